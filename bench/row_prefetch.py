"""Batch-1 decode with each prefetch hint of the one-row weight streams, alternated rep by rep in
one process, on SmolLM2-135M in the low-precision serving modes.

Why: the hint a streaming row wants differs by CPU (layers/csrc/row_prefetch.h: L2 on Intel,
L1 on AMD Zen 3 and Zen 5, none in Zen 4's AVX-512 build, where the L2 hint slowed the stream by
a third and the L1 hint by a sixth at ~60 GB/s), and this shared host's bandwidth drifts by
tens of percent within minutes, so modes measured in separate processes measure the drift. The
library's choice for this CPU is the row marked `*`; the mode is switched on the one engine between
reps (`set_row_prefetch`, what `LORASERVE_ROW_PREFETCH=off|t0|t1` sets at start-up).

    python -m bench.row_prefetch [--precisions bf16,int8] [--threads 1,2] [--reps 6]

Prints, per precision and thread count, the median tok/s of each mode over the reps; each rep
decodes 64 greedy tokens after its own random 128-token prompt (no prefix cache), timed from the
first token to the last (bench/adapter_decode.py's `decode_rate`).
"""

from __future__ import annotations

import argparse
import random
import statistics

from bench.adapter_decode import decode_rate
from bench.lowp_quality import PRECISIONS, smollm2_gguf
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.models.source import DEFAULT_MODEL_CACHE, resolve_model

MODES = {"off": 0, "t0": 1, "t1": 2}


def run(precision: str, threads: int, reps: int) -> tuple[dict[str, float], str]:
    dtype, quantize = PRECISIONS[precision]
    cfg = EngineConfig(
        dtype=dtype, quantize=quantize, num_threads=threads, prefix_caching=False, max_batch_total_tokens=512
    )
    engine = Engine.from_pretrained(resolve_model(str(smollm2_gguf()), cache_dir=DEFAULT_MODEL_CACHE), cfg)
    native = getattr(engine.runner.ops, "kernels", None)  # the module the engine loaded
    if native is None:
        raise SystemExit(f"{precision}: no native CPU kernels here (build the kernels first)")
    chosen = next(m for m, v in MODES.items() if v == native.row_prefetch())
    rng, vocab = random.Random(0), engine.runner.mc.vocab_size
    decode_rate(engine, rng, None, vocab)  # warm-up
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(reps):
        for mode, value in MODES.items():
            native.set_row_prefetch(value)
            rates[mode].append(decode_rate(engine, rng, None, vocab))
    native.set_row_prefetch(MODES[chosen])
    return {m: statistics.median(v) for m, v in rates.items()}, chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="bf16,int8", help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args(argv)
    print(f"batch-1 decode, tok/s (median of {args.reps} alternated reps); * = this CPU's default")
    print(f"{'precision':10s} {'threads':>7s} " + " ".join(f"{m:>8s}" for m in MODES))
    for precision in args.precisions.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            r, chosen = run(precision, threads, args.reps)
            cells = " ".join(f"{r[m]:7.1f}{'*' if m == chosen else ' '}" for m in MODES)
            print(f"{precision:10s} {threads:7d} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
