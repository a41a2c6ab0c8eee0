"""Batch-1 decode under one adapter: the decode stack's threads splitting its deltas against one
thread adding them, beside the base model, on SmolLM2-135M in every serving precision.

Why alternated rep by rep in one process: the split (csrc/region_lora.h) moves a step by a few
percent, and this shared host drifts by tens of percent within minutes; three engines in three
processes would measure the drift. The split is switched on the one engine between reps
(`DecodeStack.set_lora_split`, what `LORASERVE_REGION_LORA_SPLIT=0` sets at start-up).

    python -m bench.adapter_decode [--precisions int8,bf16,fp32] [--reps 6] [--adapter DIR]

Prints, per precision, the median tok/s of each (split, one thread, base) over the reps and the
ratios split ÷ one thread and split ÷ base; each rep decodes 64 greedy tokens after its own
random 128-token prompt (no prefix cache), timed from the first token to the last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from bench.lowp_quality import PRECISIONS, smollm2_gguf
from bench.shapes import REPO_ROOT
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.models.source import DEFAULT_MODEL_CACHE, resolve_model

DEFAULT_ADAPTER = REPO_ROOT / "demo" / "smollm2" / "adapters" / "date"  # rank 8, all seven projections
MODES = ("split", "one thread", "base")


def decode_rate(engine: Engine, rng: random.Random, adapter: LoraAdapter | None, vocab: int) -> float:
    params = SamplingParams(max_new_tokens=64, ignore_eos_token=True)
    engine.add_request([rng.randrange(100, vocab) for _ in range(128)], params, adapter)
    marks: list[tuple[float, int]] = []  # (when, tokens): a decode burst emits several at once
    while engine.has_unfinished():
        n = sum(len(o.tokens) for o in engine.step())
        if n:
            marks.append((time.perf_counter(), n))
    return sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])


def run(precision: str, adapter: LoraAdapter, reps: int) -> dict[str, float]:
    dtype, quantize = PRECISIONS[precision]
    cfg = EngineConfig(dtype=dtype, quantize=quantize, prefix_caching=False, max_batch_total_tokens=512)
    engine = Engine.from_pretrained(resolve_model(str(smollm2_gguf()), cache_dir=DEFAULT_MODEL_CACHE), cfg)
    stack = engine.runner.model.decode_stack
    if stack is None:
        raise SystemExit(f"{precision}: no native decode stack here (build the kernels first)")
    rng, vocab = random.Random(0), engine.runner.mc.vocab_size
    decode_rate(engine, rng, adapter, vocab)  # warm-up: the adapter loads, the caches fill
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(reps):
        for mode in MODES:
            stack.native.set_lora_split(mode != "one thread")
            rates[mode].append(decode_rate(engine, rng, None if mode == "base" else adapter, vocab))
    stack.native.set_lora_split(True)
    return {m: statistics.median(v) for m, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="int8,bf16,fp32", help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    args = ap.parse_args(argv)
    adapter = parse_peft_adapter(args.adapter, key=str(args.adapter))
    print(f"batch-1 decode under {args.adapter.name}, tok/s (median of {args.reps} alternated reps)")
    print(
        f"{'precision':10s} {'split':>8s} {'one thread':>11s} {'base':>8s} {'split/one':>10s} {'split/base':>11s}"
    )
    for precision in args.precisions.split(","):
        r = run(precision, adapter, args.reps)
        print(
            f"{precision:10s} {r['split']:8.1f} {r['one thread']:11.1f} {r['base']:8.1f} "
            f"{r['split'] / r['one thread']:10.2f} {r['split'] / r['base']:11.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
