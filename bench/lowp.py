"""fp32 vs bf16 vs int8 weights on one shape, side by side in one run: batch-1 decode, 128-token
prompt processing and 32-request throughput, with the memory-bandwidth roofline of the weight
bytes each precision actually reads per token.

    python -m bench.lowp                       # SmolLM-135M shape, random weights (bench/shapes.py)
    python -m bench.lowp --shape qwen05 --rounds 2

Every round runs each precision once in turn (same process, same prompts), and the best round of
each is kept: on a shared box slow rounds are other people's load, and interleaving keeps the
ratios fair when the load changes during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from bench.roofline import measure_bandwidth_gbs, weight_bytes_per_token
from bench.shapes import build_model, random_prompt
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams

# --dtype / --quantize of each column; bytes per weight read by a decode step
PRECISIONS = {"fp32": ("float32", None, 4), "bf16": ("bfloat16", None, 2), "int8": ("float32", "int8", 1)}


def cpu_flags() -> str:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    try:
        flags = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in wanted if f in flags)


def timed_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos_token=True)
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - t0


def measure(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """prefill s (one 128-token prompt + 1 token), batch-1 decode tok/s (the extra tokens of a
    longer run over its extra time), 32-request output tok/s."""
    one = [prompts[0]]
    t1 = timed_generate(engine, one, 1)
    tn = timed_generate(engine, one, new_tokens + 1)
    t32 = timed_generate(engine, prompts, new_tokens)
    return {
        "prefill_ms": t1 * 1e3,
        "decode_tok_s": new_tokens / max(tn - t1, 1e-9),
        "throughput_tok_s": len(prompts) * new_tokens / t32,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args()

    model_dir = build_model(args.shape)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [random_prompt(rng, args.prompt_tokens, vocab) for _ in range(args.requests)]
    names = args.precisions.split(",")
    engines = {}
    for name in names:
        dtype, quantize, _ = PRECISIONS[name]
        cfg = EngineConfig(
            dtype=dtype,
            quantize=quantize,
            max_total_tokens=1024,
            kv_cache_memory_bytes=1 << 30,
            adapter_memory_bytes=64 << 20,
        )
        engines[name] = Engine.from_pretrained(model_dir, cfg)
        timed_generate(engines[name], prompts[:4], 4)  # warm: page faults, oneDNN kernels
    best: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        for name in names:
            m = measure(engines[name], prompts, args.new_tokens)
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()), flush=True)
            b = best.setdefault(name, dict(m))
            b["prefill_ms"] = min(b["prefill_ms"], m["prefill_ms"])
            b["decode_tok_s"] = max(b["decode_tok_s"], m["decode_tok_s"])
            b["throughput_tok_s"] = max(b["throughput_tok_s"], m["throughput_tok_s"])
    bw = measure_bandwidth_gbs()
    params = weight_bytes_per_token(model_dir, "float32") // 4
    base = best[names[0]]
    print(
        f"\n{args.shape}, {args.requests} x {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens; "
        f"best of {args.rounds} interleaved rounds; {torch.get_num_threads()} threads; machine shared, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"CPU flags: {cpu_flags()}; read bandwidth {bw:.1f} GB/s; {params / 1e6:.1f} M weights read per token"
    )
    print(
        f"| weights | ops | batch-1 decode tok/s | vs {names[0]} | roofline tok/s | of roofline "
        f"| 128-token prefill ms | {args.requests}-request tok/s | vs {names[0]} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        b = best[name]
        roof = bw * 1e9 / (params * PRECISIONS[name][2])
        b.update(roofline_tok_s=roof, ops=engines[name].ops_name)
        print(
            f"| {name} | {b['ops']} | {b['decode_tok_s']:.1f} | {b['decode_tok_s'] / base['decode_tok_s']:.2f}x "
            f"| {roof:.0f} | {b['decode_tok_s'] / roof:.2f} | {b['prefill_ms']:.0f} | {b['throughput_tok_s']:.1f} "
            f"| {b['throughput_tok_s'] / base['throughput_tok_s']:.2f}x |"
        )
    if args.out:
        meta = dict(shape=args.shape, cpu_flags=cpu_flags(), bandwidth_gbs=bw, load_avg=os.getloadavg()[0])
        args.out.write_text(json.dumps({"meta": meta, "results": best}, indent=1))


if __name__ == "__main__":
    main()
