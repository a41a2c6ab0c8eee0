"""One tiny-model server shared by the server tests (starting one costs a few seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import ServerProcess, make_tiny_served_model, start_server


@pytest.fixture(scope="package")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_tiny_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="package")
def server(
    tiny_assets: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    model, adapters = tiny_assets
    srv = start_server(
        model,
        tmp_path_factory.mktemp("logs"),
        "--adapter-source",
        "local",
        "--preloaded-adapter-ids",
        str(adapters["alpha"]),
        "--max-concurrent-requests",
        "16",
        "--max-best-of",
        "3",
    )
    srv.adapters = dict(adapters)
    yield srv
    srv.stop()
