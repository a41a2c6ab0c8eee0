"""32 decode rows on 32 distinct rank-16 adapters over int8 or bf16 weight panels: each
projection's LoRA run between its panels (the fused pass, csrc/gemm_lowp_lora_cpu.cpp, where the
build takes it) against the two separate passes, on SmolLM2-135M, alternated rep by rep.

Why two engines in one process: the fused pass is chosen when an engine starts
(`LORASERVE_FUSED_LORA`, which the decode stack reads then), and this shared host drifts by
tens of percent within minutes; engines in separate processes would measure the drift. Each rep
runs the same 32 requests (random 128-token prompts, 64 new tokens, adapter i on request i) on
each engine and times its decode steps (every step after the prefill).

    python -m bench.lowp_lora [--isa avx2] [--precisions int8-bf16,int8] [--reps 4]

`--isa avx2` re-runs the script as on an AVX2 machine (bench/isa_env.py): where the build takes
the fused pass for these rows (the AVX2 build always; AVX-512 builds with integer or bf16 dot
products do not), the two columns differ; elsewhere both engines run the two passes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from bench.isa_env import reexec_as
from bench.llamacpp_setup import hf_base_dir, random_adapters
from bench.lowp_quality import PRECISIONS, smollm2_gguf
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.layers.ops_cpu import ENV_FUSED_LORA
from loraserve.models.source import DEFAULT_MODEL_CACHE, resolve_model

MODES = ("fused", "two passes")


def engine_for(precision: str, fused: bool) -> Engine:
    dtype, quantize = PRECISIONS[precision]
    os.environ[ENV_FUSED_LORA] = "1" if fused else "0"
    cfg = EngineConfig(
        dtype=dtype,
        quantize=quantize,
        prefix_caching=False,
        max_batch_total_tokens=32 * 200,
        max_lora_rank=16,
        adapter_memory_bytes=4 << 30,
    )
    return Engine.from_pretrained(resolve_model(str(smollm2_gguf()), cache_dir=DEFAULT_MODEL_CACHE), cfg)


def decode_step_ms(engine: Engine, prompts: list[list[int]], adapters: list) -> float:
    """The median decode step of the 32 requests, in ms."""
    params = SamplingParams(max_new_tokens=64, ignore_eos_token=True)
    for prompt, adapter in zip(prompts, adapters, strict=True):
        engine.add_request(prompt, params, adapter)
    engine.step()  # the prefill
    steps = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(steps)


def run(precision: str, adapters: list, reps: int) -> dict[str, float]:
    engines = {m: engine_for(precision, m == "fused") for m in MODES}
    rng = random.Random(0)
    vocab = engines["fused"].runner.mc.vocab_size
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(reps + 1):  # the first is a warm-up: the adapters load, the caches fill
        prompts = [[rng.randrange(100, vocab) for _ in range(128)] for _ in adapters]
        for m in MODES:
            ms = decode_step_ms(engines[m], prompts, adapters)
            if rep:
                times[m].append(ms)
    return {m: statistics.median(v) for m, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="int8-bf16,int8", help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--isa", choices=("host", "avx2"), default="host")
    args = ap.parse_args(argv)
    reexec_as(args.isa, "bench.lowp_lora")
    gguf = smollm2_gguf()
    adapters = [parse_peft_adapter(p, key=str(p)) for p in random_adapters(hf_base_dir(gguf), 32)]
    print(f"32 decode rows on 32 distinct rank-16 adapters, SmolLM2-135M, {args.isa}: median decode step, ms")
    print(f"{'precision':10s} {'fused':>8s} {'two passes':>11s} {'fused/two':>10s}")
    for precision in args.precisions.split(","):
        r = run(precision, adapters, args.reps)
        print(
            f"{precision:10s} {r['fused']:8.1f} {r['two passes']:11.1f} {r['fused'] / r['two passes']:10.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
