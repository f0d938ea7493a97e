"""The harness itself, without smartnatd: the topology carries packets as the IP plan says,
the oracles (strict rp_filter, SCTP sniffer, echo replies) see what they claim to see, and
teardown leaves nothing behind."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.kernel.harness import (
    EchoServer,
    EchoServers,
    NetnsFactory,
    NoReply,
    SctpSniffer,
    Topology,
    UdpFlow,
    async_wait_until,
    build_topology,
    crc32c,
    echo_server,
    expect_no_reply,
    install_cluster_ip,
    ipv4_packet,
    list_netns,
    netns_pids,
    netstat_counters,
    open_tcp,
    parse_echo_reply,
    read_sysctl,
    remove_cluster_ip,
    run,
    sctp_init_segment,
    send_raw_ipv4,
    send_sctp_init,
    sh,
    tcp_request,
    udp_request,
    wait_until,
)

# Long enough for a reply inside namespaces, short enough to keep the file fast.
SILENCE = 0.3


@pytest.fixture
def servers() -> Iterator[list[EchoServer]]:
    """Extra echo servers a test starts; all stopped at teardown."""
    started: list[EchoServer] = []
    yield started
    for server in started:
        server.stop()


def test_namespaces_have_short_unique_names_and_lo_up(netns_factory: NetnsFactory,
                                                      netns_prefix: str) -> None:
    names = [netns_factory.create("pod1"), netns_factory.create("pod1"), netns_factory.create()]
    assert len(set(names)) == 3
    assert all(name.startswith(netns_prefix) and len(name) <= 15 for name in names)
    assert set(names) <= list_netns(netns_prefix)
    assert "UP" in run(["ip", "-n", names[0], "-br", "link", "show", "lo"]).stdout
    with pytest.raises(ValueError, match="too long"):
        netns_factory.create("toolong")


def test_sysctls_follow_the_ip_plan(topology: Topology) -> None:
    for iface in ("all", "default", "c1", "c2"):
        assert read_sysctl(topology.client, f"net.ipv4.conf.{iface}.rp_filter") == "1"
    for ns, ifaces in ((topology.appliance, ("all", "default", "ext1", "ext2", "eth0")),
                       (topology.router, ("all", "default", "rt0", "p1", "p2"))):
        assert read_sysctl(ns, "net.ipv4.ip_forward") == "1"
        for iface in ifaces:
            assert read_sysctl(ns, f"net.ipv4.conf.{iface}.rp_filter") == "0"
    routes = sh(topology.appliance, "ip", "route", "show", "default").stdout
    assert routes.split()[:5] == ["default", "via", "10.10.0.1", "dev", "eth0"]
    assert sh(topology.client, "ip", "route", "show", "default").stdout == ""


def test_client_reaches_every_external_address(topology: Topology,
                                               servers: list[EchoServer]) -> None:
    links = [(address, topology.ext1_gateway) for address in topology.ext1_addresses]
    links.append((topology.ext2_address, topology.ext2_gateway))
    for address, _ in links:
        servers.append(echo_server(topology.appliance, "tcp", address, 80, "ap"))

    for address, gateway in links:
        reply = parse_echo_reply(tcp_request(topology.client, dst=address, port=80))
        assert (reply.name, reply.peer, reply.data) == ("ap", gateway, b"ping")

    # Without policy routing the appliance answers a client address through the router.
    assert expect_no_reply(tcp_request, topology.client, dst=topology.ext1_address, port=80,
                           src=topology.allowed_client, timeout=SILENCE)


def test_closed_ports_are_refused(topology: Topology) -> None:
    with pytest.raises(NoReply) as tcp_refusal:
        tcp_request(topology.client, dst=topology.ext1_address, port=9)
    assert tcp_refusal.value.reason == "refused"
    with pytest.raises(NoReply) as udp_refusal:
        udp_request(topology.client, dst=topology.ext2_address, port=9, payload=b"x")
    assert udp_refusal.value.reason == "refused"


def test_appliance_reaches_both_pods_from_its_cluster_address(
        topology: Topology, echo_servers: EchoServers) -> None:
    for index, pod_address in enumerate(topology.pod_addresses):
        tcp = tcp_request(topology.appliance, dst=pod_address, port=echo_servers.port,
                          payload=b"over tcp")
        udp = udp_request(topology.appliance, dst=pod_address, port=echo_servers.port,
                          payload=b"over udp")
        for reply, data in ((tcp, b"over tcp"), (udp, b"over udp")):
            parsed = parse_echo_reply(reply)
            assert parsed.name == f"pod{index + 1}"
            assert parsed.peer == topology.appliance_cluster_address
            assert parsed.data == data
    assert [peer for peer, _ in echo_servers["pod2", "udp"].peers] == [
        topology.appliance_cluster_address]


def test_open_connections_keep_their_source_port(topology: Topology,
                                                 echo_servers: EchoServers) -> None:
    pod1 = topology.pod_addresses[0]
    with open_tcp(topology.appliance, dst=pod1, port=echo_servers.port) as conn:
        first = parse_echo_reply(conn.exchange(b"one"))
        second = parse_echo_reply(conn.exchange(b"two"))
        local_port = conn.local[1]
    assert first.peer_port == second.peer_port == local_port
    assert (first.data, second.data) == (b"one", b"two")

    with UdpFlow(topology.appliance, src=topology.appliance_cluster_address, sport=40000,
                 dst=pod1, dport=echo_servers.port) as flow:
        replies = [parse_echo_reply(flow.exchange(data)) for data in (b"a", b"b")]
    assert [(r.peer, r.peer_port, r.data) for r in replies] == [
        (topology.appliance_cluster_address, 40000, b"a"),
        (topology.appliance_cluster_address, 40000, b"b")]


def test_cluster_ip_reaches_its_backends(topology: Topology,
                                         echo_servers: EchoServers) -> None:
    pod1, pod2 = topology.pod_addresses
    port = echo_servers.port

    def answer(protocol: str = "tcp") -> str:
        request = tcp_request if protocol == "tcp" else udp_request
        return parse_echo_reply(request(topology.appliance, dst="10.96.0.10", port=80)).name

    install_cluster_ip(topology, cluster_ip="10.96.0.10", port=80, protocol="tcp",
                       backends=[(pod1, port)])
    assert answer() == "pod1"

    # Installing again replaces the backends and adds no second rule or element.
    install_cluster_ip(topology, cluster_ip="10.96.0.10", port=80, protocol="tcp",
                       backends=[(pod2, port)])
    assert answer() == "pod2"
    install_cluster_ip(topology, cluster_ip="10.96.0.10", port=80, protocol="udp",
                       backends=[(pod1, port)])
    assert answer("udp") == "pod1"
    ruleset = sh(topology.router, "nft", "list", "table", "ip", "kube").stdout
    assert ruleset.count("vmap @services") == 2  # prerouting and output, once each
    assert ruleset.count("10.96.0.10 . tcp . 80") == 1

    # Two backends: random spread, so 30 new connections reach both (P(miss) = 2^-29).
    install_cluster_ip(topology, cluster_ip="10.96.0.10", port=80, protocol="tcp",
                       backends=[(pod1, port), (pod2, port)])
    assert {answer() for _ in range(30)} == {"pod1", "pod2"}

    remove_cluster_ip(topology, cluster_ip="10.96.0.10", port=80, protocol="tcp")
    ruleset = sh(topology.router, "nft", "list", "table", "ip", "kube").stdout
    assert "10.96.0.10 . tcp . 80" not in ruleset and "svc-tcp-80" not in ruleset
    assert "10.96.0.10 . udp . 80" in ruleset


def test_strict_rp_filter_in_client_drops_packets_on_the_wrong_link(
        topology: Topology, servers: list[EchoServer]) -> None:
    client = topology.allowed_client
    servers.append(echo_server(topology.client, "udp", client, 9000, "client"))
    sh(topology.appliance, "ip", "route", "add", f"{client}/32",
       "via", str(topology.ext1_gateway), "dev", topology.ext1_iface)

    # Right link: a source of ext1's network arriving on c1 passes.
    reply = udp_request(topology.appliance, src=topology.ext1_address, dst=client, port=9000)
    assert parse_echo_reply(reply).peer == topology.ext1_address

    # Wrong link: cl routes 198.51.100.10 via c2, so arriving on c1 it is dropped.
    before = netstat_counters(topology.client)["TcpExt.IPReversePathFilter"]
    assert expect_no_reply(udp_request, topology.appliance, src=topology.ext2_address,
                           dst=client, port=9000, timeout=SILENCE)
    wait_until(lambda: netstat_counters(topology.client)["TcpExt.IPReversePathFilter"] > before,
               timeout=2.0, message="TcpExt.IPReversePathFilter to increase in cl")
    assert [peer for peer, _ in servers[0].peers] == [topology.ext1_address]


def test_sniffer_in_pod_sees_sctp_init_from_router(topology: Topology) -> None:
    pod1 = topology.pod_addresses[0]
    with SctpSniffer(topology.pods[0]) as sniffer:
        send_sctp_init(topology.router, src=topology.pod_gateways[0], dst=pod1,
                       sport=5000, dport=3868)
        packet = sniffer.wait_for(lambda p: p.dport == 3868, timeout=2.0)
    assert packet.tuple == (topology.pod_gateways[0], pod1, 5000, 3868)
    assert (packet.chunk_type, packet.verification_tag, packet.checksum_ok) == (1, 0, True)


def test_sctp_init_checksum_passes_conntrack_and_is_nated(topology: Topology) -> None:
    # Conntrack checks SCTP checksums (nf_conntrack_checksum=1): a wrong one is not NATed.
    pod2 = topology.pod_addresses[1]
    install_cluster_ip(topology, cluster_ip="10.96.0.20", port=3868, protocol="sctp",
                       backends=[(pod2, 3869)])
    corrupt = bytearray(sctp_init_segment(sport=5001, dport=3868))
    corrupt[8] ^= 0xFF
    with SctpSniffer(topology.pods[1]) as sniffer:
        with_bad_checksum = ipv4_packet(src=topology.appliance_cluster_address,
                                        dst="10.96.0.20", protocol=132, payload=bytes(corrupt))
        send_raw_ipv4(topology.appliance, with_bad_checksum)
        send_sctp_init(topology.appliance, src=topology.appliance_cluster_address,
                       dst="10.96.0.20", sport=5002, dport=3868)
        packet = sniffer.wait_for(lambda p: p.sport == 5002, timeout=2.0)
        # Same path, sent first: had it been NATed it would have arrived already.
        assert [p.sport for p in sniffer.collect()] == [5002]
    assert packet.tuple == (topology.appliance_cluster_address, pod2, 5002, 3869)
    assert packet.checksum_ok


def test_crc32c_matches_reference_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


async def test_clients_in_different_namespaces_run_concurrently(
        topology: Topology, echo_servers: EchoServers) -> None:
    # in_netns moves only the calling thread: parallel workers must not disturb each other.
    calls = [asyncio.to_thread(tcp_request, topology.appliance, dst=address,
                               port=echo_servers.port)
             for address in topology.pod_addresses for _ in range(4)]
    replies = [parse_echo_reply(reply) for reply in await asyncio.gather(*calls)]
    assert sorted(r.name for r in replies) == ["pod1"] * 4 + ["pod2"] * 4
    assert {r.peer for r in replies} == {topology.appliance_cluster_address}
    assert await async_wait_until(lambda: len(echo_servers["pod1", "tcp"].peers) >= 4,
                                  timeout=1.0, message="pod1 peers")


def test_echo_server_stop_ends_its_thread(topology: Topology) -> None:
    before = threading.active_count()
    server = echo_server(topology.pods[0], "udp", topology.pod_addresses[0], 7000, "p")
    assert threading.active_count() == before + 1
    server.stop()
    assert threading.active_count() == before
    assert expect_no_reply(udp_request, topology.router, dst=topology.pod_addresses[0],
                           port=7000, timeout=SILENCE)


def test_cleanup_deletes_namespaces_and_their_processes_after_a_failure(
        netns_prefix: str) -> None:
    factory = NetnsFactory(prefix=netns_prefix)
    with pytest.raises(RuntimeError, match="boom"), factory:
        topology = build_topology(factory)
        sleeper = subprocess.Popen(["ip", "netns", "exec", topology.router, "sleep", "60"])
        wait_until(lambda: sleeper.pid in netns_pids(topology.router), timeout=5.0,
                   message="sleep to enter the router namespace")
        raise RuntimeError("boom")
    assert sleeper.wait(timeout=5.0) == -signal.SIGKILL
    assert not set(topology.namespaces) & list_netns()
    assert factory.created == ()


def test_wait_until_reports_the_last_value() -> None:
    values = iter(range(100))
    assert wait_until(lambda: next(values) >= 2, timeout=1.0, interval=0.001)
    with pytest.raises(AssertionError, match=r"waiting for the answer; last value: \[\]"):
        wait_until(lambda: [], timeout=0.05, message="the answer")


async def test_async_wait_until_awaits_predicates() -> None:
    async def ready() -> str:
        return "yes"

    assert await async_wait_until(ready, timeout=0.5) == "yes"
    with pytest.raises(AssertionError, match="last value: 0"):
        await async_wait_until(lambda: 0, timeout=0.05)
