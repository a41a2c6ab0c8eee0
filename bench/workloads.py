"""The three benchmark workloads as request sets (token ids, fixed output lengths).

Everything is drawn from seeded generators, so every system, and every rerun,
sees byte-identical prompts, adapters and arrival times.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from bench.shapes import DEFAULT_CACHE, build_adapters, random_prompt
from bench.spec import Request, RunSpec

# Adapter index ranges per workload, so cold-load adapters are never warm from another workload.
ZIPF_BASE_INDEX = 0
COLD_INDEX = 5000
WARM_INDEX = 6000


@dataclass
class Model:
    """The checkpoint under test and where its adapters are cached."""

    path: Path
    vocab_size: int
    cache: Path = DEFAULT_CACHE

    def adapters(self, rank: int, indices: list[int] | range) -> list[str]:
        return [str(p) for p in build_adapters(self.path, rank, indices, self.cache)]


def concurrency_runs(
    model: Model,
    ns: list[int],
    prompt_len: int,
    new_tokens: int,
    rank: int = 16,
    mixed_ranks: bool = False,
    seed: int = 0,
) -> list[RunSpec]:
    """Workload (a): N requests at once, all on the base model / on one adapter / each on its own.

    The same prompts serve every variant of a given N, so only the adapter assignment differs.
    With `mixed_ranks`, the largest N also gets a distinct-adapter run cycling ranks 8/16/64.
    """
    runs: list[RunSpec] = []
    distinct = model.adapters(rank, range(max(ns)))
    for n in ns:
        rng = random.Random(seed * 1000 + n)
        prompts = [random_prompt(rng, prompt_len, model.vocab_size) for _ in range(n)]
        runs.append(RunSpec(f"a/N={n}/base", [Request(p, new_tokens) for p in prompts]))
        runs.append(RunSpec(f"a/N={n}/one", [Request(p, new_tokens, distinct[0]) for p in prompts]))
        runs.append(
            RunSpec(
                f"a/N={n}/distinct",
                [Request(p, new_tokens, a) for p, a in zip(prompts, distinct[:n], strict=True)],
            )
        )
    if mixed_ranks:
        n = max(ns)
        rng = random.Random(seed * 1000 + n)
        prompts = [random_prompt(rng, prompt_len, model.vocab_size) for _ in range(n)]
        ranks = [(8, 16, 64)[i % 3] for i in range(n)]
        paths = [model.adapters(r, [i])[0] for i, r in enumerate(ranks)]
        runs.append(
            RunSpec(
                f"a/N={n}/mixed-ranks",
                [Request(p, new_tokens, a) for p, a in zip(prompts, paths, strict=True)],
            )
        )
    return runs


def zipf_indices(rng: random.Random, n: int, num_adapters: int, s: float) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(num_adapters)]
    return rng.choices(range(num_adapters), weights=weights, k=n)


def zipf_runs(
    model: Model,
    n_requests: int,
    rate: float,
    prompt_range: tuple[int, int],
    new_range: tuple[int, int],
    num_adapters: int = 1000,
    s: float = 1.0,
    rank: int = 16,
    seed: int = 0,
) -> list[RunSpec]:
    """Workload (b): Poisson arrivals at `rate` req/s, adapters Zipf(s)-popular among `num_adapters`.

    Same arrivals, prompts and lengths are replayed on the base model and on a single
    adapter, the two baselines. Only adapters actually drawn are written to disk: a
    registered adapter costs nothing until a request names it.
    """
    rng = random.Random(seed + 17)
    t, arrivals = 0.0, []
    for _ in range(n_requests):
        arrivals.append(t)
        t += rng.expovariate(rate)
    prompts = [random_prompt(rng, rng.randint(*prompt_range), model.vocab_size) for _ in range(n_requests)]
    news = [rng.randint(*new_range) for _ in range(n_requests)]
    idx = [ZIPF_BASE_INDEX + i for i in zipf_indices(rng, n_requests, num_adapters, s)]
    used = sorted(set(idx))
    path_of = dict(zip(used, model.adapters(rank, used), strict=True))

    def reqs(adapters: list[str | None]) -> list[Request]:
        return [Request(p, m, a, arr) for p, m, a, arr in zip(prompts, news, adapters, arrivals, strict=True)]

    opts = {"rate": rate, "num_adapters": num_adapters, "zipf_s": s, "distinct_used": len(used)}
    return [
        RunSpec("b/base", reqs([None] * n_requests), kind="arrivals", options=opts),
        RunSpec("b/one", reqs([path_of[idx[0]]] * n_requests), kind="arrivals", options=opts),
        RunSpec("b/zipf", reqs([path_of[i] for i in idx]), kind="arrivals", options=opts),
    ]


def cold_load_runs(
    model: Model,
    background: int,
    late: int,
    interval_s: float,
    prompt_len: int,
    background_tokens: int,
    late_tokens: int,
    start_s: float = 1.0,
    rank: int = 16,
    seed: int = 0,
) -> list[RunSpec]:
    """Workload (c): `late` requests on never-seen adapters join `background` running ones.

    The control replays the same arrivals with adapters already parsed and slotted, so
    the difference in the background requests' inter-token latency is the cost of loading.
    """
    rng = random.Random(seed + 29)
    bg = [
        Request(random_prompt(rng, prompt_len, model.vocab_size), background_tokens)
        for _ in range(background)
    ]
    late_prompts = [random_prompt(rng, prompt_len, model.vocab_size) for _ in range(late)]
    arrivals = [start_s + i * interval_s for i in range(late)]
    cold = model.adapters(rank, range(COLD_INDEX, COLD_INDEX + late))
    warm = model.adapters(rank, range(WARM_INDEX, WARM_INDEX + late))

    def reqs(adapters: list[str]) -> list[Request]:
        return bg + [
            Request(p, late_tokens, a, t) for p, a, t in zip(late_prompts, adapters, arrivals, strict=True)
        ]

    return [
        RunSpec("c/warm", reqs(warm), kind="cold_loads", options={"background": background, "prewarm": True}),
        RunSpec("c/cold", reqs(cold), kind="cold_loads", options={"background": background}),
    ]
