"""kube/objects.py: raw API objects -> model types, with exact reason sentences."""

from __future__ import annotations

import copy
import datetime
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartnatd.kube.objects import (
    FINALIZER,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    object_key,
    parse_endpoint_slice,
    parse_mapping,
    parse_object,
    parse_service,
)
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

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def mapping_obj(**spec: Any) -> dict[str, Any]:
    """A valid Mapping object; keyword arguments replace spec fields (a value of ... removes one)."""
    base: dict[str, Any] = {
        "addresses": ["192.0.2.10"],
        "allowedSources": ["203.0.113.0/24"],
        "serviceName": "echo",
        "mode": "service",
        "ports": [{"port": 80, "protocol": "tcp", "servicePort": 8080}],
    }
    for name, value in spec.items():
        if value is ...:
            base.pop(name, None)
        else:
            base[name] = value
    return {
        "apiVersion": "smartnat.aureacentral.com/v1alpha1",
        "kind": "Mapping",
        "metadata": {"name": "web", "namespace": "ns-a"},
        "spec": base,
    }


def spec_of(obj: dict[str, Any]) -> MappingSpec:
    spec = parse_mapping(obj).spec
    assert isinstance(spec, MappingSpec), spec
    return spec


def reason_of(obj: Any) -> str:
    spec = parse_mapping(obj).spec
    assert isinstance(spec, Invalid), spec
    return spec.reason


# --- constants ---------------------------------------------------------------------------------


def test_constants_keep_smartnat_names() -> None:
    assert (GROUP, VERSION, PLURAL, KIND) == ("smartnat.aureacentral.com", "v1alpha1", "mappings", "Mapping")
    assert FINALIZER == "mapping.finalizers.aureacentral.com"


# --- Mapping: valid specs and defaults ----------------------------------------------------------


def test_valid_mapping_parses_every_field() -> None:
    obj = mapping_obj(
        addresses=["192.0.2.10", "192.0.2.11"],
        ports=[
            {"port": 80, "protocol": "tcp", "servicePort": 8080},
            {"port": 53, "protocol": "udp", "servicePort": 5353},
            {"port": 9, "protocol": "sctp", "servicePort": 9},
        ],
        mode="direct",
    )
    obj["metadata"].update(
        creationTimestamp="2024-05-01T10:00:00Z",
        generation=3,
        uid="0a1b",
        finalizers=[FINALIZER, "other/finalizer"],
    )
    assert parse_mapping(obj) == Mapping(
        key=ObjectKey("ns-a", "web"),
        spec=MappingSpec(
            addresses=(IPv4Address("192.0.2.10"), IPv4Address("192.0.2.11")),
            allowed_sources=(IPv4Network("203.0.113.0/24"),),
            service_name="echo",
            mode=Mode.DIRECT,
            ports=(MappingPort(80, TCP, 8080), MappingPort(53, UDP, 5353), MappingPort(9, SCTP, 9)),
        ),
        creation_timestamp="2024-05-01T10:00:00Z",
        generation=3,
        uid="0a1b",
        deleting=False,
        finalizers=(FINALIZER, "other/finalizer"),
    )


def test_smartnat_user_guide_example_parses() -> None:
    # The example of SmartNat's user guide: existing Mappings must keep working unchanged.
    obj = {
        "apiVersion": "smartnat.aureacentral.com/v1alpha1",
        "kind": "Mapping",
        "metadata": {"name": "mapping-sample"},
        "spec": {
            "addresses": ["10.237.94.10", "172.17.0.1"],
            "allowedSources": ["10.0.0.0/16", "192.168.1.0/24"],
            "serviceName": "echo-test-service",
            "mode": "service",
            "ports": [
                {"port": 8080},
                {"port": 8081, "servicePort": 8080},
                {"port": 8081, "servicePort": 8080, "protocol": "udp"},
            ],
        },
    }
    mapping = parse_mapping(obj)
    assert mapping.key == ObjectKey("default", "mapping-sample")
    assert mapping.spec == MappingSpec(
        addresses=(IPv4Address("10.237.94.10"), IPv4Address("172.17.0.1")),
        allowed_sources=(IPv4Network("10.0.0.0/16"), IPv4Network("192.168.1.0/24")),
        service_name="echo-test-service",
        mode=Mode.SERVICE,
        ports=(MappingPort(8080, TCP, 8080), MappingPort(8081, TCP, 8080), MappingPort(8081, UDP, 8080)),
    )


def test_smartnat_status_is_ignored() -> None:
    obj = mapping_obj()
    obj["status"] = {"invalid": "no", "serviceVIP": "10.96.0.1", "configuredAddresses": {"192.0.2.10": {}}}
    assert isinstance(parse_mapping(obj).spec, MappingSpec)


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({"name": "web", "namespace": "ns-a"}, ObjectKey("ns-a", "web")),
        ({"name": "web"}, ObjectKey("default", "web")),
        ({"name": "web", "namespace": ""}, ObjectKey("default", "web")),
        ({"name": "web", "namespace": None}, ObjectKey("default", "web")),
    ],
)
def test_namespace_defaults_to_default(metadata: dict[str, Any], key: ObjectKey) -> None:
    obj = mapping_obj()
    obj["metadata"] = metadata
    assert parse_mapping(obj).key == key


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, {"creation_timestamp": "", "generation": 0, "uid": "", "deleting": False, "finalizers": ()}),
        ({"deletionTimestamp": "2024-05-02T00:00:00Z"}, {"deleting": True}),
        ({"deletionTimestamp": None}, {"deleting": False}),
        ({"generation": 7}, {"generation": 7}),
        ({"generation": "7"}, {"generation": 0}),
        ({"generation": True}, {"generation": 0}),
        ({"uid": 5}, {"uid": ""}),
        ({"finalizers": "x"}, {"finalizers": ()}),
        ({"finalizers": ["a", 1, None, "b"]}, {"finalizers": ("a", "b")}),
        ({"creationTimestamp": None}, {"creation_timestamp": ""}),
        # The conflict order compares the text: every form becomes the API server's own.
        ({"creationTimestamp": "2024-05-01T12:00:00Z"}, {"creation_timestamp": "2024-05-01T12:00:00Z"}),
        ({"creationTimestamp": "2024-05-01T17:00:00+05:00"}, {"creation_timestamp": "2024-05-01T12:00:00Z"}),
        ({"creationTimestamp": "2024-05-01T12:00:00.75Z"}, {"creation_timestamp": "2024-05-01T12:00:00Z"}),
        # A YAML file may hold unquoted timestamps, which PyYAML turns into datetime/date.
        (
            {"creationTimestamp": datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)},
            {"creation_timestamp": "2024-05-01T12:00:00Z"},
        ),
        (
            {
                "creationTimestamp": datetime.datetime(
                    2024, 5, 1, 14, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
                )
            },
            {"creation_timestamp": "2024-05-01T12:00:00Z"},
        ),
        ({"creationTimestamp": datetime.datetime(2024, 5, 1, 12, 0)}, {"creation_timestamp": "2024-05-01T12:00:00Z"}),
        ({"creationTimestamp": datetime.date(2024, 5, 1)}, {"creation_timestamp": "2024-05-01T00:00:00Z"}),
    ],
)
def test_metadata_fields(metadata: dict[str, Any], expected: dict[str, Any]) -> None:
    obj = mapping_obj()
    obj["metadata"].update(metadata)
    mapping = parse_mapping(obj)
    assert isinstance(mapping.spec, MappingSpec)
    for name, value in expected.items():
        assert getattr(mapping, name) == value, name


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (..., ["0.0.0.0/0"]),
        (None, ["0.0.0.0/0"]),
        ([], ["0.0.0.0/0"]),
        (["10.0.0.0/8"], ["10.0.0.0/8"]),
        (["10.1.2.3"], ["10.1.2.3/32"]),  # a plain address is a /32
        (["10.1.2.3/24"], ["10.1.2.0/24"]),  # host bits set: accepted as Go's net.ParseCIDR did
        (["10.0.0.0/08"], ["10.0.0.0/8"]),
        (["192.168.0.0/24", "10.0.0.0/8"], ["10.0.0.0/8", "192.168.0.0/24"]),  # sorted
        (["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3"], ["10.0.0.0/8"]),  # covered entries collapse
        (["10.0.0.0/25", "10.0.0.128/25"], ["10.0.0.0/24"]),  # adjacent halves merge
        (["10.0.0.1", "10.0.0.1/32"], ["10.0.0.1/32"]),  # repeats are harmless
        (["0.0.0.0/0", "10.0.0.0/8"], ["0.0.0.0/0"]),
    ],
)
def test_allowed_sources_default_normalise_sort_and_collapse(sources: Any, expected: list[str]) -> None:
    spec = spec_of(mapping_obj(allowedSources=sources))
    assert spec.allowed_sources == tuple(IPv4Network(n) for n in expected)


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"port": 80}, MappingPort(80, TCP, 80)),  # protocol tcp, servicePort = port
        ({"port": 80, "protocol": None, "servicePort": None}, MappingPort(80, TCP, 80)),
        ({"port": 80, "protocol": ""}, MappingPort(80, TCP, 80)),  # SmartNat filled "" with tcp
        ({"port": 80, "protocol": "TCP"}, MappingPort(80, TCP, 80)),
        ({"port": 53, "protocol": "Udp"}, MappingPort(53, UDP, 53)),
        ({"port": 9, "protocol": "SCTP", "servicePort": 19}, MappingPort(9, SCTP, 19)),
        ({"port": 1, "servicePort": 65535}, MappingPort(1, TCP, 65535)),
        ({"port": 65535, "servicePort": 1, "unknown": "ignored"}, MappingPort(65535, TCP, 1)),
    ],
)
def test_port_defaults(port: dict[str, Any], expected: MappingPort) -> None:
    assert spec_of(mapping_obj(ports=[port])).ports == (expected,)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(..., Mode.SERVICE), (None, Mode.SERVICE), ("", Mode.SERVICE), ("service", Mode.SERVICE),
     ("Service", Mode.SERVICE), ("direct", Mode.DIRECT), ("DIRECT", Mode.DIRECT)],
)  # fmt: skip
def test_mode_defaults_to_service_and_ignores_case(mode: Any, expected: Mode) -> None:
    assert spec_of(mapping_obj(mode=mode)).mode == expected


def test_same_port_on_different_protocols_is_fine() -> None:
    ports = [{"port": 53, "protocol": "tcp"}, {"port": 53, "protocol": "udp"}, {"port": 53, "protocol": "sctp"}]
    assert len(spec_of(mapping_obj(ports=ports)).ports) == 3


@pytest.mark.parametrize("value", [12, True, "0", "garbage", "2024-13-01T00:00:00Z", ["2024-05-01T12:00:00Z"]])
def test_a_creation_time_that_is_no_time_makes_the_mapping_invalid(value: Any) -> None:
    obj = mapping_obj()
    obj["metadata"]["creationTimestamp"] = value
    assert reason_of(obj).startswith("metadata.creationTimestamp: ")
    assert reason_of(obj).endswith(" is not an RFC 3339 time")


def test_a_namespace_that_is_not_text_makes_the_mapping_invalid() -> None:
    obj = mapping_obj()
    obj["metadata"]["namespace"] = 5
    assert reason_of(obj) == "metadata.namespace: 5 is not a namespace name"


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        # Ignoring these would serve the Mapping as if the field were unset: open to everyone.
        ({"allowedSource": ["10.0.0.0/8"]}, "spec.allowedSource: unknown field; did you mean allowedSources?"),
        ({"allowed_sources": ["10.0.0.0/8"]}, "spec.allowed_sources: unknown field; did you mean allowedSources?"),
        ({"AllowedSources": ["10.0.0.0/8"]}, "spec.AllowedSources: unknown field; did you mean allowedSources?"),
        ({"servicename": "echo"}, "spec.servicename: unknown field; did you mean serviceName?"),
        ({"port": 80}, "spec.port: unknown field; did you mean ports?"),
        ({"ports": [{"port": 80, "servicPort": 8080}]}, "spec.ports[0].servicPort: unknown field; did you mean servicePort?"),
        ({"ports": [{"port": 53, "Protocol": "udp"}]}, "spec.ports[0].Protocol: unknown field; did you mean protocol?"),
    ],
)
def test_a_misspelt_field_makes_the_mapping_invalid(spec: dict[str, Any], reason: str) -> None:
    assert reason_of(mapping_obj(**spec)) == reason


def test_unknown_fields_are_ignored() -> None:
    obj = mapping_obj(futureField={"x": [1, 2]}, ports=[{"port": 80, "weight": 3}])
    obj["extra"] = "top-level"
    obj["metadata"]["annotations"] = {"a": "b"}
    assert spec_of(obj).ports == (MappingPort(80, TCP, 80),)


@pytest.mark.parametrize(
    "name",
    ["a", "echo", "echo-test-service", "a1", "a-b-c", "x" * 62],
)
def test_valid_service_names(name: str) -> None:
    assert spec_of(mapping_obj(serviceName=name)).service_name == name


# --- Mapping: one problem each ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        # addresses
        ({"addresses": ...}, "spec.addresses is missing"),
        ({"addresses": None}, "spec.addresses is missing"),
        ({"addresses": []}, "spec.addresses: at least one address is required"),
        ({"addresses": "192.0.2.10"}, 'spec.addresses: "192.0.2.10" is not a list'),
        ({"addresses": {"a": 1}}, 'spec.addresses: {"a": 1} is not a list'),
        ({"addresses": ["10.0.0.300"]}, 'spec.addresses[0]: "10.0.0.300" is not an IPv4 address'),
        (
            {"addresses": ["192.0.2.10", "2001:db8::1"]},
            'spec.addresses[1]: "2001:db8::1" is IPv6; only IPv4 is supported',
        ),
        ({"addresses": ["192.0.2.0/24"]}, 'spec.addresses[0]: "192.0.2.0/24" is not an IPv4 address'),
        ({"addresses": ["010.0.0.1"]}, 'spec.addresses[0]: "010.0.0.1" is not an IPv4 address'),
        ({"addresses": [" 10.0.0.1"]}, 'spec.addresses[0]: " 10.0.0.1" is not an IPv4 address'),
        ({"addresses": [""]}, 'spec.addresses[0]: "" is not an IPv4 address'),
        ({"addresses": [None]}, "spec.addresses[0]: null is not an IPv4 address"),
        ({"addresses": [167772161]}, "spec.addresses[0]: 167772161 is not an IPv4 address"),
        ({"addresses": [["10.0.0.1"]]}, 'spec.addresses[0]: ["10.0.0.1"] is not an IPv4 address'),
        (
            {"addresses": ["192.0.2.10", "192.0.2.11", "192.0.2.10"]},
            "spec.addresses: address 192.0.2.10 is listed twice",
        ),
        (
            {"addresses": ["192.0.2.10", "192.0.2.10", "192.0.2.10"]},
            "spec.addresses: address 192.0.2.10 is listed twice",
        ),
        # allowedSources
        ({"allowedSources": "10.0.0.0/8"}, 'spec.allowedSources: "10.0.0.0/8" is not a list'),
        (
            {"allowedSources": ["10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/33"]},
            'spec.allowedSources[2]: "10.0.0.0/33" is not an IPv4 address or CIDR',
        ),
        ({"allowedSources": ["10.0.0.0/"]}, 'spec.allowedSources[0]: "10.0.0.0/" is not an IPv4 address or CIDR'),
        ({"allowedSources": ["/8"]}, 'spec.allowedSources[0]: "/8" is not an IPv4 address or CIDR'),
        (
            # Go's ParseCIDR takes a prefix length only; Python would take a netmask.
            {"allowedSources": ["10.0.0.0/255.0.0.0"]},
            'spec.allowedSources[0]: "10.0.0.0/255.0.0.0" is not an IPv4 address or CIDR',
        ),
        ({"allowedSources": ["10.0.0.0/+8"]}, 'spec.allowedSources[0]: "10.0.0.0/+8" is not an IPv4 address or CIDR'),
        ({"allowedSources": ["any"]}, 'spec.allowedSources[0]: "any" is not an IPv4 address or CIDR'),
        ({"allowedSources": [None]}, "spec.allowedSources[0]: null is not an IPv4 address or CIDR"),
        ({"allowedSources": [8]}, "spec.allowedSources[0]: 8 is not an IPv4 address or CIDR"),
        (
            {"allowedSources": ["2001:db8::/32"]},
            'spec.allowedSources[0]: "2001:db8::/32" is IPv6; only IPv4 is supported',
        ),
        ({"allowedSources": ["::1"]}, 'spec.allowedSources[0]: "::1" is IPv6; only IPv4 is supported'),
        # serviceName
        ({"serviceName": ...}, "spec.serviceName is missing"),
        ({"serviceName": None}, "spec.serviceName is missing"),
        ({"serviceName": "My_Svc"}, 'spec.serviceName: "My_Svc" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": ""}, 'spec.serviceName: "" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": "1echo"}, 'spec.serviceName: "1echo" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": "echo-"}, 'spec.serviceName: "echo-" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": "Echo"}, 'spec.serviceName: "Echo" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": "a.b"}, 'spec.serviceName: "a.b" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": "echo\n"}, 'spec.serviceName: "echo\\n" is not a valid Service name (DNS-1035 label)'),
        ({"serviceName": 5}, "spec.serviceName: 5 is not a valid Service name (DNS-1035 label)"),
        ({"serviceName": "x" * 63}, f'spec.serviceName: "{"x" * 56}... is longer than 62 characters'),
        # mode
        ({"mode": "nodeport"}, 'spec.mode: "nodeport" is not a mode (service, direct)'),
        ({"mode": True}, "spec.mode: true is not a mode (service, direct)"),  # YAML `mode: on`
        ({"mode": ["service"]}, 'spec.mode: ["service"] is not a mode (service, direct)'),
        # ports
        ({"ports": ...}, "spec.ports is missing"),
        ({"ports": None}, "spec.ports is missing"),
        ({"ports": []}, "spec.ports: at least one port is required"),
        ({"ports": {"port": 80}}, 'spec.ports: {"port": 80} is not a list'),
        ({"ports": [80]}, "spec.ports[0]: 80 is not an object with port, protocol and servicePort"),
        ({"ports": [{"protocol": "tcp"}]}, "spec.ports[0].port is missing"),
        ({"ports": [{"port": None}]}, "spec.ports[0].port is missing"),
        ({"ports": [{"port": 80}, {"port": 0}]}, "spec.ports[1].port: 0 is not a port number (1-65535)"),
        ({"ports": [{"port": 65536}]}, "spec.ports[0].port: 65536 is not a port number (1-65535)"),
        ({"ports": [{"port": -1}]}, "spec.ports[0].port: -1 is not a port number (1-65535)"),
        ({"ports": [{"port": "80"}]}, 'spec.ports[0].port: "80" is a string, not a port number (1-65535)'),
        ({"ports": [{"port": "http"}]}, 'spec.ports[0].port: "http" is not a port number (1-65535)'),
        ({"ports": [{"port": 80.0}]}, "spec.ports[0].port: 80.0 is not a port number (1-65535)"),
        ({"ports": [{"port": True}]}, "spec.ports[0].port: true is not a port number (1-65535)"),
        ({"ports": [{"port": 80, "servicePort": 0}]}, "spec.ports[0].servicePort: 0 is not a port number (1-65535)"),
        (
            {"ports": [{"port": 80, "servicePort": "8080"}]},
            'spec.ports[0].servicePort: "8080" is a string, not a port number (1-65535)',
        ),
        (
            {"ports": [{"port": 80, "servicePort": 70000}]},
            "spec.ports[0].servicePort: 70000 is not a port number (1-65535)",
        ),
        (
            {"ports": [{"port": 80, "protocol": "icmp"}]},
            'spec.ports[0].protocol: "icmp" is not a protocol (tcp, udp, sctp)',
        ),
        ({"ports": [{"port": 80, "protocol": 6}]}, "spec.ports[0].protocol: 6 is not a protocol (tcp, udp, sctp)"),
        (
            {"ports": [{"port": 80}, {"port": 80, "protocol": "TCP", "servicePort": 81}]},
            "spec.ports: port 80/tcp is listed twice",
        ),
        (
            {"ports": [{"port": 53, "protocol": "udp"}] * 3},
            "spec.ports: port 53/udp is listed twice",
        ),
    ],
)
def test_single_problem_reason(spec: dict[str, Any], reason: str) -> None:
    assert reason_of(mapping_obj(**spec)) == reason


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"metadata": {"name": "web"}}, "spec is missing"),
        ({"metadata": {"name": "web"}, "spec": None}, "spec is missing"),
        ({"metadata": {"name": "web"}, "spec": "x"}, 'spec: "x" is not an object'),
        ({"metadata": {"name": "web"}, "spec": []}, "spec: [] is not an object"),
        (
            {"metadata": {"name": "web"}, "spec": {}},
            "spec.addresses is missing; spec.ports is missing; spec.serviceName is missing",
        ),
        ({"spec": None}, "metadata.name is missing; spec is missing"),
        ({"metadata": {"name": ""}, "spec": None}, "metadata.name is missing; spec is missing"),
        (
            {"metadata": "web", "spec": None},
            'metadata: "web" is not an object; metadata.name is missing; spec is missing',
        ),
    ],
)
def test_object_level_problems(obj: dict[str, Any], reason: str) -> None:
    assert reason_of(obj) == reason


def test_all_problems_reported_at_once_sorted_by_path() -> None:
    obj = mapping_obj(
        addresses=["10.0.0.300", "2001:db8::1"],
        allowedSources=["10.0.0.0/8", "10.0.0.0/33"],
        serviceName="My_Svc",
        mode="nodeport",
        ports=[{"port": 80}, {"port": 0, "protocol": "icmp"}, {"port": 80}],
    )
    assert reason_of(obj) == "; ".join(
        [
            'spec.addresses[0]: "10.0.0.300" is not an IPv4 address',
            'spec.addresses[1]: "2001:db8::1" is IPv6; only IPv4 is supported',
            'spec.allowedSources[1]: "10.0.0.0/33" is not an IPv4 address or CIDR',
            'spec.mode: "nodeport" is not a mode (service, direct)',
            "spec.ports: port 80/tcp is listed twice",
            "spec.ports[1].port: 0 is not a port number (1-65535)",
            'spec.ports[1].protocol: "icmp" is not a protocol (tcp, udp, sctp)',
            'spec.serviceName: "My_Svc" is not a valid Service name (DNS-1035 label)',
        ]
    )


def test_problems_sort_indices_as_numbers() -> None:
    ports = [{"port": n} for n in range(1, 12)]
    ports[2] = {"port": 0}
    ports[10] = {"port": 0}
    assert reason_of(mapping_obj(ports=ports)) == (
        "spec.ports[2].port: 0 is not a port number (1-65535); "
        "spec.ports[10].port: 0 is not a port number (1-65535)"
    )


def test_long_values_are_shortened_in_reasons() -> None:
    reason = reason_of(mapping_obj(addresses=["1" * 200]))
    assert reason == f'spec.addresses[0]: "{"1" * 56}... is not an IPv4 address'


@pytest.mark.parametrize("obj", [None, [], "Mapping", 5, [{"spec": {}}]])
def test_a_non_object_still_gives_a_mapping(obj: Any) -> None:
    mapping = parse_mapping(obj)
    assert mapping.key == ObjectKey("default", "")
    assert isinstance(mapping.spec, Invalid)
    assert mapping.spec.reason.endswith(" is not an object")


def test_invalid_mapping_keeps_its_metadata_for_status_and_finalizer() -> None:
    obj = mapping_obj(ports=[])
    obj["metadata"].update(
        uid="u1", generation=2, deletionTimestamp="2024-05-02T00:00:00Z", finalizers=[FINALIZER]
    )
    mapping = parse_mapping(obj)
    assert isinstance(mapping.spec, Invalid)
    assert (mapping.key, mapping.uid, mapping.generation, mapping.deleting, mapping.finalizers) == (
        ObjectKey("ns-a", "web"),
        "u1",
        2,
        True,
        (FINALIZER,),
    )


def test_parse_mapping_does_not_modify_its_input() -> None:
    obj = mapping_obj(ports=[{"port": 80}], allowedSources=[])
    before = copy.deepcopy(obj)
    parse_mapping(obj)
    assert obj == before


# --- Mapping: never raises ----------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**33), 2**33) | st.floats() | st.text(max_size=20)
# Strings that look like what the fields hold, so deep branches are reached, not just type errors.
near_miss_strings = st.sampled_from(
    ["192.0.2.10", "10.0.0.0/8", "10.1.2.3/24", "2001:db8::1", "::/0", "echo", "tcp", "UDP", "direct",
     "service", "80", "", "None", "0.0.0.0/0", "10.0.0.0/33", "/", "a/b/c"]
)  # fmt: skip
json_values = st.recursive(
    json_scalars | near_miss_strings,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
port_entries = st.fixed_dictionaries(
    {},
    optional={
        "port": json_values | st.integers(0, 70000),
        "protocol": json_values | st.sampled_from(["tcp", "udp", "sctp", "TCP", "icmp"]),
        "servicePort": json_values | st.integers(0, 70000),
    },
)
# Good values for each field, so that some generated specs are valid and the rest fail on a few
# fields only: both the success path and the single-problem paths get exercised.
good_fields = {
    "addresses": st.lists(st.ip_addresses(v=4, network="192.0.2.0/24").map(str), min_size=1, max_size=3, unique=True),
    "allowedSources": st.lists(
        st.ip_addresses(v=4, network="203.0.113.0/24").map(str)
        | st.sampled_from(["10.0.0.0/8", "10.1.2.3/24", "0.0.0.0/0", "198.51.100.0/25"]),
        max_size=3,
    ),
    "serviceName": st.from_regex(r"\A[a-z]([-a-z0-9]{0,8}[a-z0-9])?\Z"),
    "mode": st.sampled_from(["service", "direct", "Direct", ""]),
    "ports": st.lists(
        st.fixed_dictionaries(
            {"port": st.integers(1, 65535)},
            optional={"protocol": st.sampled_from(["tcp", "udp", "sctp", "TCP"]), "servicePort": st.integers(1, 65535)},
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda p: (p["port"], p.get("protocol", "tcp").lower()),
    ),
}
odd_fields = {
    "addresses": json_values | st.lists(json_values | near_miss_strings, max_size=4),
    "allowedSources": json_values | st.lists(json_values | near_miss_strings, max_size=4),
    "serviceName": json_values,
    "mode": json_values,
    "ports": json_values | st.lists(port_entries | json_values, max_size=4),
}
good_specs = st.fixed_dictionaries(good_fields)
one_field_off = st.builds(
    lambda spec, name, odd: {**spec, name: odd} if odd is not ... else {k: v for k, v in spec.items() if k != name},
    good_specs,
    st.sampled_from(sorted(good_fields)),
    json_values | st.just(...),
)
specs = good_specs | one_field_off | st.fixed_dictionaries({}, optional=odd_fields)
metadata_fields = {
    "name": st.just("web") | json_values,
    "namespace": st.just("ns-a") | json_values,
    "generation": json_values,
    "uid": json_values,
    "creationTimestamp": json_values,
    "deletionTimestamp": json_values,
    "finalizers": json_values,
}
metadatas = st.fixed_dictionaries(
    {"name": st.just("web")}, optional={k: v for k, v in metadata_fields.items() if k != "name"}
) | st.fixed_dictionaries({}, optional=metadata_fields)
mapping_objects = st.fixed_dictionaries(
    {"metadata": metadatas, "spec": specs},
    optional={"apiVersion": st.just("smartnat.aureacentral.com/v1alpha1"), "kind": st.just("Mapping")},
) | st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": json_values,
        "kind": json_values,
        "metadata": metadatas | json_values,
        "spec": specs | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(obj=mapping_objects | json_values)
def test_parse_mapping_never_raises_and_always_gives_a_mapping(obj: Any) -> None:
    mapping = parse_mapping(obj)
    assert isinstance(mapping, Mapping)
    assert isinstance(mapping.key, ObjectKey)
    if isinstance(mapping.spec, Invalid):
        assert mapping.spec.reason  # every failure says why
    else:
        spec = mapping.spec
        assert spec.addresses and spec.ports and spec.allowed_sources
        assert len(set(spec.addresses)) == len(spec.addresses)
        assert len({(p.port, p.protocol) for p in spec.ports}) == len(spec.ports)
        assert all(1 <= p.port <= 65535 and 1 <= p.service_port <= 65535 for p in spec.ports)
        assert list(spec.allowed_sources) == sorted(spec.allowed_sources)


kube_ports = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "name": json_values,
            "protocol": st.sampled_from(["TCP", "UDP", "SCTP"]) | json_values,
            "port": st.integers(0, 70000) | json_values,
            "targetPort": st.integers(0, 70000) | json_values,
        },
    )
    | json_values,
    max_size=3,
)
kube_objects = st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": st.sampled_from(["v1", "discovery.k8s.io/v1", "smartnat.aureacentral.com/v1alpha1"]),
        "kind": st.sampled_from(["Service", "EndpointSlice", "Mapping", "List", "Pod"]) | json_values,
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": st.just("x") | json_values,
                "labels": st.just({"kubernetes.io/service-name": "x"}) | json_values,
            },
        )
        | json_values,
        "spec": st.fixed_dictionaries({}, optional={"clusterIP": json_values, "ports": kube_ports | json_values})
        | json_values,
        "addressType": st.sampled_from(["IPv4", "IPv6", "FQDN"]) | json_values,
        "ports": kube_ports | json_values,
        "endpoints": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "addresses": st.lists(near_miss_strings | json_values, max_size=3) | json_values,
                    "conditions": st.fixed_dictionaries({}, optional={"ready": json_values}) | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(obj=kube_objects | json_values)
def test_other_parsers_never_raise(obj: Any) -> None:
    for parse in (parse_service, parse_endpoint_slice):
        result = parse(obj)
        assert isinstance(result, (Service, EndpointSlice, Invalid))
        if isinstance(result, Invalid):
            assert result.reason
    assert isinstance(parse_object(obj), (Mapping, Service, EndpointSlice, Invalid, type(None)))


# --- Service ------------------------------------------------------------------------------------


def service_obj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
    }
    for name, value in spec.items():
        if value is ...:
            base.pop(name, None)
        else:
            base[name] = value
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "demo"}, "spec": base}


@pytest.mark.parametrize(
    ("spec", "cluster_ip", "why"),
    [
        ({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.11"]}, "10.96.0.11", ""),  # dual-stack
        ({"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11", "fd00::10"]}, "10.96.0.11", ""),
        ({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"]}, None, "IPv6"),
        ({"clusterIP": "fd00::10"}, None, "IPv6"),
        ({"type": "ExternalName", "externalName": "db.example.com", "clusterIP": ...}, None, "ExternalName"),
        ({"clusterIP": "None"}, None, ""),  # headless
    ],
)
def test_service_cluster_ip_families(spec: dict[str, Any], cluster_ip: str | None, why: str) -> None:
    parsed = parse_service(service_obj(**spec))
    assert isinstance(parsed, Service)
    assert (parsed.cluster_ip, parsed.no_cluster_ip) == (IPv4Address(cluster_ip) if cluster_ip else None, why)


def test_service_parses() -> None:
    obj = service_obj(
        ports=[
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
            {"name": "dns", "protocol": "UDP", "port": 5353, "targetPort": "dns-port"},
        ]
    )
    assert parse_service(obj) == Service(
        key=ObjectKey("demo", "echo"),
        cluster_ip=IPv4Address("10.96.0.10"),
        ports=(ServicePort("http", TCP, 80, 8080), ServicePort("dns", UDP, 5353, "dns-port")),
    )


@pytest.mark.parametrize(("cluster_ip", "expected"), [("None", None), (..., None), (None, None), ("", None),
                                                     ("10.96.0.1", IPv4Address("10.96.0.1"))])  # fmt: skip
def test_service_cluster_ip(cluster_ip: Any, expected: IPv4Address | None) -> None:
    service = parse_service(service_obj(clusterIP=cluster_ip))
    assert isinstance(service, Service)
    assert service.cluster_ip == expected


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"port": 80}, ServicePort("", TCP, 80, 80)),  # name "", TCP, targetPort = port
        ({"port": 80, "name": None, "protocol": None, "targetPort": None}, ServicePort("", TCP, 80, 80)),
        ({"port": 53, "protocol": "UDP", "targetPort": 5353}, ServicePort("", UDP, 53, 5353)),
        ({"port": 9, "protocol": "sctp"}, ServicePort("", SCTP, 9, 9)),
        ({"port": 80, "name": "web", "targetPort": "http"}, ServicePort("web", TCP, 80, "http")),
    ],
)
def test_service_port_defaults(port: dict[str, Any], expected: ServicePort) -> None:
    service = parse_service(service_obj(ports=[port]))
    assert isinstance(service, Service)
    assert service.ports == (expected,)


def test_service_without_ports_or_spec() -> None:
    assert parse_service(service_obj(ports=...)) == Service(ObjectKey("demo", "echo"), IPv4Address("10.96.0.10"), ())
    no_spec = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}
    assert parse_service(no_spec) == Service(ObjectKey("default", "x"), None, ())


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (service_obj(clusterIP="abc"), 'clusterIP "abc" is not an IPv4 address'),
        (service_obj(clusterIP="10.96.0.300"), 'clusterIP "10.96.0.300" is not an IPv4 address'),
        (service_obj(clusterIP=5), "clusterIP 5 is not an IPv4 address"),
        (service_obj(ports="80"), 'ports "80" is not a list'),
        (service_obj(ports=[80]), "ports[0] 80 is not an object"),
        (service_obj(ports=[{"name": "a"}]), "ports[0].port is missing"),
        (service_obj(ports=[{"port": 0}]), "ports[0].port 0 is not a port number (1-65535)"),
        (service_obj(ports=[{"port": "80"}]), 'ports[0].port "80" is a string, not a port number (1-65535)'),
        (service_obj(ports=[{"port": 80, "protocol": "ICMP"}]),
         'ports[0].protocol "ICMP" is not a protocol (tcp, udp, sctp)'),
        (service_obj(ports=[{"port": 80, "name": 3}]), "ports[0].name 3 is not a port name"),
        (
            service_obj(ports=[{"port": 80, "targetPort": 0}]),
            "ports[0].targetPort 0 is not a port number (1-65535) or name",
        ),
        (
            service_obj(ports=[{"port": 80, "targetPort": ""}]),
            'ports[0].targetPort "" is not a port number (1-65535) or name',
        ),
        (service_obj(clusterIP="x", ports=[{"port": 0}]),
         'clusterIP "x" is not an IPv4 address; ports[0].port 0 is not a port number (1-65535)'),
        ({"apiVersion": "v1", "kind": "Service", "spec": {}}, "metadata.name is missing"),
        ({"metadata": {"name": "x"}, "spec": "y"}, 'spec "y" is not an object'),
        ("Service", '"Service" is not an object'),
    ],
)  # fmt: skip
def test_service_problems(obj: Any, reason: str) -> None:
    assert parse_service(obj) == Invalid(reason)


# --- EndpointSlice ------------------------------------------------------------------------------


def slice_obj(**fields: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "echo-abc12", "namespace": "demo", "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}}],
    }
    for name, value in fields.items():
        if value is ...:
            obj.pop(name, None)
        else:
            obj[name] = value
    return obj


def test_endpoint_slice_parses() -> None:
    obj = slice_obj(
        ports=[{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "dns", "protocol": "UDP", "port": 8080}],
        endpoints=[
            {"addresses": ["10.244.1.2"], "conditions": {"ready": True}, "nodeName": "n1"},
            {"addresses": ["10.244.2.2"], "conditions": {"ready": False, "serving": True}},
        ],
    )
    assert parse_endpoint_slice(obj) == EndpointSlice(
        key=ObjectKey("demo", "echo-abc12"),
        service_name="echo",
        ports=(EndpointPort("http", TCP, 8080), EndpointPort("dns", UDP, 8080)),
        endpoints=(
            Endpoint((IPv4Address("10.244.1.2"),), ready=True),
            Endpoint((IPv4Address("10.244.2.2"),), ready=False),
        ),
    )


@pytest.mark.parametrize(
    ("endpoint", "ready"),
    [
        ({"addresses": ["10.244.1.2"], "conditions": {"ready": True}}, True),
        ({"addresses": ["10.244.1.2"], "conditions": {"ready": False}}, False),
        # Kubernetes: a missing/null ready condition means ready.
        ({"addresses": ["10.244.1.2"], "conditions": {"ready": None}}, True),
        ({"addresses": ["10.244.1.2"], "conditions": {}}, True),
        ({"addresses": ["10.244.1.2"], "conditions": None}, True),
        ({"addresses": ["10.244.1.2"]}, True),
    ],
)
def test_endpoint_ready_defaults_to_true(endpoint: dict[str, Any], ready: bool) -> None:
    parsed = parse_endpoint_slice(slice_obj(endpoints=[endpoint]))
    assert isinstance(parsed, EndpointSlice)
    assert parsed.endpoints == (Endpoint((IPv4Address("10.244.1.2"),), ready=ready),)


@pytest.mark.parametrize(
    ("conditions", "ready", "draining"),
    [
        ({"ready": False, "serving": True, "terminating": True}, False, True),  # drains
        ({"ready": False, "serving": False, "terminating": True}, False, False),  # gone from service
        ({"ready": False, "terminating": True}, False, False),  # serving null: as ready
        ({"ready": False, "serving": True}, False, False),  # not terminating: just not ready
        ({"ready": True, "serving": True, "terminating": False}, True, False),
    ],
)
def test_a_terminating_endpoint_that_still_serves_is_draining(
    conditions: dict[str, Any], ready: bool, draining: bool
) -> None:
    parsed = parse_endpoint_slice(slice_obj(endpoints=[{"addresses": ["10.244.1.2"], "conditions": conditions}]))
    assert isinstance(parsed, EndpointSlice)
    assert parsed.endpoints == (Endpoint((IPv4Address("10.244.1.2"),), ready=ready, draining=draining),)


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ([{"name": None, "protocol": "TCP", "port": 8080}], (EndpointPort("", TCP, 8080),)),
        ([{"port": 8080}], (EndpointPort("", TCP, 8080),)),
        ([{"name": "all", "protocol": "TCP", "port": None}], ()),  # a null port is skipped
        ([{"name": "all"}, {"name": "dns", "protocol": "UDP", "port": 53}], (EndpointPort("dns", UDP, 53),)),
        (None, ()),
        ([], ()),
    ],
)
def test_endpoint_slice_ports(ports: Any, expected: tuple[EndpointPort, ...]) -> None:
    parsed = parse_endpoint_slice(slice_obj(ports=ports))
    assert isinstance(parsed, EndpointSlice)
    assert parsed.ports == expected


def test_endpoint_slice_without_endpoints() -> None:
    for endpoints in (None, [], ...):
        parsed = parse_endpoint_slice(slice_obj(endpoints=endpoints))
        assert isinstance(parsed, EndpointSlice)
        assert parsed.endpoints == ()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"addressType": "IPv5"}, "addressType IPv5 is not supported"),
        ({"addressType": 4}, "addressType 4 is not supported"),
        ({"addressType": ...}, "addressType is missing"),
        ({"metadata": {"name": "echo-abc12"}}, "label kubernetes.io/service-name is missing"),
        (
            {"metadata": {"name": "s", "labels": {"kubernetes.io/service-name": ""}}},
            "label kubernetes.io/service-name is missing",
        ),
        ({"metadata": {"labels": {"kubernetes.io/service-name": "echo"}}}, "metadata.name is missing"),
        ({"ports": [{"port": 0}]}, "ports[0].port 0 is not a port number (1-65535)"),
        ({"ports": [{"port": 80, "protocol": "GRE"}]}, 'ports[0].protocol "GRE" is not a protocol (tcp, udp, sctp)'),
        ({"ports": {"port": 80}}, 'ports {"port": 80} is not a list'),
        ({"endpoints": "x"}, 'endpoints "x" is not a list'),
        ({"endpoints": [5]}, "endpoints[0] 5 is not an object"),
        ({"endpoints": [{"addresses": ["10.0.0.256"]}]},
         'endpoints[0].addresses[0] "10.0.0.256" is not an IPv4 address'),
        ({"endpoints": [{"addresses": "10.0.0.1"}]}, 'endpoints[0].addresses "10.0.0.1" is not a list'),
        ({"endpoints": [{"addresses": [], "conditions": {"ready": "yes"}}]},
         'endpoints[0].conditions.ready "yes" is not true or false'),
        ({"endpoints": [{"addresses": [], "conditions": []}]}, "endpoints[0].conditions [] is not an object"),
        (
            {"addressType": "IPv5", "metadata": {"name": "s"}},
            "addressType IPv5 is not supported; label kubernetes.io/service-name is missing",
        ),
    ],
)  # fmt: skip
def test_endpoint_slice_problems(fields: dict[str, Any], reason: str) -> None:
    assert parse_endpoint_slice(slice_obj(**fields)) == Invalid(reason)


@pytest.mark.parametrize("family", ["IPv6", "FQDN"])
def test_a_slice_of_another_family_is_passed_over_quietly(family: str) -> None:
    # A dual-stack Service's IPv6 slice: no problem to log on every churn, nothing to serve.
    endpoints = [{"addresses": ["fd00::1" if family == "IPv6" else "db.example.com"], "conditions": {"ready": True}}]
    parsed = parse_endpoint_slice(slice_obj(addressType=family, endpoints=endpoints))
    assert isinstance(parsed, EndpointSlice)
    assert (parsed.ports, parsed.endpoints) == ((), ())


# --- dispatch and keys ----------------------------------------------------------------------------


def test_parse_object_dispatches_on_api_version_and_kind() -> None:
    assert isinstance(parse_object(mapping_obj()), Mapping)
    assert isinstance(parse_object(service_obj()), Service)
    assert isinstance(parse_object(slice_obj()), EndpointSlice)


@pytest.mark.parametrize(
    "obj",
    [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "echo"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"}},
        {"apiVersion": "example.com/v1", "kind": "Mapping", "metadata": {"name": "other-groups-mapping"}},
        {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "knative"}},
    ],
)
def test_parse_object_ignores_other_kinds(obj: dict[str, Any]) -> None:
    assert parse_object(obj) is None


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"apiVersion": "v1", "metadata": {"name": "x"}}, "kind is missing"),
        ({"kind": "Service", "metadata": {"name": "x"}}, "apiVersion is missing"),
        (
            {"apiVersion": "smartnat.aureacentral.com/v1", "kind": "Mapping"},
            "apiVersion smartnat.aureacentral.com/v1 is not supported (expected smartnat.aureacentral.com/v1alpha1)",
        ),
        (["a"], '["a"] is not an object'),
        (None, "null is not an object"),
    ],
)
def test_parse_object_problems(obj: Any, reason: str) -> None:
    assert parse_object(obj) == Invalid(reason)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({**mapping_obj(), "kind": "mapping"}, "kind mapping is not Mapping (kinds are case-sensitive)"),
        ({"apiVersion": "v1", "kind": "service"}, "kind service is not Service (kinds are case-sensitive)"),
    ],
)
def test_a_kind_in_the_wrong_case_is_a_problem_not_skipped(obj: Any, reason: str) -> None:
    assert parse_object(obj) == Invalid(reason)


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        ({"metadata": {"name": "a", "namespace": "b"}}, ObjectKey("b", "a")),
        ({"metadata": {"name": "a"}}, ObjectKey("default", "a")),
        ({"metadata": {"name": ""}}, None),
        ({"metadata": {"name": 5}}, None),
        ({"metadata": "x"}, None),
        ({}, None),
        ("x", None),
    ],
)
def test_object_key(obj: Any, key: ObjectKey | None) -> None:
    assert object_key(obj) == key



def test_a_huge_value_is_shown_without_walking_all_of_it() -> None:
    # YAML aliases make a few lines into 10^10 list items; only the start is ever shown.
    bomb: Any = ["x"] * 10
    for _ in range(9):
        bomb = [bomb] * 10
    reason = reason_of(mapping_obj(addresses=bomb))
    assert reason.startswith('spec.addresses[0]: [[[[[[[[["x", "x"')
    assert reason.count("...") == reason.count("is not an IPv4 address") == 10
    looped: list[Any] = []
    looped.append(looped)
    assert reason_of(mapping_obj(addresses=looped)).startswith("spec.addresses[0]: [[[[")
