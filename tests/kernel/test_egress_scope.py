"""Where the egress mark applies: only to traffic the main table would send by its default route.

With SNCTRLR_SETUP_SNAT=true the first packet of a backend pod's new connection gets the egress
mark of its Mapping's interface. The mark must change the route only of traffic the main table
sends by its default route; a network the main table routes specifically (here a corporate
network behind the appliance, on a non-external interface) stays reachable, untranslated.

IP plan: the one of tests/kernel/conftest.py, plus

  appliance ns "ap"                       corp ns "corp"
  int0 172.16.0.1/24   <-veth->           c0   172.16.0.2/24   default via 172.16.0.1
  main: 172.16.1.0/24 via 172.16.0.2      lan0 172.16.1.2/32   (a network behind a gateway)
  main: 10.244.0.0/16 via 10.10.0.1       (the pod network, routed specifically: see below)

int0 is not an external interface. The appliance routes the pod network specifically, as a box
that routes a cluster's pod CIDR does; one test removes that route, so the pods are behind the
main default route as in the plain plan. The corp host's replies to a pod arrive on a
non-external interface and carry no mark (only replies to clients and a pod's own packets do),
so they find the pods through the main table either way (docs/architecture.md, Policy routing).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from tests.builders import mapping
from tests.kernel.harness import (
    EchoServer,
    NetnsFactory,
    Topology,
    echo_server,
    ip_batch,
    parse_echo_reply,
    sh,
    sysctls,
    tcp_request,
    udp_request,
)
from tests.kernel.test_dataplane import POD1, SETTINGS, appliance, web, web_slice  # noqa: F401

SNAT = dataclasses.replace(SETTINGS, setup_snat=True)
CORP_HOST = IPv4Address("172.16.0.2")  # on int0's connected network
CORP_FAR = IPv4Address("172.16.1.2")  # behind CORP_HOST, a gateway route in the main table
CORP_PORT = 9000


@pytest.fixture
def corp(topology: Topology, netns_factory: NetnsFactory) -> str:
    """A corporate network behind the appliance on int0, and the pod network routed specifically."""
    ns = netns_factory.create("corp")
    ip_batch(topology.appliance, [
        f"link add int0 type veth peer name c0 netns {ns}",
        "addr add 172.16.0.1/24 dev int0",
        "link set int0 up",
        f"route add 172.16.1.0/24 via {CORP_HOST} dev int0",
        f"route add 10.244.0.0/16 via {topology.router_address} dev {topology.cluster_iface}",
    ])
    sysctls(topology.appliance, {"net.ipv4.conf.int0.rp_filter": 0})
    sh(ns, "ip", "link", "add", "lan0", "type", "bridge")  # holds a local address, like a dummy
    ip_batch(ns, [
        f"addr add {CORP_HOST}/24 dev c0",
        f"addr add {CORP_FAR}/32 dev lan0",
        "link set c0 up",
        "link set lan0 up",
        "route add default via 172.16.0.1 dev c0",
    ])
    # Strict, like the client: a reply or request on an unexpected link is dropped.
    sysctls(ns, {f"net.ipv4.conf.{i}.rp_filter": 1 for i in ("all", "default", "c0")})
    return ns


@pytest.fixture
def corp_servers(corp: str) -> Iterator[dict[tuple[IPv4Address, str], EchoServer]]:
    """TCP and UDP echo on CORP_PORT at both corp addresses, bound to the address they serve."""
    servers: dict[tuple[IPv4Address, str], EchoServer] = {}
    try:
        for address in (CORP_HOST, CORP_FAR):
            for proto in ("tcp", "udp"):
                servers[address, proto] = echo_server(corp, proto, address, CORP_PORT, name=f"corp-{address}")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def pod1_request(t: Topology, proto: str, dst: IPv4Address):
    request = tcp_request if proto == "tcp" else udp_request
    return parse_echo_reply(request(t.pods[0], dst=dst, port=CORP_PORT))


async def test_backend_pod_reaches_specifically_routed_networks_with_its_own_address(
    topology, echo_servers, appliance, corp, corp_servers
):
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    # pod1 backs the Mapping on 192.0.2.10 (ext1), so its new connections carry ext1's egress mark.
    # Both corp networks are routed specifically by the main table: the mark leaves them alone,
    # the connection goes out of int0 untranslated and the corp host sees the pod's own address.
    for dst in (CORP_HOST, CORP_FAR):
        for proto in ("tcp", "udp"):
            reply = await asyncio.to_thread(pod1_request, topology, proto, dst)
            assert (reply.name, reply.peer) == (f"corp-{dst}", IPv4Address(POD1)), (dst, proto)
            assert corp_servers[dst, proto].peers[-1][0] == IPv4Address(POD1), (dst, proto)


async def test_backend_pod_egress_to_the_outside_still_leaves_by_ext1_with_the_mappings_address(
    topology, echo_servers, appliance, corp, corp_servers
):
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    with echo_server(topology.client, "tcp", topology.allowed_client, CORP_PORT, name="outside") as outside:
        # The main table reaches 203.0.113.10 only by its default route (into the cluster): the
        # egress mark sends it out of ext1, SNATed to the Mapping's address.
        reply = parse_echo_reply(
            await asyncio.to_thread(tcp_request, topology.pods[0], dst=topology.allowed_client, port=CORP_PORT)
        )
        assert (reply.name, reply.peer) == ("outside", IPv4Address("192.0.2.10"))
        assert [peer for peer, _ in outside.peers] == [IPv4Address("192.0.2.10")]
        # And the corp network, in the same pass, is still reached directly.
        assert (await asyncio.to_thread(pod1_request, topology, "tcp", CORP_HOST)).peer == IPv4Address(POD1)


async def test_replies_follow_the_ingress_interface_even_where_main_routes_the_client(
    topology, echo_servers, appliance
):
    """The main-table-first rule is for pods' own connections only (EGRESS_MARK).

    198.51.100.1 (the client's address on ext2's network) connects to 192.0.2.10 through ext1.
    The main table routes 198.51.100.0/24 specifically (connected on ext2). The reply leaves by
    ext1, the way the connection came in, with egress SNAT off and on: replies to clients carry
    the interface's mark alone, and the client's strict rp_filter would drop one on c2.
    """
    direct = mapping("web", mode="direct")
    via_ext1 = topology.ext2_gateway  # 198.51.100.1, sent out of c1 since 192.0.2.0/24 is there

    await appliance.apply(direct, services=[web()], slices=[web_slice((POD1,))])
    reply = parse_echo_reply(
        await asyncio.to_thread(tcp_request, topology.client, dst="192.0.2.10", port=80, src=via_ext1)
    )
    assert reply.name == "pod1"

    await appliance.apply(direct, services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    reply = parse_echo_reply(
        await asyncio.to_thread(tcp_request, topology.client, dst="192.0.2.10", port=80, src=via_ext1)
    )
    assert reply.name == "pod1"
    # A client the main table reaches only by its default route keeps its symmetric return path.
    reply = parse_echo_reply(
        await asyncio.to_thread(tcp_request, topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client)
    )
    assert reply.name == "pod1"


async def test_internal_peer_reply_reaches_a_pod_the_main_table_reaches_by_its_default_route(
    topology, echo_servers, appliance, corp, corp_servers
):
    # The plain IP plan: the pods are behind the main default route (into the cluster).
    sh(topology.appliance, "ip", "route", "del", "10.244.0.0/16")
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    reply = await asyncio.to_thread(pod1_request, topology, "udp", CORP_HOST)
    assert reply.peer == IPv4Address(POD1)
