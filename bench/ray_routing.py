"""Adapter-aware routing on Ray Serve vs Ray's plain routing, measured side by side in one run.

    python -m bench.ray_routing            # = make bench-ray
    python -m bench.ray_routing --requests 500 --concurrency 8

Zipf(alpha=1) traffic over 200 tiny random PEFT adapters of the demo model (built into a temp
dir), 2 replicas that each hold 16 adapters (16 adapter slots = `max_num_models_per_replica`,
and by default a host cache sized to 16 adapters, so an adapter that leaves a replica's LRU is
read from disk again when it comes back; `--host-cache-adapters 200` keeps every adapter read). The same request sequence runs twice on fresh replicas:
`routing=adapter` (Ray Serve model multiplexing keyed by the adapter) and `routing=plain` (the
same deployment, requests sent without a multiplexed id: Ray's power-of-two-choices routing).

Reported per routing: the replicas' adapter LRU hit rate, LRU misses and cold loads (adapters
read from disk by a replica's store) per 1,000 requests, and p50/p99 time to first token
(streamed, measured at the client). Goals (issue 20): >= 90% hit rate, >= 3x fewer cold loads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.metrics import percentile
from bench.workloads import zipf_indices

MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"
TEMPLATE = MODEL.parent / "adapters" / "upper"  # a PEFT adapter of the demo model: names and shapes
PROMPT = "<|user|>hello there<|assistant|>"


def make_adapters(out: Path, count: int, rank: int) -> list[Path]:
    """`count` random PEFT LoRA adapters shaped like the demo's, written with safetensors only
    (no transformers/peft: `make bench-ray` needs just the `ray` extra), seeded by index."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((TEMPLATE / "adapter_config.json").read_text()) | {"r": rank, "lora_alpha": 2 * rank}
    with safe_open(str(TEMPLATE / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, (rows, cols) in shapes.items():
            shape = (rank, cols) if ".lora_A." in name else (rows, rank)
            tensors[name] = torch.randn(shape, generator=g) * (0.5 / shape[-1] ** 0.5)
        path = out / f"adapter-{i:03d}"
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(path / "adapter_model.safetensors"))
        paths.append(path)
    return paths


async def _one(client: httpx.AsyncClient, adapter: str, new_tokens: int) -> float | None:
    """Time to the first streamed token in seconds; None when the request failed."""
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": new_tokens}}
    start = time.perf_counter()
    async with client.stream("POST", "/generate_stream", json=body) as r:
        first = None
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                if "error" in json.loads(line[5:]):
                    return None
                first = first or time.perf_counter() - start
    return first if r.status_code == 200 else None


async def _drive(url: str, adapters: list[str], concurrency: int, new_tokens: int) -> tuple[list[float], int]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for a in adapters:
        queue.put_nowait(a)
    ttfts: list[float] = []
    failed = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failed
        while not queue.empty():
            t = await _one(client, queue.get_nowait(), new_tokens)
            if t is None:
                failed += 1
            else:
                ttfts.append(t)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return ttfts, failed


def _counts(url: str) -> dict[str, int]:
    """Sum over replicas of the LRU counters and store loads, once every replica has reported."""
    time.sleep(2.5)  # replicas push their counters every second
    reps = httpx.get(url + "/metrics", headers={"accept": "application/json"}, timeout=30).json()["replicas"]
    out = {"hits": 0, "misses": 0, "cold_loads": 0, "replicas": len(reps)}
    for rep in reps:
        out["hits"] += rep["counts"]["hits"]
        out["misses"] += rep["counts"]["misses"]
        out["cold_loads"] += rep["store"]["loads"]
    return out


def run_routing(
    routing: str, sequence: list[str], adapter_bytes: int, args: argparse.Namespace, port: int
) -> dict[str, Any]:
    from ray import serve

    from loraserve.distributed import build_app

    app = build_app(
        model=str(MODEL),
        replicas=2,
        routing=routing,
        adapter_source="local",
        max_active_adapters=args.slots,
        adapter_host_cache_bytes=(args.host_cache_adapters or args.slots) * adapter_bytes,
        max_adapters_per_replica=args.lru_adapters,
        max_lora_rank=args.rank,
        adapter_memory_fraction=1.0,
        num_threads=1,
        max_batch_total_tokens=16384,
    )
    serve.run(app, name="loraserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    # Warm-up requests fill the caches and are not counted: cold loads of first touches are the
    # same for any routing, what routing changes is how often a warm cluster reads from disk again.
    before = {"hits": 0, "misses": 0, "cold_loads": 0}
    if args.warmup:
        asyncio.run(_drive(url, sequence[: args.warmup], args.concurrency, args.new_tokens))
        before = _counts(url)
    measured = sequence[args.warmup :]
    start = time.perf_counter()
    ttfts, failed = asyncio.run(_drive(url, measured, args.concurrency, args.new_tokens))
    wall = time.perf_counter() - start
    counts = _counts(url)
    for key in ("hits", "misses", "cold_loads"):
        counts[key] -= before[key]
    serve.delete("loraserve")
    n = len(measured)
    return {
        "routing": routing,
        "requests": n,
        "failed": failed,
        "wall_s": wall,
        "hit_rate": counts["hits"] / max(counts["hits"] + counts["misses"], 1),
        "lru_misses_per_1000": 1000 * counts["misses"] / n,
        "cold_loads_per_1000": 1000 * counts["cold_loads"] / n,
        "ttft_p50_ms": 1000 * (percentile(ttfts, 50) or 0.0),
        "ttft_p99_ms": 1000 * (percentile(ttfts, 99) or 0.0),
        "replicas_reporting": counts["replicas"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--slots", type=int, default=16, help="adapters each replica holds")
    p.add_argument(
        "--host-cache-adapters",
        type=int,
        help="adapters each replica's host cache holds (default: --slots; more makes LRU misses slot "
        "swaps from host memory and cold loads only first reads from disk)",
    )
    p.add_argument(
        "--lru-adapters",
        type=int,
        help="keys each replica's multiplexed LRU keeps (default: --slots; set it to the host cache "
        "size so routing follows what a replica holds in host memory)",
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="first requests of the sequence sent but not counted (steady state: caches warm)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="loraserve-ray-bench-") as tmp:
        paths = make_adapters(Path(tmp), args.adapters, args.rank)
        adapter_bytes = (paths[0] / "adapter_model.safetensors").stat().st_size
        picks = zipf_indices(random.Random(args.seed), args.requests, args.adapters, args.alpha)
        sequence = [str(paths[i]) for i in picks]
        # Ray's own memory monitor kills actors when the *machine* is over 95% used, which on a
        # shared box is other people's processes; the kernel's OOM killer still guards the box.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with socket.socket() as sock:  # a free loopback port for Serve's HTTP proxy
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            rows = [run_routing(r, sequence, adapter_bytes, args, port) for r in ("adapter", "plain")]
        finally:
            serve.shutdown()
            ray.shutdown()
    ours, plain = rows
    lines = [
        f"Ray Serve routing: {args.requests} requests ({args.warmup} of them warm-up, not counted), Zipf(alpha={args.alpha}) over {args.adapters} adapters "
        f"(rank {args.rank}), 2 replicas x {args.slots} adapter slots, host cache "
        f"{args.host_cache_adapters or args.slots} adapters, Ray LRU {args.lru_adapters or args.slots} keys, "
        f"concurrency {args.concurrency}, "
        f"{args.new_tokens} new tokens each, demo model, seed {args.seed}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| routing | hit rate | LRU misses / 1k | cold loads / 1k | p50 TTFT ms | p99 TTFT ms | failed | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['routing']} | {r['hit_rate']:.1%} | {r['lru_misses_per_1000']:.0f} | "
            f"{r['cold_loads_per_1000']:.0f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
            f"{r['failed']} | {r['wall_s']:.1f} |"
        )
    fewer = plain["cold_loads_per_1000"] / max(ours["cold_loads_per_1000"], 1e-9)
    weights = sorted((1.0 / (i + 1) ** args.alpha for i in range(args.adapters)), reverse=True)
    held = 2 * (args.lru_adapters or args.slots)  # keys both replicas' LRUs hold together
    bound = sum(weights[:held]) / sum(weights)  # the best any cache of that size can do
    lines += [
        "",
        f"cold loads: plain / adapter-aware = {fewer:.2f}x (goal >= 3x); "
        f"hit rate {ours['hit_rate']:.1%} vs {plain['hit_rate']:.1%} (goal >= 90%); "
        f"p99 TTFT adapter-aware / plain = {ours['ttft_p99_ms'] / max(plain['ttft_p99_ms'], 1e-9):.2f}",
        f"bound: a cache that always held the {held} most popular adapters would hit "
        f"{bound:.1%} of this traffic (no routing can beat it with {held} adapters held in all)",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
