"""Two appliances of a pair on one external segment, as keepalived runs them.

docs/operator-guide.md ("Two appliances", an address that moves): each appliance has a fixed
primary address on its external interface, and the shared Mapping address sits on whichever
one keepalived made MASTER. Built from the primitives of tests/kernel/harness.py, in
namespaces only; tests/kernel/conftest.py's single-appliance plan is left as it is.

  client ns "cl"                     appliances "ap1", "ap2"            router ns "rt"
  --------------                     -----------------------            --------------
  br0 (bridge) 192.0.2.1/24          ap1 ext1 192.0.2.2/24              rtbr (bridge) 10.10.0.1/24
      203.0.113.10/32 (client)           (+ 192.0.2.10/24 while MASTER)   r1 <-veth-> ap1 eth0
    c1 <-veth-> ap1 ext1                 eth0 10.10.0.2/24                r2 <-veth-> ap2 eth0
    c2 <-veth-> ap2 ext1             ap2 ext1 192.0.2.3/24                p1 10.244.1.1/24 <-> pod1
                                         eth0 10.10.0.3/24                p2 10.244.2.1/24 <-> pod2

  cl:   one L2 segment (br0) to both ext1s, so a gratuitous ARP moves 192.0.2.10 between them.
        rp_filter=1 (strict), as in the single-appliance plan.
  ap*:  default via 10.10.0.1 dev eth0; ip_forward=1; rp_filter=0. ext1's gateway is
        192.0.2.1 (the primary's network + 1).
  rt:   default via 10.10.0.2 (ap1). Replies reach whichever appliance DNATed a connection
        all the same: smartnatd masquerades it to that appliance's eth0 address.
  pods: 10.244.x.2/24, default via 10.244.x.1.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from dataclasses import dataclass

from tests.kernel.harness import NetnsFactory, in_netns, ip_batch, run, sysctls

_A = ipaddress.IPv4Address


@dataclass(frozen=True, kw_only=True)
class Pair:
    """Namespace names and the IP plan above (defaults are the plan)."""

    client: str
    appliances: tuple[str, str]  # ap1, ap2
    router: str
    pods: tuple[str, str]

    client_bridge: str = "br0"
    client_ports: tuple[str, str] = ("c1", "c2")
    ext_iface: str = "ext1"
    cluster_iface: str = "eth0"
    router_bridge: str = "rtbr"
    router_ports: tuple[str, str] = ("r1", "r2")
    router_pod_ifaces: tuple[str, str] = ("p1", "p2")
    pod_iface: str = "eth0"

    ext_network: ipaddress.IPv4Network = ipaddress.IPv4Network("192.0.2.0/24")
    gateway: ipaddress.IPv4Address = _A("192.0.2.1")
    client_address: ipaddress.IPv4Address = _A("203.0.113.10")
    primaries: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] = (_A("192.0.2.2"), _A("192.0.2.3"))
    shared_address: ipaddress.IPv4Address = _A("192.0.2.10")  # keepalived's virtual address
    router_address: ipaddress.IPv4Address = _A("10.10.0.1")
    cluster_addresses: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] = (_A("10.10.0.2"), _A("10.10.0.3"))
    cluster_prefixlen: int = 24
    pod_gateways: tuple[ipaddress.IPv4Address, ...] = (_A("10.244.1.1"), _A("10.244.2.1"))
    pod_addresses: tuple[ipaddress.IPv4Address, ...] = (_A("10.244.1.2"), _A("10.244.2.2"))
    pod_prefixlen: int = 24

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client, *self.appliances, self.router, *self.pods)

    def cluster_address(self, appliance: str) -> ipaddress.IPv4Address:
        return self.cluster_addresses[self.appliances.index(appliance)]


def build_pair(factory: NetnsFactory) -> Pair:
    """Create cl, ap1, ap2, rt, pod1, pod2 and wire them as the plan says; 192.0.2.10 on ap1."""
    p = Pair(
        client=factory.create("cl"),
        appliances=(factory.create("ap1"), factory.create("ap2")),
        router=factory.create("rt"),
        pods=(factory.create("pod1"), factory.create("pod2")),
    )
    ext = p.ext_network.prefixlen
    ip_batch(p.client, [
        f"link add {p.client_bridge} type bridge",
        # Veths straight into the other namespace: the host never sees them.
        *(f"link add {port} type veth peer name {p.ext_iface} netns {ap}"
          for port, ap in zip(p.client_ports, p.appliances)),
        *(f"link set {port} master {p.client_bridge}" for port in p.client_ports),
        f"addr add {p.gateway}/{ext} dev {p.client_bridge}",
        f"addr add {p.client_address}/32 dev {p.client_bridge}",
        *(f"link set {port} up" for port in p.client_ports),
        f"link set {p.client_bridge} up",
    ])
    ip_batch(p.router, [
        f"link add {p.router_bridge} type bridge",
        *(f"link add {port} type veth peer name {p.cluster_iface} netns {ap}"
          for port, ap in zip(p.router_ports, p.appliances)),
        *(f"link set {port} master {p.router_bridge}" for port in p.router_ports),
        *(f"link add {iface} type veth peer name {p.pod_iface} netns {pod}"
          for iface, pod in zip(p.router_pod_ifaces, p.pods)),
        f"addr add {p.router_address}/{p.cluster_prefixlen} dev {p.router_bridge}",
        *(f"addr add {gw}/{p.pod_prefixlen} dev {iface}" for gw, iface in zip(p.pod_gateways, p.router_pod_ifaces)),
        *(f"link set {iface} up" for iface in (*p.router_ports, p.router_bridge, *p.router_pod_ifaces)),
        f"route add default via {p.cluster_addresses[0]} dev {p.router_bridge}",
    ])
    for ap, primary, cluster in zip(p.appliances, p.primaries, p.cluster_addresses):
        ip_batch(ap, [
            f"addr add {primary}/{ext} dev {p.ext_iface}",  # the fixed primary, never moved
            f"addr add {cluster}/{p.cluster_prefixlen} dev {p.cluster_iface}",
            f"link set {p.ext_iface} up",
            f"link set {p.cluster_iface} up",
            f"route add default via {p.router_address} dev {p.cluster_iface}",
        ])
        sysctls(ap, {
            "net.ipv4.ip_forward": 1,
            **{f"net.ipv4.conf.{i}.rp_filter": 0 for i in ("all", "default", "lo", p.ext_iface, p.cluster_iface)},
        })
    for pod, address, gateway in zip(p.pods, p.pod_addresses, p.pod_gateways):
        ip_batch(pod, [
            f"addr add {address}/{p.pod_prefixlen} dev {p.pod_iface}",
            f"link set {p.pod_iface} up",
            f"route add default via {gateway} dev {p.pod_iface}",
        ])
    sysctls(p.client, {f"net.ipv4.conf.{i}.rp_filter": 1 for i in ("all", "default", p.client_bridge)})
    sysctls(p.router, {
        "net.ipv4.ip_forward": 1,
        **{f"net.ipv4.conf.{i}.rp_filter": 0
           for i in ("all", "default", "lo", p.router_bridge, *p.router_ports, *p.router_pod_ifaces)},
    })
    ip_batch(p.appliances[0], [f"addr add {p.shared_address}/{ext} dev {p.ext_iface}"])
    return p


def send_gratuitous_arp(ns: str, iface: str, address: ipaddress.IPv4Address) -> str:
    """Broadcast one gratuitous ARP request for address from iface in ns, as keepalived does
    on becoming MASTER (arping is not installed); returns iface's MAC address."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    with sock:
        sock.bind((iface, 0))
        mac: bytes = sock.getsockname()[4]
        ip = address.packed
        # Ethernet broadcast; ARP request with sender = target = address: every neighbour
        # holding an entry for it takes the new MAC (arp_accept is only about new entries).
        frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + struct.pack(
            "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
        sock.send(frame)
    return mac.hex(":")


def move_shared_address(pair: Pair, *, to: str) -> str:
    """keepalived's failover: the shared address leaves the other appliance's ext1, appears on
    `to`'s and `to` announces it. Returns `to`'s ext1 MAC."""
    other = pair.appliances[1 - pair.appliances.index(to)]
    address = f"{pair.shared_address}/{pair.ext_network.prefixlen}"
    ip_batch(other, [f"addr del {address} dev {pair.ext_iface}"])
    ip_batch(to, [f"addr add {address} dev {pair.ext_iface}"])
    return send_gratuitous_arp(to, pair.ext_iface, pair.shared_address)


def client_neighbour(pair: Pair, address: ipaddress.IPv4Address) -> str | None:
    """The MAC the client's neighbour table holds for address, or None."""
    entries = json.loads(run(["ip", "-n", pair.client, "-j", "neigh", "show", str(address)]).stdout or "[]")
    return next((e.get("lladdr") for e in entries if e.get("lladdr")), None)
