"""Frozen domain types: what the sources know about the cluster and the box.

Nothing here is an API object: kube/objects.py turns raw objects into these, once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import NamedTuple


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


class Mode(enum.StrEnum):
    SERVICE = "service"  # DNAT to the Service's ClusterIP (kube-proxy in IPVS mode on the box)
    DIRECT = "direct"  # DNAT straight to ready endpoints; no kube-proxy needed


class ObjectKey(NamedTuple):
    """Immutable and ordered like a frozen dataclass, but hashed and compared in C: a pass at
    10k Mappings looks keys up ~170,000 times, and a dataclass's __hash__ runs in Python."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


# A Mapping, a Service and an EndpointSlice are all keyed by namespace/name.
MappingKey = ObjectKey


@dataclass(frozen=True)
class MappingPort:
    port: int
    protocol: Protocol
    service_port: int


@dataclass(frozen=True)
class MappingSpec:
    """A Mapping's spec after validation of its own fields (no cluster or box context)."""

    addresses: tuple[IPv4Address, ...]
    allowed_sources: tuple[IPv4Network, ...]
    service_name: str
    mode: Mode
    ports: tuple[MappingPort, ...]


@dataclass(frozen=True)
class Invalid:
    """A user mistake in an object; `reason` is the sentence shown in status."""

    reason: str


@dataclass(frozen=True)
class Mapping:
    key: MappingKey
    spec: MappingSpec | Invalid
    # RFC 3339 text sorts chronologically; kept as text so the planner needs no clock.
    creation_timestamp: str = ""
    generation: int = 0
    uid: str = ""
    deleting: bool = False
    finalizers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: Protocol
    port: int
    target_port: int | str  # a number, or the name of a container port


@dataclass(frozen=True)
class Service:
    key: ObjectKey
    cluster_ip: IPv4Address | None  # None for headless Services, and those without an IPv4 one
    ports: tuple[ServicePort, ...]
    # Why cluster_ip is None, when not because the Service is headless: "ExternalName", or
    # "IPv6" (a single-stack IPv6 Service).
    no_cluster_ip: str = ""


@dataclass(frozen=True)
class EndpointPort:
    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[IPv4Address, ...]
    ready: bool
    # Terminating but still serving (conditions serving=true, terminating=true): no new
    # connections while another endpoint is ready, but its open connections drain.
    draining: bool = False


@dataclass(frozen=True)
class EndpointSlice:
    key: ObjectKey
    service_name: str  # label kubernetes.io/service-name
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class HostInterface:
    """An external interface of the box (its name matched SNCTRLR_INTERFACES_PATTERN)."""

    name: str
    index: int
    addresses: tuple[IPv4Interface, ...]  # primary first, as the kernel lists them
    up: bool = True


@dataclass(frozen=True)
class Host:
    """What interface discovery saw on the box."""

    interfaces: tuple[HostInterface, ...] = ()
    forwarding: bool | None = None  # net.ipv4.ip_forward; None: not known (not read)
    # Every IPv4 address local to the box in its namespace, on any interface (cluster side,
    # default gateway's, loopback, dummies) and whatever its state: the planner never DNATs
    # to one. Empty where nobody discovered it (tests, builders); the external interfaces'
    # addresses above count as local anyway.
    local_addresses: frozenset[IPv4Address] = frozenset()

    def interface_of(self, address: IPv4Address) -> HostInterface | None:
        for iface in self.interfaces:
            if any(a.ip == address for a in iface.addresses):
                return iface
        return None


@dataclass(frozen=True)
class Snapshot:
    """Everything the planner needs, taken at one instant."""

    mappings: tuple[Mapping, ...] = ()
    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    host: Host = field(default_factory=Host)
