"""Structured output's cost, measured side by side in one run (issue 16's benchmark).

32 concurrent requests constrained by a JSON schema against the same 32 unconstrained, on the
SmolLM-135M shape (random weights, fp32; `bench/shapes.py`), through the engine in-process:
- throughput ratio (generated tokens per second, constrained ÷ unconstrained; target >= 0.9);
- the time to first token a *new* schema adds (grammar compiled on first use; target <= 50 ms
  median), as single requests with a fresh schema against the same requests unconstrained;
- the mask's cost per decode step (the step-time difference of the two batch runs).

    python -m bench.structured            # also run by `make bench`
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from bench.shapes import DEFAULT_CACHE, build_model, random_prompt
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import ResponseFormat, SamplingParams

# a string field the random model can fill for the whole run, so both runs generate alike
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["answer", "score"],
}


def _batch(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, int]:
    """(seconds, generated tokens, steps) for all prompts in one continuous batch."""
    steps0 = engine.steps
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(r.tokens) for r in results), engine.steps - steps0


def _first_token_s(engine: Engine, prompt: list[int], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    engine.generate([prompt], params)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--schemas", type=int, default=10, help="fresh schemas timed for first-token cost")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    model = build_model(args.shape, args.cache)
    engine = Engine.from_pretrained(model, EngineConfig(kv_cache_memory_bytes=1 << 30))
    rng = random.Random(0)
    vocab = engine.runner.vocab_size
    prompts = [random_prompt(rng, args.prompt_len, min(vocab, 4096)) for _ in range(args.n)]
    free = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos_token=True)
    constrained = SamplingParams(
        max_new_tokens=args.new_tokens,
        ignore_eos_token=True,
        response_format=ResponseFormat(type="json_schema", schema=SCHEMA),
    )
    _batch(engine, prompts[:2], free)  # warm-up (kernels, allocator)
    _batch(engine, prompts[:2], constrained)  # warm-up, and compiles SCHEMA once
    runs = {}
    for name, params in (("free", free), ("schema", constrained), ("free2", free), ("schema2", constrained)):
        runs[name] = _batch(engine, prompts, params)
    tps = {k: tokens / secs for k, (secs, tokens, _) in runs.items()}
    step_ms = {k: 1000 * secs / steps for k, (secs, _, steps) in runs.items()}
    free_tps, schema_tps = max(tps["free"], tps["free2"]), max(tps["schema"], tps["schema2"])
    added = []
    for i in range(args.schemas):
        fresh = dict(SCHEMA, properties={f"field_{i}_{rng.getrandbits(32)}": {"type": "string"}})
        new_params = SamplingParams(
            max_new_tokens=1, response_format=ResponseFormat(type="json_schema", schema=fresh)
        )
        t_new = _first_token_s(engine, prompts[i], new_params)
        t_free = _first_token_s(engine, prompts[i], SamplingParams(max_new_tokens=1))
        added.append(1000 * (t_new - t_free))
    report = {
        "shape": args.shape,
        "n": args.n,
        "tokens_per_s": tps,
        "step_ms": step_ms,
        "throughput_ratio": schema_tps / free_tps,
        "new_schema_added_ttft_ms_median": statistics.median(added),
        "mask_cost_per_step_ms": min(step_ms["schema"], step_ms["schema2"])
        - min(step_ms["free"], step_ms["free2"]),
    }
    print("| run | tok/s | ms/step |\n|---|---|---|")
    for k in runs:
        print(f"| {k} | {tps[k]:.1f} | {step_ms[k]:.1f} |")
    print(
        f"\nconstrained ÷ unconstrained throughput: {report['throughput_ratio']:.2f} (target >= 0.9)\n"
        f"new-schema added time to first token, median of {args.schemas}: "
        f"{report['new_schema_added_ttft_ms_median']:.1f} ms (target <= 50)\n"
        f"mask cost per decode step ({args.n} rows): {report['mask_cost_per_step_ms']:.2f} ms"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
