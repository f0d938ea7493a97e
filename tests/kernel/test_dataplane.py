"""The data plane carrying real packets: plan -> Dataplane.apply in the appliance namespace.

Each test reads as a story: describe a cluster, apply it, send traffic from the client
namespace, and check who answered and which source address the pod saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from ipaddress import IPv4Address

import pytest
from pyroute2 import AsyncIPRoute

from smartnatd.dataplane import Dataplane
from smartnatd.host import discover
from smartnatd.model import Snapshot
from smartnatd.nft import names, render
from smartnatd.planner import Plan, VerdictKind, plan
from smartnatd.settings import Settings
from tests.builders import endpoint_slice, mapping, service
from tests.kernel.conftest import new_dataplane
from tests.kernel.harness import (
    EchoServers,
    SctpSniffer,
    Topology,
    UdpFlow,
    echo_server,
    expect_no_reply,
    install_cluster_ip,
    open_tcp,
    parse_echo_reply,
    send_sctp_init,
    sh,
    tcp_request,
    udp_request,
)

SETTINGS = Settings(interfaces_pattern=r"^ext[0-9]+$", default_gw_interface="eth0", instance_name="test")
CLUSTER_IP = "10.96.0.10"
POD1, POD2 = "10.244.1.2", "10.244.2.2"
TCP_AND_UDP = ((80, "tcp", 80), (53, "udp", 53))


class Appliance:
    """The real edges in the appliance namespace, driven the way the reconciler drives them."""

    def __init__(self, topology: Topology, dataplane: Dataplane) -> None:
        self.topology = topology
        self.dataplane = dataplane
        self.settings = SETTINGS

    async def apply(self, *mappings, services=(), slices=(), settings: Settings | None = None, full=False) -> Plan:
        settings = settings or self.settings
        async with AsyncIPRoute(netns=self.topology.appliance, flags=0) as ipr:
            host = await discover(ipr, pattern=settings.interfaces_regex, default_gw_interface="eth0")
        snapshot = Snapshot(mappings=tuple(mappings), services=tuple(services), endpoint_slices=tuple(slices), host=host)
        p = plan(snapshot, settings)
        self.last_report = await self.dataplane.apply(p.desired, full=full)
        return p

    def ruleset(self) -> str:
        return sh(self.topology.appliance, "nft", "list", "ruleset").stdout


@pytest.fixture
async def appliance(topology: Topology, tmp_path) -> AsyncIterator[Appliance]:
    async with new_dataplane(topology, tmp_path) as dp:
        yield Appliance(topology, dp)


def client_tcp(t: Topology, *, dst, port, src=None, payload=b"ping"):
    return parse_echo_reply(tcp_request(t.client, dst=dst, port=port, src=src or t.allowed_client, payload=payload))


def client_udp(t: Topology, *, dst, port, src=None):
    return parse_echo_reply(udp_request(t.client, dst=dst, port=port, src=src or t.allowed_client))


async def no_reply_on_tcp_and_udp(t: Topology, *, src) -> None:
    """Neither TCP port 80 nor UDP port 53 of 192.0.2.10 answers `src` (TCP_AND_UDP's ports)."""
    for port, proto, _ in TCP_AND_UDP:
        request = tcp_request if proto == "tcp" else udp_request
        assert await asyncio.to_thread(
            expect_no_reply, request, t.client, dst="192.0.2.10", port=port, src=src, timeout=0.5
        ), proto


def web(**kw):
    return service(ports=(("http", "tcp", 80, 8080), ("dns", "udp", 53, 8080)), **kw)


def web_slice(ready=(POD1, POD2)):
    return endpoint_slice(ready=ready, ports=(("http", "tcp", 8080), ("dns", "udp", 8080)))


def dropped(ruleset: str, chain_prefix: str) -> int:
    """Packets counted by the `counter ... drop` rules of the chains named chain_prefix*."""
    total, chain = 0, ""
    for line in ruleset.splitlines():
        if found := re.match(r"\s*chain (\S+) \{", line):
            chain = found.group(1)
        elif chain.startswith(chain_prefix) and (counter := re.search(r"counter packets (\d+) bytes \d+ drop$", line)):
            total += int(counter.group(1))
    return total


def conntrack_entries(t: Topology, *args: str) -> list[str]:
    """The appliance's confirmed conntrack entries matching the `conntrack -L` filters in args."""
    return sh(t.appliance, "conntrack", "-L", *args).stdout.splitlines()


def route_clients_via_ext1(t: Topology) -> None:
    """A main-table route from the appliance to the clients: the box itself can then answer them,
    and forwarded traffic no longer needs policy routing to reach them."""
    sh(t.appliance, "ip", "route", "add", "203.0.113.0/24", "via", str(t.ext1_gateway))


async def test_service_mode_reaches_pod_through_cluster_ip_with_port_translation(topology, echo_servers, appliance):
    install_cluster_ip(topology, cluster_ip=CLUSTER_IP, port=80, protocol="tcp", backends=[(POD1, 8080)])
    install_cluster_ip(topology, cluster_ip=CLUSTER_IP, port=53, protocol="udp", backends=[(POD1, 8080)])
    p = await appliance.apply(
        mapping("web", ports=((8000, "tcp", 80), (5300, "udp", 53))), services=[web()], slices=[web_slice()]
    )
    assert p.verdicts[0].kind == VerdictKind.CONFIGURED
    tcp = await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=8000)
    udp = await asyncio.to_thread(client_udp, topology, dst="192.0.2.10", port=5300)
    # Masquerade is on by default: the pod sees the appliance, and answers through it.
    assert (tcp.name, tcp.peer) == ("pod1", IPv4Address("10.10.0.2"))
    assert (udp.name, udp.peer) == ("pod1", IPv4Address("10.10.0.2"))


@pytest.mark.parametrize("allow_rules_max", [render.ALLOW_RULES_MAX, 1], ids=["rule-per-network", "one-set"])
async def test_refused_client_is_dropped_and_allowed_client_served(topology, echo_servers, appliance, monkeypatch,
                                                                     allow_rules_max):
    # Short allow-lists are a prefix match per network; longer ones one anonymous set.
    monkeypatch.setattr(render, "ALLOW_RULES_MAX", allow_rules_max)
    sources = ("198.18.0.0/24", "203.0.113.10/32", "198.19.5.0/24")
    await appliance.apply(
        mapping("web", mode="direct", sources=sources, ports=TCP_AND_UDP), services=[web()], slices=[web_slice((POD1,))]
    )
    assert ("ip saddr {" in appliance.ruleset()) == (allow_rules_max < len(sources))
    # Listeners on the box itself, and a route back to the clients: a refused packet that got past
    # the allow-list, translated or not, would now be answered (by pod1 or by the box).
    route_clients_via_ext1(topology)
    with (
        echo_server(topology.appliance, "tcp", "192.0.2.10", 80, name="box") as box_tcp,
        echo_server(topology.appliance, "udp", "192.0.2.10", 53, name="box") as box_udp,
    ):
        assert (await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=80)).name == "pod1"
        assert (await asyncio.to_thread(client_udp, topology, dst="192.0.2.10", port=53)).name == "pod1"
        served = {proto: len(echo_servers["pod1", proto].peers) for proto in ("tcp", "udp")}
        await no_reply_on_tcp_and_udp(topology, src=topology.refused_client)
        assert (box_tcp.peers, box_udp.peers) == ((), ())
    assert {proto: len(echo_servers["pod1", proto].peers) for proto in ("tcp", "udp")} == served
    # Dropped in prerouting, before conntrack confirmed anything, by the allow-list's last rule.
    assert conntrack_entries(topology, "-s", str(topology.refused_client)) == []
    assert dropped(appliance.ruleset(), names.SOURCES_PREFIX) >= 2


async def test_reply_leaves_by_the_interface_the_connection_came_in_on(topology, echo_servers, appliance):
    # Strict rp_filter in the client drops a reply on the wrong link, so each success proves the path.
    await appliance.apply(
        mapping("web", mode="direct", addresses=("192.0.2.10", "192.0.2.11", "198.51.100.10"), ports=TCP_AND_UDP),
        services=[web()],
        slices=[web_slice((POD1,))],
    )
    for dst in ("192.0.2.10", "192.0.2.11", "198.51.100.10"):
        reply = await asyncio.to_thread(client_tcp, topology, dst=dst, port=80)
        assert reply.name == "pod1", dst
        udp = await asyncio.to_thread(client_udp, topology, dst=dst, port=53)
        assert udp.name == "pod1", dst


async def test_without_policy_routing_the_reply_is_lost(topology, echo_servers, appliance):
    """The control experiment: the same rules with the return-path routes removed fail."""
    await appliance.apply(mapping("web", mode="direct", addresses=("198.51.100.10",)), services=[web()], slices=[web_slice((POD1,))])
    assert (await asyncio.to_thread(client_tcp, topology, dst="198.51.100.10", port=80)).name == "pod1"
    await appliance.dataplane._routing.cleanup()
    assert await asyncio.to_thread(
        expect_no_reply, tcp_request, topology.client, dst="198.51.100.10", port=80, src=topology.allowed_client, timeout=0.5
    )


async def test_masquerade_off_lets_the_pod_see_the_client(topology, echo_servers, appliance):
    settings = dataclasses.replace(SETTINGS, setup_masquerade=False)
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD2,))], settings=settings)
    reply = await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=80)
    assert (reply.name, reply.peer) == ("pod2", topology.allowed_client)


def spread(topology: Topology, connections: int = 40) -> set[str]:
    """Who answered `connections` new connections: 40 miss one of two pods with P = 2^-39."""
    return {client_tcp(topology, dst="192.0.2.10", port=80).name for _ in range(connections)}


@pytest.mark.parametrize("spread_max", [render.SPREAD_MAX, 1], ids=["spread-chain", "own-chain"])
async def test_direct_mode_spreads_new_connections_over_both_pods(topology, echo_servers, appliance, monkeypatch,
                                                                   spread_max):
    # Up to SPREAD_MAX targets share a static spread-<k> chain; more get a backends chain.
    monkeypatch.setattr(render, "SPREAD_MAX", spread_max)
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice()])
    chain = "spread-2" if spread_max > 1 else names.BACKENDS_PREFIX
    assert f"goto {chain}" in appliance.ruleset()

    assert await asyncio.to_thread(spread, topology) == {"pod1", "pod2"}


async def test_scaling_a_direct_mapping_changes_its_spread_without_a_full_pass(topology, echo_servers, appliance):
    web_mapping = mapping("web", mode="direct")
    await appliance.apply(web_mapping, services=[web()], slices=[web_slice((POD1,))])
    assert await asyncio.to_thread(spread, topology, 10) == {"pod1"}

    await appliance.apply(web_mapping, services=[web()], slices=[web_slice()])
    assert not appliance.last_report.full
    assert await asyncio.to_thread(spread, topology) == {"pod1", "pod2"}

    await appliance.apply(web_mapping, services=[web()], slices=[web_slice((POD2,))])
    assert not appliance.last_report.full
    assert await asyncio.to_thread(spread, topology, 10) == {"pod2"}
    assert "spread-2" not in appliance.ruleset().split("map dnat-chains")[1].split("}")[0]


def route_pods_via_ext1(t: Topology) -> None:
    """Routes on which a pod's connection to the client gets through without any rewriting: the
    appliance sends the clients' range out of ext1, the client sends the pods' range back to it.
    A pod that egress SNAT leaves alone is then seen from outside with its own address."""
    route_clients_via_ext1(t)
    sh(t.client, "ip", "route", "add", "10.244.0.0/16", "via", str(t.ext1_address))


def from_pod(t: Topology, pod: int, *, port: int = 9000):
    return parse_echo_reply(tcp_request(t.pods[pod], dst=t.allowed_client, port=port))


async def test_egress_snat_gives_pods_the_mappings_address(topology, echo_servers, appliance):
    settings = dataclasses.replace(SETTINGS, setup_snat=True)
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=settings)
    with echo_server(topology.client, "tcp", topology.allowed_client, 9000, name="outside") as outside:
        reply = await asyncio.to_thread(from_pod, topology, 0)
        assert reply.name == "outside"
        # The pod's connection left through ext1 with the Mapping's external address (the main
        # table has no route to the client: the egress mark chose ext1).
        assert reply.peer == IPv4Address("192.0.2.10")
        assert outside.peers[-1][0] == IPv4Address("192.0.2.10")

        # pod2 backs no Mapping: once routes let it out at all, it leaves with its own address.
        await asyncio.to_thread(route_pods_via_ext1, topology)
        assert (await asyncio.to_thread(from_pod, topology, 1)).peer == IPv4Address(POD2)
        assert (await asyncio.to_thread(from_pod, topology, 0)).peer == IPv4Address("192.0.2.10")
        assert [peer for peer, _ in outside.peers] == [IPv4Address(a) for a in ("192.0.2.10", POD2, "192.0.2.10")]


async def test_without_egress_snat_a_backend_pod_keeps_its_own_address(topology, echo_servers, appliance):
    # setup_snat is off by default.
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))])
    with echo_server(topology.client, "tcp", topology.allowed_client, 9000, name="outside") as outside:
        # No egress mark and no route of its own: the connection follows the main default route
        # back into the cluster and never reaches the client.
        assert await asyncio.to_thread(
            expect_no_reply, tcp_request, topology.pods[0], dst=topology.allowed_client, port=9000, timeout=0.5
        )
        assert outside.peers == ()
        # Routed out of ext1 it gets through, untranslated.
        await asyncio.to_thread(route_pods_via_ext1, topology)
        assert (await asyncio.to_thread(from_pod, topology, 0)).peer == IPv4Address(POD1)
        assert [peer for peer, _ in outside.peers] == [IPv4Address(POD1)]


async def test_sctp_is_translated_to_the_endpoint(topology, appliance):
    svc = service(ports=(("sig", "sctp", 3868, 9000),))
    sl = endpoint_slice(ready=(POD1,), ports=(("sig", "sctp", 9000),))
    await appliance.apply(mapping("diameter", mode="direct", ports=((3868, "sctp", 3868),)), services=[svc], slices=[sl])
    sniffer = SctpSniffer(topology.pods[0])
    try:
        await asyncio.to_thread(
            send_sctp_init, topology.client, src=topology.allowed_client, dst="192.0.2.10", sport=40000, dport=3868
        )
        packet = await asyncio.to_thread(sniffer.wait_for, lambda p: p.dport == 9000, timeout=2.0)
        assert (str(packet.dst), packet.dport) == (POD1, 9000)
        assert packet.checksum_ok
    finally:
        sniffer.close()


async def test_a_terminating_pod_drains_its_flows_while_new_ones_go_to_the_ready_pod(topology, echo_servers, appliance):
    web_dns = mapping("web", mode="direct", ports=TCP_AND_UDP)
    await appliance.apply(web_dns, services=[web()], slices=[web_slice((POD1,))])
    flow = UdpFlow(topology.client, src=topology.allowed_client, sport=40406, dst="192.0.2.10", dport=53)
    try:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"a")).name == "pod1"
        # A rolling update: pod1 is terminating but still serving, pod2 is ready.
        draining = endpoint_slice(ready=(POD2,), draining=(POD1,), ports=(("http", "tcp", 8080), ("dns", "udp", 8080)))
        await appliance.apply(web_dns, services=[web()], slices=[draining])
        assert appliance.last_report.flows_deleted == 0
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"b")).name == "pod1"
        assert await asyncio.to_thread(spread, topology, 10) == {"pod2"}
        # pod1 is gone: its flow moves on.
        await appliance.apply(web_dns, services=[web()], slices=[web_slice((POD2,))])
        assert appliance.last_report.flows_deleted == 1
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"c")).name == "pod2"
    finally:
        flow.close()


async def test_target_change_moves_a_long_lived_udp_flow_and_spares_others(topology, echo_servers, appliance):
    other = mapping("other", mode="direct", addresses=("198.51.100.10",), ports=TCP_AND_UDP)
    await appliance.apply(mapping("web", mode="direct", ports=TCP_AND_UDP), other, services=[web()], slices=[web_slice((POD1,))])
    flow = UdpFlow(topology.client, src=topology.allowed_client, sport=40001, dst="192.0.2.10", dport=53)
    spared = UdpFlow(topology.client, src=topology.allowed_client, sport=40002, dst="198.51.100.10", dport=53)
    try:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"a")).name == "pod1"
        assert parse_echo_reply(await asyncio.to_thread(spared.exchange, b"a")).name == "pod1"
        # The backend moves to pod2 for "web" only ("other" keeps pod1 through its own slice).
        other_svc = service("other", ports=(("http", "tcp", 80, 8080), ("dns", "udp", 53, 8080)))
        other_slice = endpoint_slice("other", ready=(POD1,), ports=(("http", "tcp", 8080), ("dns", "udp", 8080)))
        other = dataclasses.replace(other, spec=dataclasses.replace(other.spec, service_name="other"))
        await appliance.apply(mapping("web", mode="direct", ports=TCP_AND_UDP), other, services=[web(), other_svc], slices=[web_slice((POD2,)), other_slice])
        assert appliance.last_report.flows_deleted >= 1
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"b")).name == "pod2"
        assert parse_echo_reply(await asyncio.to_thread(spared.exchange, b"b")).name == "pod1"
    finally:
        flow.close()
        spared.close()


def conntrack_ids(t: Topology, *, src, sport: int) -> list[str]:
    """The conntrack ids of the appliance's UDP entries from src:sport (one per live flow)."""
    lines = conntrack_entries(t, "-p", "udp", "-s", str(src), "--sport", str(sport), "-o", "id")
    return [word for line in lines for word in line.split() if word.startswith("id=")]


async def test_a_change_keeps_the_flows_the_new_plan_still_allows(topology, echo_servers, appliance):
    sources = ("203.0.113.0/24",)
    await appliance.apply(
        mapping("web", mode="direct", ports=TCP_AND_UDP, sources=sources), services=[web()], slices=[web_slice((POD1,))]
    )
    kept = UdpFlow(topology.client, src=topology.allowed_client, sport=40011, dst="192.0.2.10", dport=53)
    cut = UdpFlow(topology.client, src=topology.refused_client, sport=40012, dst="192.0.2.10", dport=53)
    try:
        assert parse_echo_reply(await asyncio.to_thread(kept.exchange, b"a")).name == "pod1"
        assert parse_echo_reply(await asyncio.to_thread(cut.exchange, b"a")).name == "pod1"
        entry = conntrack_ids(topology, src=topology.allowed_client, sport=40011)
        assert len(entry) == 1
        # One pass scales to pod1 + pod2 and narrows the allow-list to one that still holds the
        # allowed client but no longer the refused one: only the refused client's flow must stop.
        await appliance.apply(
            mapping("web", mode="direct", ports=TCP_AND_UDP, sources=("198.18.0.0/24", "203.0.113.10/32")),
            services=[web()],
            slices=[web_slice((POD1, POD2))],
        )
        assert appliance.last_report.flows_deleted == 1
        # Same conntrack entry, so still pod1 (a new entry would be spread over both pods).
        for i in range(5):
            assert parse_echo_reply(await asyncio.to_thread(kept.exchange, b"b%d" % i)).name == "pod1"
        assert conntrack_ids(topology, src=topology.allowed_client, sport=40011) == entry
        # The refused client's next datagram is a new flow, and the allow-list drops it.
        assert await asyncio.to_thread(expect_no_reply, cut.exchange, b"b", 0.5)
    finally:
        kept.close()
        cut.close()


async def test_conflicting_and_invalid_mappings_leave_the_others_working(topology, echo_servers, appliance):
    winner = mapping("winner", namespace="default", mode="direct", created="2026-01-01T00:00:00Z")
    # The loser's Service is served by pod2 only: whoever answers on 192.0.2.10 tells who won.
    loser = mapping("loser", namespace="default", mode="direct", created="2026-02-01T00:00:00Z", addresses=("192.0.2.10", "192.0.2.11"), service="api")
    bad = mapping("bad", invalid="spec.ports[0].port: 0 is not a port number (1-65535)")
    other = mapping("other", mode="direct", addresses=("198.51.100.10",), created="2026-03-01T00:00:00Z")
    api = service("api", ports=(("http", "tcp", 80, 8080),))
    api_slice = endpoint_slice("api", ready=(POD2,))
    p = await appliance.apply(winner, loser, bad, other, services=[web(), api], slices=[web_slice((POD1,)), api_slice])
    kinds = {str(v.key): v.kind for v in p.verdicts}
    assert kinds == {
        "default/winner": VerdictKind.CONFIGURED,
        "default/loser": VerdictKind.CONFLICT,
        "default/bad": VerdictKind.INVALID,
        "default/other": VerdictKind.CONFIGURED,
    }
    # Several new connections: a half-applied loser sharing the endpoint would send some to pod2.
    assert await asyncio.to_thread(spread, topology, 10) == {"pod1"}
    assert (await asyncio.to_thread(client_tcp, topology, dst="198.51.100.10", port=80)).name == "pod1"
    # The loser's other address is not served: nothing half-applied.
    assert await asyncio.to_thread(
        expect_no_reply, tcp_request, topology.client, dst="192.0.2.11", port=80, src=topology.allowed_client, timeout=0.5
    )


async def test_an_address_moved_to_another_interface_takes_its_flows_along(topology, echo_servers, appliance):
    web_dns = mapping("web", mode="direct", addresses=("192.0.2.11",), ports=((53, "udp", 53),))
    objs = dict(services=[web()], slices=[web_slice((POD1,))])
    await appliance.apply(web_dns, **objs)
    flow = UdpFlow(topology.client, src=topology.allowed_client, sport=40405, dst="192.0.2.11", dport=53)
    try:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"a")).name == "pod1"
        # 192.0.2.11 moves from ext1 to ext2, and clients reach it by that link now.
        sh(topology.appliance, "ip", "addr", "del", "192.0.2.11/24", "dev", "ext1")
        sh(topology.appliance, "ip", "addr", "add", "192.0.2.11/32", "dev", "ext2")
        sh(topology.client, "ip", "route", "add", "192.0.2.11/32", "dev", "c2")
        await appliance.apply(web_dns, **objs)
        assert appliance.last_report.flows_deleted == 1
        # The same flow is served again: its entry, marked for ext1 (whose replies the client's
        # strict rp_filter now drops), is gone, and its next datagram starts over on ext2.
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"b")).name == "pod1"
    finally:
        flow.close()


async def test_a_reply_to_the_box_own_traffic_is_not_held_to_a_mappings_allow_list(topology, echo_servers, appliance):
    # udp/53 on 192.0.2.10 is mapped and open only to 198.18.0.0/24. The box's own DNS-style
    # query from 192.0.2.10:53 to the refused client gets its answer: the allow-list is for
    # clients opening connections, not for replies.
    await appliance.apply(
        mapping("web", mode="direct", ports=TCP_AND_UDP, sources=("198.18.0.0/24",)),
        services=[web()], slices=[web_slice((POD1,))],
    )
    await asyncio.to_thread(sh, topology.appliance, "ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1")
    with echo_server(topology.client, "udp", topology.refused_client, 9002, name="resolver"):
        query = UdpFlow(topology.appliance, src="192.0.2.10", sport=53, dst=topology.refused_client, dport=9002)
        try:
            assert parse_echo_reply(await asyncio.to_thread(query.exchange, b"q")).name == "resolver"
        finally:
            query.close()
    # The same client opening a connection to the Mapping is still refused.
    await no_reply_on_tcp_and_udp(topology, src=topology.refused_client)


async def test_unmapped_port_is_dropped_but_the_box_own_traffic_still_works(topology, echo_servers, appliance):
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))])
    # With a route back to the client the box's own server would answer it: only the drop stops it.
    route_clients_via_ext1(topology)
    before = dropped(appliance.ruleset(), names.FILTER_PREROUTING)
    with echo_server(topology.appliance, "tcp", "192.0.2.10", 9999, name="local") as local:
        assert await asyncio.to_thread(
            expect_no_reply, tcp_request, topology.client, dst="192.0.2.10", port=9999, src=topology.allowed_client, timeout=0.5
        )
        assert local.peers == ()
    assert dropped(appliance.ruleset(), names.FILTER_PREROUTING) > before
    with echo_server(topology.client, "tcp", topology.allowed_client, 9001, name="outside"):
        # The box's own connection from an external address: its replies are established, not new.
        reply = parse_echo_reply(
            await asyncio.to_thread(tcp_request, topology.appliance, dst=topology.allowed_client, port=9001, src="192.0.2.10")
        )
        assert reply.name == "outside"


async def test_with_drop_unmapped_off_the_box_answers_on_an_unmapped_port(topology, echo_servers, appliance):
    """The control experiment: the same server, reachable once the drop is switched off."""
    settings = dataclasses.replace(SETTINGS, drop_unmapped=False)
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=settings)
    route_clients_via_ext1(topology)
    with echo_server(topology.appliance, "tcp", "192.0.2.10", 9999, name="local"):
        reply = await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=9999)
    assert (reply.name, reply.peer) == ("local", topology.allowed_client)
    assert "!= @external-ports" not in appliance.ruleset()
    # The mapped port is still translated to the pod.
    assert (await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=80)).name == "pod1"


async def test_reapplying_the_same_state_changes_nothing_and_keeps_connections(topology, echo_servers, appliance):
    objs = dict(services=[web()], slices=[web_slice((POD1,))])
    await appliance.apply(mapping("web", mode="direct"), **objs)
    listing = appliance.ruleset()
    rules = sh(topology.appliance, "ip", "rule").stdout
    conn = await asyncio.to_thread(open_tcp, topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client)
    try:
        assert parse_echo_reply(await asyncio.to_thread(conn.exchange, b"one")).name == "pod1"
        await appliance.apply(mapping("web", mode="direct"), **objs)
        report = appliance.last_report
        assert (report.full, report.nft_operations, report.routing.changes, report.flows_deleted) == (False, 0, 0, 0)
        await appliance.apply(mapping("web", mode="direct"), full=True, **objs)
        # A periodic full pass of an unchanged plan runs, but reports no change (no log line).
        assert (appliance.last_report.full, appliance.last_report.changed) == (True, False)
        assert appliance.ruleset() == listing
        assert sh(topology.appliance, "ip", "rule").stdout == rules
        assert parse_echo_reply(await asyncio.to_thread(conn.exchange, b"two")).name == "pod1"
    finally:
        conn.close()


async def test_a_full_pass_repairs_a_table_someone_deleted(topology, echo_servers, appliance):
    objs = dict(services=[web()], slices=[web_slice((POD1,))])
    await appliance.apply(mapping("web", mode="direct"), **objs)
    sh(topology.appliance, "nft", "delete", "table", names.FAMILY, names.TABLE)
    assert await asyncio.to_thread(
        expect_no_reply, tcp_request, topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client, timeout=0.5
    )
    await appliance.apply(mapping("web", mode="direct"), full=True, **objs)
    assert (await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=80)).name == "pod1"


async def test_incremental_update_serves_a_new_mapping_and_removes_an_old_one(topology, echo_servers, appliance):
    objs = dict(services=[web()], slices=[web_slice((POD1,))])
    await appliance.apply(mapping("a", mode="direct", sources=("203.0.113.10/32",)), **objs)
    await appliance.apply(mapping("b", mode="direct", addresses=("198.51.100.10",)), **objs)
    assert not appliance.last_report.full
    assert (await asyncio.to_thread(client_tcp, topology, dst="198.51.100.10", port=80)).name == "pod1"
    assert await asyncio.to_thread(
        expect_no_reply, tcp_request, topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client, timeout=0.5
    )


async def test_cleanup_removes_everything_owned_and_nothing_else(topology, echo_servers, appliance):
    for port, proto, _ in TCP_AND_UDP:
        install_cluster_ip(topology, cluster_ip=CLUSTER_IP, port=port, protocol=proto, backends=[(POD1, 8080)])
    sh(topology.appliance, "nft", "add table ip other")
    await appliance.apply(mapping("web", ports=TCP_AND_UDP), services=[web()], slices=[web_slice()])
    assert (await asyncio.to_thread(client_tcp, topology, dst="192.0.2.10", port=80)).name == "pod1"
    assert (await asyncio.to_thread(client_udp, topology, dst="192.0.2.10", port=53)).name == "pod1"
    udp_seen = len(echo_servers["pod1", "udp"].peers)

    await appliance.dataplane.cleanup()
    # Nothing is served any more: no reply, and no datagram is translated to the pod.
    await no_reply_on_tcp_and_udp(topology, src=topology.allowed_client)
    assert len(echo_servers["pod1", "udp"].peers) == udp_seen
    listing = appliance.ruleset()
    assert "smartnat" not in listing and "table ip other" in listing
    assert "lookup 2" not in sh(topology.appliance, "ip", "rule").stdout
    assert sh(topology.appliance, "ip", "route", "show", "table", "all", "proto", "200").stdout.strip() == ""
