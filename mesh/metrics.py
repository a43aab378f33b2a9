"""Prometheus metrics of a node, on their own HTTP port (`--metrics-listen`, MESH_METRICS_LISTEN).

Why prometheus-client: it is the exposition format every fleet scrapes, and its text parser lets tests read
what a scraper would. Counters are read from the node at scrape time (one source of truth with `mesh stats`,
nothing to keep in step); only latencies are recorded as they happen, in histograms. Every series is named
`comfy_mesh_*`; the endpoint carries no secret data (counts, sizes, times, member states).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from mesh.address import join_hostport, split_hostport
from mesh.pb import mesh_pb2 as pb

log = logging.getLogger(__name__)

PREFIX = "comfy_mesh_"
# Monotonic counts among the node's counters (mesh stats); everything else is a gauge.
COUNTERS = {
    "hits", "misses", "puts", "duplicate_puts", "evictions", "pressure_evictions", "deletes", "bytes_in",
    "bytes_out", "refused", "conflicts_kept", "tombstoned", "transfer_errors", "busy_refusals",
    "inflight_refusals", "stalled_streams", "remote_hits", "remote_misses", "previous_owner_hits", "near_hits",
    "owner_failures", "replica_write_failures", "uncached_reads", "repair_passes", "repaired", "handed_off",
    "repair_errors", "repair_deletes_applied", "hinted_puts", "disk_errors", "disk_corrupt", "disk_evictions",
    "provider_lookups", "provider_hits", "provider_misses", "provider_errors", "provider_stores",
    "provider_stores_dropped", "provider_store_errors", "provider_bytes_in", "provider_bytes_out",
    "provider_breaker_trips",
    "lease_granted", "lease_renewed", "lease_released", "lease_expired", "lease_done", "lease_held", "lease_dropped",
    "provider_dedupe_leases", "provider_dedupe_waits", "provider_dedupe_wait_hits", "provider_dedupe_wait_timeouts",
    "provider_dedupe_takeovers", "provider_dedupe_lease_errors", "provider_dedupe_wait_seconds",
    "provider_dedupe_saved_seconds",
    "compute_seconds_saved", "provider_compute_seconds_saved", "provider_bridge_stores_cheap",
}
# The store's per-class counters, `class.<class type>.<name>` in mesh stats: one labelled family per name here.
CLASS_COUNTERS = {"hits": "Values served, by ComfyUI class type",
                  "bytes_out": "Bytes of the values served, by ComfyUI class type",
                  "seconds_saved": "Compute seconds the values served had cost their writers, by ComfyUI class type"}
GET_SOURCES = {"hits": "local", "remote_hits": "owner", "near_hits": "near_cache",
               "previous_owner_hits": "previous_owner"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _NodeCollector:
    def __init__(self, counters: Callable[[], dict[str, float]], members: Callable[[], list[pb.Member]]) -> None:
        self._counters = counters
        self._members = members

    def collect(self) -> Iterator[Metric]:
        counters = self._counters()
        sources = CounterMetricFamily(PREFIX + "gets_served", "Gets answered with a value, by where it came from",
                                      labels=["source"])
        for name, source in GET_SOURCES.items():
            sources.add_metric([source], counters.get(name, 0.0))
        yield sources
        by_class = {name: CounterMetricFamily(PREFIX + f"class_{name}", help, labels=["class_type"])
                    for name, help in CLASS_COUNTERS.items()}
        for name, value in sorted(counters.items()):
            if name.startswith("class."):
                class_type, _, counter = name[len("class."):].rpartition(".")
                if counter in by_class:
                    by_class[counter].add_metric([class_type], value)
                continue
            metric = PREFIX + name.replace(".", "_")
            if name in COUNTERS:
                yield CounterMetricFamily(metric, f"mesh stats counter {name}", value=value)
            else:
                yield GaugeMetricFamily(metric, f"mesh stats value {name}", value=value)
        yield from by_class.values()
        states = GaugeMetricFamily(PREFIX + "members", "Members this node knows, by state", labels=["state"])
        members = self._members()
        for state in ("ALIVE", "SUSPECT", "DEAD", "LEFT"):
            states.add_metric([state], sum(1 for m in members if pb.MemberState.Name(m.state) == state))
        yield states


class _ClassCollector:
    """An embedded provider's lookups by ComfyUI class type (which nodes the mesh pays off for)."""

    def __init__(self, class_stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        self._stats = class_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        families = {name: CounterMetricFamily(PREFIX + f"provider_class_{name}", f"Provider {name} by class type",
                                              labels=["class_type"])
                    for name in ("lookups", "hits", "misses", "errors", "bytes", "compute_seconds_saved")}
        seconds = SummaryMetricFamily(PREFIX + "provider_class_lookup_seconds",
                                      "Time lookups cost prompts, by class type", labels=["class_type"])
        for class_type, row in sorted(stats.items()):
            for name, family in families.items():
                family.add_metric([class_type], row.get(name, 0.0))
            seconds.add_metric([class_type], count_value=row["lookups"], sum_value=row["lookup_seconds"])
        yield from families.values()
        yield seconds


class Metrics:
    """The registry of one node (a process may embed several in tests) and its HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(PREFIX + "rpc_seconds", "Time to serve an RPC, by method",
                                     labelnames=["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._server: Any = None
        self.address = ""

    def watch(self, counters: Callable[[], dict[str, float]], members: Callable[[], list[pb.Member]]) -> None:
        self.registry.register(_NodeCollector(counters, members))  # type: ignore[arg-type]

    def watch_classes(self, class_stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        self.registry.register(_ClassCollector(class_stats))  # type: ignore[arg-type]

    def serve(self, listen: str) -> str:
        """Serve /metrics on HOST:PORT (port 0: any free port); returns the address it listens on."""
        host, port = split_hostport(listen)
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address[1]
        self.address = join_hostport(host, bound)
        log.info("metrics at http://%s/metrics", self.address)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
