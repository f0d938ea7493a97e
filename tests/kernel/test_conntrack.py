"""Stale-flow cleanup: stale_flow_filters (pure) and ConntrackEdge against real flows.

IP plan (every address lives inside namespaces this file creates; nothing touches the host's):

    client ns   c0  192.0.2.2/24, 192.0.2.3/24        route 203.0.113.0/24 via 192.0.2.1
       |  veth
    router ns   r0  192.0.2.1/24                      ip_forward=1, nft `table ip t`
                r1  198.51.100.1/24                   conntrack lives here (the appliance)
       |  veth
    backend ns  b0  198.51.100.2/24 (A), .3/24 (B)    default via 198.51.100.1; UDP echo on :7000

External endpoints, DNATed by the router (203.0.113.0/24 is on no interface: the DNAT decides):
    E1 203.0.113.10:5000/udp   E2 203.0.113.11:5001/udp   E3 203.0.113.12:5002/udp
    E4 203.0.113.13:5003/udp   MARK (0x00030000) is set on new DNATed connections unless a
    test says otherwise; a datagram to 192.0.2.1:6000 is marked but never DNATed (like egress).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import secrets
import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import AsyncConntrack, netns
from pyroute2.conntrack import ConntrackEntry, NFCTAttrTuple
from pyroute2.netlink.nfnetlink.nfctsocket import IPS_DST_NAT, IPS_SRC_NAT

from smartnatd.conntrack import (
    ConntrackEdge,
    EgressFlowFilter,
    FlowFilter,
    _doom,
    _Flow,
    stale_egress_filters,
    stale_flow_filters,
)
from smartnatd.desired import (
    MARK_MASK,
    DesiredState,
    Dnat,
    EgressSnat,
    ExternalEndpoint,
    ReturnPath,
    Target,
    interface_mark,
)
from smartnatd.model import MappingKey, Protocol

CLIENT_1 = IPv4Address("192.0.2.2")
CLIENT_2 = IPv4Address("192.0.2.3")
ROUTER_LOCAL = IPv4Address("192.0.2.1")
LOCAL_PORT = 6000
BACKEND_A = Target(address=IPv4Address("198.51.100.2"), port=7000)
BACKEND_B = Target(address=IPv4Address("198.51.100.3"), port=7000)
MARK = 0x00030000  # interface_mark(3): inside MARK_MASK

ANYONE = (IPv4Network("0.0.0.0/0"),)


def udp(address: str, port: int) -> ExternalEndpoint:
    return ExternalEndpoint(address=IPv4Address(address), protocol=Protocol.UDP, port=port)


E1 = udp("203.0.113.10", 5000)
E2 = udp("203.0.113.11", 5001)
E3 = udp("203.0.113.12", 5002)
E4 = udp("203.0.113.13", 5003)
# A Service's ClusterIP:port, as mode: service DNATs to it. It is on no interface of the lab: in
# the kernel tests the router DNATs straight to a backend, as IPVS would after the ClusterIP.
CLUSTER_IP = Target(address=IPv4Address("10.96.0.10"), port=80)
OTHER_CLUSTER_IP = Target(address=IPv4Address("10.96.0.11"), port=80)


# -- stale_flow_filters: pure ----------------------------------------------------------------
# (They need no root; tests/conftest.py still marks everything in this folder `kernel`.)


def dnat(
    external: ExternalEndpoint,
    *targets: Target,
    sources: tuple[IPv4Network, ...] = ANYONE,
    virtual: bool = False,
) -> Dnat:
    return Dnat(
        external=external,
        targets=tuple(sorted(targets)),
        allowed_sources=sources,
        owner=MappingKey("default", f"m-{external.port}"),
        interface="ext1",
        virtual_target=virtual,
    )


def state(*dnats: Dnat, drop_unmapped: bool = False) -> DesiredState:
    # drop_unmapped off: new endpoints may have flows from before their Mapping (see below).
    return DesiredState(dnats=tuple(sorted(dnats, key=lambda d: d.external)), drop_unmapped=drop_unmapped)


def nets(*texts: str) -> tuple[IPv4Network, ...]:
    return tuple(IPv4Network(t) for t in texts)


def test_unchanged_endpoints_need_no_filter() -> None:
    desired = state(dnat(E1, BACKEND_A, sources=nets("192.0.2.0/24")), dnat(E2, BACKEND_A, BACKEND_B))
    assert stale_flow_filters(old=desired, new=desired) == ()


def test_a_new_mark_for_an_interface_deletes_every_flow_to_its_endpoints() -> None:
    # ext1 came back with another ifindex (or the address moved to another interface): the
    # flows' old mark routes their replies by a path that is gone.
    path = ReturnPath(
        interface="ext1", ifindex=2, mark=interface_mark(2), table=2002, gateway=IPv4Address("192.0.2.1"),
        network=IPv4Network("192.0.2.0/24"), source=IPv4Address("192.0.2.10"),
    )
    old = dataclasses.replace(state(dnat(E1, BACKEND_A), dnat(E2, BACKEND_A)), return_paths=(path,))
    new = dataclasses.replace(old, return_paths=(dataclasses.replace(path, ifindex=5, mark=interface_mark(5)),))
    assert stale_flow_filters(old=old, new=new) == tuple(
        FlowFilter(external=e, keep_targets=None, keep_sources=None) for e in (E1, E2)
    )
    assert stale_flow_filters(old=old, new=old) == ()


def test_a_target_that_starts_draining_keeps_its_flows_until_it_is_gone() -> None:
    ready = state(dnat(E1, BACKEND_A, BACKEND_B))
    draining = state(dataclasses.replace(dnat(E1, BACKEND_B), draining=(BACKEND_A,)))
    gone = state(dnat(E1, BACKEND_B))
    assert stale_flow_filters(old=ready, new=draining) == ()
    assert stale_flow_filters(old=draining, new=gone) == (
        FlowFilter(
            external=E1, keep_targets=frozenset({BACKEND_B}), keep_sources=None, lost_targets=frozenset({BACKEND_A})
        ),
    )
    # At start-up nothing is known of the old state: a draining target's flows are kept too.
    assert stale_flow_filters(old=None, new=draining)[0].keep_targets == frozenset({BACKEND_A, BACKEND_B})


def test_removed_endpoint_deletes_every_flow_to_it() -> None:
    old = state(dnat(E1, BACKEND_A), dnat(E2, BACKEND_A))
    new = state(dnat(E1, BACKEND_A))
    assert stale_flow_filters(old=old, new=new) == (FlowFilter(external=E2, keep_targets=None, keep_sources=None),)


def test_lost_target_keeps_the_still_wanted_targets() -> None:
    old = state(dnat(E1, BACKEND_A, BACKEND_B))
    new = state(dnat(E1, BACKEND_B))
    assert stale_flow_filters(old=old, new=new) == (
        FlowFilter(
            external=E1, keep_targets=frozenset({BACKEND_B}), keep_sources=None, lost_targets=frozenset({BACKEND_A})
        ),
    )


def test_replaced_target_port_counts_as_a_lost_target() -> None:
    moved = Target(address=BACKEND_A.address, port=7001)
    (flt,) = stale_flow_filters(old=state(dnat(E1, BACKEND_A)), new=state(dnat(E1, moved)))
    assert flt.keep_targets == frozenset({moved})
    assert flt.lost_targets == frozenset({BACKEND_A})


def test_added_targets_alone_need_no_filter() -> None:
    old = state(dnat(E1, BACKEND_A))
    new = state(dnat(E1, BACKEND_A, BACKEND_B))
    assert stale_flow_filters(old=old, new=new) == ()


def test_shrunk_sources_keep_only_allowed_sources() -> None:
    old = state(dnat(E1, BACKEND_A, sources=nets("192.0.2.0/24")))
    new = state(dnat(E1, BACKEND_A, sources=nets("192.0.2.0/25")))
    assert stale_flow_filters(old=old, new=new) == (
        FlowFilter(
            external=E1, keep_targets=frozenset({BACKEND_A}), keep_sources=nets("192.0.2.0/25"), lost_targets=frozenset()
        ),
    )


def test_from_anyone_to_a_list_is_a_shrink() -> None:
    (flt,) = stale_flow_filters(
        old=state(dnat(E1, BACKEND_A)), new=state(dnat(E1, BACKEND_A, sources=nets("192.0.2.2/32")))
    )
    assert flt.keep_sources == nets("192.0.2.2/32")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (nets("192.0.2.0/25"), nets("192.0.2.0/24")),  # widened
        (nets("192.0.2.0/24"), nets("192.0.2.0/25", "192.0.2.128/25")),  # same addresses, split
        (nets("192.0.2.0/24"), ANYONE),
        (nets("192.0.2.0/24", "198.51.100.0/24"), nets("192.0.2.0/23", "198.51.100.0/24")),
    ],
)
def test_sources_not_shrunk_need_no_filter(before: tuple[IPv4Network, ...], after: tuple[IPv4Network, ...]) -> None:
    old = state(dnat(E1, BACKEND_A, sources=before))
    new = state(dnat(E1, BACKEND_A, sources=after))
    assert stale_flow_filters(old=old, new=new) == ()


def test_lost_target_and_shrunk_sources_make_one_filter() -> None:
    old = state(dnat(E1, BACKEND_A, BACKEND_B))
    new = state(dnat(E1, BACKEND_B, sources=nets("192.0.2.0/24")))
    assert stale_flow_filters(old=old, new=new) == (
        FlowFilter(
            external=E1,
            keep_targets=frozenset({BACKEND_B}),
            keep_sources=nets("192.0.2.0/24"),
            lost_targets=frozenset({BACKEND_A}),
        ),
    )


def test_added_endpoint_deletes_only_flows_not_going_to_its_targets() -> None:
    # Flows to it from before the Mapping existed were never DNATed and never reach a target.
    old = state(dnat(E1, BACKEND_A))
    new = state(dnat(E1, BACKEND_A), dnat(E2, BACKEND_B))
    assert stale_flow_filters(old=old, new=new) == (
        FlowFilter(external=E2, keep_targets=frozenset({BACKEND_B}), keep_sources=None, lost_targets=frozenset()),
    )


def test_added_endpoint_needs_no_look_when_unmapped_ports_were_dropped() -> None:
    # With drop_unmapped on, no flow to the new endpoint was ever confirmed: no filter, no walk.
    old = state(dnat(E1, BACKEND_A), drop_unmapped=True)
    new = state(dnat(E1, BACKEND_A), dnat(E2, BACKEND_B), drop_unmapped=True)
    assert stale_flow_filters(old=old, new=new) == ()


def test_protocol_is_part_of_the_endpoint() -> None:
    tcp = ExternalEndpoint(address=E1.address, protocol=Protocol.TCP, port=E1.port)
    filters = stale_flow_filters(old=state(dnat(E1, BACKEND_A)), new=state(dnat(tcp, BACKEND_A)))
    assert filters == (
        FlowFilter(external=tcp, keep_targets=frozenset({BACKEND_A}), keep_sources=None, lost_targets=frozenset()),
        FlowFilter(external=E1, keep_targets=None, keep_sources=None),
    )


def test_unknown_previous_state_keeps_exactly_what_new_allows() -> None:
    new = state(dnat(E2, BACKEND_A, BACKEND_B), dnat(E1, BACKEND_A, sources=nets("192.0.2.0/24")))
    assert stale_flow_filters(old=None, new=new) == (
        FlowFilter(external=E1, keep_targets=frozenset({BACKEND_A}), keep_sources=nets("192.0.2.0/24")),
        FlowFilter(external=E2, keep_targets=frozenset({BACKEND_A, BACKEND_B}), keep_sources=None),
    )


def test_unknown_previous_state_of_nothing_needs_no_filter() -> None:
    assert stale_flow_filters(old=None, new=DesiredState()) == ()


def test_several_changes_come_sorted_by_endpoint() -> None:
    old = state(dnat(E3, BACKEND_A), dnat(E1, BACKEND_A, BACKEND_B), dnat(E2, BACKEND_A))
    new = state(dnat(E2, BACKEND_A), dnat(E1, BACKEND_A))
    assert [f.external for f in stale_flow_filters(old=old, new=new)] == [E1, E3]


# A virtual target (mode: service) is translated again by kube-proxy (IPVS) on the box, so the
# reply source conntrack shows is a pod, never the ClusterIP: flows are judged by source only.


def test_unknown_previous_state_judges_flows_to_a_virtual_target_by_source_only() -> None:
    new = state(
        dnat(E1, CLUSTER_IP, sources=nets("192.0.2.0/24"), virtual=True),
        dnat(E2, CLUSTER_IP, virtual=True),
        dnat(E3, BACKEND_A),
    )
    assert stale_flow_filters(old=None, new=new) == (
        FlowFilter(
            external=E1, keep_targets=frozenset({CLUSTER_IP}), keep_sources=nets("192.0.2.0/24"), check_targets=False
        ),
        FlowFilter(external=E2, keep_targets=frozenset({CLUSTER_IP}), keep_sources=None, check_targets=False),
        FlowFilter(external=E3, keep_targets=frozenset({BACKEND_A}), keep_sources=None),
    )


def test_shrunk_sources_of_a_virtual_target_filter_by_source_only() -> None:
    old = state(dnat(E1, CLUSTER_IP, sources=nets("192.0.2.0/24"), virtual=True))
    new = state(dnat(E1, CLUSTER_IP, sources=nets("192.0.2.0/25"), virtual=True))
    assert stale_flow_filters(old=old, new=new) == (
        FlowFilter(
            external=E1,
            keep_targets=frozenset({CLUSTER_IP}),
            keep_sources=nets("192.0.2.0/25"),
            check_targets=False,
            lost_targets=frozenset(),
        ),
    )


def test_unchanged_virtual_target_needs_no_filter() -> None:
    desired = state(dnat(E1, CLUSTER_IP, sources=nets("192.0.2.0/24"), virtual=True))
    assert stale_flow_filters(old=desired, new=desired) == ()


def test_changed_virtual_target_deletes_every_flow_to_the_endpoint() -> None:
    # Another Service: no flow tells which ClusterIP it went through, so none can stay.
    old = state(dnat(E1, CLUSTER_IP, virtual=True))
    new = state(dnat(E1, OTHER_CLUSTER_IP, virtual=True))
    assert stale_flow_filters(old=old, new=new) == (FlowFilter(external=E1, keep_targets=None, keep_sources=None),)


def test_added_virtual_target_deletes_only_flows_never_dnated() -> None:
    new = state(dnat(E1, CLUSTER_IP, sources=nets("192.0.2.0/24"), virtual=True))
    assert stale_flow_filters(old=DesiredState(drop_unmapped=False), new=new) == (
        FlowFilter(
            external=E1,
            keep_targets=frozenset({CLUSTER_IP}),
            keep_sources=None,
            check_targets=False,
            lost_targets=frozenset(),
        ),
    )


def test_switch_to_a_virtual_target_deletes_every_flow_to_the_endpoint() -> None:
    old = state(dnat(E1, BACKEND_A, BACKEND_B))
    new = state(dnat(E1, CLUSTER_IP, virtual=True))
    assert stale_flow_filters(old=old, new=new) == (FlowFilter(external=E1, keep_targets=None, keep_sources=None),)


def test_switch_from_a_virtual_target_keeps_flows_reaching_a_new_target() -> None:
    # Even with the same target tuples: what the reply source means changed. Flows that IPVS
    # sent to a pod the endpoint now targets directly still go to a wanted target.
    for before in (CLUSTER_IP, BACKEND_A):
        old = state(dnat(E1, before, sources=nets("192.0.2.0/24"), virtual=True))
        new = state(dnat(E1, BACKEND_A, sources=nets("192.0.2.0/24")))
        assert stale_flow_filters(old=old, new=new) == (
            FlowFilter(external=E1, keep_targets=frozenset({BACKEND_A}), keep_sources=None),
        ), before


def test_a_virtual_filter_says_so_instead_of_naming_targets() -> None:
    flt = FlowFilter(external=E1, keep_targets=frozenset({CLUSTER_IP}), keep_sources=None, check_targets=False)
    assert str(flt) == f"{E1} (keep targets=virtual sources=any)"
    assert str(FlowFilter(external=E1, keep_targets=frozenset({CLUSTER_IP}), keep_sources=None)) == (
        f"{E1} (keep targets={CLUSTER_IP} sources=any)"
    )


POD_A, POD_B = IPv4Address("10.244.1.2"), IPv4Address("10.244.2.2")
SNAT_1, SNAT_2 = IPv4Address("192.0.2.10"), IPv4Address("198.51.100.10")
MARK_3, MARK_4, MARK_7 = interface_mark(3), interface_mark(4), interface_mark(7)


def egress(source: IPv4Address, to: IPv4Address, mark: int) -> EgressSnat:
    return EgressSnat(source, to, f"ext{mark >> 16}", mark, MappingKey("default", "web"))


def test_unchanged_egress_needs_no_filter() -> None:
    entries = [egress(POD_A, SNAT_1, MARK_3), egress(POD_B, SNAT_2, MARK_4)]
    assert stale_egress_filters(old=entries, new=list(reversed(entries)), marks={MARK_3, MARK_4}) == ()


def test_egress_moved_to_another_interface_deletes_the_pods_flows_under_the_old_entry() -> None:
    filters = stale_egress_filters(
        old=[egress(POD_A, SNAT_1, MARK_3), egress(POD_B, SNAT_1, MARK_3)],
        new=[egress(POD_A, SNAT_2, MARK_4), egress(POD_B, SNAT_1, MARK_3)],
        marks={MARK_3, MARK_4},
    )
    assert filters == (EgressFlowFilter(mark=MARK_3, to=SNAT_1, source=POD_A),)


def test_a_new_snat_address_on_the_same_interface_deletes_the_pods_flows() -> None:
    filters = stale_egress_filters(
        old=[egress(POD_A, SNAT_1, MARK_3)], new=[egress(POD_A, IPv4Address("192.0.2.11"), MARK_3)], marks={MARK_3}
    )
    assert filters == (EgressFlowFilter(mark=MARK_3, to=SNAT_1, source=POD_A),)


def test_a_pod_without_egress_any_more_keeps_its_egress_flows_while_their_mark_is_an_interfaces() -> None:
    # Terminating (or not ready): its open flows still leave by ext4 and finish there.
    assert stale_egress_filters(old=[egress(POD_B, SNAT_2, MARK_4)], new=[], marks={MARK_3, MARK_4}) == ()
    # ext4 is gone or came back with a new ifindex: they are black-holed, so they go.
    filters = stale_egress_filters(old=[egress(POD_B, SNAT_2, MARK_4)], new=[], marks={MARK_3})
    assert filters == (EgressFlowFilter(mark=MARK_4, to=SNAT_2, source=None),)


def test_a_mark_no_interface_has_any_more_is_one_filter_for_every_pod() -> None:
    # ext3 came back as ext7: no pod's egress can be made with the old mark now.
    filters = stale_egress_filters(
        old=[egress(POD_A, SNAT_1, MARK_3), egress(POD_B, SNAT_1, MARK_3)],
        new=[egress(POD_A, SNAT_1, MARK_7), egress(POD_B, SNAT_1, MARK_7)],
        marks={MARK_7, MARK_4},
    )
    assert filters == (EgressFlowFilter(mark=MARK_3, to=SNAT_1, source=None),)
    assert str(filters[0]) == f"egress from any pod mark={MARK_3:#x} snat={SNAT_1}"


def test_added_egress_needs_no_filter() -> None:
    assert stale_egress_filters(old=[], new=[egress(POD_A, SNAT_1, MARK_3)], marks={MARK_3}) == ()


def egress_flow(source: IPv4Address, *, to: IPv4Address, mark: int, status: int = IPS_SRC_NAT) -> _Flow:
    """A dumped flow from `source` to the outside peer 203.0.113.10:9000 whose replies go to `to`."""
    return _Flow(
        protocol=Protocol.UDP,
        source=source,
        source_port=40000,
        destination=IPv4Address("203.0.113.10"),
        destination_port=9000,
        reply_source=IPv4Address("203.0.113.10"),
        reply_source_port=9000,
        reply_destination=to,
        mark=mark,
        status=status,
        id=1,
        zone=None,
    )


def test_an_egress_filter_matches_only_snated_undnated_flows_with_its_mark_and_address() -> None:
    flt = EgressFlowFilter(mark=MARK_3, to=SNAT_1, source=POD_A)
    assert flt.matches(egress_flow(POD_A, to=SNAT_1, mark=MARK_3))
    assert not flt.matches(egress_flow(POD_B, to=SNAT_1, mark=MARK_3))  # another pod
    assert not flt.matches(egress_flow(POD_A, to=SNAT_1, mark=MARK_4))  # made under another entry
    assert not flt.matches(egress_flow(POD_A, to=SNAT_2, mark=MARK_3))
    assert not flt.matches(egress_flow(POD_A, to=POD_A, mark=MARK_3, status=0))  # to an internal peer
    assert not flt.matches(egress_flow(POD_A, to=SNAT_1, mark=MARK_3, status=IPS_SRC_NAT | IPS_DST_NAT))
    # The box's own flow from the egress address, marked alike: never SNATed.
    anyone = EgressFlowFilter(mark=MARK_3, to=SNAT_1, source=None)
    assert anyone.matches(egress_flow(POD_B, to=SNAT_1, mark=MARK_3))
    assert not anyone.matches(egress_flow(SNAT_1, to=SNAT_1, mark=MARK_3, status=0))


def dumped(source: IPv4Address, to: ExternalEndpoint, reply: Target) -> _Flow:
    """A dumped entry from `source` to `to` that the kernel answered from `reply`."""
    return _Flow(
        protocol=to.protocol,
        source=source,
        source_port=40000,
        destination=to.address,
        destination_port=to.port,
        reply_source=reply.address,
        reply_source_port=reply.port,
        reply_destination=source,
        mark=MARK,
        status=0,
        id=1,
        zone=None,
    )


AS_IS = Target(address=E1.address, port=E1.port)  # the reply source of a flow never DNATed
VIRTUAL = FlowFilter(
    external=E1, keep_targets=frozenset({CLUSTER_IP}), keep_sources=nets("192.0.2.2/32"), check_targets=False
)


def test_doom_keeps_a_flow_to_a_pod_behind_a_virtual_target() -> None:
    assert _doom(dumped(CLIENT_1, E1, BACKEND_A), VIRTUAL) is None
    assert _doom(dumped(CLIENT_1, E1, CLUSTER_IP), VIRTUAL) is None  # no second NAT layer
    # Judged by target, the same flow would go: what restarts did to every service-mode flow.
    by_target = FlowFilter(external=E1, keep_targets=frozenset({CLUSTER_IP}), keep_sources=None)
    assert _doom(dumped(CLIENT_1, E1, BACKEND_A), by_target) == ("target", BACKEND_A)


def test_doom_deletes_flows_to_a_virtual_target_never_dnated_or_from_outside() -> None:
    assert _doom(dumped(CLIENT_1, E1, AS_IS), VIRTUAL) == ("target", AS_IS)
    assert _doom(dumped(CLIENT_2, E1, BACKEND_A), VIRTUAL) == ("source", CLIENT_2)
    assert _doom(dumped(CLIENT_2, E1, AS_IS), VIRTUAL) == ("target", AS_IS)


# -- ConntrackEdge against real flows: root and network namespaces ---------------------------

kernel = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
    reason="needs root, ip and nft",
)


def run(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ns_run(ns: str, *argv: str, stdin: str | None = None) -> str:
    return run("ip", "netns", "exec", ns, *argv, stdin=stdin)


def delete_namespace(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
    for pid in map(int, pids.split()):
        if pid != os.getpid():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def lab_namespaces() -> Iterator[Callable[[str], str]]:
    """Makes `sn-<id>-<role>` namespaces with lo up; deletes every one of them at teardown."""
    made: list[str] = []
    run_id = secrets.token_hex(3)

    def make(role: str) -> str:
        name = f"sn-{run_id}-{role}"
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            delete_namespace(name)


@dataclass(frozen=True)
class Lab:
    client: str
    router: str
    backend: str


@pytest.fixture
def lab(lab_namespaces: Callable[[str], str]) -> Lab:
    client, router, backend = lab_namespaces("c"), lab_namespaces("r"), lab_namespaces("b")
    # veths are created inside the namespaces: the host never sees them.
    run("ip", "-n", client, "link", "add", "c0", "type", "veth", "peer", "name", "r0", "netns", router)
    run("ip", "-n", router, "link", "add", "r1", "type", "veth", "peer", "name", "b0", "netns", backend)
    for ns, dev, addresses in (
        (client, "c0", (f"{CLIENT_1}/24", f"{CLIENT_2}/24")),
        (router, "r0", (f"{ROUTER_LOCAL}/24",)),
        (router, "r1", ("198.51.100.1/24",)),
        (backend, "b0", (f"{BACKEND_A.address}/24", f"{BACKEND_B.address}/24")),
    ):
        for address in addresses:
            run("ip", "-n", ns, "addr", "add", address, "dev", dev)
        run("ip", "-n", ns, "link", "set", dev, "up")
    run("ip", "-n", client, "route", "add", "203.0.113.0/24", "via", str(ROUTER_LOCAL))
    run("ip", "-n", backend, "route", "add", "default", "via", "198.51.100.1")
    ns_run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    set_rules(router, [])  # loads conntrack and nat in the router namespace
    # Long UDP timeouts so that no flow expires while a slow test runs.
    ns_run(router, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
    ns_run(router, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout_stream=600")
    return Lab(client=client, router=router, backend=backend)


@dataclass(frozen=True)
class Rule:
    external: ExternalEndpoint
    target: Target
    marked: bool = True
    allowed: IPv4Network | None = None  # None: anyone may open new connections
    source: IPv4Address | None = None  # DNAT only connections from this client


def set_rules(router: str, rules: list[Rule]) -> None:
    """Replace the router's table in one transaction, as smartnatd's full pass does."""
    guard = [f"ip daddr {ROUTER_LOCAL} udp dport {LOCAL_PORT} ct state new ct mark set {MARK:#010x}"]
    nat = []
    for r in rules:
        e, t = r.external, r.target
        if r.allowed is not None:
            guard.append(
                f"ct state new ip daddr {e.address} udp dport {e.port} ip saddr != {r.allowed}"
                ' counter name "dropped" drop'
            )
        source = f"ip saddr {r.source} " if r.source is not None else ""
        mark = f"ct mark set {MARK:#010x} " if r.marked else ""
        nat.append(f"{source}ip daddr {e.address} udp dport {e.port} {mark}dnat to {t.address}:{t.port}")
    text = "\n".join(
        [
            "table ip t",
            "delete table ip t",
            "table ip t {",
            "  counter dropped { }",
            # Before the nat chain (-100) and after conntrack (-200), so `ct state` is known.
            "  chain guard { type filter hook prerouting priority -150; policy accept;",
            *(f"    {line}" for line in guard),
            "  }",
            "  chain pre { type nat hook prerouting priority dstnat; policy accept;",
            *(f"    {line}" for line in nat),
            "  }",
            "}",
            "",
        ]
    )
    ns_run(router, "nft", "-f", "-", stdin=text)


def dropped_packets(router: str) -> int:
    out = ns_run(router, "nft", "list", "counter", "ip", "t", "dropped")
    match = re.search(r"packets (\d+)", out)
    assert match, out
    return int(match.group(1))


def socket_in(ns: str, kind: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
    """A socket of network namespace `ns`: a socket keeps the namespace it was created in."""
    netns.pushns(ns)
    try:
        return socket.socket(socket.AF_INET, kind, proto)
    finally:
        netns.popns()


class EchoServer:
    """UDP echo in a thread, answering `<name>|<datagram>`; bound to one address (KERNEL-NOTES)."""

    def __init__(self, *, ns: str, target: Target, name: str) -> None:
        self.name = name
        self._sock = socket_in(ns)
        self._sock.bind((str(target.address), target.port))
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"echo-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        data, peer = self._sock.recvfrom(2048)
                        self._sock.sendto(self.name.encode() + b"|" + data, peer)
                    except BlockingIOError:
                        pass

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()


@pytest.fixture
def backends(lab: Lab) -> Iterator[None]:
    servers = [
        EchoServer(ns=lab.backend, target=BACKEND_A, name="A"),
        EchoServer(ns=lab.backend, target=BACKEND_B, name="B"),
    ]
    try:
        yield
    finally:
        for server in servers:
            server.stop()


class Client:
    """A UDP socket in the client namespace with a fixed source address and port: one flow per
    destination, for as long as conntrack keeps its entry."""

    def __init__(self, *, ns: str, source: IPv4Address, port: int) -> None:
        self.sock = socket_in(ns)
        self.sock.bind((str(source), port))
        self.sock.setblocking(False)
        self.source, self.port = source, port

    async def ask(self, external: ExternalEndpoint, *, timeout: float = 3.0) -> str:
        """Send one datagram and return the name of the backend that answered."""
        loop = asyncio.get_running_loop()
        payload = secrets.token_hex(4).encode()
        await loop.sock_sendto(self.sock, payload, (str(external.address), external.port))
        async with asyncio.timeout(timeout):
            while True:
                data, _ = await loop.sock_recvfrom(self.sock, 2048)
                name, _, echoed = data.partition(b"|")
                if echoed == payload:  # ignore late answers to earlier questions
                    return name.decode()

    async def send(self, external: ExternalEndpoint) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, b"no answer expected", (str(external.address), external.port))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client_factory(lab: Lab) -> Iterator[Callable[[IPv4Address, int], Client]]:
    made: list[Client] = []

    def make(source: IPv4Address, port: int) -> Client:
        made.append(Client(ns=lab.client, source=source, port=port))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
async def edge(lab: Lab) -> AsyncIterator[ConntrackEdge]:
    async with ConntrackEdge(netns=lab.router) as e:
        yield e


@pytest.fixture
async def table(lab: Lab) -> AsyncIterator[AsyncConntrack]:
    """An independent view of the router's conntrack table, to check what the edge did."""
    async with AsyncConntrack(netns=lab.router, flags=0) as ct:
        yield ct


async def flows(ct: AsyncConntrack, *, to: ExternalEndpoint | None = None) -> list[ConntrackEntry]:
    found = []
    tuple_orig = None if to is None else NFCTAttrTuple(daddr=str(to.address), proto=socket.IPPROTO_UDP, dport=to.port)
    async for entry in await ct.dump_entries(tuple_orig=tuple_orig):
        found.append(entry)
    return found


async def flow_of(ct: AsyncConntrack, client: Client, to: ExternalEndpoint) -> ConntrackEntry | None:
    matching = [
        e
        for e in await flows(ct, to=to)
        if e.tuple_orig.saddr == str(client.source) and e.tuple_orig.sport == client.port
    ]
    assert len(matching) <= 1, matching
    return matching[0] if matching else None


async def wait_until(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    """Poll an async or plain predicate until it is truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")
        await asyncio.sleep(0.02)


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
async def test_deleting_flows_to_a_lost_target_moves_a_long_lived_udp_flow(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
) -> None:
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_A)])
    long_lived = client_factory(CLIENT_1, 41000)
    other = client_factory(CLIENT_1, 41001)
    assert await long_lived.ask(E1) == "A"
    assert await other.ask(E2) == "A"
    other_flow = await flow_of(table, other, E2)
    assert other_flow is not None

    # The Mapping now points at B. The open flow keeps going to A: that is the problem.
    set_rules(lab.router, [Rule(E1, BACKEND_B), Rule(E2, BACKEND_A)])
    assert await long_lived.ask(E1) == "A"
    newcomer = client_factory(CLIENT_1, 41002)
    assert await newcomer.ask(E1) == "B"

    deleted = await edge.delete([FlowFilter(external=E1, keep_targets=frozenset({BACKEND_B}), keep_sources=None)])

    assert deleted == 1  # only the flow still going to A; the newcomer's goes to B already
    assert await long_lived.ask(E1) == "B"
    assert await newcomer.ask(E1) == "B"
    untouched = await flow_of(table, other, E2)
    assert untouched is not None and untouched.id == other_flow.id
    assert await other.ask(E2) == "A"


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
@pytest.mark.parametrize("kernel_side", [True, False], ids=["kernel-side", "dump"])
async def test_a_diff_of_lost_targets_deletes_them_with_or_without_a_dump(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
    kernel_side: bool,
) -> None:
    # A filter from a diff knows the lost targets: a kernel that deletes by filter needs no dump
    # (which walks the whole table). Without that support the dump gives the same result.
    if kernel_side and not edge.filtered_delete:
        pytest.skip("this kernel has no filtered conntrack delete (< 6.11)")
    edge.filtered_delete = kernel_side
    dumps = 0
    real_dump = edge._dump

    def counting_dump(**filters: object) -> AsyncIterator[_Flow]:
        nonlocal dumps
        dumps += 1
        return real_dump(**filters)

    edge._dump = counting_dump  # type: ignore[method-assign]
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_A)])
    lost = client_factory(CLIENT_1, 41050)
    other = client_factory(CLIENT_1, 41051)
    assert await lost.ask(E1) == "A"
    assert await other.ask(E2) == "A"
    set_rules(lab.router, [Rule(E1, BACKEND_B), Rule(E2, BACKEND_A)])
    kept = client_factory(CLIENT_2, 41050)
    assert await kept.ask(E1) == "B"
    kept_flow = await flow_of(table, kept, E1)
    assert kept_flow is not None

    filters = stale_flow_filters(
        old=state(dnat(E1, BACKEND_A), dnat(E2, BACKEND_A)), new=state(dnat(E1, BACKEND_B), dnat(E2, BACKEND_A))
    )
    assert [f.needs_dump for f in filters] == [False]
    assert await edge.delete(filters) == 1

    assert dumps == (0 if kernel_side else 1)
    assert await flow_of(table, lost, E1) is None
    assert await lost.ask(E1) == "B"
    still = await flow_of(table, kept, E1)
    assert still is not None and still.id == kept_flow.id
    assert await flow_of(table, other, E2) is not None


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
async def test_keep_sources_deletes_only_flows_from_sources_outside(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
) -> None:
    set_rules(lab.router, [Rule(E1, BACKEND_A)])
    inside = client_factory(CLIENT_1, 41100)
    outside = client_factory(CLIENT_2, 41100)
    assert await inside.ask(E1) == "A"
    assert await outside.ask(E1) == "A"

    allowed = IPv4Network(f"{CLIENT_1}/32")
    set_rules(lab.router, [Rule(E1, BACKEND_A, allowed=allowed)])
    assert await outside.ask(E1) == "A"  # the rule drops new connections only
    dropped_before = dropped_packets(lab.router)

    deleted = await edge.delete(
        [FlowFilter(external=E1, keep_targets=frozenset({BACKEND_A}), keep_sources=(allowed,))]
    )

    assert deleted == 1
    assert await flow_of(table, outside, E1) is None
    assert await flow_of(table, inside, E1) is not None
    assert await inside.ask(E1) == "A"
    # The outside source's next datagram is a new connection now, and the guard drops it.
    await outside.send(E1)
    await wait_until(
        lambda: dropped_packets(lab.router) > dropped_before, timeout=5, what="the guard to drop a datagram"
    )
    assert await flow_of(table, outside, E1) is None


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
async def test_removed_endpoint_loses_every_flow_and_others_keep_theirs(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
) -> None:
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_B)])
    one, two = client_factory(CLIENT_1, 41200), client_factory(CLIENT_2, 41200)
    for c in (one, two):
        assert await c.ask(E1) == "A"
        assert await c.ask(E2) == "B"
    set_rules(lab.router, [Rule(E1, BACKEND_A)])

    assert await edge.delete([FlowFilter(external=E2, keep_targets=None, keep_sources=None)]) == 2
    assert await flows(table, to=E2) == []
    assert len(await flows(table, to=E1)) == 2
    # Deleting again finds nothing: flows already gone are not an error.
    assert await edge.delete([FlowFilter(external=E2, keep_targets=None, keep_sources=None)]) == 0


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
async def test_many_filters_select_from_one_full_dump_with_the_same_result(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
) -> None:
    # The first pass after start has a filter per endpoint: past a few dozen, one dump serves all.
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_A)])
    c = client_factory(CLIENT_1, 41250)
    assert await c.ask(E1) == "A"
    assert await c.ask(E2) == "A"
    set_rules(lab.router, [Rule(E1, BACKEND_B), Rule(E2, BACKEND_A)])
    idle = [udp("203.0.113.50", port) for port in range(9000, 9040)]
    filters = [FlowFilter(external=e, keep_targets=frozenset({BACKEND_A}), keep_sources=None) for e in idle]
    filters += [
        FlowFilter(external=E1, keep_targets=frozenset({BACKEND_B}), keep_sources=None),
        FlowFilter(external=E2, keep_targets=frozenset({BACKEND_A}), keep_sources=nets("192.0.2.0/24")),
    ]

    assert await edge.delete(filters) == 1

    assert await flow_of(table, c, E1) is None
    assert await flow_of(table, c, E2) is not None
    assert await c.ask(E1) == "B"


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
async def test_deleting_a_flow_already_gone_is_not_an_error(
    lab: Lab,
    edge: ConntrackEdge,
    client_factory: Callable[[IPv4Address, int], Client],
) -> None:
    set_rules(lab.router, [Rule(E1, BACKEND_A)])
    assert await client_factory(CLIENT_1, 41300).ask(E1) == "A"
    # The race between the dump and the delete, made deterministic: delete the same flow twice.
    (flow,) = (await edge._flows_to([E1]))[E1]
    assert await edge._delete_one(flow) is True
    assert await edge._delete_one(flow) is False


def choose_delete_path(edge: ConntrackEdge, *, filtered: bool) -> None:
    """Make the edge use the kernel-side filtered delete, or force the flow-by-flow fallback."""
    if not filtered:
        edge.filtered_delete = False
    elif not edge.filtered_delete:
        pytest.skip("this kernel refuses a filtered conntrack delete (needs >= 6.11)")


PATHS = pytest.mark.parametrize("filtered", [True, False], ids=["kernel-filtered", "flow-by-flow"])


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
@PATHS
async def test_sweep_deletes_marked_flows_of_unknown_endpoints_only(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
    filtered: bool,
) -> None:
    # E3's Mapping was deleted while the daemon was down: its rule and flows are left over.
    # Not ours, so kept: E3 flows from CLIENT_2 (DNATed unmarked by someone else), E4 (same),
    # 192.0.2.1:6000 (marked, not DNATed, like pod egress) and a marked E3 entry never DNATed.
    choose_delete_path(edge, filtered=filtered)
    set_rules(
        lab.router,
        [
            Rule(E1, BACKEND_A),
            Rule(E3, BACKEND_A, marked=False, source=CLIENT_2),
            Rule(E3, BACKEND_A),
            Rule(E4, BACKEND_B, marked=False),
        ],
    )
    c1, c2 = client_factory(CLIENT_1, 41400), client_factory(CLIENT_2, 41400)
    assert await c1.ask(E1) == "A"
    assert await c1.ask(E3) == "A"
    assert await c1.ask(E4) == "B"
    assert await c2.ask(E3) == "A"
    local = ExternalEndpoint(address=ROUTER_LOCAL, protocol=Protocol.UDP, port=LOCAL_PORT)
    await c1.send(local)
    await add_flow(table, external=E3, source=CLIENT_1, port=33000, target=BACKEND_A)
    blast(lab.client, E3, count=20, first_port=34000)  # enough for one kernel-side delete
    await wait_until(lambda: flow_of(table, c1, local), timeout=5, what="the marked local flow")
    await wait_until(lambda: _count(flows(table, to=E3), 23), timeout=5, what=f"23 flows to {E3}")
    assert (await flow_of(table, c1, E3)).mark == MARK  # type: ignore[union-attr]
    assert not (await flow_of(table, c2, E3)).mark  # type: ignore[union-attr]

    deleted = await edge.sweep(mark_mask=MARK_MASK, known={E1, E2})

    assert deleted == 21
    assert await flow_of(table, c1, E3) is None
    left = sorted((e.tuple_orig.saddr, e.tuple_orig.sport) for e in await flows(table, to=E3))
    assert left == [(str(CLIENT_1), 33000), (str(CLIENT_2), 41400)]
    for kept in (E1, E4, local):
        assert await flow_of(table, c1, kept) is not None, kept
    assert await edge.sweep(mark_mask=MARK_MASK, known={E1, E2}) == 0


async def add_flow(
    ct: AsyncConntrack, *, external: ExternalEndpoint, source: IPv4Address, port: int, target: Target
) -> None:
    """Insert a conntrack entry as a DNAT to `target` would leave it; no socket needed, so any
    protocol the kernel tracks works (this kernel has no SCTP sockets, see KERNEL-NOTES)."""
    proto = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: socket.IPPROTO_SCTP}
    number = proto[external.protocol]
    await ct.entry(
        "add",
        timeout=600,
        mark=MARK,
        tuple_orig=NFCTAttrTuple(
            saddr=str(source), daddr=str(external.address), proto=number, sport=port, dport=external.port
        ),
        tuple_reply=NFCTAttrTuple(
            saddr=str(target.address), daddr=str(source), proto=number, sport=target.port, dport=port
        ),
    )


@kernel
@pytest.mark.kernel
@pytest.mark.parametrize("protocol", [Protocol.TCP, Protocol.SCTP])
@PATHS
async def test_tcp_and_sctp_flows_to_a_lost_target_are_deleted_like_udp(
    lab: Lab, edge: ConntrackEdge, table: AsyncConntrack, protocol: Protocol, filtered: bool
) -> None:
    choose_delete_path(edge, filtered=filtered)
    external = ExternalEndpoint(address=E1.address, protocol=protocol, port=443)
    same_port_udp = ExternalEndpoint(address=E1.address, protocol=Protocol.UDP, port=443)
    # 20 flows to A: enough for one kernel-side delete; 3 to B stay; 2 UDP flows to A stay.
    for port in range(30000, 30020):
        await add_flow(table, external=external, source=CLIENT_1, port=port, target=BACKEND_A)
    for port in range(31000, 31003):
        await add_flow(table, external=external, source=CLIENT_1, port=port, target=BACKEND_B)
    for port in range(32000, 32002):
        await add_flow(table, external=same_port_udp, source=CLIENT_1, port=port, target=BACKEND_A)

    parsed = {f.source_port: f for f in (await edge._flows_to([external]))[external]}
    assert len(parsed) == 23
    assert parsed[30000].reply_target == BACKEND_A and parsed[31000].reply_target == BACKEND_B
    assert all(f.protocol == protocol and f.mark == MARK for f in parsed.values())

    deleted = await edge.delete([FlowFilter(external=external, keep_targets=frozenset({BACKEND_B}), keep_sources=None)])

    assert deleted == 20
    left = (await edge._flows_to([external, same_port_udp]))
    assert sorted(f.source_port for f in left[external]) == [31000, 31001, 31002]
    assert len(left[same_port_udp]) == 2


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
@PATHS
async def test_flows_to_a_virtual_target_survive_a_restart_and_go_by_source_only(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
    filtered: bool,
) -> None:
    # mode: service on an appliance: smartnatd DNATs to the ClusterIP, then IPVS on the box
    # picks a pod, so conntrack's reply source is the pod. The router here DNATs E1 straight to
    # A, which leaves the same entry: a reply source other than the target smartnatd keeps.
    choose_delete_path(edge, filtered=filtered)
    set_rules(lab.router, [Rule(E1, BACKEND_A)])
    inside, outside = client_factory(CLIENT_1, 41700), client_factory(CLIENT_2, 41700)
    assert await inside.ask(E1) == "A"
    assert await outside.ask(E1) == "A"
    # Datagrams that reached the box before the Mapping existed and were never DNATed: 20 of
    # them, enough for one kernel-side delete selecting by reply source.
    for port in range(33000, 33020):
        await add_flow(table, external=E1, source=CLIENT_1, port=port, target=Target(E1.address, E1.port))
    live = {}
    for c in (inside, outside):
        entry = await flow_of(table, c, E1)
        assert entry is not None and entry.tuple_reply.saddr == str(BACKEND_A.address)
        live[c] = entry.id

    # The first pass after a daemon restart keeps every DNATed flow from an allowed source.
    served = state(dnat(E1, CLUSTER_IP, virtual=True))
    (flt,) = stale_flow_filters(old=None, new=served)
    assert flt.keep_targets == frozenset({CLUSTER_IP}) and not flt.check_targets

    assert await edge.delete([flt]) == 20

    assert len(await flows(table, to=E1)) == 2
    for c, flow_id in live.items():
        kept = await flow_of(table, c, E1)
        assert kept is not None and kept.id == flow_id
        assert await c.ask(E1) == "A"

    # allowedSources narrowed to CLIENT_1: the other source's flow goes, whatever its target.
    allowed = IPv4Network(f"{CLIENT_1}/32")
    set_rules(lab.router, [Rule(E1, BACKEND_A, allowed=allowed)])
    narrowed = state(dnat(E1, CLUSTER_IP, sources=(allowed,), virtual=True))

    assert await edge.delete(stale_flow_filters(old=served, new=narrowed)) == 1

    assert await flow_of(table, outside, E1) is None
    kept = await flow_of(table, inside, E1)
    assert kept is not None and kept.id == live[inside]
    assert await inside.ask(E1) == "A"


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
async def test_dump_parser_reads_what_pyroute2_decodes(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
) -> None:
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_B, marked=False)])
    for port in (41600, 41601):
        c = client_factory(CLIENT_2, port)
        assert await c.ask(E1) == "A"
        assert await c.ask(E2) == "B"
    ours = sorted(
        (str(f.source), f.source_port, str(f.destination), f.destination_port, str(f.reply_source),
         f.reply_source_port, f.mark, f.id)
        for f in [flow async for flow in edge._dump()]
    )
    theirs = sorted(
        (e.tuple_orig.saddr, e.tuple_orig.sport, e.tuple_orig.daddr, e.tuple_orig.dport, e.tuple_reply.saddr,
         e.tuple_reply.sport, e.mark or 0, e.id)
        for e in await flows(table)
        if e.tuple_orig.proto == socket.IPPROTO_UDP
    )
    assert ours == theirs and len(ours) == 4


def blast(ns: str, external: ExternalEndpoint, *, count: int, first_port: int) -> None:
    """One datagram from each of `count` source ports, through one raw socket: many flows, cheaply."""
    raw = socket_in(ns, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        for port in range(first_port, first_port + count):
            # UDP header: the kernel adds the IP header; checksum 0 means none (IPv4).
            raw.sendto(struct.pack("!HHHH", port, external.port, 9, 0) + b"x", (str(external.address), 0))
    finally:
        raw.close()


@kernel
@pytest.mark.kernel
@pytest.mark.usefixtures("backends")
@PATHS
async def test_many_flows_to_a_lost_target_are_deleted(
    lab: Lab,
    edge: ConntrackEdge,
    table: AsyncConntrack,
    client_factory: Callable[[IPv4Address, int], Client],
    filtered: bool,
) -> None:
    count = 2000
    choose_delete_path(edge, filtered=filtered)
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_A)])
    bystander = client_factory(CLIENT_1, 41500)
    assert await bystander.ask(E1) == "A"
    blast(lab.client, E2, count=count, first_port=20000)
    await wait_until(lambda: _count(flows(table, to=E2), count), timeout=10, what=f"{count} flows to {E2}")
    set_rules(lab.router, [Rule(E1, BACKEND_A), Rule(E2, BACKEND_B)])

    started = time.perf_counter()
    deleted = await edge.delete([FlowFilter(external=E2, keep_targets=frozenset({BACKEND_B}), keep_sources=None)])
    took = time.perf_counter() - started

    # A figure to read, not a limit: timing assertions belong in bench/.
    print(f"\nconntrack delete of {count} flows ({'kernel filter' if filtered else 'flow by flow'}): {took:.3f}s")
    assert deleted == count
    assert await flows(table, to=E2) == []
    assert await flow_of(table, bystander, E1) is not None


async def _count(listing: object, want: int) -> bool:
    return len(await listing) >= want  # type: ignore[misc]


@kernel
@pytest.mark.kernel
async def test_open_fails_for_a_missing_namespace() -> None:
    with pytest.raises(FileNotFoundError):
        async with ConntrackEdge(netns=f"sn-{secrets.token_hex(3)}-none"):
            pass
