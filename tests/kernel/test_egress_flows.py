"""Pods' own flows through the box (egress SNAT) after their egress entry changes.

With SNCTRLR_SETUP_SNAT=true a backend pod's connection to the outside gets its Mapping's
interface mark and leaves SNATed to the Mapping's address; both stay in the conntrack entry for
the life of the flow. When the plan routes the pod differently (the Mapping's address moved to
another interface, the interface came back with a new ifindex and so a new mark), the old entry
would keep the flow on the old path: a table that no longer exists, or the old source address.
After the apply the entry is gone, and the pod's next packet starts over on the new path.

IP plan: the one of tests/kernel/conftest.py; the outside peer is 203.0.113.10 (inet0 in the
client namespace), reached from ext1 through 192.0.2.1 and from ext2 through 198.51.100.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address

import pytest

from smartnatd.dataplane import Dataplane
from smartnatd.desired import interface_mark
from tests.builders import endpoint_slice, mapping, service
from tests.kernel.conftest import new_dataplane
from tests.kernel.harness import (
    EchoServer,
    Topology,
    UdpFlow,
    echo_server,
    ip_batch,
    open_tcp,
    parse_echo_reply,
    sh,
    sysctls,
    wait_until,
)
from tests.kernel.test_dataplane import POD1, POD2, SETTINGS, Appliance, appliance, web, web_slice  # noqa: F401

SNAT = dataclasses.replace(SETTINGS, setup_snat=True)
PEER_PORT = 9000
BOX_PORT = 9001  # the box's own flow goes to the client's gateway address on c1


@pytest.fixture
def peer(topology: Topology) -> Iterator[EchoServer]:
    """UDP echo on the outside peer (203.0.113.10:9000): records the source it saw."""
    with echo_server(topology.client, "udp", topology.allowed_client, PEER_PORT, name="outside") as server:
        yield server


@pytest.fixture
def tcp_peer(topology: Topology) -> Iterator[EchoServer]:
    with echo_server(topology.client, "tcp", topology.allowed_client, PEER_PORT, name="outside") as server:
        yield server


@pytest.fixture
def pod1_flow(topology: Topology) -> Iterator[UdpFlow]:
    """A long-lived UDP flow from pod1 to the outside peer: one source port, one conntrack entry."""
    with UdpFlow(topology.pods[0], src=None, sport=None, dst=topology.allowed_client, dport=PEER_PORT) as flow:
        yield flow


def seen_as(flow: UdpFlow) -> IPv4Address:
    """Send one datagram; the source address the outside peer saw it from."""
    return parse_echo_reply(flow.exchange(b"ping", timeout=1.0)).peer


def entry_ids(t: Topology, *filters: str) -> dict[int, str]:
    """id -> line of the appliance's conntrack entries matching the `conntrack -L` filters."""
    lines = sh(t.appliance, "conntrack", "-L", *filters, "-o", "id").stdout.splitlines()
    return {int(m.group(1)): line for line in lines if (m := re.search(r"\bid=(\d+)", line))}


def egress_ids(t: Topology, pod: str, proto: str = "udp") -> dict[int, str]:
    return entry_ids(t, "-p", proto, "-s", pod, "--dport", str(PEER_PORT))


def ifindex(t: Topology, iface: str) -> int:
    return int(sh(t.appliance, "cat", f"/sys/class/net/{iface}/ifindex").stdout)


def recreate_ext1(t: Topology) -> None:
    """Delete ext1 (and its peer c1) and build them again: same names and addresses, new ifindex."""
    sh(t.client, "ip", "link", "del", t.client_ext1_iface)
    ip_batch(t.client, [
        f"link add {t.client_ext1_iface} type veth peer name {t.ext1_iface} netns {t.appliance}",
        f"addr add {t.ext1_gateway}/{t.ext1_network.prefixlen} dev {t.client_ext1_iface}",
        f"link set {t.client_ext1_iface} up",
    ])
    ip_batch(t.appliance, [
        *(f"addr add {a}/{t.ext1_network.prefixlen} dev {t.ext1_iface}" for a in t.ext1_addresses),
        f"link set {t.ext1_iface} up",
    ])
    sysctls(t.client, {f"net.ipv4.conf.{t.client_ext1_iface}.rp_filter": 1})
    sysctls(t.appliance, {f"net.ipv4.conf.{t.ext1_iface}.rp_filter": 0})
    # Host discovery serves an interface once it is operationally up: a moment after "link up".
    wait_until(
        lambda: sh(t.appliance, "cat", f"/sys/class/net/{t.ext1_iface}/operstate").stdout.strip() == "up",
        timeout=5,
        message="ext1 to come up",
    )


@contextmanager
def box_flow(t: Topology) -> Iterator[int]:
    """The box's own UDP flow (192.0.2.10 -> 192.0.2.1:9001), its conntrack entry marked with
    ext1's mark as a pod's egress would be; yields that entry's id. Only once a ruleset is in:
    a namespace tracks connections only while some rule uses conntrack."""
    with (
        echo_server(t.client, "udp", t.ext1_gateway, BOX_PORT, name="gateway"),
        UdpFlow(t.appliance, src=t.ext1_address, sport=None, dst=t.ext1_gateway, dport=BOX_PORT) as flow,
    ):
        assert parse_echo_reply(flow.exchange(b"ping")).name == "gateway"
        mark = interface_mark(ifindex(t, t.ext1_iface))
        sh(t.appliance, "conntrack", "-U", "-p", "udp", "-s", str(t.ext1_address), "--dport", str(BOX_PORT),
           "-m", str(mark))
        (box_id, _), = entry_ids(t, "-p", "udp", "--dport", str(BOX_PORT), "--mark", str(mark)).items()
        yield box_id


@pytest.fixture(params=[True, False], ids=["kernel-side", "dump"])
def deletes(request, appliance: Appliance) -> str:
    """Both ways of deleting: by kernel-side filter (kernel >= 6.11) and by dump, flow by flow."""
    conntrack = appliance.dataplane._conntrack
    if request.param and not conntrack.filtered_delete:
        pytest.skip("this kernel has no filtered conntrack delete (< 6.11)")
    conntrack.filtered_delete = request.param
    return request.node.callspec.id


async def test_moving_the_mappings_address_to_another_interface_moves_its_pods_open_egress_flow(
    topology, echo_servers, appliance, deletes, peer, pod1_flow
):
    t = topology
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
    (old_id, line), = egress_ids(t, POD1).items()
    assert f"mark={interface_mark(ifindex(t, t.ext1_iface))}" in line

    # The Mapping now serves ext2's address: its pods' egress leaves by ext2, SNATed to it.
    moved = mapping("web", mode="direct", addresses=(str(t.ext2_address),))
    await appliance.apply(moved, services=[web()], slices=[web_slice((POD1,))], settings=SNAT)

    assert old_id not in egress_ids(t, POD1)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext2_address
    (new_id, line), = egress_ids(t, POD1).items()
    assert f"mark={interface_mark(ifindex(t, t.ext2_iface))}" in line
    assert [p for p, _ in peer.peers] == [t.ext1_address, t.ext2_address]


async def test_a_recreated_egress_interface_does_not_black_hole_its_pods_open_flows(
    topology, echo_servers, appliance, deletes, peer, tcp_peer, pod1_flow
):
    t = topology
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
    conn = await asyncio.to_thread(open_tcp, t.pods[0], dst=t.allowed_client, port=PEER_PORT)
    with conn, box_flow(t) as box_id:
        assert parse_echo_reply(await asyncio.to_thread(conn.exchange, b"ping")).peer == t.ext1_address
        (udp_id, _), = egress_ids(t, POD1).items()
        (tcp_id, _), = egress_ids(t, POD1, "tcp").items()
        old_mark = interface_mark(ifindex(t, t.ext1_iface))

        recreate_ext1(t)
        assert interface_mark(ifindex(t, t.ext1_iface)) != old_mark
        await appliance.apply(
            mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT
        )

        # Both of pod1's flows were made under the old mark, whose table is gone: deleted.
        assert udp_id not in egress_ids(t, POD1)
        assert tcp_id not in egress_ids(t, POD1, "tcp")
        # The next datagram starts over: the new mark, out of the new ext1, the same source.
        assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
        (_, line), = egress_ids(t, POD1).items()
        assert f"mark={interface_mark(ifindex(t, t.ext1_iface))}" in line
        # The box's own flow carries the old mark and its replies come to 192.0.2.10 as well,
        # but it was never SNATed: no pod's egress, so it is left alone.
        assert box_id in entry_ids(t, "-p", "udp", "--dport", str(BOX_PORT))


def pod2_on_ext2(t: Topology) -> tuple:
    """A second Mapping, on ext2's address, whose only backend is pod2: (mapping, service, slice)."""
    return (
        mapping("other", mode="direct", addresses=(str(t.ext2_address),), service="other"),
        service("other", cluster_ip="10.96.0.11", ports=(("http", "tcp", 80, 8080),)),
        endpoint_slice("other", ready=(POD2,), ports=(("http", "tcp", 8080),)),
    )


async def test_an_unrelated_change_leaves_an_open_egress_flow_alone(topology, echo_servers, appliance, peer, pod1_flow):
    t = topology
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice((POD1,))], settings=SNAT)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
    (flow_id, _), = egress_ids(t, POD1).items()

    # web's allow-list changes and another Mapping comes, with pod2's egress by ext2: pod1's
    # egress entry stays as it was.
    other, other_service, other_slice = pod2_on_ext2(t)
    await appliance.apply(
        mapping("web", mode="direct", sources=("203.0.113.0/24",)), other,
        services=[web(), other_service], slices=[web_slice((POD1,)), other_slice], settings=SNAT,
    )
    assert appliance.last_report.nft_operations > 0

    assert flow_id in egress_ids(t, POD1)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
    assert flow_id in egress_ids(t, POD1)


@pytest.fixture
def restarted(topology: Topology, tmp_path) -> Dataplane:
    """A second dataplane on the same namespace: the daemon after a restart."""
    return new_dataplane(topology, tmp_path)


async def test_the_sweep_after_a_restart_deletes_egress_flows_of_a_gone_mark_only(
    topology, echo_servers, appliance, restarted, peer, pod1_flow
):
    t = topology
    other, other_service, other_slice = pod2_on_ext2(t)
    cluster = {
        "services": [web(), other_service], "slices": [web_slice((POD1,)), other_slice], "settings": SNAT,
    }
    await appliance.apply(mapping("web", mode="direct"), other, **cluster)
    with (
        UdpFlow(t.pods[1], src=None, sport=None, dst=t.allowed_client, dport=PEER_PORT) as pod2_flow,
        box_flow(t) as box_id,
    ):
        assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
        assert await asyncio.to_thread(seen_as, pod2_flow) == t.ext2_address
        (pod1_id, _), = egress_ids(t, POD1).items()
        (pod2_id, _), = egress_ids(t, POD2).items()
        await appliance.dataplane.close()  # the daemon stops: the kernel state stays

        recreate_ext1(t)  # and ext1 comes back with a new ifindex while it is down
        async with restarted:
            appliance.dataplane = restarted
            await appliance.apply(mapping("web", mode="direct"), other, **cluster)

        # The first pass's sweep: pod1's flow has a mark no interface has, pod2's is as planned.
        assert pod1_id not in egress_ids(t, POD1)
        assert pod2_id in egress_ids(t, POD2)
        assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
        assert await asyncio.to_thread(seen_as, pod2_flow) == t.ext2_address
        assert pod2_id in egress_ids(t, POD2)
        assert box_id in entry_ids(t, "-p", "udp", "--dport", str(BOX_PORT))


async def test_a_terminating_pods_open_egress_flows_finish_as_they_began(
    topology, echo_servers, appliance, deletes, peer, tcp_peer, pod1_flow
):
    """A rolling update: pod1 starts terminating (serving, no longer ready), so it loses its
    egress entry and its new connections get no SNAT. Its open ones still have a path (ext1
    and its address are the box's as before) and must finish: deleted, their next packet
    would leave unSNATed, from the pod's own address, and the peer would not know it."""
    t = topology
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice()], settings=SNAT)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
    conn = await asyncio.to_thread(open_tcp, t.pods[0], dst=t.allowed_client, port=PEER_PORT)
    with conn:
        assert parse_echo_reply(await asyncio.to_thread(conn.exchange, b"ping")).peer == t.ext1_address
        (udp_id, _), = egress_ids(t, POD1).items()
        (tcp_id, _), = egress_ids(t, POD1, "tcp").items()

        terminating = endpoint_slice(ready=(POD2,), draining=(POD1,), ports=(("http", "tcp", 8080), ("dns", "udp", 8080)))
        p = await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[terminating], settings=SNAT)
        assert [str(e.source) for e in p.desired.egress] == [POD2]

        assert tcp_id in egress_ids(t, POD1, "tcp")
        assert parse_echo_reply(await asyncio.to_thread(conn.exchange, b"pong")).peer == t.ext1_address
        assert udp_id in egress_ids(t, POD1)
        assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address


async def test_the_sweep_after_a_restart_leaves_a_terminating_pods_open_egress_flow(
    topology, echo_servers, appliance, restarted, peer, pod1_flow
):
    t = topology
    await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[web_slice()], settings=SNAT)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
    (pod1_id, _), = egress_ids(t, POD1).items()
    await appliance.dataplane.close()  # the daemon stops: the kernel state stays

    # pod1 starts terminating while the daemon is down: ext1 and its mark are still there.
    terminating = endpoint_slice(ready=(POD2,), draining=(POD1,), ports=(("http", "tcp", 8080), ("dns", "udp", 8080)))
    async with restarted:
        appliance.dataplane = restarted
        await appliance.apply(mapping("web", mode="direct"), services=[web()], slices=[terminating], settings=SNAT)

    assert pod1_id in egress_ids(t, POD1)
    assert await asyncio.to_thread(seen_as, pod1_flow) == t.ext1_address
