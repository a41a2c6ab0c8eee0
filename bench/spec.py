"""The request sets handed to each system runner, as JSON, so every system gets identical inputs.

Stdlib only: the vLLM runner imports this from its own virtual environment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


@dataclass
class Request:
    """One benchmark request: token ids in, a fixed number of tokens out (EOS ignored)."""

    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None = None  # PEFT directory; None = base model
    arrival_s: float = 0.0  # offset from the start of the run (arrival workloads only)


def repetition(requests: list[Request], k: int) -> list[Request]:
    """The requests of a process's k-th timed batch (k = 0, 1, ...): every prompt rotated by k tokens.

    Why: the workloads' prompts share no prefix, and workload (a) gives the same prompts to its
    base, one-adapter and distinct runs; with a prefix cache (ours, vLLM's), a later timed batch
    would find the KV blocks an earlier one left (the same prompts, or the same prompt under the
    same adapter) and best-of-k would time a run without its prefill. Rotated, a prompt keeps its
    length and its tokens but none of its blocks, so every timed batch computes all of them.
    """
    if k == 0:
        return requests
    return [
        replace(r, prompt_ids=r.prompt_ids[k % n :] + r.prompt_ids[: k % n])
        if (n := len(r.prompt_ids))
        else r
        for r in requests
    ]


@dataclass
class RunSpec:
    """A named request set; `kind` tells arrival-driven runs from all-at-once batches."""

    name: str
    requests: list[Request]
    kind: str = "batch"  # "batch" | "arrivals" | "cold_loads"
    options: dict = field(default_factory=dict)


@dataclass
class BenchSpec:
    model_dir: str
    runs: list[RunSpec]
    dtype: str = "float32"
    adapter_dtype: str | None = None  # our LoRA tables (EngineConfig.adapter_dtype; None: dtype)
    device: str = "cpu"
    max_active_adapters: int = 32
    max_lora_rank: int = 16
    batch1_decode: dict | None = None  # {"prompt_len": int, "new_tokens": int}
    vocab_size: int = 0
    repeats: int = 1  # timed repetitions per run; the fastest is kept (shared, noisy machine)
    # batch runs take turns, one repetition each per round (ours only), so that a drift of the host
    # reaches every run alike; each result keeps its rounds' tok/s (extra["rounds_tok_s"])
    interleave: bool = False
    kv_cache_gib: int = 2  # same KV-cache budget for our engine and vLLM (whose knob is whole GiB)

    def adapters(self) -> list[str]:
        """Every distinct adapter in first-use order."""
        seen: dict[str, None] = {}
        for run in self.runs:
            for r in run.requests:
                if r.adapter is not None:
                    seen.setdefault(r.adapter, None)
        return list(seen)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> BenchSpec:
        d = json.loads(Path(path).read_text())
        runs = [
            RunSpec(
                name=r["name"],
                requests=[Request(**q) for q in r["requests"]],
                kind=r["kind"],
                options=r["options"],
            )
            for r in d.pop("runs")
        ]
        return cls(runs=runs, **d)


def batch1_request(spec: BenchSpec) -> Request:
    """The single request of the batch-1 decode measurement, identical for every system."""
    import random

    cfg = spec.batch1_decode or {}
    rng = random.Random(7)
    return Request([rng.randrange(3, spec.vocab_size) for _ in range(cfg["prompt_len"])], cfg["new_tokens"])
