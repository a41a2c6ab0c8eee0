"""Decode attention from the paged KV cache: our kernel against PyTorch's path (gather each
sequence's blocks, repeat the KV heads, SDPA), on the same caches in one run.

    python -m bench.decode_attention [--isa avx2] [--rows 1,32] [--context 160] [--reps 7]

Each shape runs over `--layers` caches of its own (one a layer, as a decode step walks them, so
each layer's cache is read cold after the others, as it is after a step's weights), bf16 unless
`--cache-dtype float32`:

- `smollm2`: 9 query / 3 KV heads of 64 (SmolLM2-135M), the shape of this repo's real model;
- `llama-128`: 32 query / 8 KV heads of 128 (Llama 3 8B, Mistral 7B, Qwen2.5 7B).

Prints the best of `--reps` passes over the layers, us a layer, ours and PyTorch's, and their
ratio. Why this exists: at 32 decode rows attention is ~15 % of an AVX2 int8 step on SmolLM2
(README, "Where it stands"), and a head of 128 had no register path in the AVX2 build (the
generic loop) until session 32.
`--isa avx2` re-runs the script as on an AVX2 machine (bench/isa_env.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.isa_env import reexec_as
from loraserve.layers import native_cpu

SHAPES = {"smollm2": (9, 3, 64), "llama-128": (32, 8, 128)}
BLOCK = 16


def gathered(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    """PyTorch's decode path: each sequence's blocks gathered and padded, KV heads repeated, SDPA."""
    b, hq, d = q.shape
    hkv, n = k_cache.shape[2], int(lens.max())
    k = k_cache.index_select(0, tables.flatten()).view(b, -1, hkv, d)[:, :n].float()
    v = v_cache.index_select(0, tables.flatten()).view(b, -1, hkv, d)[:, :n].float()
    k = k.repeat_interleave(hq // hkv, 2).transpose(1, 2)
    v = v.repeat_interleave(hq // hkv, 2).transpose(1, 2)
    mask = (torch.arange(n).view(1, n) < lens.view(b, 1)).view(b, 1, 1, n)
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale)
    return out.squeeze(2)


def run(kernels, shape: str, rows: int, context: int, layers: int, reps: int, dtype: torch.dtype) -> dict:
    hq, hkv, d = SHAPES[shape]
    g = torch.Generator().manual_seed(rows * 1000 + context)
    nblk = -(-context // BLOCK)
    blocks = rows * nblk + 1
    caches = [
        (
            torch.randn(blocks, BLOCK, hkv, d, generator=g).to(dtype),
            torch.randn(blocks, BLOCK, hkv, d, generator=g).to(dtype),
        )
        for _ in range(layers)
    ]
    # each sequence's blocks scattered over the cache, as a paged allocator hands them out
    tables = torch.randperm(blocks - 1, generator=g)[: rows * nblk].view(rows, nblk) + 1
    lens = torch.full((rows,), context, dtype=torch.long)
    q = torch.randn(rows, hq, d, generator=g)
    scale = d**-0.5

    def ours(kc, vc):
        return kernels.paged_decode_attention(q, kc, vc, tables, lens, scale)

    def theirs(kc, vc):
        return gathered(q, kc, vc, tables, lens, scale)

    torch.testing.assert_close(ours(*caches[0]), theirs(*caches[0]), atol=1e-4, rtol=1e-4)
    best = {"ours": float("inf"), "torch": float("inf")}
    for _ in range(reps):  # alternated pass by pass: the host's drift hits both alike
        for name, f in (("ours", ours), ("torch", theirs)):
            t0 = time.perf_counter()
            for kc, vc in caches:
                f(kc, vc)
            best[name] = min(best[name], (time.perf_counter() - t0) / layers)
    return {k: v * 1e6 for k, v in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", choices=("host", "avx2"), default="host")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = ap.parse_args(argv)
    reexec_as(args.isa, "bench.decode_attention")
    torch.set_num_threads(args.threads)
    kernels = native_cpu.cpu_kernels(torch.device("cpu"), torch.float32)
    if kernels is None:
        raise SystemExit("no native CPU kernels for these sources: run `loraserve build-kernels` first")
    dtype = getattr(torch, args.cache_dtype)
    print(
        f"decode attention, {args.cache_dtype} cache, context {args.context}, {args.threads} threads, "
        f"{args.isa} ({native_cpu.isa(kernels)}): best of {args.reps}, us a layer over {args.layers} layers"
    )
    print(f"{'shape':10s} {'rows':>5s} {'ours':>9s} {'PyTorch':>9s} {'ours/PyTorch':>13s}")
    for shape in args.shapes.split(","):
        for rows in map(int, args.rows.split(",")):
            r = run(kernels, shape, rows, args.context, args.layers, args.reps, dtype)
            print(f"{shape:10s} {rows:5d} {r['ours']:9.1f} {r['torch']:9.1f} {r['ours'] / r['torch']:13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
