"""Issue 17, item 1: per-adapter metrics and the `/v1/models` listing stay bounded and shareable.

Before, every spelling of one local path (`dir/.`, `dir//x`) was a new Prometheus label and a new
`/v1/models` entry forever, and the listing showed every caller the private repos and local paths
other callers had used. Here one server with small caps is driven through each way in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import ServerProcess, start_server
from tests.reliability.assets import Assets
from tests.reliability.stack import ALICE, HUB_REPO, MAX_NEW, PRIVATE_REPO, PROMPTS, Peers, server_env

LABEL_CAP = 2
LIST_CAP = 2


@pytest.fixture(scope="module")
def capped(assets: Assets, peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("capped-server")
    srv = start_server(
        assets.model,
        logs,
        "--adapter-source",
        "local",
        "--local-adapter-roots",
        str(assets.root / "adapters"),
        "--adapter-cache-dir",
        str(logs / "cache"),
        "--max-adapter-labels",
        str(LABEL_CAP),
        "--max-listed-adapters",
        str(LIST_CAP),
        env=server_env(peers, logs / "cache"),
    )
    yield srv
    srv.stop()


def generate(srv: ServerProcess, **params: object) -> None:
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": MAX_NEW, **params}}
    r = httpx.post(srv.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text


def adapter_labels(srv: ServerProcess) -> dict[str, float]:
    out = {}
    for line in httpx.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("loraserve_adapter_request_total{adapter_id="):
            label = line.split('adapter_id="', 1)[1].rsplit('"}', 1)[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def listed(srv: ServerProcess) -> list[str]:
    r = httpx.get(srv.url + "/v1/models", timeout=30)
    assert r.status_code == 200
    return [m["id"] for m in r.json()["data"]]


def spellings(path: Path) -> list[str]:
    p = str(path)
    head, _, tail = p.rpartition("/")
    return [p, p + "/.", f"{head}//{tail}", p + "/./.", p + "/", f"{head}/./{tail}"]


def test_every_spelling_of_a_local_adapter_is_one_label_and_one_listing(
    capped: ServerProcess, assets: Assets
) -> None:
    alpha = assets.good["alpha"]
    for spelling in spellings(alpha):
        generate(capped, adapter_id=spelling, adapter_source="local")
    canonical = str(alpha.resolve())
    labels = {k: v for k, v in adapter_labels(capped).items() if "alpha" in k}
    assert labels == {canonical: len(spellings(alpha))}
    assert [i for i in listed(capped) if "alpha" in i] == [canonical]


def test_labels_and_listing_are_capped(capped: ServerProcess, assets: Assets, peers: Peers) -> None:
    adapters = [
        {"adapter_id": str(assets.good["alpha"]), "adapter_source": "local"},
        {"adapter_id": str(assets.good["beta"]), "adapter_source": "local"},
        {"adapter_id": peers.s3_uri("gamma"), "adapter_source": "s3"},
        {"adapter_id": HUB_REPO, "adapter_source": "hub"},
    ]
    for params in adapters:
        generate(capped, **params)
    generate(capped, **adapters[-1])  # the hub adapter is the busiest of the newcomers
    labels = adapter_labels(capped)
    assert len([k for k in labels if k != "other"]) <= LABEL_CAP, labels
    assert labels.get("other", 0) >= 1, labels
    assert labels.get(HUB_REPO) == 2, labels  # heavier adapters keep their own series
    total = sum(labels.values())
    assert total >= len(adapters) + 1  # folding into `other` loses no request
    ids = listed(capped)
    assert ids[0] == str(assets.model) and len(ids) <= 1 + LIST_CAP, ids
    assert HUB_REPO in ids  # the most recently served public adapter is listed


def test_adapters_loaded_with_a_token_are_never_listed(capped: ServerProcess) -> None:
    generate(capped, adapter_id=PRIVATE_REPO, adapter_source="hub", api_token=ALICE)
    assert PRIVATE_REPO not in httpx.get(capped.url + "/v1/models", timeout=30).text
    assert PRIVATE_REPO in adapter_labels(capped)  # still counted for the operator, under its id


def test_merge_inputs_spelled_long_get_short_labels(capped: ServerProcess, assets: Assets) -> None:
    alpha = str(assets.good["alpha"])
    long_spelling = alpha + "/." * 3000  # 6 KB for one adapter id
    merged = {"ids": [long_spelling, alpha], "weights": [0.5, 0.5], "merge_strategy": "linear"}
    generate(capped, merged_adapters=merged, adapter_source="local")
    labels = adapter_labels(capped)
    assert all(len(label) <= 200 for label in labels), [len(label) for label in labels]
    assert len(httpx.get(capped.url + "/metrics", timeout=30).content) < 64 * 1024
    assert long_spelling not in httpx.get(capped.url + "/v1/models", timeout=30).text


def test_hub_adapters_loaded_with_the_servers_token_are_not_listed(
    assets: Assets, peers: Peers, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("global-token-server")
    env = {**server_env(peers, logs / "cache"), "LORAX_USE_GLOBAL_HF_TOKEN": "1", "HF_TOKEN": ALICE}
    srv = start_server(assets.model, logs, "--adapter-cache-dir", str(logs / "cache"), env=env)
    try:
        generate(srv, adapter_id=PRIVATE_REPO, adapter_source="hub")  # no caller token: the server's
        assert PRIVATE_REPO not in listed(srv)
    finally:
        srv.stop()
