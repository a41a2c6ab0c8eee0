"""Our engine with each build of the native CPU kernels side by side in one run: the host's own
(`-march=native`, AVX-512 on the CI box) and the AVX2+FMA one (`-march=x86-64-v3`, what an AMD
Zen 2/3 or an older Xeon runs), plus transformers+peft once as the common baseline.

Why a separate script instead of a flag on `run_all`: the figures that matter per build are few
(workload (a) at N = 32 on the base model and with 32 distinct adapters, and batch-1 decode), and
comparing builds is only fair within one run on this shared machine. The builds are selected
the way a server selects them, by `LORASERVE_NATIVE_MARCH` in the runner's environment.

    python -m bench.kernel_builds [--marches native,x86-64-v3] [--ns 32] [--repeats 2] [--no-hf]
                                  [--threads 1] [--no-batch1] [--fused-lora both]
                                  [--adapter-dtype both] [--back-to-back]

Ours runs base and distinct in turns, one repetition each per round, and reports distinct/base
as the median of the rounds' ratios (`--back-to-back`: each run's repetitions in a row, the ratio
of the two bests, as before).

`--threads` sets the runners' OMP_NUM_THREADS (pin the whole run with `taskset` for quiet figures);
`--fused-lora both` runs ours twice per build, with the fused base + LoRA decode pass
(csrc/gemm_lora_cpu.cpp `panel_lora_linear`) and with the two separate passes (`ours-<isa>-2pass`);
`--adapter-dtype both` adds ours with bf16 LoRA tables over the same fp32 model
(`ours-<isa>-bf16lora`, `--adapter-dtype bfloat16` of the server): the workload's targets are
for fp32 tables, whose bytes bound the distinct-adapter run on hosts with little bandwidth per core,
and this row says what halving them buys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from bench.isa_env import AVX2_TORCH_ENV
from bench.metrics import RunResult
from bench.roofline import roofline
from bench.run_all import Bench
from bench.shapes import DEFAULT_CACHE, REPO_ROOT, build_model
from bench.workloads import Model, concurrency_runs
from loraserve.layers import native_cpu
from loraserve.layers.ops_cpu import ENV_FUSED_LORA


def build_env(build: dict) -> dict[str, str]:
    env = {native_cpu.ENV_MARCH: build["march"]}
    return env | (AVX2_TORCH_ENV if build["isa"] == "avx2" else {})


@contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    """The runner subprocesses inherit this environment: their engine loads that build."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_info(march: str) -> dict:
    """Build `march` if missing (a bench may compile; a server never does) and say what it is."""
    result = native_cpu.build(march=march)
    if not result.ok:
        raise SystemExit(f"kernels for -march={march} did not build: {result.detail}")
    kernels = native_cpu.cpu_kernels(torch.device("cpu"), torch.float32, march)
    assert kernels is not None
    return {"march": march, "isa": native_cpu.isa(kernels), "library": str(result.path)}


def cpu_flags() -> str:
    """The SIMD flags of the host, for the tables (an AVX2 build here still runs on this CPU)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            keep = ("avx", "fma", "amx", "f16c")
            return " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(keep))
    return platform.processor()


def _f(v: float | None, fmt: str = "{:8.1f}") -> str:
    return fmt.format(v) if v is not None else "       -"


def round_ratios(distinct: RunResult | None, base: RunResult | None) -> list[float]:
    """distinct / base of each round where the two ran in turns (ours with --repeats > 1)."""
    if distinct is None or base is None:
        return []
    d, b = distinct.extra.get("rounds_tok_s", []), base.extra.get("rounds_tok_s", [])
    return [x / y for x, y in zip(d, b, strict=False) if y] if len(d) == len(b) > 1 else []


def table(results: list[RunResult], isas: list[str], ns: list[int], roof: float) -> str:
    """Per build: ours and transformers+peft (held to the same ISA) on the same requests. Where
    base and distinct ran in turns, distinct/base is the median of the rounds' ratios (each round
    listed below the table), not a ratio of two bests that may come from different minutes."""
    by = {(r.system, r.run): r.tok_s for r in results}
    full = {(r.system, r.run): r for r in results}
    rounds: list[str] = []
    lines = []
    for n in ns:
        base, dist = f"a/N={n}/base", f"a/N={n}/distinct"
        lines.append(
            f"\nN = {n}, tok/s       base  distinct  distinct/base  x hf+peft distinct  batch-1  b1/roofline"
        )
        for isa in isas:
            ours = dict.fromkeys(r.system for r in results if r.system.startswith(f"ours-{isa}"))
            for label in [*ours, f"hf-{isa}"]:
                if not any(r.system == label for r in results):
                    continue
                system = label.split("-")[0]
                b, d, b1 = by.get((label, base)), by.get((label, dist)), by.get((label, "batch1_decode"))
                hf = by.get((f"hf-{isa}", dist)) if system != "hf" else None
                ratios = round_ratios(full.get((label, dist)), full.get((label, base)))
                ratio = statistics.median(ratios) if ratios else (d / b if b and d else None)
                if ratios:
                    rounds.append(
                        f"{label} N={n} distinct/base by round: " + " ".join(f"{r:.2f}" for r in ratios)
                    )
                lines.append(
                    f"{label:16s} {_f(b)}  {_f(d)}       {_f(ratio, '{:8.2f}')}"
                    f"            {_f(d / hf if d and hf else None, '{:8.2f}')}  {_f(b1)}"
                    f"     {_f(b1 / roof if b1 else None, '{:8.2f}')}"
                )
    return "\n".join(lines + ([""] + rounds if rounds else []))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--marches", default="native,x86-64-v3", help="comma list of -march builds to compare")
    ap.add_argument("--ns", default="32", help="comma list of workload (a) N values")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions per run; best kept")
    ap.add_argument(
        "--back-to-back",
        action="store_true",
        help="ours repeats each run in a row instead of base and distinct in turns (the default)",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers+peft baseline")
    ap.add_argument("--no-batch1", action="store_true", help="skip the batch-1 decode run")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every runner")
    ap.add_argument(
        "--fused-lora",
        choices=["on", "off", "both"],
        default="on",
        help="ours with the fused base + LoRA decode pass, the two separate passes, or both",
    )
    ap.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16", "both"],
        default="float32",
        help="our LoRA tables: fp32 (the workload's), bf16 (label -bf16lora), or both",
    )
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the runner subprocesses inherit it
    marches = args.marches.split(",")
    ns = [int(x) for x in args.ns.split(",")]
    builds = [build_info(m) for m in marches]
    model_dir = build_model("smollm", args.cache)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    bench = Bench(Model(model_dir, vocab, args.cache), ["ours", "hf"], args.repeats)
    runs = [
        r
        for r in concurrency_runs(bench.model, ns, args.prompt_len, args.new_tokens)
        if r.name.endswith(("/base", "/distinct"))
    ]
    batch1 = None if args.no_batch1 else {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    spec = replace(bench.spec(runs, batch1=batch1), interleave=not args.back_to_back)
    t0 = time.time()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "builds": builds,
        "ns": ns,
        "repeats": args.repeats,
        "interleave": not args.back_to_back,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join(["python -m bench.kernel_builds", *(argv if argv is not None else sys.argv[1:])]),
    }
    roof = roofline(model_dir)
    out = args.out or REPO_ROOT / "bench" / "results" / f"kernel-builds-{int(t0)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> dict:
        """Written after every system, so a run cut short keeps what it measured."""
        meta.update(duration_s=time.time() - t0, loadavg_end=os.getloadavg())
        text = table(bench.results, [b["isa"] for b in builds], ns, roof["roofline_tok_s"])
        text += (
            f"\nbatch-1 roofline: {roof['roofline_tok_s']:.1f} tok/s ({roof['bandwidth_gbs']:.1f} GB/s read)"
        )
        report = {
            "meta": meta,
            "roofline": roof,
            "results": [r.to_json() for r in bench.results],
            "notes": bench.notes,
            "table": text,
        }
        out.write_text(json.dumps(report, indent=1))
        return report

    # ours on every build first (the figures compared), then the baseline on each
    fused = {"on": [True], "off": [False], "both": [True, False]}[args.fused_lora]
    tables = {"float32": ["float32"], "bfloat16": ["bfloat16"], "both": ["float32", "bfloat16"]}
    ours = [(on, t) for t in tables[args.adapter_dtype] for on in fused]  # variants of ours per build
    for system in ["ours"] if args.no_hf else ["ours", "hf"]:
        for b in builds:
            for on, lora_dtype in ours if system == "ours" else [(True, "float32")]:
                b["env"] = build_env(b)
                env = b["env"] if on else b["env"] | {ENV_FUSED_LORA: "0"}
                suffix = "" if on or args.fused_lora == "off" else "-2pass"
                suffix += "-bf16lora" if lora_dtype == "bfloat16" else ""
                run_spec = replace(spec, adapter_dtype=lora_dtype if system == "ours" else None)
                with patched_env(env):
                    label = f"{system}{suffix} with the {b['isa']} build ({env})"
                    for r in bench.run(label, run_spec, [system]):
                        r.system = f"{system}-{b['isa']}{suffix}"
                save()
    report = save()
    print(f"host flags: {meta['cpu_flags']}\n{report['table']}\n\nwritten to {out}")
    return report


if __name__ == "__main__":
    main()
