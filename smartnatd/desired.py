"""Kernel-neutral desired state: what the box must do, computed by the planner.

The dataplane backends (nft, routing, conntrack) turn this into kernel state; nothing here
knows how.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from smartnatd.model import MappingKey, Protocol

# Bits of the conntrack and packet marks that smartnatd owns. An external interface's mark is
# its ifindex shifted into these bits, so marks survive restarts while the interface exists.
MARK_SHIFT = 16
MARK_MASK = 0x0FFF0000
MAX_MARKED_IFINDEX = MARK_MASK >> MARK_SHIFT
# On the packets of a pod's own connection (egress), beside its interface's mark: policy routing
# lets a specific main-table route win for those, while replies to clients keep strictly to the
# interface they came in on.
EGRESS_MARK = 0x10000000
# On the conntrack entry (never the packet) of a connection to a Mapping's external endpoint that
# came in on a non-external interface: a pod calling a Mapping of the box (hairpin). Such a
# connection is masqueraded, so its target answers through the box, and its replies route by
# the main table, back into the cluster.
HAIRPIN_MARK = 0x20000000


def interface_mark(ifindex: int) -> int:
    return ifindex << MARK_SHIFT


@dataclass(frozen=True, order=True)
class ExternalEndpoint:
    """Where clients connect: an address of the box, a protocol and a port."""

    address: IPv4Address
    protocol: Protocol
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class Target:
    address: IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Dnat:
    """New connections to `external` from `allowed_sources` go to one of `targets`."""

    external: ExternalEndpoint
    targets: tuple[Target, ...]  # sorted, never empty
    allowed_sources: tuple[IPv4Network, ...]  # sorted, collapsed; (0.0.0.0/0,) means anyone
    owner: MappingKey
    interface: str
    # True when `targets` is a Service's virtual IP that another NAT layer (kube-proxy in IPVS
    # mode) translates again: the reply source conntrack shows is then a pod, not a target.
    virtual_target: bool = False
    # Terminating pods that still serve, while others are ready: they get no new connections,
    # but their open ones are left to finish (never in `targets`; sorted).
    draining: tuple[Target, ...] = ()

    @property
    def allows_anyone(self) -> bool:
        return allows_anyone(self.allowed_sources)


def allows_anyone(sources: tuple[IPv4Network, ...]) -> bool:
    """Whether an allow-list lets every client in (it holds 0.0.0.0/0)."""
    return any(n.prefixlen == 0 for n in sources)


@dataclass(frozen=True, order=True)
class ReturnPath:
    """Replies and egress marked for `interface` are routed by its own table via its gateway."""

    interface: str
    ifindex: int
    mark: int
    table: int
    gateway: IPv4Address
    network: IPv4Network
    source: IPv4Address  # the interface's primary address


@dataclass(frozen=True, order=True)
class EgressSnat:
    """New connections from a Mapping's backend leave by `interface` with source `to`."""

    source: IPv4Address
    to: IPv4Address
    interface: str
    mark: int
    owner: MappingKey


@dataclass(frozen=True)
class DesiredState:
    dnats: tuple[Dnat, ...] = ()  # sorted by external endpoint
    return_paths: tuple[ReturnPath, ...] = ()  # sorted by interface
    egress: tuple[EgressSnat, ...] = ()  # sorted by source
    managed_addresses: tuple[IPv4Address, ...] = ()  # every address on an external interface
    external_interfaces: tuple[str, ...] = ()
    masquerade: bool = True
    drop_unmapped: bool = True
    rule_priority: int = 1000
