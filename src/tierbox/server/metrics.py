"""Prometheus metrics of the daemon (prometheus-client), one registry per daemon.

Latency histograms are per tier; the dashboard reads its latency table from
the same histograms, so the page and ``/metrics`` never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: seconds: from a wasm create (~1 ms) to a VM boot under TCG (~tens of s)
BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)


class _StateCollector(Collector):
    """Gauges read at scrape time from the daemon's own tables."""

    def __init__(
        self,
        sandboxes: Callable[[], Iterable[tuple[str, str, int]]],
        restarts: Callable[[], dict[str, int]],
    ) -> None:
        self._sandboxes = sandboxes
        self._restarts = restarts

    def collect(self) -> Iterable[Any]:
        g = GaugeMetricFamily(
            "tierbox_sandboxes",
            "Sandboxes the daemon holds, by tier and state",
            labels=["tier", "state"],
        )
        for tier, state, n in self._sandboxes():
            g.add_metric([tier, state], n)
        yield g
        r = GaugeMetricFamily(
            "tierbox_daemon_restarts",
            "Starts of the daemon on this state after the first, by how the previous run ended",
            labels=["previous"],
        )
        for kind, n in self._restarts().items():
            r.add_metric([kind], n)
        yield r


class Metrics:
    """Every metric the daemon exports."""

    def __init__(
        self,
        sandboxes: Callable[[], Iterable[tuple[str, str, int]]],
        restarts: Callable[[], dict[str, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        self.create_s = Histogram(
            "tierbox_create_seconds",
            "Time to create a sandbox (the engine's start-up), by tier",
            ["tier"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.exec_s = Histogram(
            "tierbox_exec_seconds",
            "Time from starting a command to its end, by tier",
            ["tier"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.oom_kills = Counter(
            "tierbox_oom_kills",
            "Commands ended by the out-of-memory killer",
            ["tier"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "tierbox_timeouts",
            "Commands stopped at their time limit",
            ["tier"],
            registry=self.registry,
        )
        self.quota_refusals = Counter(
            "tierbox_quota_refusals",
            "Requests refused by a tenant quota, by quota",
            ["quota"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tierbox_http_requests",
            "HTTP requests by status class",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(sandboxes, restarts))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def latency_table(self) -> list[dict[str, Any]]:
        """Per tier: count, mean and bucket estimates of p50/p95 for create
        and exec, from the histograms."""
        rows: dict[str, dict[str, Any]] = {}
        for metric, what in ((self.create_s, "create"), (self.exec_s, "exec")):
            per_tier: dict[str, dict[str, Any]] = {}
            for family in metric.collect():
                for s in family.samples:
                    tier = s.labels.get("tier", "")
                    d = per_tier.setdefault(tier, {"buckets": []})
                    if s.name.endswith("_bucket"):
                        d["buckets"].append((float(s.labels["le"]), s.value))
                    elif s.name.endswith("_count"):
                        d["count"] = s.value
                    elif s.name.endswith("_sum"):
                        d["sum"] = s.value
            for tier, d in per_tier.items():
                count = int(d.get("count", 0))
                row = rows.setdefault(tier, {"tier": tier})
                row[f"{what}_count"] = count
                row[f"{what}_mean_s"] = d.get("sum", 0.0) / count if count else None
                row[f"{what}_p50_s"] = _quantile(d["buckets"], 0.5, count)
                row[f"{what}_p95_s"] = _quantile(d["buckets"], 0.95, count)
        keys = [
            f"{w}_{k}" for w in ("create", "exec") for k in ("count", "mean_s", "p50_s", "p95_s")
        ]
        return [{k: None for k in keys} | rows[t] for t in sorted(rows)]


def _quantile(buckets: list[tuple[float, float]], q: float, count: int) -> float | None:
    """The upper bound of the bucket holding the q-quantile (as Prometheus's
    histogram_quantile would bound it), None without observations."""
    if not count:
        return None
    want = q * count
    for le, cumulative in sorted(buckets):
        if cumulative >= want:
            return le if le != float("inf") else None
    return None
