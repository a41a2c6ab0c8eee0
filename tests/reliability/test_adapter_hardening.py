"""Issue 17, adapter side, against a real server: crafted configs, cache paths, preloads, probing.

This module runs its own server, configured the way the attacks need it: no
`--local-adapter-roots` (LoRAX's default: any readable path is a local
adapter), a hub cache apart from `--adapter-cache-dir`, a Predibase adapter
preloaded with the operator's `--predibase-api-token`, and auth results never
reused (`--adapter-auth-ttl-s 0`).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.fake_pbase import FakePredibase
from tests.fixtures.server import ServerProcess, start_server
from tests.reliability.assets import Assets
from tests.reliability.good_traffic import error_message
from tests.reliability.stack import ALICE, MALLORY, PBASE_TOKEN, PRIVATE_REPO, Peers, server_env

PB_ADAPTER = "acme-pb/1"
EVIL_KEY = r"(?=model\.layers\.0\.self_attn\.q)model(.|.)*Z"  # backtracked for 17 s as a regex


@pytest.fixture(scope="module")
def gateway(peers: Peers) -> Iterator[FakePredibase]:
    gw = FakePredibase().start()
    gw.tokens.add(PBASE_TOKEN)
    gw.add_v2("acme-pb", "1", peers.s3_uri("gamma"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def server(
    assets: Assets, peers: Peers, gateway: FakePredibase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("hardening")
    env = server_env(peers, d / "cache")
    env.update(HF_HUB_CACHE=str(d / "hf-cache"), PREDIBASE_GATEWAY_ENDPOINT=gateway.url)
    srv = start_server(
        assets.model,
        d,
        "--adapter-cache-dir",
        str(d / "cache"),
        "--adapter-auth-ttl-s",
        "0",
        "--adapter-source-timeout-s",
        "5",
        "--predibase-api-token",
        PBASE_TOKEN,
        "--preloaded-adapter-ids",
        PB_ADAPTER,
        "--preloaded-adapter-source",
        "pbase",
        "--max-input-length",
        "48",
        "--max-total-tokens",
        "64",
        env=env,
    )
    srv.adapters = {"hf-cache": d / "hf-cache", "cache": d / "cache"}
    yield srv
    srv.stop()


def post(server: ServerProcess, headers: dict | None = None, **params: object) -> httpx.Response:
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 3, **params}}
    return httpx.post(server.url + "/generate", json=body, headers=headers or {}, timeout=60)


# -- item 1: a crafted rank/alpha pattern key does not freeze the server


def _adapter_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_backtracking_pattern_key_neither_freezes_nor_loads(
    server: ServerProcess, assets: Assets, tmp_path: Path
) -> None:
    evil = _adapter_with_config(assets.good["alpha"], tmp_path / "evil", alpha_pattern={EVIL_KEY: 8})
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            httpx.get(server.url + "/health", timeout=30)
            health.append(time.monotonic() - t0)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        t0 = time.monotonic()
        r = post(server, adapter_id=str(evil), adapter_source="local")
        took = time.monotonic() - t0
    finally:
        done.set()
        poller.join()
    assert r.status_code == 424, r.text  # an adapter that fails to load: LoRAX's generation error
    assert "alpha_pattern" in error_message(r) and "matches no LoRA module" in error_message(r)
    assert took < 1.0 and health and max(health) < 1.0, (took, max(health, default=None))


def test_normal_pattern_still_applies(server: ServerProcess, assets: Assets, tmp_path: Path) -> None:
    """A plain alpha_pattern key changes the output exactly as a matching global lora_alpha does."""
    cfg = json.loads((assets.good["alpha"] / "adapter_config.json").read_text())
    r = cfg["r"]
    pattern = {m: 3 * r for m in cfg["target_modules"]}
    by_pattern = _adapter_with_config(assets.good["alpha"], tmp_path / "pattern", alpha_pattern=pattern)
    by_alpha = _adapter_with_config(assets.good["alpha"], tmp_path / "alpha", lora_alpha=3 * r)
    texts = []
    for path in (assets.good["alpha"], by_pattern, by_alpha):
        resp = post(server, adapter_id=str(path), adapter_source="local", ignore_eos_token=True)
        assert resp.status_code == 200, resp.text
        texts.append(resp.json()["generated_text"])
    assert texts[1] == texts[2] != texts[0]


# -- item 4: malformed configs are a 4xx naming the field, at load


BAD_CONFIGS = [
    ("alpha-a-string", {"lora_alpha": "16"}, "lora_alpha"),
    ("alpha-1e38", {"lora_alpha": 1e38}, "lora_alpha"),
    ("alpha-pattern-string", {"alpha_pattern": {"q_proj": "16"}}, "alpha_pattern"),
    ("target-modules-ints", {"target_modules": [1, 2]}, "target_modules"),
    ("rank-pattern-zero", {"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
]


@pytest.mark.parametrize(("changes", "field"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_malformed_config_is_a_424(
    server: ServerProcess, assets: Assets, tmp_path: Path, changes: dict, field: str
) -> None:
    path = _adapter_with_config(assets.good["alpha"], tmp_path / "bad", **changes)
    r = post(server, adapter_id=str(path), adapter_source="local")
    assert r.status_code == 424 and field in error_message(r), r.text


@pytest.mark.parametrize(
    ("text", "field"),
    [("[]", "JSON object"), ('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "lora_alpha")],
    ids=["config-a-list", "alpha-nan"],
)
def test_config_file_text_is_a_424(
    server: ServerProcess, assets: Assets, tmp_path: Path, text: str, field: str
) -> None:
    path = shutil.copytree(assets.good["alpha"], tmp_path / "bad")
    (path / "adapter_config.json").write_text(text)
    r = post(server, adapter_id=str(path), adapter_source="local")
    assert r.status_code == 424 and field in error_message(r), r.text


# -- item 2: the server's own caches are not local adapters


def test_private_hub_snapshot_is_not_a_local_adapter(server: ServerProcess) -> None:
    r = post(server, adapter_id=PRIVATE_REPO, adapter_source="hub", api_token=ALICE)
    assert r.status_code == 200, r.text  # downloaded into the hub cache with a valid token
    repo_dir = server.adapters["hf-cache"] / "models--acme--private-lora"
    snapshots = list((repo_dir / "snapshots").iterdir())
    assert len(snapshots) == 1
    for path in (snapshots[0], repo_dir, server.adapters["hf-cache"]):
        r = post(server, adapter_id=str(path), adapter_source="local")
        assert r.status_code == 403, r.text
        assert "own adapter cache" in error_message(r)


def test_s3_download_dir_is_not_a_local_adapter(server: ServerProcess, peers: Peers) -> None:
    r = post(server, adapter_id=peers.s3_uri("gamma"), adapter_source="s3")
    assert r.status_code == 200, r.text
    downloads = [p for p in (server.adapters["cache"] / "s3").iterdir() if p.is_dir()]
    assert downloads
    for path in downloads:
        r = post(server, adapter_id=str(path), adapter_source="local")
        assert r.status_code == 403, r.text


def test_ordinary_local_adapter_loads_and_start_warned(server: ServerProcess, assets: Assets) -> None:
    r = post(server, adapter_id=str(assets.good["alpha"]), adapter_source="local")
    assert r.status_code == 200, r.text
    assert server.log().count("--local-adapter-roots is not set") == 1


# -- item 3: preloaded private adapters still check the caller's token


@pytest.mark.parametrize("token", [None, MALLORY], ids=["no-token", "forged-token"])
def test_preloaded_pbase_adapter_checks_the_token(server: ServerProcess, token: str | None) -> None:
    auth = {} if token is None else {"api_token": token}
    r = post(server, adapter_id=PB_ADAPTER, **auth)  # no adapter_source: the preloaded bare id
    assert r.status_code == 401, r.text
    merged = {"ids": [PB_ADAPTER], "weights": [1.0], "merge_strategy": "linear"}
    r = post(server, merged_adapters=merged, **auth)
    assert r.status_code == 401, r.text


def test_preloaded_pbase_adapter_serves_a_valid_token(server: ServerProcess, gateway: FakePredibase) -> None:
    before = gateway.count("/v2/repos/acme-pb/version/1")
    r = post(server, adapter_id=PB_ADAPTER, api_token=PBASE_TOKEN)
    assert r.status_code == 200, r.text
    merged = {"ids": [PB_ADAPTER], "weights": [1.0], "merge_strategy": "linear"}
    r = post(server, merged_adapters=merged, headers={"authorization": f"Bearer {PBASE_TOKEN}"})
    assert r.status_code == 200, r.text
    assert gateway.count("/v2/repos/acme-pb/version/1") >= before + 2  # the gateway was asked each time


# -- item 5: no probing of paths; NUL bytes and non-ASCII tokens are 4xx


def test_local_errors_do_not_tell_which_paths_exist(server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "adapter_config.json").write_text("{}")
    answers = set()
    for name in ("missing", "empty", "a-file", "config-only"):
        path = str(tmp_path / name)
        r = post(server, adapter_id=path, adapter_source="local")
        answers.add((r.status_code, error_message(r).replace(path, "<path>")))
    assert len(answers) == 1, answers
    assert next(iter(answers))[0] == 424


def test_nul_byte_in_a_local_path_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    r = post(server, adapter_id=f"{tmp_path}/a\x00b", adapter_source="local")
    assert r.status_code == 424, r.text  # no such adapter can exist: LoRAX's generation error
    assert "NUL" in error_message(r)


def test_non_ascii_token_is_a_401(server: ServerProcess) -> None:
    r = post(server, adapter_id=PRIVATE_REPO, adapter_source="hub", api_token="hf_tökén")
    assert r.status_code == 401, r.text
    assert "malformed" in error_message(r)
    header = {"authorization": "Bearer hf_t\xf6k\xe9n".encode("latin-1")}
    r = post(server, headers=header, adapter_id=PRIVATE_REPO, adapter_source="hub")
    assert r.status_code == 401, r.text
