"""A Mapping never hands outside clients to the appliance itself, whatever its EndpointSlice says.

Anyone who may create a selector-less Service and a hand-written EndpointSlice can list an
address of the appliance as an endpoint. The story: a server listens on the appliance's
cluster-side address (10.10.0.2, on eth0, which is not an external interface) on the pod port,
and the box has a route back to the clients, so a connection DNATed to it would be answered.
The Mapping is planned from what discovery sees in the appliance namespace, as the daemon
plans it, and applied with the real data plane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from pyroute2 import AsyncIPRoute

from smartnatd.dataplane import Dataplane
from smartnatd.desired import Target
from smartnatd.host import discover
from smartnatd.model import Snapshot
from smartnatd.planner import Plan, VerdictKind, plan
from smartnatd.settings import Settings
from tests.builders import endpoint_slice, mapping, service
from tests.kernel.harness import (
    EchoServer,
    EchoServers,
    Topology,
    echo_server,
    expect_no_reply,
    parse_echo_reply,
    sh,
    tcp_request,
)

SETTINGS = Settings(interfaces_pattern=r"^ext[0-9]+$", default_gw_interface="eth0", instance_name="test")
POD1 = "10.244.1.2"
PORT = 8080  # the pods' echo port, and the port of the appliance's own listener


async def apply(topology: Topology, dp: Dataplane, *endpoints: str) -> Plan:
    """A direct-mode Mapping of 192.0.2.10:80 whose EndpointSlice lists `endpoints`."""
    async with AsyncIPRoute(netns=topology.appliance, flags=0) as ipr:
        host = await discover(ipr, pattern=SETTINGS.interfaces_regex, default_gw_interface="eth0")
    assert topology.appliance_cluster_address in host.local_addresses
    snapshot = Snapshot(
        mappings=(mapping("web", mode="direct"),),
        services=(service(),),
        endpoint_slices=(endpoint_slice(ready=endpoints, ports=(("http", "tcp", PORT),)),),
        host=host,
    )
    p = plan(snapshot, SETTINGS)
    await dp.apply(p.desired, full=True)
    return p


def answers(topology: Topology, connections: int) -> list[str]:
    """Who answered each of `connections` new connections to 192.0.2.10:80."""
    return [
        parse_echo_reply(tcp_request(topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client)).name
        for _ in range(connections)
    ]


@pytest.fixture
def box_listener(topology: Topology) -> Iterator[EchoServer]:
    """A server of the appliance itself on its cluster-side address, and a main-table route
    back to the clients: a connection DNATed to the box would reach it and be answered."""
    sh(topology.appliance, "ip", "route", "add", "203.0.113.0/24", "via", str(topology.ext1_gateway))
    with echo_server(topology.appliance, "tcp", topology.appliance_cluster_address, PORT, name="box") as box:
        yield box


async def test_an_endpoint_that_is_the_appliance_is_skipped_and_the_pod_serves(
    topology: Topology, echo_servers: EchoServers, dataplane: Dataplane, box_listener: EchoServer
):
    p = await apply(topology, dataplane, str(topology.appliance_cluster_address), POD1)
    (v,) = p.verdicts
    assert v.kind == VerdictKind.CONFIGURED
    assert v.reason == "serving 192.0.2.10:80/tcp; endpoint 10.10.0.2 (an address of this appliance) refused"

    # With both as targets, 30 connections would all miss the box with P = 2^-30.
    assert set(await asyncio.to_thread(answers, topology, 30)) == {"pod1"}
    assert box_listener.peers == ()
    assert len(echo_servers["pod1", "tcp"].peers) == 30


async def test_a_mapping_whose_only_endpoint_is_the_appliance_is_not_served_here(
    topology: Topology, echo_servers: EchoServers, dataplane: Dataplane, box_listener: EchoServer
):
    p = await apply(topology, dataplane, str(topology.appliance_cluster_address))
    (v,) = p.verdicts
    assert (v.kind, v.event_reason) == (VerdictKind.NOT_LOCAL, "TargetRefused")
    assert v.reason == (
        "Service default/web: endpoint 10.10.0.2 (an address of this appliance) refused; "
        "no other endpoint is ready for port 80/TCP; not served by this appliance"
    )
    assert p.desired.dnats == ()

    assert await asyncio.to_thread(
        expect_no_reply, tcp_request, topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client, timeout=0.5
    )
    assert box_listener.peers == ()


async def test_cluster_ips_kube_proxy_binds_on_the_box_are_no_own_addresses(topology: Topology):
    """kube-proxy in IPVS mode (what `mode: service` runs on) binds every ClusterIP to its
    kube-ipvs0 dummy interface on the appliance, DOWN: they are the Services' virtual addresses,
    which IPVS takes at local-in, not the box's own. A `mode: service` Mapping is served."""
    sh(topology.appliance, "ip", "link", "add", "kube-ipvs0", "type", "bridge")  # no dummy driver here
    sh(topology.appliance, "ip", "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0")
    async with AsyncIPRoute(netns=topology.appliance, flags=0) as ipr:
        host = await discover(ipr, pattern=SETTINGS.interfaces_regex, default_gw_interface="eth0")
    assert IPv4Address("10.96.0.10") not in host.local_addresses
    assert topology.appliance_cluster_address in host.local_addresses

    snapshot = Snapshot(mappings=(mapping("web", mode="service"),), services=(service(),), host=host)
    p = plan(snapshot, SETTINGS)
    (v,) = p.verdicts
    assert (v.kind, v.reason) == (VerdictKind.CONFIGURED, "serving 192.0.2.10:80/tcp")
    assert [d.targets for d in p.desired.dnats] == [(Target(IPv4Address("10.96.0.10"), 80),)]
