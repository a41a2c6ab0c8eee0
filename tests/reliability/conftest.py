"""One real server wired to real adapter peers (moto S3, fake hub) behind fault-injecting proxies.

The server runs as a subprocess exactly as users start it; its adapter sources
reach the peers only through `FaultProxy`s, so fault tests can break the
network path while everything else stays real. `oracle` holds what the engine
alone (no server, no batching with strangers) answers for each prompt and
adapter, which every good response is compared with.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.s3_server import S3TestServer
from tests.fixtures.server import ServerProcess, start_server
from tests.reliability.assets import Assets, build_assets
from tests.reliability.stack import (
    ALICE,
    BOB,
    BUCKET,
    HUB_REPO,
    MAX_NEW,
    PBASE_TOKEN,
    PRIVATE_REPO,
    PROMPTS,
    Peers,
    Stack,
    server_env,
)


@pytest.fixture(scope="package")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return build_assets(tmp_path_factory.mktemp("rel"))


@pytest.fixture(scope="package")
def peers(assets: Assets) -> Iterator[Peers]:
    s3 = S3TestServer().start()
    s3_proxy = FaultProxy(s3.endpoint, hang_s=20).start()
    hub = FakeHub().start()
    hub_proxy = FaultProxy(hub.url, hang_s=20).start()
    p = Peers(s3, s3_proxy, hub, hub_proxy)
    s3.upload_dir(assets.good["gamma"], BUCKET, "gamma")
    for prefix in ("fault-error", "fault-hang", "fault-cut", "fault-down", "secrets"):
        s3.upload_dir(assets.good["gamma"], BUCKET, prefix)
    s3.upload_dir(assets.bad["corrupt"], BUCKET, "corrupt")
    hub.add_repo(HUB_REPO, assets.good["delta"])
    for name in ("fault-error", "fault-hang", "fault-cut", "fault-down"):
        hub.add_repo(f"acme/{name}", assets.good["delta"])
    hub.add_repo(PRIVATE_REPO, assets.good["delta"], private=True, tokens=(ALICE,))
    hub.add_token(BOB)  # a valid hub user who has no access to the private repo
    yield p
    s3_proxy.stop()
    hub_proxy.stop()
    hub.stop()
    s3.stop()


@pytest.fixture(scope="package")
def stack(assets: Assets, peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("main-server")
    srv = start_server(
        assets.model,
        logs,
        "--adapter-source",
        "local",
        "--local-adapter-roots",
        str(assets.root / "adapters"),
        "--adapter-cache-dir",
        str(logs / "cache"),
        "--max-input-length",
        "48",
        "--max-total-tokens",
        "64",
        "--max-concurrent-requests",
        "128",
        "--max-request-bytes",
        "65536",
        "--adapter-auth-ttl-s",
        "0",
        "--adapter-source-timeout-s",
        "1.5",
        "--predibase-api-token",
        PBASE_TOKEN,
        "--log-level",
        "debug",
        env=server_env(peers, logs / "cache"),
    )
    yield Stack(srv, assets, peers)
    srv.stop()


@pytest.fixture(scope="package")
def oracle(assets: Assets) -> dict[tuple[str, str | None], str]:
    """(prompt, adapter name) -> the engine's own greedy text, each request run alone."""
    engine = Engine.from_pretrained(assets.model, EngineConfig(max_batch_total_tokens=1024, num_threads=1))
    loaded = {name: parse_peft_adapter(path) for name, path in assets.good.items()}
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos_token=True)
    answers = {}
    for prompt in PROMPTS:
        for name in (None, *loaded):
            out = engine.generate([prompt], params, [loaded[name] if name else None])[0]
            answers[(prompt, name)] = out.generated_text
    assert len({answers[(PROMPTS[0], n)] for n in (None, *loaded)}) == 1 + len(loaded)  # adapters matter
    return answers


@pytest.fixture(scope="package")
def long_model(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights with a 4096-token context, so a held request lasts seconds, not milliseconds."""
    model = tmp_path_factory.mktemp("long") / "long-context-model"
    shutil.copytree(assets.model, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="package")
def small_server(
    assets: Assets, long_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Four concurrent requests at most and long generations allowed: overload and cancellation."""
    logs = tmp_path_factory.mktemp("small-server")
    srv = start_server(
        long_model,
        logs,
        "--adapter-source",
        "local",
        "--local-adapter-roots",
        str(assets.root / "adapters"),
        "--max-concurrent-requests",
        "4",
        "--max-total-tokens",
        "4096",
    )
    srv.adapters = dict(assets.good)
    yield srv
    srv.stop()
