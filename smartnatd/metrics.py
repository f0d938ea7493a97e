"""smartnat_* metrics: definitions, updates after each pass, and per-Mapping nft counters."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from smartnatd import __version__
from smartnatd.dataplane import ApplyReport
from smartnatd.errors import NftError
from smartnatd.host import LinkState
from smartnatd.nft import names
from smartnatd.nft.runner import NftRunner, ProcessRunner
from smartnatd.reconciler import Health

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# An nft listing for /metrics that takes longer is given up (the scrape then has no per-Mapping
# counters): ~0.2 s at 10k Mappings, so only a stuck nft reaches it, and a scrape waits no longer.
COUNTER_TIMEOUT = 5.0
# A counter reading is served again for this long: a flood of scrapes runs at most one nft
# listing a second, and a Prometheus scraping every 5 s or more always gets a fresh one.
COUNTERS_MAX_AGE = 1.0


class _StateCollector(Collector):
    """Gauges read from the published Health at scrape time, so they are never stale."""

    def __init__(
        self,
        health: Callable[[], Health],
        sources: Callable[[], dict[str, bool]] | None = None,
        links: Callable[[], Sequence[LinkState]] | None = None,
    ) -> None:
        self._health = health
        self._sources = sources
        self._links = links

    def collect(self) -> Iterator[GaugeMetricFamily]:
        h = self._health()
        mappings = GaugeMetricFamily("smartnat_mappings", "Mappings by verdict of the last successful pass", labels=["verdict"])
        for verdict in ("Configured", "NotLocal", "Invalid", "Conflict", "Waiting", "Deleting"):
            mappings.add_metric([verdict], h.verdicts.get(verdict, 0))
        yield mappings
        # Counted once per pass by the reconciler; a reason without a problem has no series.
        problems = GaugeMetricFamily(
            "smartnat_mapping_problems",
            "Mappings whose verdict of the last successful pass is a problem, by its Event reason",
            labels=["reason"],
        )
        for reason, n in sorted(h.problems.items()):
            problems.add_metric([reason], n)
        yield problems
        yield GaugeMetricFamily("smartnat_endpoints", "External endpoints served by this appliance", value=h.endpoints)
        yield GaugeMetricFamily("smartnat_ready", "1 after the first successful full pass", value=int(h.ready))
        if h.last_success_wall is not None:
            yield GaugeMetricFamily(
                "smartnat_last_sync_success_timestamp_seconds",
                "Unix time of the last successful pass",
                value=h.last_success_wall,
            )
        yield GaugeMetricFamily(
            "smartnat_consecutive_sync_failures", "Failed passes since the last success", value=h.consecutive_failures
        )
        if self._sources is not None:
            up = GaugeMetricFamily(
                "smartnat_source_up", "1 while a source has listed and is not failing, else 0", labels=["source"]
            )
            for name, ok in sorted(self._sources().items()):
                up.add_metric([name], int(ok))
            yield up
        if self._links is not None:
            yield from _link_metrics(self._links())


def _link_metrics(links: Sequence[LinkState]) -> Iterator[GaugeMetricFamily]:
    up = GaugeMetricFamily(
        "smartnat_external_interface_up",
        "1 while an external interface is served as up (held ones included), 0 when reported down",
        labels=["interface"],
    )
    held = GaugeMetricFamily(
        "smartnat_external_interface_held",
        "1 while an external interface is down but still served as up (SNCTRLR_LINK_DOWN_HOLD_SEC), else 0",
        labels=["interface"],
    )
    for link in links:
        up.add_metric([link.name], int(link.up))
        held.add_metric([link.name], int(link.held))
    yield up
    yield held


class _CounterCollector(Collector):
    """Per-Mapping packets and bytes from the nft element counters of external-ports, read
    at most once per `max_age` seconds (a failed reading counts: a stuck nft is not asked
    again by every scrape of a flood)."""

    def __init__(
        self, read: Callable[[], dict[str, tuple[int, int, str]]], *, max_age: float, clock: Callable[[], float]
    ) -> None:
        self._read = read
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()  # one reading at a time, whichever thread scrapes
        self._last: tuple[float, dict[str, tuple[int, int, str]]] | None = None

    def _counters(self) -> dict[str, tuple[int, int, str]]:
        with self._lock:
            if self._last is not None and self._clock() - self._last[0] < self._max_age:
                return self._last[1]
            try:
                counters = self._read()
            except Exception:  # a scrape must not fail because the table is being replaced
                logger.debug("reading nft counters failed", exc_info=True)
                counters = {}
            self._last = (self._clock(), counters)
            return counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        # Counted by the external-ports lookup every client-to-endpoint packet passes (replies
        # are not counted: their destination is the client).
        packets = CounterMetricFamily(
            "smartnat_mapping_packets", "Packets from clients to an external endpoint", labels=["mapping", "endpoint"]
        )
        octets = CounterMetricFamily(
            "smartnat_mapping_bytes", "Bytes from clients to an external endpoint", labels=["mapping", "endpoint"]
        )
        for key, (p, b, owner) in sorted(self._counters().items()):
            parts = key.split(" . ")
            endpoint = f"{parts[0]}:{parts[2]}/{parts[1]}" if len(parts) == 3 else key
            packets.add_metric([owner, endpoint], p)
            octets.add_metric([owner, endpoint], b)
        yield packets
        yield octets


class Metrics:
    def __init__(
        self,
        *,
        health: Callable[[], Health],
        counters: Callable[[], dict[str, tuple[int, int, str]]] | None,
        sources: Callable[[], dict[str, bool]] | None = None,
        links: Callable[[], Sequence[LinkState]] | None = None,
        counters_max_age: float = COUNTERS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "smartnat_sync_duration_seconds", "Time of one pass: snapshot, plan, apply, conntrack cleanup (not write-back)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.syncs = Counter("smartnat_syncs", "Successful passes", ["type"], registry=r)
        for kind in ("full", "incremental"):  # present from the start: rate() needs a zero to begin with
            self.syncs.labels(type=kind)
        self.failures = Counter("smartnat_sync_failures", "Passes the kernel rejected", registry=r)
        self.flows_deleted = Counter("smartnat_conntrack_flows_deleted", "Stale flows deleted from conntrack", registry=r)
        info = Gauge("smartnat_info", "smartnatd version", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        r.register(_StateCollector(health, sources, links))
        if counters is not None:
            r.register(_CounterCollector(counters, max_age=counters_max_age, clock=clock))

    def observe_pass(self, report: ApplyReport | None, took: float, ok: bool) -> None:
        self.sync_duration.observe(took)
        if not ok or report is None:
            self.failures.inc()
            return
        self.syncs.labels(type="full" if report.full else "incremental").inc()
        self.flows_deleted.inc(report.flows_deleted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def nft_counter_reader(
    runner: NftRunner, *, timeout: float = COUNTER_TIMEOUT
) -> Callable[[], dict[str, tuple[int, int, str]]]:
    """Reads the counters with an nft process of its own, given up after `timeout` seconds,
    where the command is installed. A listing at 10k Mappings takes ~0.2 s, and through the
    library runner it would hold the one context, and the next pass's transaction with it, for
    that long on every scrape; the transaction runner's own timeout (120 s) is for a pass."""
    reader: NftRunner
    try:
        reader = ProcessRunner(netns=runner.netns, timeout=timeout)
    except NftError as err:
        reader = runner
        logger.warning(
            "/metrics reads nft counters through the %s runner, without a %gs timeout%s (%s)",
            runner.backend, timeout, ": a pass waits while it does" if runner.backend == "library" else "", err,
        )
    return lambda: reader.element_counters(names.FAMILY, names.TABLE, names.EXTERNAL_PORTS)
