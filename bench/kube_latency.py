#!/usr/bin/env python3
"""Latency from a Kubernetes API change to the kernel serving it, with many Mappings present.

A real `smartnatd run --netns AP` process watches the emulated API server of tests/kube (in this
process, on 127.0.0.1) while the API holds --mappings Mappings (default 10k: half on this
appliance's addresses, half on another appliance's) in 100 namespaces. Inside throwaway network
namespaces (the kernel test topology: client, appliance, router, two pods with echo servers),
each scenario changes one object over HTTP, as kubectl would, and probes with real TCP
connections from the client namespace until the change shows:

  create     a new Mapping (direct mode) on a fresh port: until a connection gets an echo
  endpoints  an EndpointSlice swaps pod1 for pod2: until a new connection reaches the new pod
  delete     that Mapping deleted: until connections are refused again (the finalizer then goes)

t0 is taken just before the write is sent; t1 is the start of the first probe attempt that sees
the change (see `probe`: an upper bound, within one failed attempt of 20 ms at most). For `create`
the time until this appliance's status entry appears is reported too (status after kernel).
Prints p50/p95/p99 per scenario; --json FILE writes all figures.

Run as root: `.venv/bin/python bench/kube_latency.py [--mappings 10000] [--repeats 30] [--json out.json]`.
The namespaces are deleted at the end, even after a failure. It imports the emulator and the
kernel harness from tests/ (run from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.kernel.harness import (  # noqa: E402
    NetnsFactory,
    NoReply,
    Topology,
    build_topology,
    ip_batch,
    new_netns_prefix,
    parse_echo_reply,
    start_pod_echo_servers,
    tcp_request,
)
from common import exit_on_sigterm  # noqa: E402  (bench/common.py)
from tests.kube.emulator import ENDPOINTSLICES, MAPPINGS, SERVICES, KubeEmulator  # noqa: E402

SMARTNATD = Path(sys.executable).parent / "smartnatd"
NAMESPACES = 100
EXTRA = [f"192.0.2.{i}" for i in range(20, 52)]  # more addresses on ext1, for the local Mappings
REMOTE = [f"203.0.113.{i}" for i in range(10, 42)]  # another appliance's addresses: NotLocal here
PROBE_NS = "bench"
PROBE_ADDRESS = "192.0.2.10"
FLIP_PORT = 81
PODS = {"pod1": "10.244.1.2", "pod2": "10.244.2.2"}


# --- the cluster ---------------------------------------------------------------------------

def service(namespace: str, name: str, cluster_ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                                                          "targetPort": 8080}]}}


def endpoint_slice(namespace: str, service_name: str, pods: list[str], name: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [p], "conditions": {"ready": True}} for p in pods]}


def mapping(namespace: str, name: str, address: str, port: int, service_name: str) -> dict[str, Any]:
    return {"apiVersion": "smartnat.aureacentral.com/v1alpha1", "kind": "Mapping",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"addresses": [address], "serviceName": service_name, "mode": "direct",
                     "ports": [{"port": port, "protocol": "tcp", "servicePort": 80}]}}


def background(count: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """`count` Mappings over 100 namespaces, each with a Service and a two-pod EndpointSlice."""
    for n in range(NAMESPACES):
        ns = f"team-{n:03d}"
        yield SERVICES, service(ns, "svc", f"10.96.{n // 250}.{n % 250 + 1}")
        yield ENDPOINTSLICES, endpoint_slice(ns, "svc", list(PODS.values()))
    for i in range(count):
        local = i % 2 == 0
        addresses = EXTRA if local else REMOTE
        address = addresses[(i // 2) % len(addresses)]
        port = 1000 + (i // 2) // len(addresses)
        yield MAPPINGS, mapping(f"team-{i % NAMESPACES:03d}", f"m{i:05d}", address, port, "svc")


# --- the daemon ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    def __init__(self, *, topology: Topology, url: str, state: Path, debounce_ms: int, debug: bool) -> None:
        kubeconfig = state / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f'clusters: [{{name: e, cluster: {{server: "{url}"}}}}]\n'
            "users: [{name: e, user: {token: bench}}]\n"
            "contexts: [{name: e, context: {cluster: e, user: e}}]\ncurrent-context: e\n"
        )
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SNCTRLR_", "KUBERNETES_"))}
        env.update(KUBECONFIG=str(kubeconfig), SNCTRLR_INTERFACES_PATTERN="^ext[0-9]+$",
                   SNCTRLR_DEFAULT_GW_INTERFACE="eth0", SNCTRLR_STATE_DIR=str(state),
                   SNCTRLR_INSTANCE_NAME="bench", SNCTRLR_MONITOR_PORT=str(self.port),
                   SNCTRLR_SYNC_DEBOUNCE_MS=str(debounce_ms),
                   SNCTRLR_DEBUG_ENABLED=str(debug).lower())
        self.log = state / "daemon.log"
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen([str(SMARTNATD), "run", "--netns", topology.appliance], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    async def ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"smartnatd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    async def idle(self, quiet: float = 1.0) -> float:
        """Wait until no pass has run for `quiet` seconds (from /status); seconds it took."""
        async with aiohttp.ClientSession() as session:

            async def passes() -> int:
                async with session.get(f"http://127.0.0.1:{self.port}/status") as response:
                    return int((await response.json())["passes"])

            return await unchanged_for(passes, quiet=quiet, what="the daemon's passes")

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


# --- probes --------------------------------------------------------------------------------

ATTEMPT_TIMEOUT = 0.02  # an exchange takes ~0.5 ms; a connection nobody answers costs this much


def probe(t: Topology, port: int, until: Callable[[str | None], bool], timeout: float = 10.0) -> float:
    """Connect again and again until `until(answering pod or None)`; when that attempt began.

    The attempt's SYN left right after it began, so the kernel showed the change by then: the
    start of the first attempt that sees it bounds the latency from above, within one failed
    attempt (at most ATTEMPT_TIMEOUT) of the truth. An unserved port does not answer at all
    here (the box's reset leaves by its default route and the client's strict rp_filter drops
    it), so every failed attempt lasts the whole ATTEMPT_TIMEOUT.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        began = time.monotonic()
        try:
            reply = tcp_request(t.client, dst=PROBE_ADDRESS, port=port, src=t.allowed_client,
                                timeout=ATTEMPT_TIMEOUT)
            who: str | None = parse_echo_reply(reply).name
        except NoReply:
            who = None
        if until(who):
            return began
        time.sleep(0.0002)  # let the API server's thread of control run
    raise TimeoutError(f"port {port}: no change seen within {timeout}s")


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.001)
    return time.monotonic()


def served_by_bench(api: KubeEmulator, name: str) -> bool:
    obj = api.current(MAPPINGS, name, namespace=PROBE_NS) or {}
    return "bench" in ((obj.get("status") or {}).get("appliances") or {})


async def unchanged_for(read: Callable[[], Awaitable[int]], *, quiet: float, what: str,
                        timeout: float = 600.0) -> float:
    """Wait until `read()` gives the same count for `quiet` seconds; seconds until it last moved."""
    started = time.monotonic()
    last, since = -1, time.monotonic()
    while time.monotonic() - started < timeout:
        count = await read()
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return since - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} never settled")


async def settle(api: KubeEmulator, quiet: float = 0.3) -> float:
    """Wait until the daemon has written nothing for `quiet` seconds; seconds it took."""

    async def writes() -> int:
        return len(api.recorded(verb="patch")) + len(api.recorded(verb="create"))

    return await unchanged_for(writes, quiet=quiet, what="write-back")


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(p / 100 * len(ms) + 0.5) - 1))]

    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p95_ms": round(pct(95), 2),
            "p99_ms": round(pct(99), 2), "max_ms": round(ms[-1], 2), "min_ms": round(ms[0], 2)}


async def timed(write: Callable[[], Awaitable[Any]], seen: Callable[[], float]) -> float:
    t0 = time.monotonic()
    watching = asyncio.ensure_future(asyncio.to_thread(seen))
    await write()
    return await watching - t0


# --- main ----------------------------------------------------------------------------------

async def bench(args: argparse.Namespace) -> dict[str, Any]:
    factory = NetnsFactory(prefix=new_netns_prefix())
    servers = None
    daemon: Daemon | None = None
    result: dict[str, Any] = {"mappings": args.mappings, "repeats": args.repeats, "debounce_ms": args.debounce_ms,
                              "python": platform.python_version(), "kernel": platform.release()}
    try:
        t = build_topology(factory)
        ip_batch(t.appliance, [f"addr add {a}/24 dev ext1" for a in EXTRA])
        servers = start_pod_echo_servers(t, port=8080)
        async with KubeEmulator(kmock_history=8) as api:
            started = time.monotonic()
            for resource, body in background(args.mappings):
                api.preload(resource, [body])
            api.preload(SERVICES, [service(PROBE_NS, "echo", "10.96.100.1")])
            api.preload(ENDPOINTSLICES, [endpoint_slice(PROBE_NS, "echo", [PODS["pod1"]])])
            api.preload(SERVICES, [service(PROBE_NS, "flip", "10.96.100.2")])
            api.preload(ENDPOINTSLICES, [endpoint_slice(PROBE_NS, "flip", [PODS["pod1"]])])
            api.preload(MAPPINGS, [mapping(PROBE_NS, "flip", PROBE_ADDRESS, FLIP_PORT, "flip")])
            result["preload_s"] = round(time.monotonic() - started, 2)

            with tempfile.TemporaryDirectory(prefix="sn-bench-") as state:
                started = time.monotonic()
                daemon = Daemon(topology=t, url=api.url, state=Path(state), debounce_ms=args.debounce_ms,
                                debug=args.debug)
                await daemon.ready(timeout=600)
                result["start_to_ready_s"] = round(time.monotonic() - started, 2)
                result["initial_writeback_s"] = round(await settle(api) + result["start_to_ready_s"], 2)
                result["initial_writes"] = len(api.recorded(verb="patch")) + len(api.recorded(verb="create"))
                # Its own finalizer writes come back as watch events (finalizers are part of a
                # Mapping): the first start on a cluster digests them for a while after the
                # writes end. The rounds measure the steady state that follows.
                result["idle_after_writeback_s"] = round(await daemon.idle(), 2)
                print(f"ready after {result['start_to_ready_s']}s; initial write-back done after "
                      f"{result['initial_writeback_s']}s ({result['initial_writes']} writes); idle "
                      f"{result['idle_after_writeback_s']}s later", flush=True)

                create, status, flip, delete = [], [], [], []
                for i in range(args.repeats):
                    name, port = f"probe-{i}", 30000 + i
                    body = mapping(PROBE_NS, name, PROBE_ADDRESS, port, "echo")
                    status_seen = asyncio.ensure_future(wait_for(lambda n=name: served_by_bench(api, n)))
                    t0 = time.monotonic()
                    create.append(await timed(lambda b=body: api.create_object(MAPPINGS, b),
                                              lambda p=port: probe(t, p, lambda who: who == "pod1")))
                    status.append(await status_seen - t0)
                    await settle(api, quiet=0.1)

                    target = "pod2" if i % 2 == 0 else "pod1"
                    endpoints = [{"addresses": [PODS[target]], "conditions": {"ready": True}}]
                    flip.append(await timed(
                        lambda e=endpoints: api.patch_object(ENDPOINTSLICES, "flip-1", {"endpoints": e},
                                                             namespace=PROBE_NS),
                        lambda tg=target: probe(t, FLIP_PORT, lambda who: who == tg)))
                    await settle(api, quiet=0.1)

                    delete.append(await timed(lambda n=name: api.delete_object(MAPPINGS, n, namespace=PROBE_NS),
                                              lambda p=port: probe(t, p, lambda who: who is None)))
                    await wait_for(lambda n=name: api.current(MAPPINGS, n, namespace=PROBE_NS) is None)
                    await settle(api, quiet=0.1)
                    print(f"  {i + 1}/{args.repeats}: create {create[-1] * 1000:.1f} ms, endpoints "
                          f"{flip[-1] * 1000:.1f} ms, delete {delete[-1] * 1000:.1f} ms", flush=True)
                result["create"] = summary(create)
                result["create_status_written"] = summary(status)
                result["endpoints"] = summary(flip)
                result["delete"] = summary(delete)
                await daemon.stop()
                result["daemon_log_tail"] = daemon.log.read_text(errors="replace").splitlines()[-5:]
                if args.keep_log:
                    args.keep_log.write_text(daemon.log.read_text(errors="replace"))
    finally:
        if daemon is not None:
            await daemon.stop()
        if servers is not None:
            servers.stop()
        factory.cleanup()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mappings", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--debounce-ms", type=int, default=10, help="SNCTRLR_SYNC_DEBOUNCE_MS (default 10)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--debug", action="store_true", help="run the daemon with SNCTRLR_DEBUG_ENABLED=true")
    parser.add_argument("--keep-log", type=Path, help="copy the daemon's log here before its state dir goes")
    args = parser.parse_args()
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the namespaces are still deleted.
    signal.signal(signal.SIGTERM, exit_on_sigterm(os.getpid()))
    if os.geteuid() != 0:
        print("kube_latency.py needs root (network namespaces, nft)", file=sys.stderr)
        return 2
    result = asyncio.run(bench(args))
    print(f"\n{args.mappings} Mappings present, {args.repeats} repeats, debounce {args.debounce_ms} ms")
    print(f"{'scenario':<24}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for key in ("create", "endpoints", "delete", "create_status_written"):
        s = result[key]
        print(f"{key:<24}{s['p50_ms']:>9.1f}{s['p95_ms']:>9.1f}{s['p99_ms']:>9.1f}{s['max_ms']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
