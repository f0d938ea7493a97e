"""Raw API objects -> model types, parsed once; past this module nothing sees an API object.

Pure: no I/O, no clock, no logging. Every function accepts any JSON/YAML-shaped value and never
raises on its shape: a user mistake comes back as `Invalid(reason)`, the sentence for status.

A Mapping always parses to a `Mapping` (its spec may be `Invalid`) so the daemon can still write
its status and handle its finalizer. Services and EndpointSlices are written by Kubernetes, so a
bad one is rare; it comes back as `Invalid` and the caller drops it.

Reasons name the field path and the offending value as JSON (`spec.ports[1].port: 0 is not ...`)
and list every problem, sorted by path, joined with "; ", so the user fixes everything at once.

List responses omit apiVersion/kind on their items: a watch of a known resource calls
`parse_mapping`/`parse_service`/`parse_endpoint_slice` directly; `parse_object` is for files.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeGuard

from smartnatd.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
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

GROUP = "smartnat.aureacentral.com"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "mappings"
KIND = "Mapping"
# SmartNat's finalizer name: Mappings it finalized must stay finalizable by us.
FINALIZER = "mapping.finalizers.aureacentral.com"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_NAMESPACE = "default"
# SmartNat's CRD allowed 1-62 characters (one less than DNS-1035's 63); keep its limit.
MAX_SERVICE_NAME_LENGTH = 62
EVERYWHERE = IPv4Network("0.0.0.0/0")

_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_PROTOCOLS = ", ".join(p.value for p in Protocol)
_MODES = ", ".join(m.value for m in Mode)
_PORT_RANGE = "(1-65535)"


# --- problems: collected, then reported sorted by field path ---------------------------------


def _path_order(path: str) -> tuple[Any, ...]:
    # Natural order, so spec.ports[2] comes before spec.ports[10]; parts alternate str/int.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", path)))


class _Problems:
    """The sentences found while parsing one object (local to one parse call)."""

    def __init__(self, *, separator: str) -> None:
        self._separator = separator  # ": " for Mapping specs, " " for Kubernetes' own objects
        self._items: list[tuple[str, str]] = []

    def add(self, path: str, sentence: str) -> None:
        self._items.append((path, f"{path}{self._separator}{sentence}"))

    def missing(self, path: str) -> None:
        self._items.append((path, f"{path} is missing"))

    def note(self, path: str, message: str) -> None:
        """A whole message that does not start with its path; `path` only places it in order."""
        self._items.append((path, message))

    def __bool__(self) -> bool:
        return bool(self._items)

    def invalid(self) -> Invalid:
        ordered = sorted(self._items, key=lambda item: _path_order(item[0]))  # stable within a path
        return Invalid("; ".join(message for _, message in ordered))


_SHOW_MAX = 60


def _show(value: Any) -> str:
    """The value as the user wrote it (JSON), short enough for a status line."""
    parts: list[str] = []
    try:
        _json_prefix(value, parts, [_SHOW_MAX + 1])
    except _Enough:
        pass
    text = "".join(parts)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


class _Enough(Exception):
    """The text has grown past what _show() keeps."""


def _json_prefix(value: Any, parts: list[str], budget: list[int]) -> None:
    """Append JSON text of `value` to `parts` until `budget` characters are written: a YAML file
    can hold a small value with a huge expansion (aliases), and only the start is shown."""
    if isinstance(value, dict):
        items: Any = value.items()
        opening, closing = "{", "}"
    elif isinstance(value, (list, tuple)):
        items, opening, closing = value, "[", "]"
    else:
        if isinstance(value, str):
            value = value[: budget[0]]
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
        _emit(text, parts, budget)
        return
    _emit(opening, parts, budget)
    for i, item in enumerate(items):
        if i:
            _emit(", ", parts, budget)
        if opening == "{":
            key, item = item
            _emit(json.dumps(str(key)[: budget[0]], ensure_ascii=False) + ": ", parts, budget)
        _json_prefix(item, parts, budget)
    _emit(closing, parts, budget)


def _emit(text: str, parts: list[str], budget: list[int]) -> None:
    parts.append(text)
    budget[0] -= len(text)
    if budget[0] <= 0:
        raise _Enough


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is no port


def _not_a_port(value: Any) -> str:
    if isinstance(value, str) and value.strip().isdecimal():
        # YAML "80" is a string and SmartNat's CRD wants an integer: say why "80" is refused.
        return f"{_show(value)} is a string, not a port number {_PORT_RANGE}"
    return f"{_show(value)} is not a port number {_PORT_RANGE}"


def _port_number(value: Any) -> int | None:
    return value if _is_int(value) and 1 <= value <= 65535 else None


def _ipv4_address(value: Any) -> IPv4Address | str:
    """The address, or the sentence saying why it is not one."""
    if isinstance(value, str):
        try:
            return IPv4Address(value)
        except ValueError:
            pass
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            pass
        else:
            return f"{_show(value)} is IPv6; only IPv4 is supported"
    return f"{_show(value)} is not an IPv4 address"


def _ipv4_network(value: Any) -> IPv4Network | str:
    """An IPv4 CIDR or plain address, host bits allowed as Go's net.ParseCIDR allowed them."""
    if isinstance(value, str):
        address, slash, prefix = value.partition("/")
        # Python would also take a netmask after the slash; Go's ParseCIDR, whose inputs we
        # must accept, takes a prefix length only, so allow exactly that.
        if not slash or (prefix.isascii() and prefix.isdigit() and int(prefix) <= 32):
            try:
                return IPv4Network(f"{address}/{int(prefix) if slash else 32}", strict=False)
            except ValueError:
                pass
        try:
            ipaddress.IPv6Network(value, strict=False)
        except ValueError:
            pass
        else:
            return f"{_show(value)} is IPv6; only IPv4 is supported"
    return f"{_show(value)} is not an IPv4 address or CIDR"


def _protocol(value: Any, *, default: Protocol = Protocol.TCP) -> Protocol | None:
    if value is None or value == "":  # SmartNat filled an empty protocol with tcp
        return default
    if isinstance(value, str):
        try:
            return Protocol(value.lower())
        except ValueError:
            return None
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


# The API server's own form, taken as it is up to day 28; later days go through the parse,
# which refuses 30 February.
_CANONICAL_TIME = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z"
)


def _timestamp(value: Any) -> str | None:
    """The time as the API server writes it (UTC, whole seconds, "Z"), so that comparing the
    text compares the times; "" when unset, None when it is no time. The API server always
    writes that form; a file may hold an offset, or an unquoted datetime that YAML parsed."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        if _CANONICAL_TIME.fullmatch(value) and value[8:10] <= "28":  # as the API server writes it
            return value
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, datetime.date):
        return value.strftime("%Y-%m-%dT00:00:00Z")
    return None


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _namespace(metadata: dict[Any, Any]) -> str:
    namespace = metadata.get("namespace")
    return namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE


def object_key(obj: Any) -> ObjectKey | None:
    """namespace/name of a raw object (namespace defaults to "default"); None without a name."""
    metadata = _dict(_dict(obj).get("metadata"))
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        return None
    return ObjectKey(_namespace(metadata), name)


# --- Mapping ----------------------------------------------------------------------------------


def parse_mapping(obj: Any) -> Mapping:
    """A Mapping object -> Mapping; always a Mapping, its spec a MappingSpec or Invalid."""
    if not isinstance(obj, dict):
        return Mapping(key=ObjectKey(DEFAULT_NAMESPACE, ""), spec=Invalid(f"{_show(obj)} is not an object"))
    problems = _Problems(separator=": ")
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        problems.add("metadata", f"{_show(metadata)} is not an object")
    metadata = _dict(metadata)
    key = object_key(obj)
    if key is None:
        problems.missing("metadata.name")
        key = ObjectKey(_namespace(metadata), "")
    namespace = metadata.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        problems.add("metadata.namespace", f"{_show(namespace)} is not a namespace name")
    created = _timestamp(metadata.get("creationTimestamp"))
    if created is None:
        # The conflict order reads it: a time we cannot read must not win or lose by its text.
        shown = _show(metadata.get("creationTimestamp"))
        problems.add("metadata.creationTimestamp", f"{shown} is not an RFC 3339 time")
    generation = metadata.get("generation")
    finalizers = metadata.get("finalizers")
    spec = _mapping_spec(obj.get("spec"), problems=problems)
    return Mapping(
        key=key,
        spec=problems.invalid() if problems or spec is None else spec,
        creation_timestamp=created or "",
        generation=generation if _is_int(generation) else 0,
        uid=_text(metadata.get("uid")),
        deleting=metadata.get("deletionTimestamp") is not None,
        finalizers=tuple(f for f in finalizers if isinstance(f, str)) if isinstance(finalizers, list) else (),
    )


def _mapping_spec(spec: Any, *, problems: _Problems) -> MappingSpec | None:
    if spec is None:
        problems.missing("spec")
        return None
    if not isinstance(spec, dict):
        problems.add("spec", f"{_show(spec)} is not an object")
        return None
    _misspelt(spec, _SPEC_FIELDS, "spec", problems=problems)
    addresses = _mapping_addresses(spec.get("addresses"), problems=problems)
    allowed_sources = _allowed_sources(spec.get("allowedSources"), problems=problems)
    service_name = _service_name(spec.get("serviceName"), problems=problems)
    mode = _mode(spec.get("mode"), problems=problems)
    ports = _mapping_ports(spec.get("ports"), problems=problems)
    if addresses is None or allowed_sources is None or service_name is None or mode is None or ports is None:
        return None
    return MappingSpec(
        addresses=addresses,
        allowed_sources=allowed_sources,
        service_name=service_name,
        mode=mode,
        ports=ports,
    )


_SPEC_FIELDS = ("addresses", "allowedSources", "serviceName", "mode", "ports")
_PORT_FIELDS = ("port", "protocol", "servicePort")


def _misspelt(fields: dict[Any, Any], known: tuple[str, ...], path: str, *, problems: _Problems) -> None:
    """A field close to a known one is a typo, and ignoring it can fail open (a misspelt
    allowedSources lets everyone in): refuse it. Other unknown fields are ignored, so that a
    field added by a newer version does not break an older appliance of a pair."""
    lowered = {name.lower(): name for name in known}
    for field in fields:
        if field in known:
            continue
        close = difflib.get_close_matches(str(field).lower(), lowered, n=1, cutoff=0.75)
        if close:
            problems.add(f"{path}.{field}", f"unknown field; did you mean {lowered[close[0]]}?")


def _list(value: Any, path: str, *, problems: _Problems, required: bool) -> list[Any] | None:
    if value is None:
        if required:
            problems.missing(path)
            return None
        return []
    if not isinstance(value, list):
        problems.add(path, f"{_show(value)} is not a list")
        return None
    return value


def _mapping_addresses(value: Any, *, problems: _Problems) -> tuple[IPv4Address, ...] | None:
    path = "spec.addresses"
    items = _list(value, path, problems=problems, required=True)
    if items is None:
        return None
    if not items:
        problems.add(path, "at least one address is required")
        return None
    addresses: list[IPv4Address] = []
    ok = True
    for i, item in enumerate(items):
        parsed = _ipv4_address(item)
        if isinstance(parsed, str):
            problems.add(f"{path}[{i}]", parsed)
            ok = False
        elif parsed in addresses:
            if addresses.count(parsed) == 1:  # say it once, however often it repeats
                problems.add(path, f"address {parsed} is listed twice")
            addresses.append(parsed)
            ok = False
        else:
            addresses.append(parsed)
    return tuple(addresses) if ok else None


def _allowed_sources(value: Any, *, problems: _Problems) -> tuple[IPv4Network, ...] | None:
    path = "spec.allowedSources"
    items = _list(value, path, problems=problems, required=False)
    if items is None:
        return None
    networks: list[IPv4Network] = []
    ok = True
    for i, item in enumerate(items):
        parsed = _ipv4_network(item)
        if isinstance(parsed, str):
            problems.add(f"{path}[{i}]", parsed)
            ok = False
        else:
            networks.append(parsed)
    if not ok:
        return None
    # Empty means everyone, as in SmartNat; collapsing also sorts and drops covered entries.
    return tuple(ipaddress.collapse_addresses(networks)) if networks else (EVERYWHERE,)


def _service_name(value: Any, *, problems: _Problems) -> str | None:
    path = "spec.serviceName"
    if value is None:
        problems.missing(path)
        return None
    if isinstance(value, str) and len(value) > MAX_SERVICE_NAME_LENGTH:
        problems.add(path, f"{_show(value)} is longer than {MAX_SERVICE_NAME_LENGTH} characters")
        return None
    if not isinstance(value, str) or not _DNS_1035_LABEL.fullmatch(value):
        problems.add(path, f"{_show(value)} is not a valid Service name (DNS-1035 label)")
        return None
    return value


def _mode(value: Any, *, problems: _Problems) -> Mode | None:
    # SmartNat required mode but compared it lower-cased; "" is Go's "not set".
    if value is None or value == "":
        return Mode.SERVICE
    if isinstance(value, str):
        try:
            return Mode(value.lower())
        except ValueError:
            pass
    problems.add("spec.mode", f"{_show(value)} is not a mode ({_MODES})")
    return None


def _mapping_ports(value: Any, *, problems: _Problems) -> tuple[MappingPort, ...] | None:
    path = "spec.ports"
    items = _list(value, path, problems=problems, required=True)
    if items is None:
        return None
    if not items:
        problems.add(path, "at least one port is required")
        return None
    ports: list[MappingPort] = []
    seen: dict[tuple[int, Protocol], int] = {}
    ok = True
    for i, item in enumerate(items):
        port = _mapping_port(item, f"{path}[{i}]", problems=problems)
        if port is None:
            ok = False
            continue
        external = (port.port, port.protocol)
        seen[external] = seen.get(external, 0) + 1
        if seen[external] == 2:  # say it once, however often it repeats
            problems.add(path, f"port {port.port}/{port.protocol} is listed twice")
            ok = False
        ports.append(port)
    return tuple(ports) if ok else None


def _mapping_port(item: Any, path: str, *, problems: _Problems) -> MappingPort | None:
    if not isinstance(item, dict):
        problems.add(path, f"{_show(item)} is not an object with port, protocol and servicePort")
        return None
    _misspelt(item, _PORT_FIELDS, path, problems=problems)
    ok = True
    port = _port_number(item.get("port"))
    if item.get("port") is None:
        problems.missing(f"{path}.port")
        ok = False
    elif port is None:
        problems.add(f"{path}.port", _not_a_port(item.get("port")))
        ok = False
    protocol = _protocol(item.get("protocol"))
    if protocol is None:
        problems.add(f"{path}.protocol", f"{_show(item.get('protocol'))} is not a protocol ({_PROTOCOLS})")
        ok = False
    raw_service_port = item.get("servicePort")
    service_port = port if raw_service_port is None else _port_number(raw_service_port)
    if raw_service_port is not None and service_port is None:
        problems.add(f"{path}.servicePort", _not_a_port(raw_service_port))
        ok = False
    if not ok or port is None or protocol is None or service_port is None:
        return None
    return MappingPort(port=port, protocol=protocol, service_port=service_port)


# --- Service ----------------------------------------------------------------------------------


def parse_service(obj: Any) -> Service | Invalid:
    """A v1 Service -> Service (cluster_ip None when headless or unset), or Invalid."""
    if not isinstance(obj, dict):
        return Invalid(f"{_show(obj)} is not an object")
    problems = _Problems(separator=" ")
    key = object_key(obj)
    if key is None:
        problems.missing("metadata.name")
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, dict):
        problems.add("spec", f"{_show(spec)} is not an object")
    spec = _dict(spec)
    cluster_ip, no_cluster_ip = _cluster_ip(spec, problems=problems)
    ports = _kube_ports(spec.get("ports"), problems=problems, parse=_service_port)
    if problems or key is None:
        return problems.invalid()
    return Service(
        key=key,
        cluster_ip=cluster_ip,
        ports=tuple(p for p in ports if isinstance(p, ServicePort)),
        no_cluster_ip=no_cluster_ip,
    )


def _cluster_ip(spec: dict[Any, Any], *, problems: _Problems) -> tuple[IPv4Address | None, str]:
    """The Service's IPv4 ClusterIP (a dual-stack Service's IPv4 entry of clusterIPs, wherever
    it is listed), and why there is none when not because it is headless."""
    if spec.get("type") == "ExternalName":
        return None, "ExternalName"
    value = spec.get("clusterIP")
    if value is None or value == "" or value == "None":  # "None" marks a headless Service
        return None, ""
    listed = spec.get("clusterIPs")
    found: IPv4Address | None = None
    for path, candidate in [("clusterIP", value), *((f"clusterIPs[{i}]", c) for i, c in enumerate(
        listed if isinstance(listed, list) else ()
    ))]:
        try:
            address = ipaddress.ip_address(candidate) if isinstance(candidate, str) else None
        except ValueError:
            address = None
        if address is None:
            problems.add(path, f"{_show(candidate)} is not an IPv4 address")
        elif isinstance(address, IPv4Address) and found is None:
            found = address
    return found, "" if found is not None else "IPv6"


def _kube_ports(value: Any, *, problems: _Problems, parse: Callable[..., Any]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add("ports", f"{_show(value)} is not a list")
        return []
    return [parse(item, f"ports[{i}]", problems=problems) for i, item in enumerate(value)]


def _kube_port_common(item: Any, path: str, *, problems: _Problems) -> tuple[str, Protocol | None, bool]:
    """name and protocol as Kubernetes defaults them (name "" when unset, protocol TCP)."""
    name = item.get("name")
    ok = True
    if name is not None and not isinstance(name, str):
        problems.add(f"{path}.name", f"{_show(name)} is not a port name")
        ok = False
    protocol = _protocol(item.get("protocol"))
    if protocol is None:
        problems.add(f"{path}.protocol", f"{_show(item.get('protocol'))} is not a protocol ({_PROTOCOLS})")
        ok = False
    return _text(name), protocol, ok


def _service_port(item: Any, path: str, *, problems: _Problems) -> ServicePort | None:
    if not isinstance(item, dict):
        problems.add(path, f"{_show(item)} is not an object")
        return None
    name, protocol, ok = _kube_port_common(item, path, problems=problems)
    raw_port = item.get("port")
    port = _port_number(raw_port)
    if raw_port is None:
        problems.missing(f"{path}.port")
        ok = False
    elif port is None:
        problems.add(f"{path}.port", _not_a_port(raw_port))
        ok = False
    raw_target = item.get("targetPort")
    target: int | str | None
    if raw_target is None:
        target = port  # Kubernetes defaults targetPort to port
    elif isinstance(raw_target, str) and raw_target:
        target = raw_target  # the name of a container port, resolved through the EndpointSlice
    else:
        target = _port_number(raw_target)
        if target is None:
            problems.add(f"{path}.targetPort", f"{_show(raw_target)} is not a port number {_PORT_RANGE} or name")
            ok = False
    if not ok or port is None or protocol is None or target is None:
        return None
    return ServicePort(name=name, protocol=protocol, port=port, target_port=target)


# --- EndpointSlice ----------------------------------------------------------------------------


def parse_endpoint_slice(obj: Any) -> EndpointSlice | Invalid:
    """A discovery.k8s.io/v1 EndpointSlice of addressType IPv4 -> EndpointSlice, or Invalid."""
    if not isinstance(obj, dict):
        return Invalid(f"{_show(obj)} is not an object")
    problems = _Problems(separator=" ")
    key = object_key(obj)
    if key is None:
        problems.missing("metadata.name")
    address_type = obj.get("addressType")
    other_family = address_type in ("IPv6", "FQDN")
    if address_type is None:
        problems.missing("addressType")
    elif address_type != "IPv4" and not other_family:
        shown = address_type if isinstance(address_type, str) else _show(address_type)
        problems.add("addressType", f"{shown} is not supported")
    labels = _dict(_dict(obj.get("metadata")).get("labels"))
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        problems.note("metadata.labels", f"label {SERVICE_NAME_LABEL} is missing")
    if other_family and key is not None:
        # A dual-stack Service's IPv6 (or an FQDN) slice: smartnatd serves IPv4 only, and as
        # kube-proxy does it passes over the other family quietly; the IPv4 slices serve.
        return EndpointSlice(key=key, service_name=_text(service_name), ports=(), endpoints=())
    ports = _kube_ports(obj.get("ports"), problems=problems, parse=_endpoint_port)
    endpoints = _endpoints(obj.get("endpoints"), problems=problems)
    if problems or key is None:
        return problems.invalid()
    return EndpointSlice(
        key=key,
        service_name=_text(service_name),
        ports=tuple(p for p in ports if isinstance(p, EndpointPort)),
        endpoints=endpoints,
    )


def _endpoint_port(item: Any, path: str, *, problems: _Problems) -> EndpointPort | None:
    if not isinstance(item, dict):
        problems.add(path, f"{_show(item)} is not an object")
        return None
    name, protocol, ok = _kube_port_common(item, path, problems=problems)
    raw_port = item.get("port")
    if raw_port is None:
        return None  # a null port means "all ports"; nothing to DNAT to by number, so skip it
    port = _port_number(raw_port)
    if port is None:
        problems.add(f"{path}.port", _not_a_port(raw_port))
        return None
    if not ok or protocol is None:
        return None
    return EndpointPort(name=name, protocol=protocol, port=port)


def _endpoints(value: Any, *, problems: _Problems) -> tuple[Endpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add("endpoints", f"{_show(value)} is not a list")
        return ()
    endpoints: list[Endpoint] = []
    for i, item in enumerate(value):
        path = f"endpoints[{i}]"
        if not isinstance(item, dict):
            problems.add(path, f"{_show(item)} is not an object")
            continue
        raw_addresses = item.get("addresses")
        addresses: list[IPv4Address] = []
        if raw_addresses is not None and not isinstance(raw_addresses, list):
            problems.add(f"{path}.addresses", f"{_show(raw_addresses)} is not a list")
        for j, raw in enumerate(raw_addresses if isinstance(raw_addresses, list) else ()):
            parsed = _ipv4_address(raw)
            if isinstance(parsed, str):
                problems.add(f"{path}.addresses[{j}]", parsed)
            else:
                addresses.append(parsed)
        conditions = item.get("conditions")
        if conditions is not None and not isinstance(conditions, dict):
            problems.add(f"{path}.conditions", f"{_show(conditions)} is not an object")
        flags = {}
        for name in ("ready", "serving", "terminating"):
            flag = _dict(conditions).get(name)
            if flag is not None and not isinstance(flag, bool):
                problems.add(f"{path}.conditions.{name}", f"{_show(flag)} is not true or false")
            flags[name] = flag
        # Kubernetes: an unknown (null) ready condition is to be read as ready, a null serving
        # one as the ready one, a null terminating one as false.
        ready = flags["ready"] is not False
        serving = ready if flags["serving"] is None else flags["serving"] is True
        draining = not ready and serving and flags["terminating"] is True
        endpoints.append(Endpoint(addresses=tuple(addresses), ready=ready, draining=draining))
    return tuple(endpoints)


# --- dispatch ---------------------------------------------------------------------------------

_PARSERS: dict[tuple[str, str], Callable[[Any], Mapping | Service | EndpointSlice | Invalid]] = {
    (API_VERSION, KIND): parse_mapping,
    ("v1", "Service"): parse_service,
    ("discovery.k8s.io/v1", "EndpointSlice"): parse_endpoint_slice,
}


def parse_object(obj: Any) -> Mapping | Service | EndpointSlice | Invalid | None:
    """Any object, e.g. a document of a file -> its model type; None for kinds smartnatd ignores."""
    if not isinstance(obj, dict):
        return Invalid(f"{_show(obj)} is not an object")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(kind, str) or not kind:
        return Invalid("kind is missing")
    if not isinstance(api_version, str) or not api_version:
        return Invalid("apiVersion is missing")
    parser = _PARSERS.get((api_version, kind))
    if parser is not None:
        return parser(obj)
    for known_version, known_kind in _PARSERS:
        if api_version == known_version and kind.lower() == known_kind.lower():
            return Invalid(f"kind {kind} is not {known_kind} (kinds are case-sensitive)")
    if kind == KIND and api_version.partition("/")[0] == GROUP:
        return Invalid(f"apiVersion {api_version} is not supported (expected {API_VERSION})")
    return None
