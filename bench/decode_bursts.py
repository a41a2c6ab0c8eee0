"""Batch-1 decode in bursts (engine/decode_bursts.py) against one step at a time, on
SmolLM2-135M, per serving precision: tok/s, and per token the time spent outside the model's
native calls (the engine's Python, which bursts pay once per burst instead of once per step).

Why alternated rep by rep in one process: bursts move a step by a few percent, and this shared
host drifts by tens of percent within minutes, and more between processes; the modes are switched
on the one engine between reps (`Engine.bursts.max_steps`, what `--decode-steps` sets).

    python -m bench.decode_bursts [--precisions int8,bf16,fp32] [--steps 1,4,8] [--reps 8]
                                  [--rows greedy,sampled]

Prints, per precision and mode, the median tok/s over the reps, the median of the per-rep ratios
to the first mode (each against the rep beside it), and the median ms a token outside the native
calls (wall time less the time inside the model's `burst_steps`, `embed_tokens`, `logits`,
decode stack and the step's argmax / norm / draw calls). Each rep decodes 64 tokens after its own
random 128-token prompt (no prefix cache), timed after the prompt's step: greedy, or sampled at
temperature 0.8 with the rep's seed (`--rows`; what an OpenAI client asks for by default).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.lowp_quality import PRECISIONS, smollm2_gguf
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.models.source import DEFAULT_MODEL_CACHE, resolve_model


class NativeClock:
    """Time spent inside the calls it wraps on one engine (instance attributes: this engine only)."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = 0.0
        model, ops = engine.runner.model, engine.runner.ops
        for owner, name in (
            (model, "burst_steps"),
            (model, "embed_tokens"),
            (model, "logits"),
            (ops, "rms_norm"),
            (ops, "argmax_logsumexp"),
            (ops, "draw"),
        ):
            setattr(owner, name, self._timed(getattr(owner, name)))
        stack = model.decode_stack
        if stack is not None:
            stack.native = _Timed(stack.native, self)

    def _timed(self, f: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


class _Timed:
    """The native stack with its `run` timed (the one-step path's layers)."""

    def __init__(self, native: Any, clock: NativeClock) -> None:
        self._native, self.run = native, clock._timed(native.run)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)


def rows_params(rows: str, seed: int) -> SamplingParams:
    """A rep's request: greedy, or sampled at temperature 0.8 (seeded), the OpenAI API's default
    kind of request."""
    if rows == "sampled":
        return SamplingParams(
            max_new_tokens=64, ignore_eos_token=True, do_sample=True, temperature=0.8, seed=seed
        )
    return SamplingParams(max_new_tokens=64, ignore_eos_token=True)


def one_rep(
    engine: Engine, clock: NativeClock, rng: random.Random, vocab: int, params: SamplingParams
) -> tuple[float, float]:
    """(tok/s, seconds a token outside the native calls) for one request after its prompt."""
    engine.add_request([rng.randrange(100, vocab) for _ in range(128)], params)
    engine.step()  # the prompt
    clock.seconds, tokens, start = 0.0, 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.tokens) for o in engine.step())
    wall = time.perf_counter() - start
    return tokens / wall, (wall - clock.seconds) / tokens


def run(precision: str, modes: list[int], reps: int, rows: str = "greedy") -> dict[int, dict[str, float]]:
    dtype, quantize = PRECISIONS[precision]
    cfg = EngineConfig(dtype=dtype, quantize=quantize, prefix_caching=False, max_batch_total_tokens=512)
    engine = Engine.from_pretrained(resolve_model(str(smollm2_gguf()), cache_dir=DEFAULT_MODEL_CACHE), cfg)
    clock = NativeClock(engine)
    rng, vocab = random.Random(0), engine.runner.mc.vocab_size
    rates: dict[int, list[float]] = {m: [] for m in modes}
    rest: dict[int, list[float]] = {m: [] for m in modes}
    for rep in range(reps + 1):  # the first round warms up
        for m in modes:
            engine.bursts.max_steps, engine.bursts.on = m, m > 1
            rate, outside = one_rep(engine, clock, rng, vocab, rows_params(rows, rep))
            if rep:
                rates[m].append(rate)
                rest[m].append(outside)
    base = rates[modes[0]]
    return {
        m: {
            "tok_s": statistics.median(rates[m]),
            "ratio": statistics.median(a / b for a, b in zip(rates[m], base)),
            "outside_ms": statistics.median(rest[m]) * 1e3,
        }
        for m in modes
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="int8,bf16,fp32", help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument(
        "--steps", default="1,4,8", help="decode steps a burst, per mode; the first is the reference"
    )
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rows", default="greedy,sampled", help="comma list: greedy, sampled (temperature 0.8)")
    args = ap.parse_args(argv)
    modes = [int(m) for m in args.steps.split(",")]
    print(
        f"batch-1 decode, bursts of N steps (median of {args.reps} alternated reps; ratio: paired, to N={modes[0]})"
    )
    print(
        f"{'precision':10s} {'N':>3s} {'tok/s':>8s} {'ratio':>7s} {'ms a token outside native calls':>33s} rows"
    )
    for precision in args.precisions.split(","):
        for rows in args.rows.split(","):
            for m, r in run(precision, modes, args.reps, rows).items():
                print(
                    f"{precision:10s} {m:3d} {r['tok_s']:8.1f} {r['ratio']:7.2f} {r['outside_ms']:33.3f} {rows}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
