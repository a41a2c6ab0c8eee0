"""`make bench`: every workload on our engine and its peers, side by side, in one run.

Each system runs in its own subprocess (vLLM in its own venv), so peak memory is per
system and no system inherits another's threads or allocator state. Results are
printed as tables of raw figures and of paired ratios, and written to JSON.

    python -m bench.run_all [--quick] [--shape smollm|qwen05|demo] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.baseline_vllm import run_vllm, vllm_python
from bench.metrics import RunResult
from bench.report import compute_ratios, format_report
from bench.roofline import roofline
from bench.shapes import DEFAULT_CACHE, REPO_ROOT, build_model
from bench.spec import BenchSpec, RunSpec
from bench.workloads import Model, cold_load_runs, concurrency_runs, zipf_runs

SYSTEMS = ("ours", "hf", "vllm")
MODULES = {"ours": "bench.engine_runs", "hf": "bench.baseline_hf"}


@dataclass
class Plan:
    """Sizes of every workload; `--quick` shrinks them to a smoke test of a few minutes."""

    ns: list[int]
    prompt_len: int
    new_tokens: int
    zipf_requests: int
    zipf_prompt: tuple[int, int]
    zipf_new: tuple[int, int]
    cold_background: int
    cold_late: int
    cold_background_tokens: int
    cold_late_tokens: int
    cold_interval_s: float
    batch1: dict = field(default_factory=lambda: {"prompt_len": 128, "new_tokens": 64})
    mixed_ranks: bool = True


FULL = Plan(
    ns=[1, 8, 32, 64],
    prompt_len=128,
    new_tokens=64,
    zipf_requests=64,
    zipf_prompt=(64, 512),
    zipf_new=(32, 256),
    cold_background=16,
    cold_late=8,
    cold_background_tokens=256,
    cold_late_tokens=32,
    cold_interval_s=0.5,
)
QUICK = Plan(
    ns=[1, 8],
    prompt_len=64,
    new_tokens=16,
    zipf_requests=12,
    zipf_prompt=(64, 128),
    zipf_new=(16, 32),
    cold_background=4,
    cold_late=3,
    cold_background_tokens=48,
    cold_late_tokens=8,
    cold_interval_s=0.3,
    batch1={"prompt_len": 64, "new_tokens": 16},
    mixed_ranks=False,
)


def run_in_subprocess(system: str, spec: BenchSpec, timeout_s: float = 3600) -> list[RunResult]:
    """Run `spec` on `system` in a fresh interpreter; vLLM goes through its own venv."""
    if system == "vllm":
        return run_vllm(spec, timeout_s)
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.save(spec_path)
        proc = subprocess.run(
            [sys.executable, "-m", MODULES[system], str(spec_path), str(out_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(
                f"{system} runner failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return [RunResult(**r) for r in json.loads(out_path.read_text())["results"]]


class Bench:
    def __init__(self, model: Model, systems: list[str], repeats: int = 1) -> None:
        self.model = model
        self.repeats = repeats
        self.systems = systems
        self.results: list[RunResult] = []
        self.notes: list[str] = []
        self.on_progress: Callable[[], object] = lambda: None

    def spec(self, runs: list[RunSpec], rank: int = 16, batch1: dict | None = None) -> BenchSpec:
        return BenchSpec(
            model_dir=str(self.model.path),
            runs=runs,
            max_lora_rank=rank,
            batch1_decode=batch1,
            vocab_size=self.model.vocab_size,
            repeats=self.repeats,
        )

    def run(self, label: str, spec: BenchSpec, systems: list[str]) -> list[RunResult]:
        got: list[RunResult] = []
        for system in systems:
            if system not in self.systems:
                continue
            if system == "vllm" and vllm_python() is None:
                self.notes.append("vLLM skipped: no .venv-vllm (run `bash bench/setup_vllm.sh`)")
                continue
            t0 = time.perf_counter()
            print(f"[bench] {label}: {system} ...", file=sys.stderr, flush=True)
            try:
                res = run_in_subprocess(system, spec)
            except Exception as e:  # one failing peer must not lose the others' figures
                self.notes.append(f"{label} on {system} failed: {str(e)[-600:]}")
                print(f"[bench] {label}: {system} FAILED\n{e}", file=sys.stderr, flush=True)
                continue
            print(
                f"[bench] {label}: {system} done in {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            got += res
            self.results += res
            self.on_progress()
        return got


def _auto_rate(results: list[RunResult], plan: Plan) -> float:
    """Arrival rate at ~80% of our base-model capacity from workload (a), so (b) is loaded, not flooded."""
    base = [r for r in results if r.system == "ours" and r.run.startswith("a/") and r.run.endswith("/base")]
    mean_new = sum(plan.zipf_new) / 2
    if not base:
        return 1.0
    best = max(r.tok_s for r in base)
    return max(0.8 * best / mean_new, 0.05)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of a few minutes")
    ap.add_argument("--shape", default="smollm", choices=["smollm", "qwen05", "tinyllama", "demo"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--systems", default=None, help="comma list of ours,hf,vllm (quick default: ours,hf)")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--ns", default=None, help="comma list overriding workload (a)'s N values")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="workload (b) arrivals/s (default: auto)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--repeats", type=int, default=1, help="timed repetitions per batch run; best kept")
    ap.add_argument("--no-mixed-ranks", action="store_true", help="skip the rank 8/16/64 mixed run")
    args = ap.parse_args(argv)
    plan = dataclasses.replace(QUICK if args.quick else FULL)
    if args.ns:
        plan.ns = [int(x) for x in args.ns.split(",")]
    plan.prompt_len = args.prompt_len or plan.prompt_len
    plan.new_tokens = args.new_tokens or plan.new_tokens
    plan.mixed_ranks = plan.mixed_ranks and not args.no_mixed_ranks
    systems = (args.systems or ("ours,hf" if args.quick else ",".join(SYSTEMS))).split(",")
    workloads = args.workloads.split(",")

    model_dir = build_model(args.shape, args.cache)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    bench = Bench(Model(model_dir, vocab, args.cache), systems, args.repeats)
    t_start = time.time()
    out = (
        args.out
        or REPO_ROOT
        / "bench"
        / "results"
        / f"{args.shape}{'-quick' if args.quick else ''}-{int(t_start)}.json"
    )
    meta = {
        "shape": args.shape,
        "model_dir": str(model_dir),
        "quick": args.quick,
        "systems": systems,
        "plan": plan.__dict__,
        "repeats": args.repeats,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }
    roof = roofline(model_dir)

    def save() -> dict:
        """Written after every system, so a long run that dies keeps what it measured."""
        meta.update(duration_s=time.time() - t_start, loadavg_end=os.getloadavg())
        ratios = compute_ratios(bench.results, plan.ns, roof["roofline_tok_s"])
        report = {
            "meta": meta,
            "roofline": roof,
            "results": [r.to_json() for r in bench.results],
            "ratios": [r.to_json() for r in ratios],
            "notes": bench.notes,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        return report

    bench.on_progress = save
    if "a" in workloads:
        runs = concurrency_runs(bench.model, plan.ns, plan.prompt_len, plan.new_tokens)
        bench.run("(a) concurrency", bench.spec(runs, batch1=plan.batch1), ["ours", "hf", "vllm"])
        if plan.mixed_ranks:
            n = max(plan.ns)
            mixed = concurrency_runs(bench.model, [n], plan.prompt_len, plan.new_tokens, mixed_ranks=True)
            bench.run("(a) mixed ranks", bench.spec([mixed[-1]], rank=64), ["ours", "hf"])
    meta["zipf_rate"] = rate = args.rate or _auto_rate(bench.results, plan)
    if "b" in workloads:
        runs = zipf_runs(bench.model, plan.zipf_requests, rate, plan.zipf_prompt, plan.zipf_new)
        bench.run("(b) zipf", bench.spec(runs), ["ours"])
    if "c" in workloads:
        runs = cold_load_runs(
            bench.model,
            plan.cold_background,
            plan.cold_late,
            plan.cold_interval_s,
            plan.prompt_len,
            plan.cold_background_tokens,
            plan.cold_late_tokens,
        )
        bench.run("(c) cold loads", bench.spec(runs), ["ours"])
    report = save()
    print(format_report(report))
    print(f"\nwritten to {out}")
    return report


if __name__ == "__main__":
    main()
