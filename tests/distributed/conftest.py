"""One local Ray instance and one 2-replica app of the demo model for tests/distributed.

Starting Ray and two replicas costs ~25 s on the CI box, so the app is shared by the whole
package; the test that kills a replica runs last (`test_ray_app.py` ends with it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.server import ServerProcess, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "demo" / "model"
ADAPTERS = {name: str(REPO / "demo" / "adapters" / name) for name in ("reverse", "upper", "add")}
#: The engine flags `tests.fixtures.server.start_server` gives a single server, so outputs compare.
#: Slots are fixed, so /info matches: the adapter budget is a fraction of *free* memory, which Ray's
#: object store and the shared machine make small and variable; at rank 16 (the demo adapters')
#: 4 slots need 2.5 MB of it.
ENGINE_FLAGS = {
    "num_threads": 1,
    "max_batch_total_tokens": 16384,
    "adapter_memory_fraction": 1.0,
    "max_lora_rank": 16,
}
SLOTS = 4


@dataclass
class RayApp:
    url: str
    session_dir: Path


@pytest.fixture(scope="package")
def ray_app() -> Iterator[RayApp]:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from loraserve.distributed import build_app

    # Ray's own memory monitor kills actors when the *machine* is over 95% used, which on a
    # shared box is other people's processes; the kernel's OOM killer still guards the box.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            model=str(MODEL), replicas=2, adapter_source="local", max_active_adapters=SLOTS, **ENGINE_FLAGS
        )
        serve.run(app, name="loraserve", route_prefix="/")
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        yield RayApp(f"http://127.0.0.1:{port}", session)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="package")
def single_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The single server on the same model and flags: the oracle for the Ray app's answers."""
    srv = start_server(
        MODEL,
        tmp_path_factory.mktemp("single"),
        "--adapter-source",
        "local",
        f"--max-active-adapters={SLOTS}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_FLAGS.items()),
    )
    yield srv
    srv.stop()
