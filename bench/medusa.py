"""`make bench-medusa`: Medusa speculative decoding on the demo model, against the same server without it.

Two `loraserve serve` processes on `demo/model`, identical except that one runs
`--adapter-id demo/medusa`. Each workload is sent to both, alternating which goes
first, several repetitions; greedy outputs are identical (checked), so both do the
same work and the wall-clock ratio is the speedup. Tokens per step come from the
speculating server's `/metrics` counters (verification steps and the tokens they
produced: accepted drafts + one corrected or bonus token each).

Workloads, at batch 1 (one request at a time) and batch 8 (eight concurrent):

* `prose`: the demo grammar's text cut after a few words, 96 new tokens (the heads'
  best case, ~3.4 tokens/step in `demo/medusa/training_report.json`);
* `chat`: held-out demo chat prompts on the base model (short answers, then EOS);
* `chat+lora`: the same prompts through their task's LoRA adapter (`upper` through
  `upper_medusa`, i.e. per-request heads; the plain server runs the plain `upper`).

    python -m bench.medusa [--quick] [--requests 24] [--repeats 5] [--threads 1] [--out bench/results/medusa.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
TASKS = ("reverse", "upper", "add")
sys.path.insert(0, str(REPO / "scripts"))
import demo_tasks  # noqa: E402


@dataclass
class Request:
    inputs: str
    adapter_id: str | None
    max_new_tokens: int


@dataclass
class Workload:
    name: str
    batch: int
    requests: list[Request]


@dataclass
class Measure:
    """One workload on one server, one repetition."""

    seconds: float
    tokens: int
    spec_steps: int = 0
    spec_tokens: int = 0
    texts: list[str] = field(default_factory=list)


# ---- inputs -----------------------------------------------------------------------------------


def prose_prompts(n: int, seed: int = 1234) -> list[str]:
    """As `scripts/train_medusa.py` cuts them, from another seed than training's."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = demo_tasks.lm_document(rng).split(" ")
        out.append(" ".join(words[: rng.randint(1, 6)]))
    return out


def chat_cases(n: int) -> list[tuple[str, str]]:
    """(prompt, task) from the held-out cases, tasks interleaved."""
    cases = json.loads((DEMO / "heldout_cases.json").read_text())["cases"]
    out = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        out.append((cases[task][i // len(TASKS)]["prompt"], task))
    return out


def workloads(n: int, batches: list[int]) -> list[Workload]:
    upper_medusa = str(DEMO / "adapters" / "upper_medusa")
    chat = chat_cases(min(2 * n, 90))  # answers are short: twice the requests for a steadier clock
    lora = [Request(p, upper_medusa if t == "upper" else str(DEMO / "adapters" / t), 32) for p, t in chat]
    out = []
    for b in batches:
        out.append(Workload("prose", b, [Request(p, None, 96) for p in prose_prompts(n)]))
        out.append(Workload("chat", b, [Request(p, None, 32) for p, _ in chat]))
        out.append(Workload("chat+lora", b, lora))
    return out


def plain_twin(r: Request) -> Request:
    """What the non-speculating server runs: `upper_medusa`'s LoRA part is `upper`, byte for byte."""
    if r.adapter_id and r.adapter_id.endswith("upper_medusa"):
        return Request(r.inputs, str(DEMO / "adapters" / "upper"), r.max_new_tokens)
    return r


# ---- servers ----------------------------------------------------------------------------------


class Server:
    def __init__(self, name: str, threads: int, log_dir: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        preload = [str(DEMO / "adapters" / t) for t in TASKS]
        cmd = [
            sys.executable,
            "-m",
            "loraserve.cli",
            "serve",
            "--model-id",
            str(DEMO / "model"),
            "--hostname",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num-threads",
            str(threads),
            "--max-batch-total-tokens",
            "16384",
            # every repetition sends the same prompts: without this, later ones skip their prefill
            "--prefix-caching",
            "false",
            "--adapter-memory-fraction",
            "0.01",
            "--adapter-source",
            "local",
            "--preloaded-adapter-ids",
            *preload,
            *extra,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not healthy after {timeout}s")

    def spec_counters(self) -> tuple[int, int]:
        text = httpx.get(self.url + "/metrics", timeout=10).text

        def value(name: str) -> int:
            m = re.search(rf"^{name} ([\d.eE+]+)$", text, re.M)
            return int(float(m.group(1))) if m else 0

        return value("loraserve_speculative_steps_total"), value("loraserve_speculative_tokens_total")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def _run(
    url: str, requests: list[Request], batch: int, warm_up: bool = False
) -> tuple[float, list[dict]]:
    """Requests in waves of `batch` concurrent ones; wall time of the whole workload."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(r: Request) -> dict:
            params: dict = {"max_new_tokens": r.max_new_tokens, "details": True}
            if r.adapter_id:
                params["adapter_id"] = r.adapter_id
            resp = await client.post("/generate", json={"inputs": r.inputs, "parameters": params})
            resp.raise_for_status()
            return resp.json()

        if warm_up:  # the first request of each adapter activates its slot and heads
            await asyncio.gather(*(one(r) for r in {r.adapter_id: r for r in requests}.values()))
            return 0.0, []
        out: list[dict] = []
        t0 = time.perf_counter()
        for i in range(0, len(requests), batch):
            out.extend(await asyncio.gather(*(one(r) for r in requests[i : i + batch])))
        return time.perf_counter() - t0, out


def measure(server: Server, w: Workload, twin: bool) -> Measure:
    reqs = [plain_twin(r) for r in w.requests] if twin else w.requests
    asyncio.run(_run(server.url, reqs, w.batch, warm_up=True))
    steps0, toks0 = server.spec_counters()
    seconds, out = asyncio.run(_run(server.url, reqs, w.batch))
    steps1, toks1 = server.spec_counters()
    return Measure(
        seconds=seconds,
        tokens=sum(o["details"]["generated_tokens"] for o in out),
        spec_steps=steps1 - steps0,
        spec_tokens=toks1 - toks0,
        texts=[o["generated_text"] for o in out],
    )


# ---- report -----------------------------------------------------------------------------------


def summarise(w: Workload, spec: list[Measure], plain: list[Measure]) -> dict:
    ratios = [p.seconds / s.seconds for s, p in zip(spec, plain, strict=True)]
    steps = sum(m.spec_steps for m in spec)
    return {
        "workload": w.name,
        "batch": w.batch,
        "requests": len(w.requests),
        "tokens": spec[0].tokens,
        "tokens_per_step": sum(m.spec_tokens for m in spec) / steps if steps else None,
        "spec_tok_s": statistics.median(m.tokens / m.seconds for m in spec),
        "plain_tok_s": statistics.median(m.tokens / m.seconds for m in plain),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "identical_outputs": all(s.texts == p.texts for s, p in zip(spec, plain, strict=True)),
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'workload':<10} {'batch':>5} {'tok/step':>8} {'spec tok/s':>10} {'plain tok/s':>11} "
        f"{'speedup':>8} {'(min-max)':>12} {'identical':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "-"
        lines.append(
            f"{r['workload']:<10} {r['batch']:>5} {tps:>8} {r['spec_tok_s']:>10.1f} {r['plain_tok_s']:>11.1f} "
            f"{r['speedup_median']:>7.2f}x {r['speedup_min']:>5.2f}-{r['speedup_max']:<5.2f} "
            f"{str(r['identical_outputs']):>9}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 prose requests per workload, 1 repetition")
    ap.add_argument("--requests", type=int, default=24, help="prose requests per workload (chat: twice)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server")
    ap.add_argument(
        "--speculative-tokens", type=int, default=0, help="the speculating server's cap (0: all heads)"
    )
    ap.add_argument("--workloads", nargs="+", default=["prose", "chat", "chat+lora"])
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/medusa-<time>.json)")
    args = ap.parse_args()
    n, repeats = (8, 1) if args.quick else (args.requests, args.repeats)
    with tempfile.TemporaryDirectory() as logs:
        spec = Server(
            "medusa",
            args.threads,
            Path(logs),
            "--adapter-id",
            str(DEMO / "medusa"),
            "--speculative-tokens",
            str(args.speculative_tokens),
        )
        plain = Server("plain", args.threads, Path(logs))
        try:
            spec.wait()
            plain.wait()
            rows = []
            for w in [w for w in workloads(n, args.batches) if w.name in args.workloads]:
                s_runs, p_runs = [], []
                for rep in range(repeats):  # alternate who goes first: drift on a shared machine hits both
                    if rep % 2 == 0:
                        s_runs.append(measure(spec, w, twin=False))
                        p_runs.append(measure(plain, w, twin=True))
                    else:
                        p_runs.append(measure(plain, w, twin=True))
                        s_runs.append(measure(spec, w, twin=False))
                rows.append(summarise(w, s_runs, p_runs))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            spec.stop()
            plain.stop()
    print()
    print(format_table(rows))
    out = args.out or REPO / "bench" / "results" / f"medusa-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "speculative_tokens": args.speculative_tokens,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "requests": n,
        "repeats": repeats,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
