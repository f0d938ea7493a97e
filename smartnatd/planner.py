"""plan(snapshot, settings) -> Plan: the complete desired state and one verdict per Mapping.

Pure: no I/O, no clock, no logging. Every decision comes back as a verdict with a reason, and
both appliances of a pair compute the same claims and conflicts from the same cluster view.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from smartnatd.desired import (
    MAX_MARKED_IFINDEX,
    DesiredState,
    Dnat,
    EgressSnat,
    ExternalEndpoint,
    ReturnPath,
    Target,
    interface_mark,
)
from smartnatd.model import (
    EndpointSlice,
    Host,
    HostInterface,
    Invalid,
    Mapping,
    MappingKey,
    MappingSpec,
    Mode,
    ObjectKey,
    Service,
    ServicePort,
    Snapshot,
)
from smartnatd.settings import Settings


class VerdictKind(enum.StrEnum):
    CONFIGURED = "Configured"  # served on at least one address of this box
    NOT_LOCAL = "NotLocal"  # valid, but none of its addresses is on this box: not an error
    INVALID = "Invalid"  # the Mapping itself is wrong
    CONFLICT = "Conflict"  # an older Mapping claims one of its endpoints
    WAITING = "Waiting"  # valid, but its Service, port or endpoints are missing
    DELETING = "Deleting"  # being deleted: served nowhere


# Kubernetes Event reasons (UpperCamelCase) for each kind of verdict; WAITING refines below.
EVENT_REASONS = {
    VerdictKind.CONFIGURED: "Configured",
    VerdictKind.NOT_LOCAL: "AddressNotOnHost",
    VerdictKind.INVALID: "InvalidMapping",
    VerdictKind.CONFLICT: "EndpointConflict",
    VerdictKind.DELETING: "Deleting",
}


@dataclass(frozen=True)
class Verdict:
    key: MappingKey
    kind: VerdictKind
    reason: str  # the sentence shown in status and Events
    event_reason: str  # UpperCamelCase
    winner: MappingKey | None = None
    served: tuple[ExternalEndpoint, ...] = ()  # endpoints this box serves for the Mapping
    addresses: tuple[IPv4Address, ...] = ()  # addresses of the Mapping that are on this box
    service_vip: IPv4Address | None = None
    pod_ips: tuple[IPv4Address, ...] = ()

    @property
    def ok(self) -> bool:
        return self.kind in (VerdictKind.CONFIGURED, VerdictKind.NOT_LOCAL)


@dataclass(frozen=True)
class Plan:
    desired: DesiredState
    verdicts: tuple[Verdict, ...]  # sorted by key; exactly one per Mapping
    host_problems: tuple[str, ...] = ()  # box-level trouble (unusable interface), for the log

    def verdict(self, key: MappingKey) -> Verdict | None:
        for v in self.verdicts:
            if v.key == key:
                return v
        return None


def _order(mapping: Mapping) -> tuple[str, str, str]:
    # Oldest first; a missing timestamp sorts last so a half-written object never wins.
    return (mapping.creation_timestamp or "\uffff", mapping.key.namespace, mapping.key.name)


def gateway_of(address: IPv4Interface, offset: int) -> IPv4Address:
    """SmartNat's rule: positive offsets count from the network address, negative from broadcast."""
    network = address.network
    if offset > 0:
        return network.network_address + offset
    return network.broadcast_address + offset


def _return_paths(host: Host, settings: Settings) -> tuple[tuple[ReturnPath, ...], tuple[str, ...]]:
    paths: list[ReturnPath] = []
    problems: list[str] = []
    for iface in sorted(host.interfaces, key=lambda i: i.name):
        if not iface.addresses:
            continue
        if not iface.up:
            # The kernel refuses routes through a down link; serve it again when it comes up.
            problems.append(f"interface {iface.name} is down; its addresses are not served until it is up")
            continue
        if iface.index > MAX_MARKED_IFINDEX:
            problems.append(
                f"interface {iface.name} has ifindex {iface.index} > {MAX_MARKED_IFINDEX}: "
                "no mark bits left for its return path; its addresses are not served"
            )
            continue
        primary = iface.addresses[0]
        try:
            gateway = gateway_of(primary, settings.gw_address_offset)
        except ValueError:  # the offset leaves the IPv4 space altogether
            gateway = primary.network.network_address
        if gateway not in primary.network or gateway in (primary.network.network_address, primary.network.broadcast_address):
            problems.append(
                f"interface {iface.name}: SNCTRLR_GW_ADDRESS_OFFSET={settings.gw_address_offset} gives no usable "
                f"gateway in {primary.network}; its addresses are not served"
            )
            continue
        paths.append(
            ReturnPath(
                interface=iface.name,
                ifindex=iface.index,
                mark=interface_mark(iface.index),
                table=settings.route_table_base + iface.index,
                gateway=gateway,
                network=primary.network,
                source=primary.ip,
            )
        )
    return tuple(paths), tuple(problems)


def _find_service(services: dict[ObjectKey, Service], mapping: Mapping, spec: MappingSpec) -> Service | None:
    return services.get(ObjectKey(mapping.key.namespace, spec.service_name))


def _service_port(service: Service, port: int, protocol: str) -> ServicePort | None:
    for sp in service.ports:
        if sp.port == port and sp.protocol == protocol:
            return sp
    return None


def _slices_of(slices: Iterable[EndpointSlice], namespace: str, service_name: str) -> list[EndpointSlice]:
    return [s for s in slices if s.key.namespace == namespace and s.service_name == service_name]


def _ready_ips(slices: Iterable[EndpointSlice]) -> tuple[IPv4Address, ...]:
    return tuple(sorted({a for s in slices for e in s.endpoints if e.ready for a in e.addresses}))


def _endpoint_targets(slices: Iterable[EndpointSlice], sp: ServicePort) -> tuple[Target, ...]:
    """Ready endpoints for one Service port, its targetPort resolved through the slices' ports."""
    targets: set[Target] = set()
    for s in slices:
        port: int | None = None
        for ep in s.ports:
            if ep.protocol == sp.protocol and ep.name == sp.name:
                port = ep.port
                break
        if port is None and isinstance(sp.target_port, int) and not s.ports:
            port = sp.target_port
        if port is None:
            continue
        for e in s.endpoints:
            if e.ready:
                targets.update(Target(a, port) for a in e.addresses)
    return tuple(sorted(targets))


def _claims(spec: MappingSpec) -> list[ExternalEndpoint]:
    return [ExternalEndpoint(a, p.protocol, p.port) for a in spec.addresses for p in spec.ports]


def plan(snapshot: Snapshot, settings: Settings) -> Plan:
    services = {s.key: s for s in snapshot.services}
    paths, host_problems = _return_paths(snapshot.host, settings)
    usable = {p.interface for p in paths}
    local: dict[IPv4Address, HostInterface] = {}
    for iface in snapshot.host.interfaces:
        if iface.name in usable:
            for a in iface.addresses:
                local.setdefault(a.ip, iface)

    verdicts: dict[MappingKey, Verdict] = {}
    claimed: dict[ExternalEndpoint, MappingKey] = {}
    dnats: list[Dnat] = []
    egress: dict[IPv4Address, EgressSnat] = {}
    path_of = {p.interface: p for p in paths}

    # Duplicate keys cannot come from the API; keep the first so the plan stays total.
    mappings: dict[MappingKey, Mapping] = {}
    for m in snapshot.mappings:
        mappings.setdefault(m.key, m)

    for m in sorted(mappings.values(), key=_order):
        verdicts[m.key] = _decide(m, services, snapshot, settings, claimed, local)
        v = verdicts[m.key]
        if v.kind != VerdictKind.CONFIGURED:
            continue
        spec = m.spec
        assert isinstance(spec, MappingSpec)
        for ext, targets in _targets(m, spec, services, snapshot, local):
            iface = local[ext.address]
            dnats.append(
                Dnat(
                    external=ext,
                    targets=targets,
                    allowed_sources=spec.allowed_sources,
                    owner=m.key,
                    interface=iface.name,
                )
            )
        if settings.setup_snat:
            # Egress leaves with the Mapping's first served address; the oldest Mapping wins a pod.
            first = v.addresses[0]
            path = path_of[local[first].name]
            for ip in v.pod_ips:
                egress.setdefault(ip, EgressSnat(ip, first, path.interface, path.mark, m.key))

    managed = sorted(local)
    desired = DesiredState(
        dnats=tuple(sorted(dnats, key=lambda d: d.external)),
        return_paths=paths,
        egress=tuple(sorted(egress.values())),
        managed_addresses=tuple(managed),
        external_interfaces=tuple(sorted(usable)),
        masquerade=settings.setup_masquerade,
        drop_unmapped=settings.drop_unmapped,
        rule_priority=settings.rule_priority,
    )
    return Plan(
        desired=desired,
        verdicts=tuple(verdicts[k] for k in sorted(verdicts)),
        host_problems=host_problems,
    )


def _verdict(m: Mapping, kind: VerdictKind, reason: str, event_reason: str = "", **kw: object) -> Verdict:
    return Verdict(key=m.key, kind=kind, reason=reason, event_reason=event_reason or EVENT_REASONS[kind], **kw)  # type: ignore[arg-type]


def _decide(
    m: Mapping,
    services: dict[ObjectKey, Service],
    snapshot: Snapshot,
    settings: Settings,
    claimed: dict[ExternalEndpoint, MappingKey],
    local: dict[IPv4Address, HostInterface],
) -> Verdict:
    if m.deleting:
        return _verdict(m, VerdictKind.DELETING, "the Mapping is being deleted")
    spec = m.spec
    if isinstance(spec, Invalid):
        return _verdict(m, VerdictKind.INVALID, spec.reason)
    if len(spec.ports) > settings.max_ports_per_mapping:
        return _verdict(
            m,
            VerdictKind.INVALID,
            f"spec.ports: {len(spec.ports)} ports exceed SNCTRLR_MAX_PORTS_PER_MAPPING={settings.max_ports_per_mapping}",
        )
    # Claims are cluster-wide so every appliance agrees on who owns an endpoint.
    for ext in _claims(spec):
        owner = claimed.get(ext)
        if owner is not None:
            return _verdict(
                m,
                VerdictKind.CONFLICT,
                f"port {ext.port}/{ext.protocol.upper()} on {ext.address} is already mapped by {owner}",
                winner=owner,
            )
    for ext in _claims(spec):
        claimed[ext] = m.key

    service = _find_service(services, m, spec)
    if service is None:
        return _verdict(
            m, VerdictKind.WAITING, f"Service {m.key.namespace}/{spec.service_name} not found", "ServiceNotFound"
        )
    slices = _slices_of(snapshot.endpoint_slices, m.key.namespace, spec.service_name)
    pod_ips = _ready_ips(slices)
    for p in spec.ports:
        sp = _service_port(service, p.service_port, p.protocol)
        if sp is None:
            return _verdict(
                m,
                VerdictKind.WAITING,
                f"Service {service.key} has no port {p.service_port}/{p.protocol.upper()} (spec.ports servicePort)",
                "ServicePortNotFound",
            )
        if spec.mode == Mode.SERVICE and service.cluster_ip is None:
            return _verdict(
                m,
                VerdictKind.WAITING,
                f"Service {service.key} has no ClusterIP (headless); use mode: direct",
                "ServiceHasNoClusterIP",
            )
        if spec.mode == Mode.DIRECT and not _endpoint_targets(slices, sp):
            return _verdict(
                m,
                VerdictKind.WAITING,
                f"Service {service.key} has no ready endpoints for port {sp.port}/{sp.protocol.upper()}",
                "NoReadyEndpoints",
                service_vip=service.cluster_ip,
            )

    here = tuple(a for a in spec.addresses if a in local)
    if not here:
        listed = ", ".join(str(a) for a in spec.addresses)
        return _verdict(
            m,
            VerdictKind.NOT_LOCAL,
            f"none of the addresses {listed} is on an external interface of this appliance",
            service_vip=service.cluster_ip,
            pod_ips=pod_ips,
        )
    served = tuple(sorted(ExternalEndpoint(a, p.protocol, p.port) for a in here for p in spec.ports))
    return _verdict(
        m,
        VerdictKind.CONFIGURED,
        "serving " + ", ".join(str(e) for e in served),
        served=served,
        addresses=here,
        service_vip=service.cluster_ip,
        pod_ips=pod_ips,
    )


def _targets(
    m: Mapping,
    spec: MappingSpec,
    services: dict[ObjectKey, Service],
    snapshot: Snapshot,
    local: dict[IPv4Address, HostInterface],
) -> list[tuple[ExternalEndpoint, tuple[Target, ...]]]:
    service = _find_service(services, m, spec)
    assert service is not None
    slices = _slices_of(snapshot.endpoint_slices, m.key.namespace, spec.service_name)
    out: list[tuple[ExternalEndpoint, tuple[Target, ...]]] = []
    for p in spec.ports:
        sp = _service_port(service, p.service_port, p.protocol)
        assert sp is not None
        if spec.mode == Mode.SERVICE:
            assert service.cluster_ip is not None
            targets: tuple[Target, ...] = (Target(service.cluster_ip, p.service_port),)
        else:
            targets = _endpoint_targets(slices, sp)
        out.extend((ExternalEndpoint(a, p.protocol, p.port), targets) for a in spec.addresses if a in local)
    return out
