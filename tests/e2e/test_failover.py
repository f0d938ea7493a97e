"""Two appliances give high availability: a keepalived-style address move, end to end.

Two real `smartnatd run` processes (instances ap1 and ap2, each in its own appliance namespace
of tests/e2e/pair.py) watch one emulated API server. The shared address 192.0.2.10 moves
between their ext1s as keepalived moves it (delete, add, gratuitous ARP); the client's new
connections follow it, each appliance writes only its own `status.appliances` entry, the
shared conditions never flap and the finalizer waits for both.

Which appliance carried a connection is told by the source address pod1 saw: smartnatd
masquerades DNATed connections to the appliance's own cluster address (10.10.0.2 or .3).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from smartnatd.kube.objects import FINALIZER
from tests.e2e.pair import Pair, build_pair, client_neighbour, move_shared_address
from tests.e2e.test_kube import NS, KubeDaemon, create_echo, mapping_status, write_kubeconfig
from tests.kernel.harness import EchoServer, NoReply, async_wait_until, echo_server, parse_echo_reply, sh, tcp_request
from tests.kube.conftest import kube_api  # noqa: F401  (fixture)
from tests.kube.emulator import LEASES, MAPPINGS, KubeEmulator

AP1, AP2 = "ap1", "ap2"
ECHO_PORT = 8080
# Generous: the daemon serves a new address within a second (operator guide); this only
# bounds a hang. The measured time is printed.
FAILOVER_TIMEOUT = 10.0


@pytest.fixture
def pair(netns_factory: Any) -> Pair:
    return build_pair(netns_factory)


@pytest.fixture
def pod1_echo(pair: Pair) -> Iterator[EchoServer]:
    server = echo_server(pair.pods[0], "tcp", pair.pod_addresses[0], ECHO_PORT, "pod1")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def daemons(pair: Pair, kube_api: KubeEmulator, tmp_path: Path) -> AsyncIterator[dict[str, KubeDaemon]]:
    """ap1 and ap2: one daemon per appliance namespace, own instance name, port and state dir."""
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    started: dict[str, KubeDaemon] = {}
    try:
        for instance, ns in zip((AP1, AP2), pair.appliances):
            started[instance] = KubeDaemon(netns=ns, kubeconfig=kubeconfig, state=tmp_path / instance, instance=instance)
        yield started
    finally:
        for daemon in started.values():
            await daemon.stop()


def _request(pair: Pair) -> ipaddress.IPv4Address | None:
    try:
        reply = parse_echo_reply(tcp_request(pair.client, dst=pair.shared_address, port=80,
                                             src=pair.client_address, timeout=0.5))
    except NoReply:
        return None
    assert reply.name == "pod1", reply
    return reply.peer


async def carrier(pair: Pair) -> str | None:
    """The appliance a new client connection to 192.0.2.10:80 went through, None if unanswered."""
    peer = await asyncio.to_thread(_request, pair)
    if peer is None:
        return None
    return {pair.cluster_address(ns): name for ns, name in zip(pair.appliances, (AP1, AP2))}[peer]


def holders(kube_api: KubeEmulator) -> set[str]:
    return set(mapping_status(kube_api).get("appliances") or {})


def ready(kube_api: KubeEmulator) -> dict[str, Any]:
    """The Ready condition ({} before the first status write)."""
    return next((c for c in mapping_status(kube_api).get("conditions") or [] if c["type"] == "Ready"), {})


def finalizers(kube_api: KubeEmulator) -> list[str]:
    return (kube_api.current(MAPPINGS, "echo", namespace=NS) or {}).get("metadata", {}).get("finalizers") or []


def ready_not_true_writes(kube_api: KubeEmulator) -> list[Any]:
    """Every Mapping patch the emulator received that set Ready to anything but True."""
    found = []
    for request in kube_api.recorded(verb="patch", resource=MAPPINGS):
        status = request.body.get("status") if isinstance(request.body, dict) else None
        conditions = status.get("conditions") if isinstance(status, dict) else None
        if any(c.get("type") == "Ready" and c.get("status") != "True" for c in conditions or []):
            found.append(request.body)
    return found


async def carried_by(pair: Pair, instance: str) -> bool:
    return await carrier(pair) == instance


async def neighbour_is(pair: Pair, mac: str) -> bool:
    return await asyncio.to_thread(client_neighbour, pair, pair.shared_address) == mac


async def fail_over(pair: Pair, *, to: str) -> float:
    """Move the address to appliance `to` and wait until a new connection goes through it; the
    seconds from the start of the move to the first connection answered through `to`."""
    start = time.monotonic()
    mac = await asyncio.to_thread(move_shared_address, pair, to=pair.appliances[(AP1, AP2).index(to)])
    # The gratuitous ARP updated the client's entry: its next packets go to `to`'s ext1.
    await async_wait_until(lambda: neighbour_is(pair, mac), timeout=2,
                           message=f"the client's neighbour entry for {pair.shared_address} to be {mac}")
    await async_wait_until(lambda: carried_by(pair, to), timeout=FAILOVER_TIMEOUT, interval=0.01,
                           message=f"a new connection through {to}")
    return time.monotonic() - start


async def nft_mentions(ns: str, text: str) -> bool:
    ruleset = (await asyncio.to_thread(sh, ns, "nft", "list", "table", "ip", "smartnat")).stdout
    return text in ruleset


async def test_the_shared_address_moves_between_two_appliances_and_status_follows(
        pair: Pair, pod1_echo: EchoServer, kube_api: KubeEmulator, daemons: dict[str, KubeDaemon]) -> None:
    ap1_ns, ap2_ns = pair.appliances
    await create_echo(kube_api)  # Service, EndpointSlice (pod1), direct Mapping on 192.0.2.10:80
    await asyncio.gather(*(daemon.wait_ready() for daemon in daemons.values()))

    # 1. ap1 holds the address: it serves, it alone has an entry; ap2 sees the Mapping NotLocal.
    assert await async_wait_until(lambda: carrier(pair), timeout=5, message="served") == AP1
    await async_wait_until(lambda: holders(kube_api) == {AP1} and ready(kube_api).get("status") == "True", timeout=5,
                           message="ap1's entry and Ready=True")
    assert mapping_status(kube_api)["appliances"][AP1]["configured"] == [f"{pair.shared_address}:80/tcp"]
    served = {str(pair.shared_address): {"podIPs": [str(pair.pod_addresses[0])]}}
    assert mapping_status(kube_api)["configuredAddresses"] == served
    assert await nft_mentions(ap1_ns, f"{NS}/echo") and not await nft_mentions(ap2_ns, f"{NS}/echo")
    assert 'smartnat_mappings{verdict="NotLocal"} 1.0' in (await daemons[AP2].get("/metrics"))[1]
    for instance in (AP1, AP2):  # both talk to the API: each renews its own Lease
        lease = kube_api.current(LEASES, f"smartnat-{instance}", namespace="smartnat-system")
        assert lease is not None and lease["spec"]["holderIdentity"] == instance
    assert finalizers(kube_api) == [FINALIZER]
    ready_since = ready(kube_api)["lastTransitionTime"]

    # 2. keepalived fails over to ap2: new connections go through ap2 (pod1 sees 10.10.0.3).
    took = await fail_over(pair, to=AP2)
    print(f"\nfailover ap1 -> ap2: first connection through ap2 {took:.3f}s after the address moved")
    conntrack = (await asyncio.to_thread(sh, ap2_ns, "conntrack", "-L", "-d", str(pair.shared_address))).stdout
    # The reply direction: pod1 answers ap2's masquerading address.
    assert f"src={pair.pod_addresses[0]} dst={pair.cluster_addresses[1]} sport={ECHO_PORT}" in conntrack, conntrack
    assert await nft_mentions(ap2_ns, f"{NS}/echo") and not await nft_mentions(ap1_ns, f"{NS}/echo")

    # 3. ap2's entry appears, ap1 releases its own; the shared conditions never moved.
    await async_wait_until(lambda: holders(kube_api) == {AP2}, timeout=5, message="entries swapped to ap2")
    # The address key stays: ap1 releasing it from a view without ap2's entry, and ap2 leaving
    # it out because its view still had it, each lost it in 5 of 5 runs before both patches
    # carried a resourceVersion precondition (a stale one now gets a 409 and is computed again).
    await async_wait_until(lambda: mapping_status(kube_api)["configuredAddresses"] == served, timeout=5,
                           message="configuredAddresses kept through the failover")
    assert ready(kube_api)["status"] == "True" and ready(kube_api)["lastTransitionTime"] == ready_since
    assert finalizers(kube_api) == [FINALIZER]
    assert ready_not_true_writes(kube_api) == []

    # 4. Fail back: ap1 carries new connections again and the entries swap back.
    took = await fail_over(pair, to=AP1)
    print(f"failback ap2 -> ap1: first connection through ap1 {took:.3f}s after the address moved")
    await async_wait_until(lambda: holders(kube_api) == {AP1}, timeout=5, message="entries swapped back to ap1")
    await async_wait_until(lambda: mapping_status(kube_api)["configuredAddresses"] == served, timeout=5,
                           message="configuredAddresses kept through the failback")
    assert ready(kube_api)["status"] == "True" and ready(kube_api)["lastTransitionTime"] == ready_since
    assert finalizers(kube_api) == [FINALIZER]
    assert ready_not_true_writes(kube_api) == []

    # 5. Deleted: ap1 releases its entry, nobody else holds one, the finalizer goes and the
    # object with it; neither appliance serves the address any more.
    before = len(kube_api.recorded(verb="patch", resource=MAPPINGS))
    await kube_api.delete_object(MAPPINGS, "echo", namespace=NS)
    await async_wait_until(lambda: kube_api.current(MAPPINGS, "echo", namespace=NS) is None, timeout=10,
                           message="the Mapping finalized and gone")
    # In that order: ap1 drops its entry, then (no entry left) the finalizer is removed.
    after = [(r.subresource, r.body) for r in kube_api.recorded(verb="patch", resource=MAPPINGS)[before:]]
    assert [body["status"].get("appliances") for sub, body in after if sub == "status"] == [{AP1: None}], after
    assert after[-1][0] is None and {"op": "remove", "path": "/metadata/finalizers/0"} in after[-1][1], after
    assert await carrier(pair) is None
    for ns in pair.appliances:
        assert not await nft_mentions(ns, f"{NS}/echo"), f"{ns} still has the Mapping's elements"
    assert all(daemon.proc.poll() is None for daemon in daemons.values())
    assert [await daemon.stop() for daemon in daemons.values()] == [0, 0]
