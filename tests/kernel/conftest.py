"""Namespace fixtures for packet tests: netns_factory -> topology -> echo_servers.

IP plan (every kernel and e2e test uses exactly this; `Topology` in harness.py holds it):

  client ns "cl"              appliance ns "ap"                 router ns "rt" (cluster
  --------------              -----------------                 network and kube-proxy)
  c1 192.0.2.1/24    <-veth-> ext1 192.0.2.10/24
     (ext1's gateway)              192.0.2.11/24 (secondary)
  c2 198.51.100.1/24 <-veth-> ext2 198.51.100.10/24
     (ext2's gateway)         eth0 10.10.0.2/24      <-veth->   rt0 10.10.0.1/24
  inet0 (dummy)                                                 p1  10.244.1.1/24 <-veth-+
    203.0.113.10/32 allowed client                              p2  10.244.2.1/24 <-veth-|-+
    203.0.113.20/32 refused client                                                       | |
                                      pod ns "pod1": eth0 10.244.1.2/24 <----------------+ |
                                      pod ns "pod2": eth0 10.244.2.2/24 <------------------+

  cl:   connected routes only (no default route). rp_filter=1 (strict) on all, default, c1,
        c2: a reply arriving on the wrong link is dropped (TcpExt.IPReversePathFilter), so a
        wrong return path shows up as a timeout.
  ap:   default via 10.10.0.1 dev eth0 in the main table: without policy routing, replies to
        203.0.113.x go to the router and are lost. ip_forward=1; rp_filter=0 on all, default,
        lo, ext1, ext2, eth0. ClusterIPs (10.96.0.0/12) are reached through the default route.
  rt:   default via 10.10.0.2 dev rt0 (pod replies and pod egress go back through the
        appliance). ip_forward=1; rp_filter=0. ClusterIPs: `install_cluster_ip` adds an nft
        DNAT in table `ip kube`, as kube-proxy would.
  inet0 is a dummy interface; on a kernel without the dummy driver (this one) a port-less
        bridge, which holds local addresses just as well.
  pods: default via 10.244.x.1 dev eth0. The echo_servers fixture serves TCP and UDP on
        <pod address>:8080, named "pod1" / "pod2".

Namespace names are `<session prefix><2 hex>-<role>`, e.g. `sn-4f2a91-pod1` (<= 15 chars).
Veths are created from one namespace straight into the other: the host namespace never gets
an interface, address, route or sysctl change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from smartnatd.dataplane import Dataplane
from tests.builders import SETTINGS
from tests.kernel.harness import (
    EchoServers,
    NetnsFactory,
    Topology,
    build_topology,
    start_pod_echo_servers,
)

ECHO_PORT = 8080


@pytest.fixture
def netns_factory(netns_prefix: str) -> Iterator[NetnsFactory]:
    """Creates namespaces for one test; deletes all of them at teardown, even after failure."""
    factory = NetnsFactory(prefix=netns_prefix)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def topology(netns_factory: NetnsFactory) -> Topology:
    """cl <-> ap <-> rt <-> pod1/pod2 as the IP plan above says."""
    return build_topology(netns_factory)


def new_dataplane(topology: Topology, state_dir: Path) -> Dataplane:
    """A Dataplane on the appliance namespace with the default table ids and rule priority."""
    return Dataplane(
        netns=topology.appliance,
        table_base=SETTINGS.route_table_base,
        rule_priority=SETTINGS.rule_priority,
        state_dir=state_dir,
    )


@pytest.fixture
async def dataplane(topology: Topology, tmp_path: Path) -> AsyncIterator[Dataplane]:
    """An open Dataplane on the appliance namespace."""
    async with new_dataplane(topology, tmp_path) as dp:
        yield dp


@pytest.fixture
def echo_servers(topology: Topology) -> Iterator[EchoServers]:
    """TCP and UDP echo on 8080 in both pods; `echo_servers["pod1", "udp"]`."""
    servers = start_pod_echo_servers(topology, port=ECHO_PORT)
    try:
        yield servers
    finally:
        servers.stop()
