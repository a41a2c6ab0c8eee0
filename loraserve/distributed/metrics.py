"""Metrics across replicas: each replica pushes its `/metrics` text to a small hub deployment,
and the ingress's `/metrics` serves every replica's series with a `replica` label added.

A hub instead of asking replicas: Ray Serve routes a call to *some* replica and has no
broadcast, so the ingress could never be sure to reach each one. Replicas that stop
reporting (dead, replaced) drop out after `stale_after_s`.

Per replica, `loraserve_ray_adapter_lru_{hits,misses}_total` count requests whose adapter
key was (or was not) in the replica's multiplexed LRU: with adapter-aware routing, requests
for one adapter keep landing where it is loaded, so misses stay near one per adapter.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

#: Response header naming the replica that served a request (tests, debugging).
REPLICA_HEADER = "x-loraserve-replica"


def replica_counter_lines(counts: dict[str, int], slots: int, store: dict[str, Any]) -> str:
    """The replica's own routing counters in Prometheus text, appended to its app's `/metrics`."""
    lines = []
    for name, help_text, value in (
        (
            "loraserve_ray_adapter_lru_hits",
            "Requests whose adapter was in this replica's LRU",
            counts["hits"],
        ),
        ("loraserve_ray_adapter_lru_misses", "Requests that loaded their adapter key here", counts["misses"]),
        ("loraserve_ray_adapter_load_failures", "Adapter loads that failed here", counts["load_failures"]),
        ("loraserve_ray_adapter_store_loads", "Adapters read from their source here", store.get("loads", 0)),
    ):
        lines += [f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter", f"{name}_total {value}"]
    lines += [
        "# HELP loraserve_ray_adapter_lru_slots Adapter keys this replica keeps (max_num_models_per_replica)",
        "# TYPE loraserve_ray_adapter_lru_slots gauge",
        f"loraserve_ray_adapter_lru_slots {slots}",
    ]
    return "\n".join(lines) + "\n"


class MetricsHub:
    """A Ray Serve deployment class holding the latest snapshot of every replica."""

    def __init__(self, stale_after_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self.snapshots: dict[str, dict[str, Any]] = {}

    def report(self, snapshot: dict[str, Any]) -> None:
        self.snapshots[snapshot["replica"]] = snapshot

    def collect(self) -> list[dict[str, Any]]:
        now = time.time()
        for rid in [r for r, s in self.snapshots.items() if now - s["time"] > self.stale_after_s]:
            del self.snapshots[rid]
        return sorted(self.snapshots.values(), key=lambda s: s["replica"])


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def aggregate(snapshots: list[dict[str, Any]], ingress: dict[str, float]) -> bytes:
    """Every replica's series labelled `replica=<id>`, plus the ingress's own counters."""
    merged: dict[str, Metric] = {}
    for snap in snapshots:
        for family in text_string_to_metric_families(snap["metrics"]):
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                out.samples.append(sample._replace(labels={**sample.labels, "replica": snap["replica"]}))
    replicas = GaugeMetricFamily("loraserve_ray_replicas", "Replicas that reported metrics recently")
    replicas.add_metric([], len(snapshots))
    unavailable = CounterMetricFamily(
        "loraserve_ray_unavailable", "Requests answered 503 because their replica failed or died"
    )
    unavailable.add_metric([], ingress.get("unavailable", 0))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), replicas, unavailable]))  # type: ignore[arg-type]
    return generate_latest(registry)
