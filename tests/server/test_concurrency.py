"""Concurrent requests for different adapters through the server give the engine's own tokens."""

from __future__ import annotations

import asyncio

import httpx

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.fixtures.server import ServerProcess

PROMPTS = ["hello world", "the quick brown fox", "adapters change", "many adapters share one batch"]


def test_concurrent_mixed_adapters_match_engine_alone(server: ServerProcess) -> None:
    adapters = [None, "alpha", "beta"]
    jobs = [(p, a) for p in PROMPTS for a in adapters]  # 12 requests in flight at once

    async def fire() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(prompt: str, name: str | None) -> list[int]:
                params = {"max_new_tokens": 10, "details": True, "ignore_eos_token": True}
                if name:
                    params.update(adapter_id=str(server.adapters[name]), adapter_source="local")
                r = await client.post(server.url + "/generate", json={"inputs": prompt, "parameters": params})
                assert r.status_code == 200, r.text
                return [t["id"] for t in r.json()["details"]["tokens"]]

            return list(await asyncio.gather(*[one(p, a) for p, a in jobs]))

    served = asyncio.run(fire())

    engine = Engine.from_pretrained(
        server.model_dir, EngineConfig(max_batch_total_tokens=2048, num_threads=1)
    )
    loaded = {name: parse_peft_adapter(server.adapters[name]) for name in ("alpha", "beta")}
    outs = engine.generate(
        [p for p, _ in jobs],
        SamplingParams(max_new_tokens=10, ignore_eos_token=True),
        [loaded[a] if a else None for _, a in jobs],
    )
    alone = [[t.id for t in o.tokens] for o in outs]
    assert served == alone
    assert len({tuple(x) for x in served[:3]}) == 3  # the three adapters really differ
