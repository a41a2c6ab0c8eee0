"""Read the server's live gauges from `/metrics`: the tests' window into KV blocks and slots."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

GAUGES = {
    "free_blocks": "loraserve_engine_free_blocks",
    "total_blocks": "loraserve_engine_total_blocks",
    "slots_in_use": "loraserve_engine_adapter_slots_in_use",
    "running": "lorax_batch_current_size",
    "waiting": "lorax_queue_length",
    "steps": "loraserve_engine_steps_total",
    "in_flight": "loraserve_requests_in_flight",
}


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return {key: float(values[metric]) for key, metric in GAUGES.items()}


def is_idle(g: dict[str, float]) -> bool:
    """Nothing running or queued, every KV block free, no adapter slot referenced, no request held."""
    return (
        g["free_blocks"] == g["total_blocks"]
        and g["slots_in_use"] == 0
        and g["running"] == 0
        and g["waiting"] == 0
        and g["in_flight"] == 0
    )


def wait_for(url: str, pred: Callable[[dict[str, float]], bool], timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    g = gauges(url)
    while not pred(g) and time.monotonic() < deadline:
        time.sleep(0.02)
        g = gauges(url)
    return g
