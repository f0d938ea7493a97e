"""Small constructors for model objects, so tests read as the cluster they describe."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from smartnatd.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Host,
    HostInterface,
    Invalid,
    Mapping,
    MappingPort,
    MappingSpec,
    Mode,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
)
from smartnatd.settings import Settings

SETTINGS = Settings(interfaces_pattern=r"^ext[0-9]+$", default_gw_interface="eth0", instance_name="test")


def host(*interfaces: tuple[str, int, list[str]], local: tuple[str, ...] = ()) -> Host:
    """External interfaces (name, ifindex, addresses), and `local`: the box's other addresses."""
    return Host(
        interfaces=tuple(
            HostInterface(name=name, index=index, addresses=tuple(IPv4Interface(a) for a in addrs))
            for name, index, addrs in interfaces
        ),
        local_addresses=frozenset(IPv4Address(a) for a in local),
    )


HOST = host(("ext1", 3, ["192.0.2.10/24", "192.0.2.11/24"]), ("ext2", 4, ["198.51.100.10/24"]))


def mapping(
    name: str,
    *,
    namespace: str = "default",
    addresses: tuple[str, ...] = ("192.0.2.10",),
    ports: tuple[tuple[int, str, int], ...] = ((80, "tcp", 80),),
    service: str = "web",
    mode: str = "service",
    sources: tuple[str, ...] = ("0.0.0.0/0",),
    created: str = "2026-01-01T00:00:00Z",
    invalid: str = "",
    deleting: bool = False,
) -> Mapping:
    key = ObjectKey(namespace, name)
    if invalid:
        return Mapping(key=key, spec=Invalid(invalid), creation_timestamp=created)
    spec = MappingSpec(
        addresses=tuple(IPv4Address(a) for a in addresses),
        allowed_sources=tuple(IPv4Network(s) for s in sources),
        service_name=service,
        mode=Mode(mode),
        ports=tuple(MappingPort(p, Protocol(proto), sp) for p, proto, sp in ports),
    )
    return Mapping(key=key, spec=spec, creation_timestamp=created, deleting=deleting)


def service(
    name: str = "web",
    *,
    namespace: str = "default",
    cluster_ip: str | None = "10.96.0.10",
    ports: tuple[tuple[str, str, int, int | str], ...] = (("http", "tcp", 80, 8080),),
) -> Service:
    return Service(
        key=ObjectKey(namespace, name),
        cluster_ip=IPv4Address(cluster_ip) if cluster_ip else None,
        ports=tuple(ServicePort(n, Protocol(p), port, t) for n, p, port, t in ports),
    )


def endpoint_slice(
    service_name: str = "web",
    *,
    namespace: str = "default",
    name: str = "",
    ready: tuple[str, ...] = ("10.244.1.2", "10.244.2.2"),
    not_ready: tuple[str, ...] = (),
    draining: tuple[str, ...] = (),  # terminating, still serving
    ports: tuple[tuple[str, str, int], ...] = (("http", "tcp", 8080),),
) -> EndpointSlice:
    endpoints = (
        tuple(Endpoint((IPv4Address(a),), True) for a in ready)
        + tuple(Endpoint((IPv4Address(a),), False) for a in not_ready)
        + tuple(Endpoint((IPv4Address(a),), False, draining=True) for a in draining)
    )
    return EndpointSlice(
        key=ObjectKey(namespace, name or f"{service_name}-abc12"),
        service_name=service_name,
        ports=tuple(EndpointPort(n, Protocol(p), port) for n, p, port in ports),
        endpoints=endpoints,
    )
