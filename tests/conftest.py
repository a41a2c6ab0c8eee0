"""Shared fixtures: tiny random checkpoints and PEFT adapters, built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_models import make_peft_adapter, make_tiny_model

# Two cores on CI: keep each test process from oversubscribing them.
THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _test_thread_keeps_its_threads() -> Iterator[None]:
    """`AsyncEngine.build` leaves the thread that calls it (here: pytest's) at one OpenMP thread
    (`cpu_threads.use_one_omp_thread`, per thread and kept until it exits): without this, every
    later test in the process would run its kernels serially, and a test of a parallel path (the
    one-region decode step, attention split over threads) would pass on the serial one."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture
def two_threads() -> object:
    """Two OpenMP threads on this thread, whatever earlier tests left (`use_one_omp_thread` sets
    one for the thread that calls it): the one-region path runs only with more than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


# (rank, target modules, rslora): different ranks, different module sets, one rslora
ADAPTER_SPECS: list[tuple[int, tuple[str, ...], bool]] = [
    (4, ("q_proj", "v_proj"), False),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj"), False),
    (16, ("gate_proj", "up_proj", "down_proj"), False),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    (4, ("o_proj", "down_proj"), False),
    (16, ("q_proj", "v_proj", "up_proj"), False),
    (8, ("k_proj", "gate_proj"), True),
    (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
]


@pytest.fixture(scope="session")
def llama_adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_peft_adapter(llama_dir, root / f"a{i}", r=r, target_modules=t, seed=100 + i, use_rslora=rs)
        for i, (r, t, rs) in enumerate(ADAPTER_SPECS)
    ]
