"""Hairpin: a pod connecting to a Mapping's external address through the appliance.

The pods' traffic leaves the cluster through the appliance (the router's default route is the
appliance's cluster address), so pod1 calling 192.0.2.10:80, mapped to pod2, arrives on the
cluster interface eth0, is DNATed to pod2 and goes back out of eth0. Unless the appliance also
masquerades that connection, pod2 answers pod1 directly and pod1 drops the answer: it comes from
pod2's address, not from the address pod1 called. And a pod that also has egress SNAT (it backs
a Mapping, SNCTRLR_SETUP_SNAT on) must not have the hairpin connection marked as its egress: the
replies would follow the external interface's table out to its gateway. The appliance's own
connection to 192.0.2.10:80 is a hairpin too: translated on the output hook and masqueraded.

IP plan: the one of tests/kernel/conftest.py. Mappings on 192.0.2.10 (ext1): "web" -> pod2;
"pod1-out" on 198.51.100.10 (ext2) -> pod1, which gives pod1 an egress mark when SETUP_SNAT is on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from ipaddress import IPv4Address

import pytest

from tests.builders import endpoint_slice, mapping, service
from tests.kernel.harness import (
    SctpSniffer,
    Topology,
    UdpFlow,
    echo_server,
    expect_no_reply,
    parse_echo_reply,
    send_sctp_init,
    tcp_request,
    udp_request,
)
from tests.kernel.test_dataplane import (  # noqa: F401
    POD1,
    POD2,
    SETTINGS,
    TCP_AND_UDP,
    appliance,
    client_tcp,
    conntrack_entries,
    web,
    web_slice,
)
from tests.kernel.test_egress_flows import restarted  # noqa: F401

SNAT = dataclasses.replace(SETTINGS, setup_snat=True)
NO_MASQUERADE = dataclasses.replace(SETTINGS, setup_masquerade=False)
BOTH = dataclasses.replace(SETTINGS, setup_snat=True, setup_masquerade=False)
PLANS = pytest.mark.parametrize(
    "settings", [SETTINGS, NO_MASQUERADE, SNAT, BOTH], ids=["masquerade", "no-masquerade", "snat", "snat-no-masquerade"]
)


def pod1_out() -> tuple:
    """A Mapping on ext2 served by pod1: with SETUP_SNAT pod1's own connections leave by ext2."""
    return (
        mapping("pod1-out", mode="direct", addresses=("198.51.100.10",), service="out", ports=((80, "tcp", 80),)),
        service("out", cluster_ip="10.96.0.11", ports=(("http", "tcp", 80, 8080),)),
        endpoint_slice("out", ready=(POD1,), ports=(("http", "tcp", 8080),)),
    )


async def apply_web(appliance, *, settings=SETTINGS, target=POD2, sources=("0.0.0.0/0",), ports=TCP_AND_UDP):
    out, out_service, out_slice = pod1_out()
    return await appliance.apply(
        mapping("web", mode="direct", ports=ports, sources=sources),
        out,
        services=[web(), out_service],
        slices=[web_slice((target,)), out_slice],
        settings=settings,
    )


def from_pod(t: Topology, pod: int, proto: str, *, dst="192.0.2.10", port: int):
    request = tcp_request if proto == "tcp" else udp_request
    return parse_echo_reply(request(t.pods[pod], dst=dst, port=port))


@PLANS
async def test_a_pod_reaches_another_pod_through_a_mappings_external_address(
    topology, echo_servers, appliance, settings
):
    t = topology
    await apply_web(appliance, settings=settings)
    for port, proto, _ in TCP_AND_UDP:
        reply = await asyncio.to_thread(from_pod, t, 0, proto, port=port)
        # pod2 answers and saw the appliance's cluster-side address: its reply went back
        # through the box, which un-NATs both ways, so pod1 got it from 192.0.2.10.
        assert (reply.name, reply.peer) == ("pod2", t.appliance_cluster_address), proto
        assert echo_servers["pod2", proto].peers[-1][0] == t.appliance_cluster_address, proto
        # A pod reaching a Mapping served by itself works the same way.
        reply = await asyncio.to_thread(from_pod, t, 1, proto, port=port)
        assert (reply.name, reply.peer) == ("pod2", t.appliance_cluster_address), proto
    # Outside clients are served as before, and see the translation they always saw.
    reply = await asyncio.to_thread(client_tcp, t, dst="192.0.2.10", port=80)
    client_peer = t.appliance_cluster_address if settings.setup_masquerade else t.allowed_client
    assert (reply.name, reply.peer) == ("pod2", client_peer)


async def test_a_pods_hairpin_connection_does_not_take_its_egress_path(topology, echo_servers, appliance):
    t = topology
    await apply_web(appliance, settings=SNAT)
    # pod1's own connections to the outside leave by ext2, SNATed to pod1-out's address...
    with UdpFlow(t.pods[0], src=None, sport=None, dst=t.allowed_client, dport=9100) as egress:
        with echo_server(t.client, "udp", t.allowed_client, 9100, name="outside"):
            assert parse_echo_reply(await asyncio.to_thread(egress.exchange, b"e")).peer == t.ext2_address
    # ...while its connection to a Mapping of the box is a hairpin, answered through eth0.
    with UdpFlow(t.pods[0], src=None, sport=40601, dst="192.0.2.10", dport=53) as flow:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"h")).name == "pod2"
    entries = conntrack_entries(t, "-p", "udp", "-s", POD1, "--sport", "40601")
    assert len(entries) == 1 and "mark=536870912" in entries[0], entries  # HAIRPIN_MARK alone


async def test_a_pods_sctp_init_reaches_the_target_masqueraded(topology, echo_servers, appliance):
    t = topology
    svc = service("sig", ports=(("sig", "sctp", 3868, 9000),))
    sl = endpoint_slice("sig", ready=(POD2,), ports=(("sig", "sctp", 9000),))
    await appliance.apply(
        mapping("diameter", mode="direct", service="sig", ports=((3868, "sctp", 3868),)),
        services=[svc], slices=[sl], settings=NO_MASQUERADE,
    )
    sniffer = SctpSniffer(t.pods[1])
    try:
        await asyncio.to_thread(send_sctp_init, t.pods[0], src=POD1, dst="192.0.2.10", sport=40000, dport=3868)
        packet = await asyncio.to_thread(sniffer.wait_for, lambda p: p.dport == 9000, timeout=2.0)
        assert (packet.src, packet.dst, packet.dport) == (t.appliance_cluster_address, IPv4Address(POD2), 9000)
        assert packet.checksum_ok
    finally:
        sniffer.close()


async def test_an_allow_list_refuses_a_pod_outside_it(topology, echo_servers, appliance):
    t = topology
    await apply_web(appliance, sources=(f"{t.allowed_client}/32", f"{POD2}/32"))
    for port, proto, _ in TCP_AND_UDP:
        request = tcp_request if proto == "tcp" else udp_request
        assert await asyncio.to_thread(
            expect_no_reply, request, t.pods[0], dst="192.0.2.10", port=port, timeout=0.5
        ), proto
        # pod2's address is on the list: the same connection from it is served.
        assert (await asyncio.to_thread(from_pod, t, 1, proto, port=port)).name == "pod2", proto
    assert [peer for peer in echo_servers["pod2", "tcp"].peers if peer[0] != t.appliance_cluster_address] == []
    assert conntrack_entries(t, "-s", POD1, "-d", "192.0.2.10") == []
    assert (await asyncio.to_thread(client_tcp, t, dst="192.0.2.10", port=80)).name == "pod2"


def from_box(t: Topology, proto: str, *, port: int):
    request = tcp_request if proto == "tcp" else udp_request
    return parse_echo_reply(request(t.appliance, dst="192.0.2.10", port=port))


@pytest.mark.parametrize("settings", [SETTINGS, NO_MASQUERADE], ids=["masquerade", "no-masquerade"])
async def test_the_box_own_connection_to_a_mapping_reaches_the_target_masqueraded(
    topology, echo_servers, appliance, settings
):
    # An operator's curl on the box, or a health check: translated on the output hook like a
    # pod's hairpin, and masqueraded to the cluster-side address (its socket picked 192.0.2.10,
    # the address it called). The allow-list leaves out the box: it does not apply to it. The
    # box's own listeners on the mapped ports are there to answer if it were not translated.
    t = topology
    await apply_web(appliance, settings=settings, sources=(f"{t.allowed_client}/32",))
    with (
        echo_server(t.appliance, "tcp", "192.0.2.10", 80, name="box"),
        echo_server(t.appliance, "udp", "192.0.2.10", 53, name="box"),
    ):
        for port, proto, _ in TCP_AND_UDP:
            reply = await asyncio.to_thread(from_box, t, proto, port=port)
            assert (reply.name, reply.peer) == ("pod2", t.appliance_cluster_address), proto
            assert echo_servers["pod2", proto].peers[-1][0] == t.appliance_cluster_address, proto
        with UdpFlow(t.appliance, src=None, sport=40604, dst="192.0.2.10", dport=53) as flow:
            assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"h")).name == "pod2"
            assert flow.local[0] == IPv4Address("192.0.2.10")  # the source the kernel picked
    entries = conntrack_entries(t, "-p", "udp", "--sport", "40604", "-d", "192.0.2.10")
    assert len(entries) == 1 and "mark=536870912" in entries[0], entries  # HAIRPIN_MARK alone
    # Clients outside are still held to the allow-list.
    assert await asyncio.to_thread(
        expect_no_reply, tcp_request, t.client, dst="192.0.2.10", port=80, src=t.refused_client, timeout=0.5
    )


async def test_the_box_own_connection_to_a_port_no_mapping_serves_stays_local(topology, echo_servers, appliance):
    # The same address, a port of no Mapping: the box's own server answers, and DROP_UNMAPPED
    # (on here) does not drop it on its way back in through lo.
    t = topology
    await apply_web(appliance)
    for proto in ("tcp", "udp"):
        with echo_server(t.appliance, proto, "192.0.2.10", 9999, name="box"):
            reply = await asyncio.to_thread(from_box, t, proto, port=9999)
        assert (reply.name, reply.peer) == ("box", IPv4Address("192.0.2.10")), proto
        entries = conntrack_entries(t, "-p", proto, "-d", "192.0.2.10", "--dport", "9999")
        assert entries and not any("mark=536870912" in e for e in entries), entries  # no hairpin


async def test_a_target_change_moves_a_long_lived_box_udp_flow(topology, echo_servers, appliance):
    t = topology
    await apply_web(appliance)
    with UdpFlow(t.appliance, src=None, sport=40605, dst="192.0.2.10", dport=53) as flow:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"a")).name == "pod2"
        await apply_web(appliance, target=POD1)
        assert appliance.last_report.flows_deleted >= 1
        # The old entry is gone: the next datagram is a new flow, DNATed to pod1.
        reply = parse_echo_reply(await asyncio.to_thread(flow.exchange, b"b"))
        assert (reply.name, reply.peer) == ("pod1", t.appliance_cluster_address)


async def test_a_target_change_moves_a_long_lived_hairpin_udp_flow(topology, echo_servers, appliance):
    t = topology
    await apply_web(appliance)
    with UdpFlow(t.pods[0], src=None, sport=40602, dst="192.0.2.10", dport=53) as flow:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"a")).name == "pod2"
        await apply_web(appliance, target=POD1)
        assert appliance.last_report.flows_deleted >= 1
        # The old entry is gone: the next datagram is a new flow, DNATed to pod1 (itself).
        reply = parse_echo_reply(await asyncio.to_thread(flow.exchange, b"b"))
        assert (reply.name, reply.peer) == ("pod1", t.appliance_cluster_address)


async def test_a_hairpin_flow_to_a_mapping_deleted_while_down_is_swept_at_start(
    topology, echo_servers, appliance, restarted
):
    t = topology
    await apply_web(appliance)
    with UdpFlow(t.pods[0], src=None, sport=40603, dst="192.0.2.10", dport=53) as flow:
        assert parse_echo_reply(await asyncio.to_thread(flow.exchange, b"a")).name == "pod2"
        assert len(conntrack_entries(t, "-p", "udp", "-s", POD1, "--sport", "40603")) == 1
        await appliance.dataplane.close()  # the daemon stops: the kernel state stays
        # web is deleted while it is down; the restarted daemon's first pass sweeps its flows.
        out, out_service, out_slice = pod1_out()
        async with restarted:
            appliance.dataplane = restarted
            await appliance.apply(out, services=[out_service], slices=[out_slice])
        assert conntrack_entries(t, "-p", "udp", "-s", POD1, "--sport", "40603") == []
        assert await asyncio.to_thread(expect_no_reply, flow.exchange, b"b", 0.5)
