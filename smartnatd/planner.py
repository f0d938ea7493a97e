"""plan(snapshot, settings) -> Plan: the complete desired state and one verdict per Mapping.

Pure: no I/O, no clock, no logging. Every decision comes back as a verdict with a reason, and
both appliances of a pair compute the same claims and conflicts from the same cluster view.

IncrementalPlanner returns exactly plan(snapshot, settings) too, but from the keys that changed
since its previous snapshot: it keeps each Mapping's outcome, keyed by what that outcome reads
(the Mapping, its Service, that Service's EndpointSlices, the box's addresses and settings), and
re-decides only the Mappings a change can reach, so a pass costs what changed, not the cluster.
"""

from __future__ import annotations

import bisect
import enum
import heapq
from collections.abc import Callable, Iterable
from collections.abc import Mapping as ReadOnlyDict
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, Generic, Protocol, TypeVar

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


# Kinds that mean the Mapping is fine as far as this box goes (Verdict.ok).
OK_KINDS = frozenset({VerdictKind.CONFIGURED, VerdictKind.NOT_LOCAL})

# Kubernetes Event reasons (UpperCamelCase) for each kind of verdict; WAITING refines below.
EVENT_REASONS = {
    VerdictKind.CONFIGURED: "Configured",
    VerdictKind.NOT_LOCAL: "AddressNotOnHost",
    VerdictKind.INVALID: "InvalidMapping",
    VerdictKind.CONFLICT: "EndpointConflict",
    VerdictKind.DELETING: "Deleting",
}
# WAITING because every target of a port is refused: an address of this box, or one that is
# never a pod's (see _refusal).
TARGET_REFUSED = "TargetRefused"


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
    # The object the verdict was computed from: write-back writes it only to that object at
    # that generation, never as the status of a newer spec or of a re-created namesake.
    generation: int = 0
    uid: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in OK_KINDS


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


Order = tuple[str, str, str]  # a Mapping's place in the conflict order; unique per key
EndpointKey = tuple[int, str, int]  # an ExternalEndpoint as a cheap dict key in its own order


def _order(mapping: Mapping) -> Order:
    # Oldest first; a missing timestamp sorts last so a half-written object never wins.
    return (mapping.creation_timestamp or "\uffff", mapping.key.namespace, mapping.key.name)


# Sort keys giving the same order as the dataclasses' own comparisons, at C speed: sorting
# 10k frozen dataclasses by their generated __lt__ costs tens of milliseconds.
def _key_order(key: ObjectKey) -> tuple[str, str]:
    return (key.namespace, key.name)


def _endpoint_order(e: ExternalEndpoint) -> tuple[int, str, int]:
    return (int(e.address), e.protocol, e.port)


def _first(cell: tuple[Any, ...]) -> Any:
    return cell[0]


def gateway_of(address: IPv4Interface, offset: int) -> IPv4Address:
    """SmartNat's rule: positive offsets count from the network address, negative from broadcast.
    A /31 (RFC 3021, a point-to-point pair) has no network or broadcast address: the gateway is
    the other address."""
    network = address.network
    if network.prefixlen == 31:
        return network.network_address + (1 - int(address.ip) % 2)
    if offset > 0:
        return network.network_address + offset
    return network.broadcast_address + offset


def _return_paths(host: Host, settings: Settings) -> tuple[tuple[ReturnPath, ...], tuple[str, ...]]:
    paths: list[ReturnPath] = []
    problems: list[str] = []
    if host.forwarding is False:
        # Every rule is in place and every verdict reads Configured, yet no packet is forwarded.
        problems.append(
            "net.ipv4.ip_forward is 0: this box forwards nothing, so no Mapping is reachable; "
            "set it to 1 (etc/sysctl.d/90-smartnat.conf)"
        )
    if not host.interfaces:
        # Valid settings that fit no interface of this box serve nothing: say so, once.
        problems.append(
            f"no interface matches SNCTRLR_INTERFACES_PATTERN={settings.interfaces_pattern}"
            + (f" (besides SNCTRLR_DEFAULT_GW_INTERFACE={settings.default_gw_interface})" if settings.default_gw_interface else "")
            + "; no address of this box is served"
        )
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
        special = () if primary.network.prefixlen == 31 else (primary.network.network_address, primary.network.broadcast_address)
        own = any(gateway == a.ip for a in iface.addresses)  # a route via itself goes nowhere
        if gateway not in primary.network or gateway in special or own:
            what = f"this box's own address {gateway} as the gateway" if own else f"no usable gateway in {primary.network}"
            problems.append(
                f"interface {iface.name}: SNCTRLR_GW_ADDRESS_OFFSET={settings.gw_address_offset} gives {what}; "
                "its addresses are not served"
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


def _service_port(service: Service, port: int, protocol: str) -> ServicePort | None:
    for sp in service.ports:
        if sp.port == port and sp.protocol == protocol:
            return sp
    return None


# Addresses are deduplicated and sorted by their integer: an IPv4Address hashes and compares in
# Python, an int in C, and for IPv4 alone the two orders are the same.

# Never a DNAT target: an address of this box would hand outside clients to its own services
# (sshd, the monitor port), and these ranges are never a pod's. The API server refuses most of
# them in EndpointSlices, but files read with --source pass no API validation at all.
OWN_ADDRESS = "an address of this appliance"
_NEVER_A_POD = (
    (0x00000000, 8, "in 0.0.0.0/8, never a pod's"),
    (0x7F000000, 8, "a loopback address"),
    (0xA9FE0000, 16, "a link-local address"),
    (0xE0000000, 4, "a multicast address"),
    (0xFFFFFFFF, 32, "the broadcast address"),
)
# First octets of those ranges: one set lookup lets every other address through untouched.
_SUSPECT_OCTETS = frozenset({0, 127, 169, 255, *range(224, 240)})
_NAMED_REFUSALS = 3  # addresses a reason names before "and N more"

Refused = dict[int, tuple[IPv4Address, str]]  # int(address) -> (address, why it is refused)


def _refusal(ip: int, own: frozenset[int]) -> str:
    """Why the address `ip` is never a DNAT target on this box; "" when it may be one. The
    ranges come first: a loopback address is refused alike on every appliance of a pair."""
    if ip >> 24 in _SUSPECT_OCTETS:
        for network, prefixlen, why in _NEVER_A_POD:
            if ip >> (32 - prefixlen) == network >> (32 - prefixlen):
                return why
    return OWN_ADDRESS if ip in own else ""


def _refused_text(refused: Refused) -> str:
    """"endpoint 10.0.0.5 (an address of this appliance)", or several, at most a few named."""
    named = [f"{a} ({why})" for _, (a, why) in sorted(refused.items())[:_NAMED_REFUSALS]]
    more = f" and {len(refused) - len(named)} more" if len(refused) > len(named) else ""
    return f"endpoint{'s' if len(refused) > 1 else ''} {', '.join(named)}{more}"


def _ready_ips(slices: Iterable[EndpointSlice], own: frozenset[int]) -> tuple[IPv4Address, ...]:
    ready = {int(a): a for s in slices for e in s.endpoints if e.ready for a in e.addresses}
    for ip in [ip for ip in ready if ip in own or ip >> 24 in _SUSPECT_OCTETS]:
        if _refusal(ip, own):
            del ready[ip]  # no egress SNAT for what is not a pod
    if len(ready) < 2:
        return tuple(ready.values())
    return tuple(map(ready.__getitem__, sorted(ready)))


def _endpoint_targets(
    slices: Iterable[EndpointSlice], sp: ServicePort, own: frozenset[int]
) -> tuple[tuple[Target, ...], tuple[Target, ...], Refused]:
    """(targets, draining, refused) for one Service port, its targetPort resolved through the
    slices' ports. Targets are the ready endpoints; as kube-proxy does, the terminating ones
    that still serve take their place when none is ready, and otherwise only drain. Endpoints
    that are never a target (see _refusal) are left out of both and listed in `refused`."""
    targets: dict[tuple[int, int], Target] = {}
    draining: dict[tuple[int, int], Target] = {}
    refused: Refused = {}
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
            if e.ready or e.draining:
                into = targets if e.ready else draining
                for a in e.addresses:
                    ip = int(a)
                    key = (ip, port)  # Target's own order, cheaper to hash and sort
                    if key not in into:
                        if (ip in own or ip >> 24 in _SUSPECT_OCTETS) and (why := _refusal(ip, own)):
                            refused[ip] = (a, why)
                            continue
                        into[key] = Target(a, port)
    if not targets:
        targets, draining = draining, {}
    elif draining:
        for key in targets.keys() & draining.keys():  # ready in one slice wins
            del draining[key]
    return (
        tuple(map(targets.__getitem__, sorted(targets))),
        tuple(map(draining.__getitem__, sorted(draining))),
        refused,
    )


def _claims(spec: MappingSpec) -> list[tuple[EndpointKey, IPv4Address]]:
    """The endpoints a Mapping claims, in claim order, each as its key with its address: the
    ExternalEndpoint itself is made only for the conflict that names it."""
    ips = [(int(a), a) for a in spec.addresses]
    return [((ip, p.protocol, p.port), a) for ip, a in ips for p in spec.ports]


def _endpoint(ek: EndpointKey, address: IPv4Address) -> ExternalEndpoint:
    return ExternalEndpoint(address, ek[1], ek[2])  # type: ignore[arg-type]


def _service_key(m: Mapping, spec: MappingSpec) -> ObjectKey:
    return ObjectKey(m.key.namespace, spec.service_name)


def _slice_owner(s: EndpointSlice) -> ObjectKey:
    """The Service an EndpointSlice belongs to (label kubernetes.io/service-name)."""
    return ObjectKey(s.key.namespace, s.service_name)


@dataclass(frozen=True)
class _HostView:
    """What the plan needs from the box, derived from Host and settings alone."""

    paths: tuple[ReturnPath, ...]
    problems: tuple[str, ...]
    local: dict[IPv4Address, HostInterface]  # served addresses -> their interface
    path_of: dict[str, ReturnPath]
    managed: tuple[IPv4Address, ...]
    interfaces: tuple[str, ...]
    own: frozenset[int]  # every address of the box, as ints: never a DNAT target
    # served addresses -> (their interface's name, the address as text): what _serve() reads,
    # in one lookup, and without formatting the same few addresses again for every Mapping.
    spots: dict[IPv4Address, tuple[str, str]]

    def place(self, address: IPv4Address) -> tuple[str, ReturnPath] | None:
        """Everything a Mapping's outcome reads about one of its addresses."""
        iface = self.local.get(address)
        return None if iface is None else (iface.name, self.path_of[iface.name])


def _host_view(host: Host, settings: Settings) -> _HostView:
    paths, problems = _return_paths(host, settings)
    usable = {p.interface for p in paths}
    local: dict[IPv4Address, HostInterface] = {}
    for iface in host.interfaces:
        if iface.name in usable:
            for a in iface.addresses:
                local.setdefault(a.ip, iface)
    return _HostView(
        paths=paths,
        problems=problems,
        local=local,
        path_of={p.interface: p for p in paths},
        managed=tuple(sorted(local)),
        interfaces=tuple(sorted(usable)),
        own=frozenset(
            [int(a) for a in host.local_addresses] + [int(a.ip) for iface in host.interfaces for a in iface.addresses]
        ),
        spots={a: (iface.name, str(a)) for a, iface in local.items()},
    )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One Mapping's verdict and what it adds to the desired state."""

    verdict: Verdict
    dnats: tuple[Dnat, ...] = ()
    egress: tuple[EgressSnat, ...] = ()  # candidates: the oldest Configured Mapping wins a pod


def _verdict(m: Mapping, kind: VerdictKind, reason: str, event_reason: str = "", **kw: object) -> Verdict:
    return Verdict(key=m.key, kind=kind, reason=reason, event_reason=event_reason or EVENT_REASONS[kind],
                   generation=m.generation, uid=m.uid, **kw)  # type: ignore[arg-type]


def _eligible(m: Mapping, settings: Settings) -> MappingSpec | None:
    """The spec of a Mapping that takes part in claims; None when it claims nothing."""
    spec = m.spec
    if m.deleting or isinstance(spec, Invalid) or len(spec.ports) > settings.max_ports_per_mapping:
        return None
    return spec


def _unclaimed(m: Mapping, settings: Settings) -> Verdict:
    """The verdict of a Mapping that is not eligible for claims."""
    if m.deleting:
        return _verdict(m, VerdictKind.DELETING, "the Mapping is being deleted")
    spec = m.spec
    if isinstance(spec, Invalid):
        return _verdict(m, VerdictKind.INVALID, spec.reason)
    return _verdict(
        m,
        VerdictKind.INVALID,
        f"spec.ports: {len(spec.ports)} ports exceed SNCTRLR_MAX_PORTS_PER_MAPPING={settings.max_ports_per_mapping}",
    )


def _refused_verdict(
    m: Mapping, reason: str, *, this_box_only: bool, service_vip: IPv4Address | None, pod_ips: tuple[IPv4Address, ...]
) -> Verdict:
    """Every target of a port refused. For a range (loopback...) every appliance says the same,
    so the Mapping is Waiting. For this box's own addresses only this box refuses: it is not
    served here (NotLocal, a per-appliance state) rather than Waiting, which would set the
    shared Ready condition against what the other appliances of a pair write, back and forth."""
    if this_box_only:
        return _verdict(
            m, VerdictKind.NOT_LOCAL, f"{reason}; not served by this appliance", TARGET_REFUSED,
            service_vip=service_vip, pod_ips=pod_ips,
        )
    return _verdict(m, VerdictKind.WAITING, reason, TARGET_REFUSED, service_vip=service_vip)


def _conflict(m: Mapping, ext: ExternalEndpoint, owner: MappingKey) -> Verdict:
    return _verdict(
        m,
        VerdictKind.CONFLICT,
        f"port {ext.port}/{ext.protocol.upper()} on {ext.address} is already mapped by {owner}",
        winner=owner,
    )


def _serve(
    m: Mapping,
    spec: MappingSpec,
    service: Service | None,
    slices: Iterable[EndpointSlice],
    view: _HostView,
    settings: Settings,
) -> _Outcome:
    """The outcome of a Mapping that holds all its claims. Reads only its arguments: the
    Mapping, its Service, that Service's slices, the box and settings."""
    if service is None:
        return _Outcome(
            _verdict(m, VerdictKind.WAITING, f"Service {m.key.namespace}/{spec.service_name} not found", "ServiceNotFound")
        )
    if service.no_cluster_ip == "ExternalName":
        # Neither a ClusterIP nor endpoints: a DNS name, which kube-proxy does not serve either.
        return _Outcome(
            _verdict(
                m, VerdictKind.WAITING,
                f"Service {service.key} is of type ExternalName (a DNS name, no ClusterIP or endpoints); "
                "smartnatd cannot serve it",
                "ServiceIsExternalName",
            )
        )
    slices = tuple(slices)
    own = view.own
    pod_ips = _ready_ips(slices, own)
    spots = view.spots
    here = [(a, spot) for a in spec.addresses if (spot := spots.get(a)) is not None]
    targets_per_port: list[tuple[tuple[Target, ...], tuple[Target, ...]]] = []  # (targets, draining)
    refused: Refused = {}  # endpoints left out, for the Configured sentence
    for p in spec.ports:
        sp = _service_port(service, p.service_port, p.protocol)
        if sp is None:
            return _Outcome(
                _verdict(
                    m,
                    VerdictKind.WAITING,
                    f"Service {service.key} has no port {p.service_port}/{p.protocol.upper()} (spec.ports servicePort)",
                    "ServicePortNotFound",
                )
            )
        if spec.mode == Mode.SERVICE:
            if service.cluster_ip is None:
                kind = "only an IPv6 ClusterIP" if service.no_cluster_ip == "IPv6" else "no ClusterIP (headless)"
                return _Outcome(
                    _verdict(
                        m,
                        VerdictKind.WAITING,
                        f"Service {service.key} has {kind}; use mode: direct",
                        "ServiceHasNoClusterIP",
                    )
                )
            why = _refusal(int(service.cluster_ip), own)
            if why and (here or why != OWN_ADDRESS):
                return _Outcome(
                    _refused_verdict(
                        m, f"Service {service.key}: ClusterIP {service.cluster_ip} ({why}) refused",
                        this_box_only=why == OWN_ADDRESS, service_vip=service.cluster_ip, pod_ips=pod_ips,
                    )
                )
            targets_per_port.append(((Target(service.cluster_ip, p.service_port),) if not why else (), ()))
            continue
        targets, draining, left_out = _endpoint_targets(slices, sp, own)
        if left_out:
            refused.update(left_out)
            # This box's own addresses are refused only where it serves the Mapping: elsewhere
            # it is NotLocal below, as it would be on the other appliances of a pair.
            # One of this box's own addresses among them: another appliance of a pair, which
            # does not own it, may well serve the Mapping, so the refusal is this box's alone.
            own_refused = any(why == OWN_ADDRESS for _, why in left_out.values())
            if not targets and (here or not own_refused):
                return _Outcome(
                    _refused_verdict(
                        m,
                        f"Service {service.key}: {_refused_text(left_out)} refused; "
                        f"no other endpoint is ready for port {sp.port}/{sp.protocol.upper()}",
                        this_box_only=own_refused, service_vip=service.cluster_ip, pod_ips=pod_ips,
                    )
                )
        if not targets and not left_out:
            return _Outcome(
                _verdict(
                    m,
                    VerdictKind.WAITING,
                    f"Service {service.key} has no ready endpoints for port {sp.port}/{sp.protocol.upper()}",
                    "NoReadyEndpoints",
                    service_vip=service.cluster_ip,
                )
            )
        targets_per_port.append((targets, draining))

    if not here:
        listed = ", ".join(str(a) for a in spec.addresses)
        return _Outcome(
            _verdict(
                m,
                VerdictKind.NOT_LOCAL,
                f"none of the addresses {listed} is on an external interface of this appliance",
                service_vip=service.cluster_ip,
                pod_ips=pod_ips,
            )
        )
    # Each endpoint once, with its sort key and its text (ExternalEndpoint.__str__, from the
    # address text the view holds); rows by address, columns by port.
    ports = spec.ports
    rows = []
    for a, (_, text) in here:
        ip = int(a)
        rows.append([((ip, p.protocol, p.port), ExternalEndpoint(a, p.protocol, p.port), f"{text}:{p.port}/{p.protocol}") for p in ports])
    flat = [cell for row in rows for cell in row]
    if len(flat) > 1:
        flat.sort(key=_first)
    served = tuple([cell[1] for cell in flat])
    reason = "serving " + ", ".join([cell[2] for cell in flat])
    if refused:
        reason += f"; {_refused_text(refused)} refused"
    verdict = Verdict(
        key=m.key,
        kind=VerdictKind.CONFIGURED,
        reason=reason,
        event_reason=EVENT_REASONS[VerdictKind.CONFIGURED],
        served=served,
        addresses=tuple([a for a, _ in here]),
        service_vip=service.cluster_ip,
        pod_ips=pod_ips,
        generation=m.generation,
        uid=m.uid,
    )
    virtual = spec.mode == Mode.SERVICE
    allowed, owner = spec.allowed_sources, m.key
    dnats = tuple(
        [
            Dnat(
                external=row[i][1],
                targets=targets,
                allowed_sources=allowed,
                owner=owner,
                interface=spot[0],
                virtual_target=virtual,
                draining=draining,
            )
            for i, (targets, draining) in enumerate(targets_per_port)
            for row, (_, spot) in zip(rows, here)
        ]
    )
    egress: tuple[EgressSnat, ...] = ()
    if settings.setup_snat:
        # Egress leaves with the Mapping's first served address.
        first, (name, _) = here[0]
        path = view.path_of[name]
        egress = tuple(EgressSnat(ip, first, path.interface, path.mark, m.key) for ip in pod_ips)
    return _Outcome(verdict, dnats, egress)


def _desired(
    view: _HostView, settings: Settings, dnats: tuple[Dnat, ...], egress: tuple[EgressSnat, ...]
) -> DesiredState:
    return DesiredState(
        dnats=dnats,
        return_paths=view.paths,
        egress=egress,
        managed_addresses=view.managed,
        external_interfaces=view.interfaces,
        masquerade=settings.setup_masquerade,
        drop_unmapped=settings.drop_unmapped,
        rule_priority=settings.rule_priority,
    )


def plan(snapshot: Snapshot, settings: Settings) -> Plan:
    view = _host_view(snapshot.host, settings)
    services = {s.key: s for s in snapshot.services}
    slices: dict[ObjectKey, list[EndpointSlice]] = {}
    for s in snapshot.endpoint_slices:
        slices.setdefault(_slice_owner(s), []).append(s)

    # Duplicate keys cannot come from the API; keep the first so the plan stays total.
    mappings: dict[MappingKey, Mapping] = {}
    for m in snapshot.mappings:
        mappings.setdefault(m.key, m)

    verdicts: dict[MappingKey, Verdict] = {}
    claimed: dict[EndpointKey, MappingKey] = {}
    dnats: list[Dnat] = []
    egress: dict[IPv4Address, EgressSnat] = {}
    for m in sorted(mappings.values(), key=_order):
        spec = _eligible(m, settings)
        if spec is None:
            verdicts[m.key] = _unclaimed(m, settings)
            continue
        # Claims are cluster-wide so every appliance agrees on who owns an endpoint.
        claims = _claims(spec)
        taken = next(((ek, a) for ek, a in claims if ek in claimed), None)
        if taken is not None:
            verdicts[m.key] = _conflict(m, _endpoint(*taken), claimed[taken[0]])
            continue
        for ek, _ in claims:
            claimed[ek] = m.key
        service_key = _service_key(m, spec)
        outcome = _serve(m, spec, services.get(service_key), slices.get(service_key, ()), view, settings)
        verdicts[m.key] = outcome.verdict
        dnats.extend(outcome.dnats)
        for e in outcome.egress:
            egress.setdefault(e.source, e)  # in age order: the oldest Mapping wins a pod

    return Plan(
        desired=_desired(
            view,
            settings,
            # Sources are unique, so ordering egress by source is its dataclass order.
            tuple(sorted(dnats, key=lambda d: _endpoint_order(d.external))),
            tuple(sorted(egress.values(), key=lambda e: int(e.source))),
        ),
        verdicts=tuple(verdicts[k] for k in sorted(verdicts, key=_key_order)),
        host_problems=view.problems,
    )


# --- the incremental planner ---------------------------------------------------------------


class SnapshotChanges(Protocol):
    """How a snapshot differs from an earlier one: per kind, each changed key with its object
    now (None: deleted). Store.snapshot_with_changes() gives these."""

    @property
    def base(self) -> int:
        """The serial of the snapshot these changes start from."""

    @property
    def serial(self) -> int:
        """The serial of the snapshot they lead to."""

    @property
    def mappings(self) -> ReadOnlyDict[ObjectKey, Mapping | None]: ...

    @property
    def services(self) -> ReadOnlyDict[ObjectKey, Service | None]: ...

    @property
    def endpoint_slices(self) -> ReadOnlyDict[ObjectKey, EndpointSlice | None]: ...

    @property
    def host(self) -> bool:
        """Whether snapshot.host differs."""


class _Sortable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Sortable)
V = TypeVar("V")

# Above this many insertions and removals in one pass, re-sorting a key list beats bisecting.
_RESORT = 256


_GONE: Any = object()  # marks a key removed since the last output


class _SortedIndex(Generic[K, V]):
    """key -> value, and the values as a tuple in key order, rebuilt only after a change. Keys
    are their own sort order (tuples, ints), so sorting and bisecting run in C; the values in
    order sit in a list beside the keys, so the tuple is a copy, not 50k lookups."""

    def __init__(self) -> None:
        self.values: dict[K, V] = {}
        self._keys: list[K] = []
        self._items: list[V] = []
        self._pending: dict[K, V] = {}  # changes not yet in _keys/_items; _GONE: removed
        self._flat: tuple[Any, ...] = ()

    def put(self, key: K, value: V) -> None:
        self.values[key] = value
        self._pending[key] = value

    def pop(self, key: K) -> None:
        if self.values.pop(key, _GONE) is not _GONE:
            self._pending[key] = _GONE

    def output(self) -> tuple[Any, ...]:
        pending = self._pending
        if not pending:
            return self._flat
        keys, items = self._keys, self._items
        if len(pending) > _RESORT:
            keys[:] = sorted(self.values)
            items[:] = map(self.values.__getitem__, keys)
        else:
            for key, value in pending.items():
                i = bisect.bisect_left(keys, key)
                present = i < len(keys) and keys[i] == key
                if value is _GONE:
                    if present:
                        del keys[i], items[i]
                elif present:
                    items[i] = value
                else:
                    keys.insert(i, key)
                    items.insert(i, value)
        pending.clear()
        self._flat = tuple(items)
        return self._flat


class IncrementalPlanner:
    """plan() with memory. `plan(snapshot, changes)` returns exactly `plan(snapshot, settings)`
    while re-deciding only the Mappings that `changes` can reach:

    - a Mapping's outcome reads its own spec, its Service, that Service's EndpointSlices, the
      box (only where its addresses are and their return paths) and settings; a change to any
      of those re-decides it, found through indexes by Service and by address;
    - conflicts are re-resolved only among the claimants of endpoints whose claims changed,
      oldest first, spreading to younger claimants only while someone's win or loss flips.

    Without changes, after an error, or when `changes` does not start where the last call
    ended, it rebuilds from the whole snapshot. It holds no clients and reads no clock: its
    state is a cache of the last snapshot, and equal inputs give equal plans.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._serial: int | None = None  # the snapshot the state reflects; None: rebuild
        self._reset(Host())

    def _reset(self, host: Host) -> None:
        self._view = _host_view(host, self._settings)
        self._mappings: dict[MappingKey, Mapping] = {}
        self._services: dict[ObjectKey, Service] = {}
        self._slices: dict[ObjectKey, EndpointSlice] = {}
        self._slices_of: dict[ObjectKey, dict[ObjectKey, EndpointSlice]] = {}  # by Service
        self._by_service: dict[ObjectKey, set[MappingKey]] = {}
        self._by_address: dict[int, set[MappingKey]] = {}
        # Claims: each eligible Mapping's endpoints and, per endpoint, its claimants by age.
        self._order: dict[MappingKey, Order] = {}
        self._claims: dict[MappingKey, tuple[tuple[EndpointKey, IPv4Address], ...]] = {}
        self._claimants: dict[EndpointKey, list[Order]] = {}
        self._taken: dict[MappingKey, tuple[ExternalEndpoint, MappingKey] | None] = {}  # None: it wins
        # Outcomes and the plan assembled from them.
        self._outcomes: dict[MappingKey, tuple[Order, _Outcome]] = {}
        self._verdicts: _SortedIndex[tuple[str, str], Verdict] = _SortedIndex()
        self._dnats: _SortedIndex[tuple[int, str, int, int], Dnat] = _SortedIndex()
        self._egress_claims: dict[int, dict[Order, EgressSnat]] = {}
        self._egress: _SortedIndex[int, EgressSnat] = _SortedIndex()
        self._last: Plan | None = None

    def plan(self, snapshot: Snapshot, changes: SnapshotChanges | None = None) -> Plan:
        continues = changes is not None and self._serial is not None and changes.base == self._serial
        self._serial = None  # until this call succeeds: after an exception, rebuild
        result: Plan | None
        if continues:
            assert changes is not None
            result = self._update(snapshot, changes)
        else:
            result = self._rebuild(snapshot)
        if result is None:
            return plan(snapshot, self._settings)
        self._serial = changes.serial if changes is not None else None
        return result

    def _rebuild(self, snapshot: Snapshot) -> Plan | None:
        """The state of `snapshot` from scratch, in one pass in age order as plan() goes.
        None (use plan()) for snapshots with duplicate keys, which the store never makes and
        which this state, keyed by object, cannot hold."""
        self._reset(snapshot.host)
        mappings = {m.key: m for m in snapshot.mappings}
        services = {s.key: s for s in snapshot.services}
        slices = {s.key: s for s in snapshot.endpoint_slices}
        sizes = (len(mappings), len(services), len(slices))
        if sizes != (len(snapshot.mappings), len(snapshot.services), len(snapshot.endpoint_slices)):
            return None
        self._services = services
        self._slices = slices
        for key, sl in self._slices.items():
            self._slices_of.setdefault(_slice_owner(sl), {})[key] = sl
        claimed: dict[EndpointKey, MappingKey] = {}
        egress: set[int] = set()
        for m in sorted(mappings.values(), key=_order):
            key = m.key
            order = _order(m)
            self._mappings[key] = m
            self._learn(m, order, append=True)
            claims = self._claims.get(key)
            if claims is not None:
                taken = next(((ek, a) for ek, a in claims if ek in claimed), None)
                if taken is None:
                    self._taken[key] = None
                    for ek, _ in claims:
                        claimed[ek] = key
                else:
                    self._taken[key] = (_endpoint(*taken), claimed[taken[0]])
            self._add(key, order, self._outcome(m), egress)
        self._elect(egress)
        return self._assemble()

    def _update(self, snapshot: Snapshot, changes: SnapshotChanges) -> Plan:
        settings = self._settings
        redo: set[MappingKey] = set()  # Mappings whose outcome must be computed again

        if changes.host:
            before, self._view = self._view, _host_view(snapshot.host, settings)
            if before.own != self._view.own:
                # Any Mapping's targets may be refused or let through now; the box's addresses
                # change rarely, so re-decide them all rather than index every endpoint.
                redo.update(self._mappings)
            for a in before.local.keys() | self._view.local.keys():
                if before.place(a) != self._view.place(a):
                    redo |= self._by_address.get(int(a), set())
        for key, service in changes.services.items():
            if service is None:
                self._services.pop(key, None)
            else:
                self._services[key] = service
            redo |= self._by_service.get(key, set())
        for key, sl in changes.endpoint_slices.items():
            old = self._slices.pop(key, None)
            if old is not None:
                owner = _slice_owner(old)
                del self._slices_of[owner][key]
                redo |= self._by_service.get(owner, set())
            if sl is not None:
                self._slices[key] = sl
                owner = _slice_owner(sl)
                self._slices_of.setdefault(owner, {})[key] = sl
                redo |= self._by_service.get(owner, set())

        contested: set[EndpointKey] = set()
        for key, m in changes.mappings.items():
            old_m = self._mappings.pop(key, None)
            if old_m is not None:
                contested.update(self._forget(old_m))
            if m is not None:
                self._mappings[key] = m
                contested.update(self._learn(m, _order(m)))
            redo.add(key)
        redo |= self._resolve(contested, changes.mappings.keys())
        self._redo(redo)
        return self._assemble()

    def _assemble(self) -> Plan:
        desired = _desired(self._view, self._settings, self._dnats.output(), self._egress.output())
        verdicts = self._verdicts.output()
        last = self._last
        if last is not None:
            # Unchanged parts stay the very same objects, so later stages can skip them by identity.
            if desired == last.desired:
                desired = last.desired
            if verdicts is last.verdicts and desired is last.desired and self._view.problems == last.host_problems:
                return last
        self._last = Plan(desired=desired, verdicts=verdicts, host_problems=self._view.problems)
        return self._last

    # -- indexes and claims

    def _learn(self, m: Mapping, order: Order, *, append: bool = False) -> Iterable[EndpointKey]:
        """Index a Mapping; returns the endpoints it claims. `append`: Mappings come in age
        order, so each joins the end of its endpoints' claimant lists."""
        spec = m.spec
        if isinstance(spec, Invalid):
            return ()
        self._by_service.setdefault(_service_key(m, spec), set()).add(m.key)
        for a in spec.addresses:
            self._by_address.setdefault(int(a), set()).add(m.key)
        if _eligible(m, self._settings) is None:
            return ()
        claims = dict(_claims(spec))  # in claim order, once each
        self._order[m.key] = order
        self._claims[m.key] = tuple(claims.items())
        for ek in claims:
            if append:
                self._claimants.setdefault(ek, []).append(order)
            else:
                bisect.insort(self._claimants.setdefault(ek, []), order)
        return claims.keys()

    def _forget(self, m: Mapping) -> Iterable[EndpointKey]:
        """Undo _learn; returns the endpoints it claimed."""
        spec = m.spec
        if isinstance(spec, Invalid):
            return ()
        _discard(self._by_service, _service_key(m, spec), m.key)
        for a in spec.addresses:
            _discard(self._by_address, int(a), m.key)
        claims = self._claims.pop(m.key, ())
        order = self._order.pop(m.key, None)
        self._taken.pop(m.key, None)
        if order is None:  # it claimed nothing
            return ()
        for ek, _ in claims:
            claimants = self._claimants[ek]
            del claimants[bisect.bisect_left(claimants, order)]
            if not claimants:
                del self._claimants[ek]
        return [ek for ek, _ in claims]

    def _taker(self, key: MappingKey) -> tuple[ExternalEndpoint, MappingKey] | None:
        """The first of its endpoints (in claim order) already held by an older winner, with
        that winner: what plan() finds in `claimed` when it reaches this Mapping."""
        order = self._order[key]
        for ek, address in self._claims[key]:
            for other in self._claimants[ek]:
                if other >= order:
                    break
                other_key = ObjectKey(other[1], other[2])
                if self._taken.get(other_key, True) is None:
                    return _endpoint(ek, address), other_key
        return None

    def _resolve(self, contested: set[EndpointKey], changed: Iterable[MappingKey]) -> set[MappingKey]:
        """Decide again who wins, oldest first; returns every Mapping looked at.

        A Mapping's result reads only older claimants' results, so walking in age order sees
        final answers; when a win turns into a loss or back (or a Mapping is new), the younger
        claimants of its endpoints join the walk."""
        queued: set[Order] = set()
        for ek in contested:
            queued.update(self._claimants.get(ek, ()))
        queued.update(self._order[key] for key in changed if key in self._order)
        queue = sorted(queued)
        seen: set[MappingKey] = set()
        while queue:
            order = heapq.heappop(queue)
            key = ObjectKey(order[1], order[2])
            seen.add(key)
            was = self._taken.get(key, False)  # False: not decided before
            now = self._taker(key)
            self._taken[key] = now
            if was is False or (was is None) != (now is None):
                for ek, _ in self._claims[key]:
                    for other in self._claimants[ek]:
                        if other > order and other not in queued:
                            queued.add(other)
                            heapq.heappush(queue, other)
        return seen

    # -- outcomes

    def _outcome(self, m: Mapping) -> _Outcome:
        spec = _eligible(m, self._settings)
        if spec is None:
            return _Outcome(_unclaimed(m, self._settings))
        taken = self._taken[m.key]
        if taken is not None:
            return _Outcome(_conflict(m, *taken))
        service_key = _service_key(m, spec)
        slices = self._slices_of.get(service_key, {}).values()
        return _serve(m, spec, self._services.get(service_key), slices, self._view, self._settings)

    def _redo(self, keys: set[MappingKey]) -> None:
        # Take every old contribution out before putting new ones in: a winner's new endpoint
        # may still be listed under the Mapping that held it until this pass.
        fresh: list[tuple[MappingKey, Order, _Outcome]] = []
        egress_touched: set[int] = set()
        for key in keys:
            old = self._outcomes.pop(key, None)
            m = self._mappings.get(key)
            new = None if m is None else self._outcome(m)
            order = None if m is None else _order(m)
            if old is not None:
                old_order, old_outcome = old
                if new == old_outcome and order == old_order:
                    self._outcomes[key] = old  # same values: keep the same objects
                    continue
                for dk, _ in _dnat_keys(old_outcome.dnats):
                    self._dnats.pop(dk)
                for e in old_outcome.egress:
                    ip = int(e.source)
                    self._egress_claims[ip].pop(old_order)
                    egress_touched.add(ip)
                if new is None:
                    self._verdicts.pop(_key_order(key))
                    continue
                new = _reuse(old_outcome, new)
            if new is not None and order is not None:
                fresh.append((key, order, new))
        for key, order, outcome in fresh:
            self._add(key, order, outcome, egress_touched)
        self._elect(egress_touched)

    def _add(self, key: MappingKey, order: Order, outcome: _Outcome, egress_touched: set[int]) -> None:
        """Put a Mapping's outcome in; the pods it offers egress for go into `egress_touched`."""
        self._outcomes[key] = (order, outcome)
        self._verdicts.put(_key_order(key), outcome.verdict)
        for dk, d in _dnat_keys(outcome.dnats):
            self._dnats.put(dk, d)
        for e in outcome.egress:
            ip = int(e.source)
            self._egress_claims.setdefault(ip, {})[order] = e
            egress_touched.add(ip)

    def _elect(self, egress_touched: set[int]) -> None:
        """Decide again which Mapping a pod's egress goes with: the oldest that offers it."""
        for ip in egress_touched:
            candidates = self._egress_claims.get(ip)
            if not candidates:
                self._egress_claims.pop(ip, None)
                self._egress.pop(ip)
                continue
            winner = candidates[min(candidates)]  # the oldest Mapping wins a pod
            if self._egress.values.get(ip) is not winner:
                self._egress.put(ip, winner)


def _dnat_keys(dnats: tuple[Dnat, ...]) -> list[tuple[tuple[int, str, int, int], Dnat]]:
    """Each Dnat keyed by its endpoint in sort order, plus a count that keeps apart the Dnats
    of a spec listing one endpoint twice (plan() keeps both, in spec order)."""
    if len(dnats) == 1:  # the common case: nothing to keep apart
        d = dnats[0]
        return [((*_endpoint_order(d.external), 0), d)]
    seen: dict[EndpointKey, int] = {}
    keyed = []
    for d in dnats:
        ek = _endpoint_order(d.external)  # equal keys for equal endpoints, hashed in C
        n = seen[ek] = seen.get(ek, -1) + 1
        keyed.append(((*ek, n), d))
    return keyed


def _discard(index: dict[Any, set[MappingKey]], key: Any, member: MappingKey) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


def _reuse(old: _Outcome, new: _Outcome) -> _Outcome:
    """`new`, with the objects of `old` wherever they are equal, so that later stages that
    compare by identity see them unchanged."""
    kept = {d.external: d for d in old.dnats}
    dnats = tuple(d if kept.get(d.external) != d else kept[d.external] for d in new.dnats)
    kept_egress = {e.source: e for e in old.egress}
    egress = tuple(e if kept_egress.get(e.source) != e else kept_egress[e.source] for e in new.egress)
    verdict = old.verdict if old.verdict == new.verdict else new.verdict
    return _Outcome(verdict, dnats, egress)
