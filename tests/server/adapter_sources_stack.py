"""A real server wired to every adapter source's real peer, and what each adapter should answer.

Peers on 127.0.0.1: moto S3 (for `s3` and the weights `pbase` points at), the
fake hub behind a `FaultProxy` (so a test can hold downloads in progress), and
the fake Predibase gateway. Each source serves its own distinct adapter, so a
request answered with the wrong adapter's weights cannot pass: `oracle` is
what the engine alone (no server, no batching) generates for each of them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.fake_pbase import FakePredibase
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.peft_factory import PeftAdapterFactory
from tests.fixtures.s3_server import S3TestServer
from tests.fixtures.server import make_tiny_served_model

PROMPT = "hello world"
MAX_NEW = 6
PUBLIC_REPO = "acme/public-lora"
PRIVATE_REPO = "acme/private-lora"
SLOW_REPO = "acme/slow-lora"
ALICE = "hf_aliceSourcesTokenAAAAAAAAAAA"  # may read the private repo
MALLORY = "hf_forgedSourcesTokenMMMMMMMMMM"  # unknown to the hub
SERVER_HF_TOKEN = "hf_serverSourcesTokenSSSSSSSSSS"  # the operator's: valid, with access to the private repo
PB_TOKEN = "pb-sources-token-PPPPPPPPPPPP"
BUCKET, PBASE_BUCKET = "adapters", "pbase-models"
PB_V2_REPO, PB_V2_VERSION = "support-bot", "3"
PB_LEGACY_REPO = "legacy-bot"  # versions 1 (old) and 2 (latest)

# One distinct adapter per place it is served from; `local_both` is built from two of them.
ADAPTERS = (
    "hub_public",
    "hub_private",
    "hub_slow",
    "pbase_v2",
    "pbase_legacy",
    "pbase_legacy_old",
    "s3",
    "local_safetensors",
    "local_bin",
)


@dataclass
class SourceAssets:
    root: Path
    model: Path
    dirs: dict[str, Path]


@dataclass
class SourcePeers:
    s3: S3TestServer
    hub: FakeHub
    hub_proxy: FaultProxy
    pbase: FakePredibase

    def stop(self) -> None:
        self.hub_proxy.stop()
        self.hub.stop()
        self.pbase.stop()
        self.s3.stop()


def build_assets(root: Path) -> SourceAssets:
    model, _ = make_tiny_served_model(root, ())
    dirs: dict[str, Path] = {}
    modules = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    with PeftAdapterFactory(model, r=8, target_modules=modules) as factory:
        for seed, name in enumerate(ADAPTERS, start=20):
            dirs[name] = factory.save(root / "adapters" / name, seed, safetensors=name != "local_bin")
    assert not (dirs["local_bin"] / "adapter_model.safetensors").exists()
    # safetensors of one adapter beside the .bin of another: whichever file is read decides the answer
    both = root / "adapters" / "local_both"
    shutil.copytree(dirs["local_safetensors"], both)
    shutil.copy(dirs["local_bin"] / "adapter_model.bin", both / "adapter_model.bin")
    dirs["local_both"] = both
    return SourceAssets(root, model, dirs)


def legacy_prefix(uuid: str, run: str) -> str:
    return f"{uuid}/{run}/artifacts/model/model_weights"


def start_peers(assets: SourceAssets) -> SourcePeers:
    d = assets.dirs
    s3 = S3TestServer().start()
    hub = FakeHub().start()
    peers = SourcePeers(s3, hub, FaultProxy(hub.url, hang_s=30).start(), FakePredibase().start())
    s3.upload_dir(d["s3"], BUCKET, "team/s3-lora")
    hub.add_repo(PUBLIC_REPO, d["hub_public"])
    hub.add_repo(PRIVATE_REPO, d["hub_private"], private=True, tokens=(ALICE, SERVER_HF_TOKEN))
    hub.add_repo(SLOW_REPO, d["hub_slow"])
    pbase = peers.pbase
    pbase.tokens.add(PB_TOKEN)
    pbase.add_v2(PB_V2_REPO, PB_V2_VERSION, s3.upload_dir(d["pbase_v2"], BUCKET, "pbase/support-bot-v3"))
    pbase.add_v2(PB_V2_REPO, "4", f"s3://{BUCKET}/pbase/never-uploaded", status="training")
    for version, name, uuid in (("1", "pbase_legacy_old", "u-old"), ("2", "pbase_legacy", "u-new")):
        s3.upload_dir(d[name], PBASE_BUCKET, legacy_prefix(uuid, "run-7"))
        pbase.add_legacy(PB_LEGACY_REPO, version, uuid, "run-7")
    return peers


def server_env(peers: SourcePeers, cache: Path, use_global_token: bool) -> dict[str, str]:
    return {
        **peers.s3.env(),
        "HF_ENDPOINT": peers.hub_proxy.url,
        "HF_HUB_CACHE": str(cache / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": SERVER_HF_TOKEN,
        "HUGGING_FACE_HUB_TOKEN": SERVER_HF_TOKEN,
        "LORAX_USE_GLOBAL_HF_TOKEN": "1" if use_global_token else "0",
        "PREDIBASE_GATEWAY_ENDPOINT": peers.pbase.url,
        "PREDIBASE_MODEL_BUCKET": PBASE_BUCKET,
    }


def engine_alone(assets: SourceAssets) -> dict[str | None, list[int]]:
    """Adapter name (None: base model) -> greedy token ids from the engine, one request at a time."""
    engine = Engine.from_pretrained(assets.model, EngineConfig(max_batch_total_tokens=1024, num_threads=1))
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos_token=True)
    answers: dict[str | None, list[int]] = {}
    for name in (None, *assets.dirs):
        adapter = parse_peft_adapter(assets.dirs[name]) if name else None
        answers[name] = [t.id for t in engine.generate([PROMPT], params, [adapter])[0].tokens]
    distinct = {tuple(answers[n]) for n in (None, *ADAPTERS)}
    assert len(distinct) == 1 + len(ADAPTERS), (
        "adapters must change the answer for these tests to mean anything"
    )
    return answers


def generate(
    url: str, headers: dict[str, str] | None = None, timeout: float = 60, **params: object
) -> httpx.Response:
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": MAX_NEW, "ignore_eos_token": True, "details": True, **params},
    }
    return httpx.post(url + "/generate", json=body, headers=headers or {}, timeout=timeout)


def token_ids(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]
