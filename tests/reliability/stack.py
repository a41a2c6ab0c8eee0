"""The shared cast of the reliability tests: peers, the main server and the names they use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.s3_server import S3TestServer
from tests.fixtures.server import ServerProcess
from tests.reliability.assets import Assets

BUCKET = "adapters"
HUB_REPO = "acme/delta-lora"
PRIVATE_REPO = "acme/private-lora"
ALICE, BOB, MALLORY = (
    "hf_aliceTokenAAAAAAAAAAAAAAAA",
    "hf_bobTokenBBBBBBBBBBBBBBBBBB",
    "hf_forgedMMMMMMMMMMMMMMMMMM",
)
AWS_KEY_ID, AWS_SECRET = "AKIALEAKCHECK7Q2XZ9", "leakcheck/SECRET+do-not-log-9f8e7d6c"
SERVER_HF_TOKEN, PBASE_TOKEN = "hf_serverOwnTokenSSSSSSSSSSSSSS", "pb-operator-token-PPPPPPPP"
SECRETS = (ALICE, BOB, MALLORY, AWS_KEY_ID, AWS_SECRET, SERVER_HF_TOKEN, PBASE_TOKEN)

PROMPTS = ("hello world", "the quick brown fox", "adapters change what", "many adapters share one batch")
MAX_NEW = 6  # small: the soak's 2,000 requests must fit CI


@dataclass
class Peers:
    s3: S3TestServer
    s3_proxy: FaultProxy
    hub: FakeHub
    hub_proxy: FaultProxy

    def s3_uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"


@dataclass
class Stack:
    """The main server plus what it was built from."""

    server: ServerProcess
    assets: Assets
    peers: Peers

    @property
    def url(self) -> str:
        return self.server.url

    def adapter_params(self, name: str | None) -> dict:
        """Request parameters selecting one of the good adapters through its own source."""
        if name is None:
            return {}
        if name in ("alpha", "beta"):
            return {"adapter_id": str(self.assets.good[name]), "adapter_source": "local"}
        if name == "gamma":
            return {"adapter_id": self.peers.s3_uri("gamma"), "adapter_source": "s3"}
        if name == "delta":
            return {"adapter_id": HUB_REPO, "adapter_source": "hub"}
        raise KeyError(name)


def server_env(peers: Peers, cache: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": peers.s3_proxy.url,
        "HF_ENDPOINT": peers.hub_proxy.url,
        "HF_HUB_CACHE": str(cache / "hf"),
        "HF_TOKEN": SERVER_HF_TOKEN,  # the operator's token: must never be used for callers nor leak
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREDIBASE_GATEWAY_ENDPOINT": "http://127.0.0.1:9",
    }


def good_body(stack: Stack, prompt: str, adapter: str | None, **extra: object) -> dict:
    params = {"max_new_tokens": MAX_NEW, "ignore_eos_token": True, **stack.adapter_params(adapter), **extra}
    return {"inputs": prompt, "parameters": params}
