"""Structured output's cost, measured side by side in one run (issue 16's benchmark).

32 concurrent requests constrained by a JSON schema against the same 32 unconstrained, on the
SmolLM-135M shape (random weights, fp32, 49k vocabulary; `bench/shapes.py`), through the engine
in-process, for each grammar backend asked for (llguidance, the default; xgrammar, the
alternative the issue names: engine/grammar_xgrammar.py, `pip install -e '.[xgrammar]'`):
- throughput ratio (generated tokens per second, constrained ÷ unconstrained; target >= 0.9);
  the batch runs alternate free and constrained, every backend in each round;
- the time to first token a *new* schema adds (its grammar compiled and matcher built on first
  use; target <= 50 ms median), as single requests with a fresh schema against the same
  requests unconstrained;
- the mask's cost per decode step (the step-time difference of the batch runs), and measured
  directly: filling the bitmask for 32 rows at different places in the schema, and building a
  matcher for a fresh schema up to its first mask (both without the model).

    python -m bench.structured                                # also run by `make bench`
    python -m bench.structured --backends llguidance,xgrammar  # the backend comparison
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.shapes import DEFAULT_CACHE, build_model, random_prompt
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.grammar import fill_bitmask
from loraserve.engine.params import ResponseFormat, SamplingParams

# a string field the random model can fill for the whole run, so both runs generate alike
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["answer", "score"],
}
#: a document of SCHEMA; the 32 mask rows sit at different prefixes of it
DOCUMENT = '{"answer": "the quick brown fox jumps over the lazy dog", "score": 1234567}'


def compilers(engine: Engine, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if name == "llguidance":
            out[name] = engine.grammars
        elif name == "xgrammar":
            from loraserve.engine.grammar_xgrammar import XGrammarCompiler

            out[name] = XGrammarCompiler(engine.tokenizer, engine.runner.vocab_size, sorted(engine.eos_ids))
        else:
            raise SystemExit(f"unknown grammar backend {name!r}")
        _ = out[name].matcher(ResponseFormat("json_object"))  # tokenizer built before timing
    return out


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


def _fresh(rng: random.Random) -> ResponseFormat:
    return ResponseFormat(
        "json_schema", dict(SCHEMA, properties={f"f_{rng.getrandbits(48)}": {"type": "string"}})
    )


def mask_fill_ms(engine: Engine, compiler: Any, rows: int, steps: int = 30) -> float:
    """Median time to fill the bitmask of `rows` matchers as a decode step does: each row at its
    own place in DOCUMENT, every matcher advanced by one token (a state whose mask is not computed
    yet: both libraries remember the last one) before each timed fill."""
    ids = engine.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    spread = len(ids) - steps - 1
    assert spread >= 0, "DOCUMENT is too short for that many steps"
    starts = [r * spread // max(rows - 1, 1) for r in range(rows)]
    matchers = [compiler.matcher(ResponseFormat("json_schema", SCHEMA)) for _ in range(rows)]
    for m, start in zip(matchers, starts):
        for t in ids[:start]:
            m.consume_token(t)
    times = []
    for step in range(steps):
        for m, start in zip(matchers, starts):
            m.consume_token(ids[start + step])
            assert not m.is_error()
        t0 = time.perf_counter()
        fill_bitmask(matchers, engine.runner.vocab_size)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def new_schema_ms(engine: Engine, compiler: Any, rng: random.Random, n: int) -> float:
    """Median time from a fresh schema to its matcher's first mask (the admission-path work)."""
    times = []
    for _ in range(n):
        fmt = _fresh(rng)
        t0 = time.perf_counter()
        fill_bitmask([compiler.matcher(fmt)], engine.runner.vocab_size)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--schemas", type=int, default=10, help="fresh schemas timed for first-token cost")
    ap.add_argument("--backends", default="llguidance", help="comma-separated: llguidance,xgrammar")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    model = build_model(args.shape, args.cache)
    # no prefix cache: the runs share their prompts, and a run after the first would otherwise
    # skip their prefill (the constrained runs come after the free one)
    engine = Engine.from_pretrained(model, EngineConfig(kv_cache_memory_bytes=1 << 30, prefix_caching=False))
    backends = compilers(engine, args.backends.split(","))
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
    for compiler in backends.values():
        engine.grammars = compiler
        _batch(engine, prompts[:2], constrained)  # warm-up, and compiles SCHEMA once
    runs: dict[str, tuple[float, int, int]] = {}
    for rnd in ("", "2"):
        runs["free" + rnd] = _batch(engine, prompts, free)
        for name, compiler in backends.items():
            engine.grammars = compiler
            runs[name + rnd] = _batch(engine, prompts, constrained)
    tps = {k: tokens / secs for k, (secs, tokens, _) in runs.items()}
    step_ms = {k: 1000 * secs / steps for k, (secs, _, steps) in runs.items()}
    free_tps, free_step = max(tps["free"], tps["free2"]), min(step_ms["free"], step_ms["free2"])
    per_backend: dict[str, dict] = {}
    for name, compiler in backends.items():
        engine.grammars = compiler
        added = []
        for i in range(args.schemas):
            new_params = SamplingParams(max_new_tokens=1, response_format=_fresh(rng))
            t_new = _first_token_s(engine, prompts[i], new_params)
            t_free = _first_token_s(engine, prompts[i], SamplingParams(max_new_tokens=1))
            added.append(1000 * (t_new - t_free))
        per_backend[name] = {
            "throughput_ratio": max(tps[name], tps[name + "2"]) / free_tps,
            "new_schema_added_ttft_ms_median": statistics.median(added),
            "mask_cost_per_step_ms": min(step_ms[name], step_ms[name + "2"]) - free_step,
            f"mask_fill_{args.n}_rows_ms": mask_fill_ms(engine, compiler, args.n),
            "new_schema_to_first_mask_ms": new_schema_ms(engine, compiler, rng, args.schemas),
        }
    report = {"shape": args.shape, "n": args.n, "tokens_per_s": tps, "step_ms": step_ms, **per_backend}
    if list(backends) == ["llguidance"]:  # the single-backend report's keys, as before
        report.update(per_backend["llguidance"])
    print("| run | tok/s | ms/step |\n|---|---|---|")
    for k in runs:
        print(f"| {k} | {tps[k]:.1f} | {step_ms[k]:.1f} |")
    print(
        f"\n| backend | constrained ÷ free (>= 0.9) | new schema +TTFT ms (<= 50) | mask ms/step "
        f"| fill {args.n} rows ms | new schema -> first mask ms |\n|---|---|---|---|---|---|"
    )
    for name, r in per_backend.items():
        print(
            f"| {name} | {r['throughput_ratio']:.2f} | {r['new_schema_added_ttft_ms_median']:.1f} "
            f"| {r['mask_cost_per_step_ms']:.2f} | {r[f'mask_fill_{args.n}_rows_ms']:.2f} "
            f"| {r['new_schema_to_first_mask_ms']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
