"""Adapter exchange through the server: a popular adapter cannot lock a rare one out of the only slot.

The server has one device slot (`--max-active-adapters 1`). Ten clients keep
a popular adapter busy without pause, their generations of different lengths
so the slot is never free by chance. A request for a rare adapter must still
finish within a bound (the scheduler drains the popular adapter once the rare
one has waited `--adapter-cycle-time-s`), with the engine-alone answer, and
the popular traffic must carry on afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.cli import _engine_config, build_parser
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.fixtures.peft_factory import PeftAdapterFactory
from tests.fixtures.server import ServerProcess, make_tiny_served_model, start_server

CYCLE_S = 0.3
RARE_BOUND_S = 15.0
# Long and unequal, so the clients never all stand between two requests at the same moment: without
# adapter exchange the slot would never come free.
POPULAR_LENGTHS = tuple(range(150, 450, 30))
RARE_NEW = 6
PROMPT = "hello world"


@pytest.fixture(scope="module")
def fairness_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("fairness")
    model, _ = make_tiny_served_model(root, ())
    with PeftAdapterFactory(model, r=8, target_modules=("q_proj", "v_proj", "down_proj")) as factory:
        dirs = {
            name: factory.save(root / "adapters" / name, seed) for seed, name in ((1, "popular"), (2, "rare"))
        }
    return model, dirs


@pytest.fixture(scope="module")
def oracle(fairness_assets: tuple[Path, dict[str, Path]]) -> dict[str, list[int]]:
    model, dirs = fairness_assets
    engine = Engine.from_pretrained(model, EngineConfig(max_batch_total_tokens=256, num_threads=1))
    params = SamplingParams(max_new_tokens=max(POPULAR_LENGTHS), ignore_eos_token=True)
    return {
        name: [t.id for t in engine.generate([PROMPT], params, [parse_peft_adapter(d)])[0].tokens]
        for name, d in dirs.items()
    }


@pytest.fixture(scope="module")
def server(
    fairness_assets: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    model, _ = fairness_assets
    srv = start_server(
        model,
        tmp_path_factory.mktemp("fairness-logs"),
        "--adapter-source",
        "local",
        "--max-active-adapters",
        "1",
        "--adapter-cycle-time-s",
        str(CYCLE_S),
    )
    yield srv
    srv.stop()


def ask(url: str, adapter: Path, max_new: int, timeout: float = 120) -> list[int]:
    body = {
        "inputs": PROMPT,
        "parameters": {
            "adapter_id": str(adapter),
            "adapter_source": "local",
            "max_new_tokens": max_new,
            "ignore_eos_token": True,
            "details": True,
        },
    }
    r = httpx.post(url + "/generate", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


class PopularTraffic:
    """Clients that each send the next popular request the moment the last one is answered."""

    def __init__(self, url: str, adapter: Path, expected: list[int]) -> None:
        self.url, self.adapter, self.expected = url, adapter, expected
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in POPULAR_LENGTHS]

    def _run(self, max_new: int) -> None:
        while not self._stop.is_set():
            try:
                ids = ask(self.url, self.adapter, max_new)
            except Exception as e:  # recorded and asserted on by the test
                self.failures.append(repr(e))
                return
            with self._lock:
                self.done += 1
                if ids != self.expected[:max_new]:
                    self.failures.append(f"wrong popular answer {ids}")

    def __enter__(self) -> PopularTraffic:
        for t in self._threads:
            t.start()
            time.sleep(0.05)  # staggered starts: the clients never line up
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def wait_done(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done < n and not self.failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.done >= n and not self.failures, (self.done, self.failures[:3])


def test_cycle_time_flag_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--model-id", "m", "--adapter-cycle-time-s", "0.25"])
    assert _engine_config(args).adapter_cycle_time_s == 0.25
    monkeypatch.setenv("ADAPTER_CYCLE_TIME_S", "1.5")
    assert _engine_config(build_parser().parse_args(["serve", "--model-id", "m"])).adapter_cycle_time_s == 1.5


def test_popular_adapter_does_not_starve_a_rare_one(
    server: ServerProcess, fairness_assets: tuple[Path, dict[str, Path]], oracle: dict[str, list[int]]
) -> None:
    _, dirs = fairness_assets
    with PopularTraffic(server.url, dirs["popular"], oracle["popular"]) as popular:
        popular.wait_done(len(POPULAR_LENGTHS))  # the single slot is busy with the popular adapter
        before = popular.done
        t0 = time.monotonic()
        try:
            rare = ask(server.url, dirs["rare"], RARE_NEW, timeout=RARE_BOUND_S)
        except httpx.TimeoutException:
            pytest.fail(f"the rare adapter starved: no answer in {RARE_BOUND_S}s while the popular one ran")
        waited = time.monotonic() - t0
        during = popular.done - before
        popular.wait_done(popular.done + len(POPULAR_LENGTHS))  # and the popular adapter gets its slot back
    print(f"\nrare adapter answered in {waited:.2f}s while {during} popular requests finished")
    assert rare == oracle["rare"][:RARE_NEW]
    assert waited < RARE_BOUND_S
    assert during > 0  # the popular stream really was running while the rare request waited
    assert not popular.failures, popular.failures[:3]
