#!/usr/bin/env python3
"""Sync cost at scale: full passes and one changed object, against the kernel.

For each size (default 1k, 10k and 50k Mappings) this builds a realistic cluster view, runs it
through the real edges inside a throwaway network namespace and reports medians and p95 over
repeats:

  full pass   plan(), render(), Ruleset.text() and the nft transaction, each on its own; then
              the whole start-up pass as the daemon does it: a fresh Reconciler and Dataplane,
              store snapshot -> plan -> render -> nft -> routes -> conntrack sweep;
  one change  one Mapping changed in the store (its port, then its allow-list, in turn), then
              one reconciler pass (snapshot -> plan -> render/diff -> nft -> routes ->
              conntrack) through the real Dataplane; the same for one EndpointSlice (a pod
              replaced). Broken down into nft, the rest of Dataplane.apply, and the
              reconciler's own work (snapshot, plan, bookkeeping).

Run as root (`make bench`, or `.venv/bin/python bench/sync.py --sizes 1000,10000 --json out.json`).
Everything happens in a namespace `sn-bench-XXXX` deleted at the end, even after a failure.
Write-back is a no-op here: status patches go to the API server after the pass and are not
part of the kernel sync being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from common import exit_on_sigterm  # bench/common.py
from pyroute2 import AsyncIPRoute

from smartnatd.daemon import GC_THRESHOLDS, settle_heap
from smartnatd.dataplane import Dataplane
from smartnatd.host import discover
from smartnatd.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Host,
    Mapping,
    MappingPort,
    MappingSpec,
    Mode,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
)
from smartnatd.nft.render import render
from smartnatd.planner import Plan, plan
from smartnatd.reconciler import Reconciler
from smartnatd.settings import Settings
from smartnatd.store import Kind, Store

SETTINGS = Settings(interfaces_pattern=r"^ext[0-9]+$", default_gw_interface="eth0", instance_name="bench")

# The box: two external interfaces with 32 addresses each (primary first), and eth0 towards
# the cluster. 203.0.113.0/24 is the other appliance of a pair: Mappings there are NotLocal.
EXT = {
    "ext1": [IPv4Address("192.0.2.10") + i for i in range(32)],
    "ext2": [IPv4Address("198.51.100.10") + i for i in range(32)],
}
LOCAL = [a for addrs in EXT.values() for a in addrs]
REMOTE = [IPv4Address("203.0.113.10") + i for i in range(8)]
NAMESPACES = 100
# A few distinct allow-lists, as real clusters have (office, partner, VPN ranges); None = anyone.
ALLOW_LISTS: tuple[tuple[str, ...] | None, ...] = (
    None, None, None,
    ("203.0.113.0/24",),
    ("198.18.0.0/15",),
    ("192.0.2.128/25", "203.0.113.0/24"),
    ("10.0.0.0/8",),
    ("100.64.0.0/10", "172.16.0.0/12"),
)
CHANGED_PORT_BASE = 40000  # external ports the changed Mapping moves to; unused by the cluster


@dataclass(frozen=True)
class Cluster:
    mappings: tuple[Mapping, ...]
    services: tuple[Service, ...]
    slices: tuple[EndpointSlice, ...]


def build_cluster(n: int, *, direct_percent: int = 25, own_allow_percent: int = 0) -> Cluster:
    """n Mappings, deterministic: `direct_percent` in direct mode, the rest in service mode;
    20% with a TCP and a UDP port; 5% with a second address; 5% on the other appliance's
    addresses (NotLocal here); 3/8 open to anyone, the rest share 5 allow-lists. Each has its
    own Service with one EndpointSlice of 1-3 ready pods (so 60% of direct-mode Mappings
    spread over several pods through dnat-spread). `own_allow_percent` of them instead get an
    allow-list of their own (a /29 and a /32), as when every team lists its own clients."""
    mappings: list[Mapping] = []
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    next_port: dict[IPv4Address, int] = {}

    pod = int(IPv4Address("10.128.0.1"))
    for i in range(n):
        ns = f"team-{i % NAMESPACES:03d}"
        name = f"app-{i:05d}"
        two_ports = i % 5 == 0
        remote = i % 20 == 7
        pool = REMOTE if remote else LOCAL
        address = pool[i % len(pool)]
        addresses = [address]
        if i % 20 == 3 and not remote:
            addresses.append(LOCAL[(i + len(LOCAL) // 2) % len(LOCAL)])
        count = 2 if two_ports else 1
        # Ports unique per address across the cluster; a second address reuses the free port
        # of both so each endpoint is claimed once.
        port = max(next_port.get(a, 1024) for a in addresses)
        for a in addresses:
            next_port[a] = port + count
        ports = [MappingPort(port, Protocol.TCP, 80)]
        sports = [ServicePort("http", Protocol.TCP, 80, 8080)]
        eports = [EndpointPort("http", Protocol.TCP, 8080)]
        if two_ports:
            ports.append(MappingPort(port + 1, Protocol.UDP, 53))
            sports.append(ServicePort("dns", Protocol.UDP, 53, 5353))
            eports.append(EndpointPort("dns", Protocol.UDP, 5353))
        allow = ALLOW_LISTS[i % len(ALLOW_LISTS)]
        if (i * 13) % 100 < own_allow_percent:  # i*13 runs through every residue mod 100
            block = IPv4Address("100.64.0.0") + 16 * i
            allow = (f"{block}/29", f"{block + 8}/32")
        sources = tuple(IPv4Network(s) for s in allow) if allow else (IPv4Network("0.0.0.0/0"),)
        spec = MappingSpec(
            addresses=tuple(addresses),
            allowed_sources=sources,
            service_name=f"svc-{i:05d}",
            # i*7 runs through every residue mod 100: exact shares in each block of 100.
            mode=Mode.DIRECT if (i * 7) % 100 < direct_percent else Mode.SERVICE,
            ports=tuple(ports),
        )
        mappings.append(
            Mapping(
                key=ObjectKey(ns, name),
                spec=spec,
                # Spread over days so the conflict order is by time, then name.
                creation_timestamp=f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
                generation=1,
                uid=f"uid-{i}",
            )
        )
        services.append(
            Service(key=ObjectKey(ns, spec.service_name), cluster_ip=IPv4Address("10.96.0.0") + 1 + i, ports=tuple(sports))
        )
        pods = (1, 2, 3)[i % 5 % 3]
        endpoints = tuple(Endpoint((IPv4Address(pod + k),), True) for k in range(pods))
        pod += pods
        slices.append(
            EndpointSlice(
                key=ObjectKey(ns, f"{spec.service_name}-x7k2p"),
                service_name=spec.service_name,
                ports=tuple(eports),
                endpoints=endpoints,
            )
        )
    return Cluster(tuple(mappings), tuple(services), tuple(slices))


# --- the namespace ------------------------------------------------------------------------


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True)


@contextmanager
def bench_netns() -> Iterator[str]:
    """A namespace holding the box's external addresses on veth pairs (this kernel has no dummy
    driver), deleted afterwards whatever happened."""
    ns = f"sn-bench-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
    try:
        batch = ["link set lo up"]
        for iface, addrs in EXT.items():
            batch += [f"link add {iface} type veth peer name {iface}p", f"link set {iface}p up", f"link set {iface} up"]
            batch += [f"addr add {a}/24 dev {iface}" for a in addrs]
        batch += ["link add eth0 type veth peer name eth0p", "link set eth0p up", "link set eth0 up",
                  "addr add 10.10.0.2/24 dev eth0", "route add default via 10.10.0.1 dev eth0"]
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n", check=True,
                       capture_output=True, text=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


async def discover_host(ns: str) -> Host:
    async with AsyncIPRoute(netns=ns, flags=0) as ipr:
        return await discover(ipr, pattern=SETTINGS.interfaces_regex, default_gw_interface="eth0")


# --- statistics ---------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, float]:
    """Seconds in, milliseconds out: median, p95 (nearest rank), min, max."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, -(-95 * len(ordered) // 100) - 1))
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[rank] * 1000, 3),
        "min_ms": round(ordered[0] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "n": len(ordered),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


class NullWriteback:
    async def publish(self, plan: Plan, *, previous: Plan | None) -> None:
        pass


class NullNotifier:
    def ready(self, status: str) -> None: ...
    def status(self, status: str) -> None: ...
    def watchdog(self) -> None: ...


class Probe:
    """Times the Dataplane's apply, its nft call, its routing and its conntrack cleanup from
    the outside, by wrapping them on the instance, so the code measured is the daemon's own.
    (Routing and conntrack are private attributes: a bench may look inside, code may not.)"""

    def __init__(self, dataplane: Dataplane) -> None:
        self.apply_s = 0.0
        self.nft_s = 0.0
        self.routing_s = 0.0
        self.conntrack_s = 0.0
        self.full: bool | None = None
        self.ops = 0
        apply, run = dataplane.apply, dataplane.runner.run
        routing, conntrack = dataplane._routing, dataplane._conntrack
        routing_apply, conntrack_delete = routing.apply, conntrack.delete

        async def timed_routing(paths: Any, **options: Any) -> Any:
            started = time.perf_counter()
            try:
                return await routing_apply(paths, **options)
            finally:
                self.routing_s = time.perf_counter() - started

        async def timed_conntrack(filters: Any, **options: Any) -> Any:
            started = time.perf_counter()
            try:
                return await conntrack_delete(filters, **options)
            finally:
                self.conntrack_s = time.perf_counter() - started

        routing.apply = timed_routing  # type: ignore[method-assign]
        conntrack.delete = timed_conntrack  # type: ignore[method-assign]

        async def timed_apply(desired: Any, *, full: bool = False) -> Any:
            self.nft_s = self.routing_s = self.conntrack_s = 0.0
            started = time.perf_counter()
            report = await apply(desired, full=full)
            self.apply_s = time.perf_counter() - started
            self.full, self.ops = report.full, report.nft_operations
            return report

        def timed_run(text: str) -> None:
            started = time.perf_counter()
            run(text)
            self.nft_s = time.perf_counter() - started

        dataplane.apply = timed_apply  # type: ignore[method-assign]
        dataplane.runner.run = timed_run  # type: ignore[method-assign]


class Settler:
    """The daemon's pass hook without the metrics: settle the heap after a full pass. It runs
    after the pass (after READY=1 at start-up), so its time is taken out of the pass's and
    reported apart."""

    def __init__(self) -> None:
        self.took = 0.0

    def __call__(self, report: Any, took: float, ok: bool) -> None:
        self.took = 0.0
        if ok and report is not None and report.full:
            started = time.perf_counter()
            settle_heap()
            self.took = time.perf_counter() - started


def fill(store: Store, cluster: Cluster, host: Host) -> None:
    store.replace(Kind.MAPPINGS, cluster.mappings)
    store.replace(Kind.SERVICES, cluster.services)
    store.replace(Kind.ENDPOINT_SLICES, cluster.slices)
    store.set_host(host)


def new_dataplane(ns: str, state_dir: Path) -> Dataplane:
    return Dataplane(netns=ns, table_base=SETTINGS.route_table_base, rule_priority=SETTINGS.rule_priority,
                     state_dir=state_dir)


# --- measurements -------------------------------------------------------------------------


async def measure_full(ns: str, cluster: Cluster, host: Host, repeat: int, state_dir: Path) -> dict[str, Any]:
    store = Store()
    fill(store, cluster, host)
    snapshot = store.snapshot()
    parts: dict[str, list[float]] = {
        "plan": [], "render": [], "text": [], "nft": [], "total": [],
        # The start-up pass broken down like a single change (see measure_changes).
        "total_reconciler": [], "total_render_text": [], "total_nft": [], "total_routing": [], "total_conntrack": [],
        # The periodic resync: a full pass right after the start-up pass, nothing changed.
        "resync": [], "resync_reconciler": [], "resync_render_text": [], "resync_nft": [], "resync_routing": [],
        "resync_conntrack": [],
        # settle_heap() after each of those full passes: the loop is busy, the pass is done.
        "total_settle": [], "resync_settle": [],
    }
    counts: dict[str, int] = {}
    dataplane = new_dataplane(ns, state_dir)
    async with dataplane:
        for _ in range(repeat):
            gc.collect()
            took, p = timed(lambda: plan(snapshot, SETTINGS))
            parts["plan"].append(took)
            took, ruleset = timed(lambda: render(p.desired))
            parts["render"].append(took)
            took, text = timed(ruleset.text)
            parts["text"].append(took)
            took, _ = timed(lambda: dataplane.runner.run(text))
            parts["nft"].append(took)
        counts = {
            "mappings": len(p.verdicts),
            "configured": sum(1 for v in p.verdicts if v.kind == "Configured"),
            "endpoints": len(p.desired.dnats),
            "chains": len(ruleset.chains),
            "elements": sum(len(s.elements) for s in ruleset.sets),
            "transaction_bytes": len(text.encode()),
        }
    # The start-up pass: what a restarted daemon does before READY=1.
    for _ in range(repeat):
        dataplane = new_dataplane(ns, state_dir)
        async with dataplane:
            # As the daemon runs it: the heap settled after each full pass.
            settler = Settler()
            reconciler = Reconciler(store=store, dataplane=dataplane, settings=SETTINGS,
                                    writeback=NullWriteback(), notifier=NullNotifier(),
                                    on_pass=settler)
            probe = Probe(dataplane)
            # The start-up pass, then the periodic resync on the same reconciler.
            for total_key, prefix in (("total", "total_"), ("resync", "resync_")):
                gc.collect()
                started = time.perf_counter()
                assert await reconciler.run_once(full=True), f"{total_key} pass failed"
                total = time.perf_counter() - started - settler.took
                assert probe.full
                parts[total_key].append(total)
                parts[prefix + "reconciler"].append(total - probe.apply_s)
                parts[prefix + "render_text"].append(probe.apply_s - probe.nft_s - probe.routing_s - probe.conntrack_s)
                parts[prefix + "nft"].append(probe.nft_s)
                parts[prefix + "routing"].append(probe.routing_s)
                parts[prefix + "conntrack"].append(probe.conntrack_s)
                parts[prefix + "settle"].append(settler.took)
    return {"counts": counts, **{k: summary(v) for k, v in parts.items()}}


def _spec(m: Mapping) -> MappingSpec:
    assert isinstance(m.spec, MappingSpec)
    return m.spec


def changed_mapping(m: Mapping, step: int) -> Mapping:
    """Step through realistic edits: move the external port, then change the allow-list."""
    spec = _spec(m)
    if step % 2 == 0:
        port = CHANGED_PORT_BASE + step
        ports = (dataclasses.replace(spec.ports[0], port=port),) + spec.ports[1:]
        spec = dataclasses.replace(spec, ports=ports)
    else:
        lists = [a for a in ALLOW_LISTS if a] + [("0.0.0.0/0",)]
        allow = lists[(step // 2) % len(lists)]
        spec = dataclasses.replace(spec, allowed_sources=tuple(IPv4Network(s) for s in allow))
    return dataclasses.replace(m, spec=spec, generation=m.generation + 1)


def changed_slice(s: EndpointSlice, step: int) -> EndpointSlice:
    """A pod replaced: the last endpoint gets a new address."""
    fresh = Endpoint((IPv4Address("10.200.0.0") + step,), True)
    return dataclasses.replace(s, endpoints=s.endpoints[:-1] + (fresh,))


async def measure_changes(ns: str, cluster: Cluster, host: Host, repeat: int, state_dir: Path) -> dict[str, Any]:
    store = Store()
    fill(store, cluster, host)
    out: dict[str, Any] = {}
    dataplane = new_dataplane(ns, state_dir)
    async with dataplane:
        reconciler = Reconciler(store=store, dataplane=dataplane, settings=SETTINGS,
                                writeback=NullWriteback(), notifier=NullNotifier(),
                                on_pass=Settler())
        assert await reconciler.run_once(full=True), "first pass failed"
        probe = Probe(dataplane)
        # A Mapping in the middle of the list, and the EndpointSlice of a local direct-mode
        # Mapping spreading over several pods (its dnat-spread element changes with the pod).
        half = len(cluster.mappings) // 2
        mapping = cluster.mappings[half]
        direct = next(
            (
                i for i in range(half, len(cluster.mappings))
                if _spec(cluster.mappings[i]).mode == Mode.DIRECT and len(cluster.slices[i].endpoints) > 1
                and _spec(cluster.mappings[i]).addresses[0] in LOCAL
            ),
            None,
        )
        scenarios: dict[str, Callable[[int], Callable[[], None]]] = {
            "mapping": lambda step: lambda: store.upsert(Kind.MAPPINGS, changed_mapping(mapping, step)),
        }
        if direct is not None:
            scenarios["endpoints"] = lambda step: lambda: store.upsert(
                Kind.ENDPOINT_SLICES, changed_slice(cluster.slices[direct], step)
            )
        for scenario, change in scenarios.items():
            samples: dict[str, list[float]] = {
                "total": [], "apply": [], "nft": [], "routing": [], "conntrack": [], "render_diff": [], "reconciler": []
            }
            ops: list[int] = []
            for step in range(repeat + 2):
                edit = change(step)
                gc.collect()
                started = time.perf_counter()
                edit()
                ok = await reconciler.run_once()
                total = time.perf_counter() - started
                assert ok, f"{scenario} pass failed"
                assert probe.full is False, f"{scenario}: the pass after one change was full"
                if step < 2:
                    continue  # warm-up: first diffs after the full pass also delete stale chains
                samples["total"].append(total)
                samples["apply"].append(probe.apply_s)
                samples["nft"].append(probe.nft_s)
                samples["routing"].append(probe.routing_s)
                samples["conntrack"].append(probe.conntrack_s)
                # What is left of apply: rendering, diffing, the conntrack filters, bookkeeping.
                samples["render_diff"].append(probe.apply_s - probe.nft_s - probe.routing_s - probe.conntrack_s)
                # Store snapshot, planner, the reconciler's own bookkeeping.
                samples["reconciler"].append(total - probe.apply_s)
                ops.append(probe.ops)
            out[scenario] = {"nft_operations": max(ops), **{k: summary(v) for k, v in samples.items()}}
    return out


async def run(
    sizes: list[int], repeat: int, change_repeat: int, changes_from: int, direct_percent: int,
    own_allow_percent: int = 0,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with bench_netns() as ns, tempfile.TemporaryDirectory(prefix="smartnat-bench-") as tmp:
        host = await discover_host(ns)
        for n in sizes:
            cluster = build_cluster(n, direct_percent=direct_percent, own_allow_percent=own_allow_percent)
            print(f"size {n}: full pass x{repeat} ...", file=sys.stderr, flush=True)
            entry: dict[str, Any] = {"full": await measure_full(ns, cluster, host, repeat, Path(tmp))}
            if n >= changes_from:
                print(f"size {n}: one change x{change_repeat} ...", file=sys.stderr, flush=True)
                entry["change"] = await measure_changes(ns, cluster, host, change_repeat, Path(tmp))
            results[str(n)] = entry
            del cluster
    return results


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "nft": nft}


def print_table(results: dict[str, Any]) -> None:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median_ms']:9.1f} {s['p95_ms']:8.1f}"

    print("full pass (ms: median p95)")
    print(f"{'mappings':>9} {'endpoints':>9} | {'plan':>18} | {'render':>18} | {'text':>18} | {'nft':>18} | {'total':>18}")
    for n, entry in results.items():
        f = entry["full"]
        print(f"{n:>9} {f['counts']['endpoints']:>9} | " + " | ".join(
            cell(f[k]) for k in ("plan", "render", "text", "nft", "total")))
    print("\nstart-up pass through the reconciler, broken down (ms: median p95)")
    columns = ("total", "total_reconciler", "total_render_text", "total_nft", "total_routing", "total_conntrack",
               "total_settle")
    titles = ("total", "snapshot+plan", "render+text", "nft", "routing", "conntrack", "then settle heap")
    print(f"{'mappings':>9} | " + " | ".join(f"{t:>18}" for t in titles))
    for n, entry in results.items():
        print(f"{n:>9} | " + " | ".join(cell(entry["full"][k]) for k in columns))
    print("\nperiodic resync: a full pass of an unchanged cluster, after the start-up pass (ms: median p95)")
    print(f"{'mappings':>9} | " + " | ".join(f"{t:>18}" for t in titles))
    for n, entry in results.items():
        print(f"{n:>9} | " + " | ".join(
            cell(entry["full"]["resync_" + k.removeprefix("total_") if k != "total" else "resync"]) for k in columns))
    if any("change" in e for e in results.values()):
        print("\none change, reconciler pass through the real Dataplane (ms: median p95)")
        columns = ("total", "reconciler", "render_diff", "nft", "routing", "conntrack")
        titles = ("total", "snapshot+plan", "render+diff", "nft", "routing", "conntrack")
        print(f"{'mappings':>9} {'change':>9} {'ops':>4} | " + " | ".join(f"{t:>18}" for t in titles))
        for n, entry in results.items():
            for scenario, c in entry.get("change", {}).items():
                print(f"{n:>9} {scenario:>9} {c['nft_operations']:>4} | " + " | ".join(cell(c[k]) for k in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated Mapping counts")
    parser.add_argument("--repeat", type=int, default=5, help="full passes per size")
    parser.add_argument("--change-repeat", type=int, default=50, help="single-change passes per size and scenario")
    parser.add_argument("--changes-from", type=int, default=10000,
                        help="measure single changes at sizes from this many Mappings up")
    parser.add_argument("--direct-percent", type=int, default=25,
                        help="share of Mappings in direct mode (each multi-pod one spreads through dnat-spread)")
    parser.add_argument("--own-allow-lists", type=int, default=0, metavar="PERCENT",
                        help="share of Mappings with an allow-list of their own instead of a shared one")
    parser.add_argument("--gc-threshold", type=int, default=-1,
                        help="gc.set_threshold(N, 20, 10) first; 0: Python's default (700, 10, 10); "
                             "default: the daemon's own thresholds")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the namespaces are still deleted.
    signal.signal(signal.SIGTERM, exit_on_sigterm(os.getpid()))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if os.geteuid() != 0:
        print("bench/sync.py needs root (a network namespace and nftables)", file=sys.stderr)
        return 77
    logging.basicConfig(level=logging.WARNING)
    # As the daemon runs (smartnatd/daemon.py GC_THRESHOLDS) unless told otherwise.
    if args.gc_threshold < 0:
        gc.set_threshold(*GC_THRESHOLDS)
    elif args.gc_threshold == 0:
        gc.set_threshold(700, 10, 10)
    else:
        gc.set_threshold(args.gc_threshold, 20, 10)
    started = time.time()
    results = asyncio.run(
        run(sizes, args.repeat, args.change_repeat, args.changes_from, args.direct_percent, args.own_allow_lists)
    )
    print_table(results)
    if args.json:
        document = {
            "bench": "sync",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "machine": machine(),
            "repeat": args.repeat,
            "change_repeat": args.change_repeat,
            "direct_percent": args.direct_percent,
            "own_allow_percent": args.own_allow_lists,
            "gc_thresholds": list(gc.get_threshold()),
            "sizes": results,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
