"""The memory-bandwidth roofline for batch-1 decode.

A batch-1 decode step must stream every weight the token touches once, so
tokens/s can never exceed bandwidth ÷ bytes read per token. We measure the
bandwidth the way a decode step sees it (a reduction over a tensor much larger
than the caches) and count the bytes from the checkpoint itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import time
from pathlib import Path

import torch

from loraserve.host_allocator import zeros_on_huge_pages

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def measure_bandwidth_gbs(mib: int = 256, repeats: int = 7, device: str = "cpu") -> float:
    """Best-of-N read bandwidth in GB/s (10^9 bytes) of `sum` over a `mib`-MiB fp32 tensor.

    The tensor sits on 2 MiB pages where the OS gives them (loraserve/host_allocator.py), as the
    served weights do: a roofline is the most the machine reads, and 4 KiB pages read less (the
    TLB misses, the hardware prefetchers stopping at every page). Before session 37 the probe was
    a plain tensor, which a host whose transparent huge pages are `madvise` (the common default)
    backs with 4 KiB pages: on the 2-core Zen 3 those read 1.09-1.19 x less than 2 MiB pages (e.g.
    33.0 vs 37.5 GB/s, medians of 12 alternated best-of-7 probes; `python -m bench.roofline
    --page-sizes`, four runs), so shares of the roofline read 9-19 % high there.
    """
    n = mib * 2**20 // 4
    return _best_sum_gbs(zeros_on_huge_pages((n,), torch.float32, torch.device(device)).fill_(1.0), repeats)


class PairedProbe:
    """One read of a 64 MiB tensor (~1 ms), to bracket a decode burst of ~10 ms.

    Why: a shared host's free bandwidth flips between levels within 0.1-1 s (2-core Zen 4, one
    64 MiB read every 0.85 ms for 6 s: runs of ~30-35 and of ~55-65 GB/s, hundreds of reads
    each), so a best-of-7 probe taken seconds away from the tokens it divides tends to catch the
    fast level while the tokens ran through both. A read right before and right after each burst
    sees what the burst saw; pairs whose two reads disagree (a change of level inside the burst)
    are dropped. 64 MiB is twice the largest L3 here, so the read comes from DRAM, and it evicts
    the caches the burst would have found warm: the pairing costs the burst its warm start,
    never the other way round.
    """

    def __init__(self, mib: int = 64, device: str = "cpu") -> None:
        n = mib * 2**20 // 4
        self.x = zeros_on_huge_pages((n,), torch.float32, torch.device(device)).fill_(1.0)
        self.x.sum()  # warm the kernel

    def read_gbs(self) -> float:
        return self.x.numel() * 4 / _sum_seconds(self.x) / 1e9


def _sum_seconds(x: torch.Tensor) -> float:
    """One timed `sum` over x, with nothing queued before it on a GPU."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    x.sum().item()
    return time.perf_counter() - t0


def _best_sum_gbs(x: torch.Tensor, repeats: int) -> float:
    x.sum()  # warm the kernel
    return x.numel() * 4 / min(_sum_seconds(x) for _ in range(repeats)) / 1e9


def _safetensors_params(model_dir: Path) -> dict[str, int]:
    """Parameter count per tensor, read from safetensors headers only (no weights loaded)."""
    counts: dict[str, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            c = 1
            for d in meta["shape"]:
                c *= d
            counts[name] = c
    return counts


def weight_bytes_per_token(model_dir: str | Path, dtype: str = "float32") -> int:
    """Bytes of weights one decode step reads at `dtype`.

    The input embedding is a row lookup, not a full read, unless it is tied to the LM
    head (then the head reads the whole matrix once; it appears once in the file).
    """
    counts = _safetensors_params(Path(model_dir))
    params = sum(counts.values())
    if any(k.endswith("lm_head.weight") for k in counts):
        params -= sum(v for k, v in counts.items() if k.endswith("embed_tokens.weight"))
    return params * DTYPE_BYTES[dtype]


def roofline(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> dict:
    bw = measure_bandwidth_gbs(device=device)
    nbytes = weight_bytes_per_token(model_dir, dtype)
    return {"bandwidth_gbs": bw, "weight_bytes_per_token": nbytes, "roofline_tok_s": bw * 1e9 / nbytes}


def page_sizes(mib: int = 256, rounds: int = 12) -> dict[str, float]:
    """The probe over a plain tensor (4 KiB pages where transparent huge pages are `madvise`) and
    over 2 MiB pages, alternated round by round in one process: medians of best-of-7 GB/s, and of
    the rounds' ratios."""
    n = mib * 2**20 // 4
    plain = torch.ones(n, dtype=torch.float32)
    huge = zeros_on_huge_pages((n,), torch.float32, torch.device("cpu")).fill_(1.0)
    got: dict[str, list[float]] = {"plain": [], "huge": []}
    for r in range(rounds):
        for name in ("plain", "huge") if r % 2 == 0 else ("huge", "plain"):
            got[name].append(_best_sum_gbs(plain if name == "plain" else huge, 7))
    out = {k: statistics.median(v) for k, v in got.items()}
    out["huge/plain"] = statistics.median(h / p for h, p in zip(got["huge"], got["plain"], strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="batch-1 decode roofline of a checkpoint on this machine")
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--page-sizes", action="store_true", help="compare the probe on 4 KiB and 2 MiB pages instead"
    )
    args = ap.parse_args()
    if args.page_sizes:
        print(json.dumps(page_sizes(), indent=1))
    elif args.model_dir is None:
        ap.error("model_dir is required (or --page-sizes)")
    else:
        print(json.dumps(roofline(args.model_dir, args.dtype, args.device), indent=1))


if __name__ == "__main__":
    main()
