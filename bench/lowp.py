"""fp32 vs bf16 vs int8 weights on one shape, side by side in one run: batch-1 decode, 128-token
prompt processing and 32-request throughput, with the memory-bandwidth roofline of the weight
bytes each precision actually reads per token.

    python -m bench.lowp                       # SmolLM-135M shape, random weights (bench/shapes.py)
    python -m bench.lowp --shape qwen05 --rounds 2
    python -m bench.lowp --kernels             # per projection: our kernels vs oneDNN, by rows

Every round runs each precision once in turn (same process, same prompts), and the best round of
each is kept: on a shared box slow rounds are other people's load, and interleaving keeps the
ratios fair when the load changes during the run. Each round draws prompts of its own, and each
of its three measures its own ones: the engines cache the KV blocks of the prompts they served
(prefix caching, on by default), so a prompt seen before would be timed without its prefill.
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
    longer run over its extra time), 32-request output tok/s; prompts never served before: the
    first two for the batch-1 runs, the rest for the batch."""
    t1 = timed_generate(engine, prompts[:1], 1)
    tn = timed_generate(engine, prompts[1:2], new_tokens + 1)
    t32 = timed_generate(engine, prompts[2:], new_tokens)
    return {
        "prefill_ms": t1 * 1e3,
        "decode_tok_s": new_tokens / max(tn - t1, 1e-9),
        "throughput_tok_s": (len(prompts) - 2) * new_tokens / t32,
    }


# (name, out, in) of the SmolLM-135M projections (q|k|v and gate|up fused, as the engine runs them)
SMOLLM_PROJECTIONS = [
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]


def _best_us(fn, calls: int, budget_s: float = 0.5) -> float:
    fn()
    best, t_end = float("inf"), time.perf_counter() + budget_s
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end and i >= 3:
            break
    return best * 1e6


def _row_times(kernels, x, n: int, fp32: list, bf: list, i8: list, wb: list, calls: int) -> dict[str, float]:
    import torch.nn.functional as F

    c = len(bf)
    row = {}
    if fp32:
        row["fp32_us"] = _best_us(lambda i=0: kernels.panel_linear(x, fp32[i % c], n, None), calls)
    row["bf16_us"] = _best_us(
        lambda i=0: kernels.lowp_panel_linear(x, bf[i % c].weight, n, None, None), calls
    )
    row["int8_us"] = _best_us(
        lambda i=0: kernels.lowp_panel_linear(x, i8[i % c].weight, n, i8[i % c].scale, None), calls
    )
    row["onednn_bf16_us"] = _best_us(lambda i=0: F.linear(x.to(torch.bfloat16), wb[i % c]), calls)
    return row


def kernel_table(
    kernels, rows_list: list[int], projections=SMOLLM_PROJECTIONS, calls: int = 30
) -> list[dict]:
    """Best-of-`calls` microseconds per projection call: fp32 panels (`panel_linear`), our bf16
    and int8 panels (`lowp_panel_linear`) and oneDNN's bf16 `F.linear` (x converted per call).
    Several copies of each weight are cycled so that a call reads its weights from L3, as a
    decode step does, not from the L2 the previous call left them in."""
    from loraserve.layers.linear import pack_panels
    from loraserve.layers.quantized_linear import pack_lowp_panels

    gen = torch.Generator().manual_seed(0)
    out = []
    for name, n, k in projections:
        w = torch.randn(n, k, generator=gen) / k**0.5
        copies = max(1, min(8, (32 << 20) // (n * k * 4)))  # >= 32 MB of fp32 in flight
        fp32 = [pack_panels(w.clone()) for _ in range(copies)] if hasattr(kernels, "panel_linear") else []
        bf = [pack_lowp_panels(w, None, "bf16") for _ in range(copies)]
        i8 = [pack_lowp_panels(w, None, "int8") for _ in range(copies)]
        wb = [w.to(torch.bfloat16) for _ in range(copies)]
        for rows in rows_list:
            if name == "lm_head" and rows > 32:  # logits: decode rows and prompts' last rows only
                continue
            x = torch.randn(rows, k, generator=gen)
            row = {
                "proj": f"{name} {n}x{k}",
                "rows": rows,
                **_row_times(kernels, x, n, fp32, bf, i8, wb, calls),
            }
            out.append(row)
            print(
                f"| {row['proj']} | {rows} | "
                + " | ".join(
                    f"{row[c]:,.0f}" for c in ("fp32_us", "bf16_us", "int8_us", "onednn_bf16_us") if c in row
                )
                + " |",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm")
    ap.add_argument(
        "--model", type=Path, help="a model directory (e.g. the real SmolLM2 checkpoint) instead of --shape"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    ap.add_argument(
        "--kernels", action="store_true", help="per-projection kernel times instead (SmolLM shapes)"
    )
    ap.add_argument("--rows", default="1,4,8,32,128", help="--kernels: rows per call")
    args = ap.parse_args()
    if args.kernels:
        from loraserve.layers.native_cpu import cpu_kernels, isa

        kernels = cpu_kernels(torch.device("cpu"), torch.float32)
        assert kernels is not None, "no native kernels: run `loraserve build-kernels`"
        print(
            f"{isa(kernels)}, lowp {kernels.lowp_gemm_isa()}; {torch.get_num_threads()} threads; us per call"
        )
        print(
            "| projection | rows | fp32 panels | ours bf16 | ours int8 | oneDNN bf16 |\n|---|---|---|---|---|---|"
        )
        rows = kernel_table(kernels, [int(r) for r in args.rows.split(",")])
        if args.out:
            args.out.write_text(json.dumps({"cpu_flags": cpu_flags(), "rows": rows}, indent=1))
        return

    model_dir = args.model or build_model(args.shape)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def fresh(seed: int) -> list[list[int]]:  # a round's prompts: 2 for batch 1, then the batch
        rng = random.Random(seed)
        return [random_prompt(rng, args.prompt_tokens, vocab) for _ in range(args.requests + 2)]

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
        timed_generate(engines[name], fresh(999)[:4], 4)  # warm: page faults, oneDNN kernels
    best: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        prompts = fresh(1000 + r)  # (random.Random(-k) is Random(k): no negative seeds)
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
        f"\n{args.model or args.shape}, {args.requests} x {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens; "
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
        meta = dict(
            shape=str(args.model or args.shape),
            cpu_flags=cpu_flags(),
            bandwidth_gbs=bw,
            load_avg=os.getloadavg()[0],
        )
        args.out.write_text(json.dumps({"meta": meta, "results": best}, indent=1))


if __name__ == "__main__":
    main()
