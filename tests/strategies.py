"""Hypothesis strategies built from the model types (documentation address ranges only)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

from hypothesis import strategies as st

from smartnatd.model import Invalid, Mapping, MappingPort, MappingSpec, Mode, ObjectKey, Protocol, Snapshot
from tests.builders import HOST, endpoint_slice, service

# A few local addresses (on HOST) and one that is not, so collisions and non-local cases happen.
ADDRESSES = st.sampled_from(["192.0.2.10", "192.0.2.11", "198.51.100.10", "203.0.113.99"]).map(IPv4Address)
NAMESPACES = st.sampled_from(["ns-a", "ns-b", "ns-c"])
NAMES = st.sampled_from(["web", "api", "dns", "db", "mail", "ftp"])
TIMESTAMPS = st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z", ""])
SOURCES = st.lists(
    st.sampled_from(["0.0.0.0/0", "203.0.113.0/28", "203.0.113.10/32", "198.51.100.0/24"]).map(IPv4Network),
    min_size=1,
    max_size=2,
    unique=True,
).map(lambda xs: tuple(sorted(xs)))


@st.composite
def mapping_specs(
    draw: st.DrawFn, addresses: st.SearchStrategy[IPv4Address] = ADDRESSES, service_names: tuple[str, ...] = ("web", "missing")
) -> MappingSpec:
    ports = draw(
        st.lists(
            st.tuples(st.sampled_from([80, 443, 53]), st.sampled_from(list(Protocol))),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    return MappingSpec(
        addresses=tuple(draw(st.lists(addresses, min_size=1, max_size=2, unique=True))),
        allowed_sources=draw(SOURCES),
        service_name=draw(st.sampled_from(service_names)),
        mode=draw(st.sampled_from(list(Mode))),
        ports=tuple(MappingPort(p, proto, 80 if proto == Protocol.TCP else 53) for p, proto in ports),
    )


@st.composite
def mappings(draw: st.DrawFn) -> Mapping:
    spec = draw(st.one_of(mapping_specs(), st.just(Invalid("spec.mode: \"x\" is not a mode (service, direct)"))))
    return Mapping(
        key=ObjectKey(draw(NAMESPACES), draw(NAMES)),
        spec=spec,
        creation_timestamp=draw(TIMESTAMPS),
        deleting=draw(st.integers(0, 9)) == 0,
    )


def unique_by_key(ms: list[Mapping]) -> list[Mapping]:
    seen: dict[ObjectKey, Mapping] = {}
    for m in ms:
        seen.setdefault(m.key, m)
    return list(seen.values())


MAPPING_LISTS = st.lists(mappings(), max_size=12).map(unique_by_key)

# Mostly valid Mappings of an existing Service on three addresses, one of them not on HOST:
# many claim the same endpoints, so conflicts, chains of them (A blocks B, B blocks C) and NotLocal claimants are
# common rather than rare.
CONTESTED_ADDRESSES = st.sampled_from(["192.0.2.10", "198.51.100.10", "203.0.113.99"]).map(IPv4Address)


@st.composite
def contested_mappings(draw: st.DrawFn) -> Mapping:
    invalid = draw(st.sampled_from([False] * 5 + [True]))
    spec = Invalid("spec.mode: \"x\" is not a mode (service, direct)") if invalid else draw(mapping_specs(CONTESTED_ADDRESSES, ("web", "web", "web", "missing")))
    return Mapping(
        key=ObjectKey(draw(NAMESPACES), draw(NAMES)),
        spec=spec,
        creation_timestamp=draw(TIMESTAMPS),
        deleting=draw(st.sampled_from([False] * 7 + [True])),
    )


CONTESTED_MAPPING_LISTS = st.lists(contested_mappings(), min_size=1, max_size=12).map(unique_by_key)

SERVICES = tuple(
    service(namespace=ns, ports=(("http", "tcp", 80, 8080), ("dns", "udp", 53, 5353), ("s", "sctp", 80, 9000)))
    for ns in ("ns-a", "ns-b", "ns-c")
)
SLICES = tuple(
    endpoint_slice(namespace=ns, ports=(("http", "tcp", 8080), ("dns", "udp", 5353), ("s", "sctp", 9000)))
    for ns in ("ns-a", "ns-b")
)


# HOST with the addresses discovery finds on the box's other interfaces; one of them is also
# an endpoint of SLICES (a hand-written EndpointSlice naming the box), which is refused.
BOX = dataclasses.replace(HOST, local_addresses=frozenset(map(IPv4Address, ("10.10.0.2", "127.0.0.1", "10.244.2.2"))))


def snapshot_of(ms: list[Mapping]) -> Snapshot:
    return Snapshot(mappings=tuple(ms), services=SERVICES, endpoint_slices=SLICES, host=BOX)
