"""Adapter-source faults fail only the requests that need that source, with a clear error; a retry heals.

The S3 store and the hub sit behind `FaultProxy`, which answers 500s, hangs,
cuts downloads in half, or is really stopped. Meanwhile good traffic on other
adapters (local, and an S3 adapter already in host memory) must be unaffected.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.reliability.good_traffic import GoodTraffic, error_message
from tests.reliability.stack import PROMPTS, Stack, good_body

UNAFFECTED = (None, "alpha", "beta", "gamma")  # gamma is in host memory: its S3 store is not asked again


@pytest.mark.parametrize(
    "source,mode",
    [("s3", m) for m in ("error", "hang", "cut", "down")]
    + [("hub", m) for m in ("error", "hang", "cut", "down")],
)
def test_source_fault_fails_only_its_requests_and_a_retry_recovers(
    stack: Stack, oracle: dict, source: str, mode: str
) -> None:
    peers = stack.peers
    proxy = peers.s3_proxy if source == "s3" else peers.hub_proxy
    if source == "s3":
        params = {"adapter_id": peers.s3_uri(f"fault-{mode}"), "adapter_source": "s3"}
        expected = oracle[(PROMPTS[0], "gamma")]
    else:
        params = {"adapter_id": f"acme/fault-{mode}", "adapter_source": "hub"}
        expected = oracle[(PROMPTS[0], "delta")]
    body = good_body(stack, PROMPTS[0], None, **params)
    # gamma must be resident before its store breaks (it is, if an earlier test used it; make sure).
    assert (
        httpx.post(
            stack.url + "/generate", json=good_body(stack, PROMPTS[0], "gamma"), timeout=60
        ).status_code
        == 200
    )
    with GoodTraffic(stack, oracle, adapters=UNAFFECTED) as traffic:
        traffic.wait_served(3)
        if mode == "down":
            proxy.stop()
        else:
            proxy.set_mode(mode)
        try:
            t0 = time.monotonic()
            r = httpx.post(stack.url + "/generate", json=body, timeout=60)
            took = time.monotonic() - t0
        finally:
            if mode == "down":
                proxy.start()
            else:
                proxy.set_mode("pass")
        # LoRAX's loader answers any failed load 424; an unreachable source says a retry may work
        assert r.status_code == 424 and r.json()["error_type"] == "generation", r.text
        assert r.headers.get("retry-after") == "1"
        message = error_message(r).lower()
        assert params["adapter_id"].lower() in message and source in message, message
        assert took < 20, took  # a stalled source is cut off by --adapter-source-timeout-s, not waited on
        retry = httpx.post(stack.url + "/generate", json=body, timeout=60)
        assert retry.status_code == 200, retry.text
        assert retry.json()["generated_text"] == expected
        traffic.wait_served(traffic.served + 2)
    assert not traffic.failures, traffic.failures[:10]
