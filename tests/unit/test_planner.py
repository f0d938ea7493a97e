"""The planner's decisions, one behaviour per test."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

import pytest

from smartnatd.desired import Target
from smartnatd.model import Snapshot
from smartnatd.planner import VerdictKind, gateway_of, plan
from tests.builders import HOST, SETTINGS, endpoint_slice, host, mapping, service


def snap(*mappings, services=(), slices=(), h=HOST) -> Snapshot:
    return Snapshot(mappings=tuple(mappings), services=tuple(services), endpoint_slices=tuple(slices), host=h)


def test_service_mode_dnats_local_address_to_cluster_ip():
    p = plan(snap(mapping("a"), services=[service()]), SETTINGS)
    (v,) = p.verdicts
    assert v.kind == VerdictKind.CONFIGURED
    assert v.reason == "serving 192.0.2.10:80/tcp"
    (d,) = p.desired.dnats
    assert d.targets == (Target(IPv4Address("10.96.0.10"), 80),)
    assert d.interface == "ext1"


def test_port_translation_uses_service_port():
    svc = service(ports=(("http", "tcp", 8000, 8080),))
    p = plan(snap(mapping("a", ports=((80, "tcp", 8000),)), services=[svc]), SETTINGS)
    (d,) = p.desired.dnats
    assert d.external.port == 80 and d.targets[0].port == 8000


def test_direct_mode_spreads_over_ready_endpoints_with_resolved_target_port():
    p = plan(
        snap(
            mapping("a", mode="direct"),
            services=[service()],
            slices=[endpoint_slice(not_ready=("10.244.3.2",))],
        ),
        SETTINGS,
    )
    (d,) = p.desired.dnats
    assert [str(t) for t in d.targets] == ["10.244.1.2:8080", "10.244.2.2:8080"]
    assert [str(ip) for ip in p.verdicts[0].pod_ips] == ["10.244.1.2", "10.244.2.2"]


def test_direct_mode_resolves_named_target_port_per_slice():
    svc = service(ports=(("http", "tcp", 80, "web-port"),))
    slices = [
        endpoint_slice(name="web-1", ready=("10.244.1.2",), ports=(("http", "tcp", 8080),)),
        endpoint_slice(name="web-2", ready=("10.244.2.2",), ports=(("http", "tcp", 9090),)),
    ]
    p = plan(snap(mapping("a", mode="direct"), services=[svc], slices=slices), SETTINGS)
    assert [str(t) for t in p.desired.dnats[0].targets] == ["10.244.1.2:8080", "10.244.2.2:9090"]


def test_direct_mode_without_ready_endpoints_waits():
    p = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=())]), SETTINGS)
    (v,) = p.verdicts
    assert v.kind == VerdictKind.WAITING
    assert v.event_reason == "NoReadyEndpoints"
    assert p.desired.dnats == ()


def test_missing_service_waits_with_precise_reason():
    (v,) = plan(snap(mapping("a", service="nope")), SETTINGS).verdicts
    assert (v.kind, v.reason, v.event_reason) == (
        VerdictKind.WAITING,
        "Service default/nope not found",
        "ServiceNotFound",
    )


def test_missing_service_port_waits():
    (v,) = plan(snap(mapping("a", ports=((80, "udp", 80),)), services=[service()]), SETTINGS).verdicts
    assert v.kind == VerdictKind.WAITING
    assert v.reason == "Service default/web has no port 80/UDP (spec.ports servicePort)"


def test_address_not_on_this_box_is_not_an_error_and_serves_nothing():
    p = plan(snap(mapping("a", addresses=("203.0.113.99",)), services=[service()]), SETTINGS)
    (v,) = p.verdicts
    assert v.kind == VerdictKind.NOT_LOCAL and v.ok
    assert p.desired.dnats == ()


def test_every_local_address_of_a_mapping_is_served():
    m = mapping("a", addresses=("192.0.2.10", "198.51.100.10", "203.0.113.99"))
    p = plan(snap(m, services=[service()]), SETTINGS)
    assert [(str(d.external.address), d.interface) for d in p.desired.dnats] == [
        ("192.0.2.10", "ext1"),
        ("198.51.100.10", "ext2"),
    ]


def test_conflict_oldest_wins_and_loser_names_winner():
    old = mapping("old", namespace="ns-a", created="2026-01-01T00:00:00Z")
    new = mapping("new", namespace="ns-b", created="2026-02-01T00:00:00Z", service="web")
    p = plan(
        snap(new, old, services=[service(namespace="ns-a"), service(namespace="ns-b")]),
        SETTINGS,
    )
    verdicts = {str(v.key): v for v in p.verdicts}
    assert verdicts["ns-a/old"].kind == VerdictKind.CONFIGURED
    assert verdicts["ns-b/new"].kind == VerdictKind.CONFLICT
    assert verdicts["ns-b/new"].reason == "port 80/TCP on 192.0.2.10 is already mapped by ns-a/old"
    assert [str(d.owner) for d in p.desired.dnats] == ["ns-a/old"]


def test_conflict_tie_on_timestamp_breaks_by_namespace_then_name():
    a = mapping("b", namespace="x")
    b = mapping("a", namespace="x")
    p = plan(snap(a, b, services=[service(namespace="x")]), SETTINGS)
    assert {str(v.key): v.kind for v in p.verdicts} == {"x/a": VerdictKind.CONFIGURED, "x/b": VerdictKind.CONFLICT}


def test_conflicts_are_cluster_wide_even_for_addresses_not_on_this_box():
    old = mapping("old", addresses=("203.0.113.99",), created="2026-01-01T00:00:00Z")
    new = mapping("new", addresses=("203.0.113.99", "192.0.2.10"), created="2026-03-01T00:00:00Z")
    p = plan(snap(old, new, services=[service()]), SETTINGS)
    assert p.verdict(new.key).kind == VerdictKind.CONFLICT
    assert p.desired.dnats == ()


def test_invalid_mapping_does_not_claim_and_others_work():
    bad = mapping("bad", invalid="spec.ports[0].port: 0 is not a port number (1-65535)", created="2020-01-01T00:00:00Z")
    good = mapping("good")
    p = plan(snap(bad, good, services=[service()]), SETTINGS)
    assert p.verdict(bad.key).kind == VerdictKind.INVALID
    assert p.verdict(bad.key).reason.startswith("spec.ports[0].port")
    assert p.verdict(good.key).kind == VerdictKind.CONFIGURED


def test_too_many_ports_is_invalid():
    settings = dataclasses.replace(SETTINGS, max_ports_per_mapping=2)
    m = mapping("a", ports=((1, "tcp", 80), (2, "tcp", 80), (3, "tcp", 80)))
    (v,) = plan(snap(m, services=[service()]), settings).verdicts
    assert v.kind == VerdictKind.INVALID
    assert v.reason == "spec.ports: 3 ports exceed SNCTRLR_MAX_PORTS_PER_MAPPING=2"


def test_deleting_mapping_serves_nothing_and_frees_its_endpoints():
    old = mapping("old", created="2026-01-01T00:00:00Z", deleting=True)
    new = mapping("new", created="2026-02-01T00:00:00Z")
    p = plan(snap(old, new, services=[service()]), SETTINGS)
    assert p.verdict(old.key).kind == VerdictKind.DELETING
    assert p.verdict(new.key).kind == VerdictKind.CONFIGURED


def test_headless_service_in_service_mode_waits():
    (v,) = plan(snap(mapping("a"), services=[service(cluster_ip=None)]), SETTINGS).verdicts
    assert v.kind == VerdictKind.WAITING and v.event_reason == "ServiceHasNoClusterIP"


def test_an_ipv6_only_service_in_service_mode_says_so():
    svc = dataclasses.replace(service(cluster_ip=None), no_cluster_ip="IPv6")
    (v,) = plan(snap(mapping("a"), services=[svc]), SETTINGS).verdicts
    assert (v.kind, v.reason) == (VerdictKind.WAITING, "Service default/web has only an IPv6 ClusterIP; use mode: direct")


@pytest.mark.parametrize("mode", ["service", "direct"])
def test_an_external_name_service_cannot_be_served_in_either_mode(mode):
    svc = dataclasses.replace(service(cluster_ip=None), no_cluster_ip="ExternalName")
    (v,) = plan(snap(mapping("a", mode=mode), services=[svc], slices=[endpoint_slice()]), SETTINGS).verdicts
    assert (v.kind, v.event_reason) == (VerdictKind.WAITING, "ServiceIsExternalName")
    assert v.reason == (
        "Service default/web is of type ExternalName (a DNS name, no ClusterIP or endpoints); smartnatd cannot serve it"
    )


def test_return_paths_per_interface_with_gateway_offset():
    p = plan(snap(), SETTINGS)
    paths = {r.interface: r for r in p.desired.return_paths}
    assert str(paths["ext1"].gateway) == "192.0.2.1"
    assert paths["ext1"].mark == 3 << 16 and paths["ext1"].table == SETTINGS.route_table_base + 3
    assert str(paths["ext2"].gateway) == "198.51.100.1"


def test_gateway_offset_negative_counts_from_broadcast():
    from ipaddress import IPv4Interface

    assert str(gateway_of(IPv4Interface("10.10.10.10/24"), -1)) == "10.10.10.254"
    assert str(gateway_of(IPv4Interface("10.10.10.10/24"), 1)) == "10.10.10.1"


def test_terminating_pods_that_still_serve_drain_while_others_are_ready():
    p = plan(
        snap(mapping("a", mode="direct"), services=[service()],
             slices=[endpoint_slice(ready=("10.244.2.2",), draining=("10.244.1.2",))]),
        SETTINGS,
    )
    (d,) = p.desired.dnats
    assert [str(t.address) for t in d.targets] == ["10.244.2.2"]
    assert [str(t.address) for t in d.draining] == ["10.244.1.2"]
    assert [str(ip) for ip in p.verdicts[0].pod_ips] == ["10.244.2.2"]


def test_terminating_pods_that_still_serve_take_new_connections_when_none_is_ready():
    # kube-proxy's fallback: better a terminating pod than no answer.
    p = plan(
        snap(mapping("a", mode="direct"), services=[service()],
             slices=[endpoint_slice(ready=(), draining=("10.244.1.2",), not_ready=("10.244.2.2",))]),
        SETTINGS,
    )
    (d,) = p.desired.dnats
    assert ([str(t.address) for t in d.targets], d.draining) == (["10.244.1.2"], ())


def test_forwarding_off_is_a_host_problem():
    off = dataclasses.replace(HOST, forwarding=False)
    p = plan(snap(mapping("a"), services=[service()], h=off), SETTINGS)
    assert p.host_problems == (
        "net.ipv4.ip_forward is 0: this box forwards nothing, so no Mapping is reachable; "
        "set it to 1 (etc/sysctl.d/90-smartnat.conf)",
    )
    for known in (True, None):
        assert plan(snap(h=dataclasses.replace(HOST, forwarding=known)), SETTINGS).host_problems == ()


def test_a_slash_31_link_uses_the_other_address_as_its_gateway():
    # RFC 3021: both addresses of a /31 are hosts; the other one is the router, whatever the offset.
    from ipaddress import IPv4Interface

    assert str(gateway_of(IPv4Interface("192.0.2.0/31"), 1)) == "192.0.2.1"
    assert str(gateway_of(IPv4Interface("192.0.2.1/31"), -1)) == "192.0.2.0"
    p = plan(snap(mapping("a", addresses=("192.0.2.0",)), services=[service()], h=host(("ext1", 3, ["192.0.2.0/31"]))), SETTINGS)
    assert [(r.interface, str(r.gateway)) for r in p.desired.return_paths] == [("ext1", "192.0.2.1")]
    assert p.host_problems == ()


def test_an_offset_that_names_the_box_itself_is_a_host_problem():
    p = plan(snap(h=host(("ext1", 3, ["192.0.2.1/24"]))), SETTINGS)
    assert p.desired.return_paths == ()
    assert p.host_problems == (
        "interface ext1: SNCTRLR_GW_ADDRESS_OFFSET=1 gives this box's own address 192.0.2.1 as the gateway; "
        "its addresses are not served",
    )


def test_unusable_gateway_offset_is_a_host_problem():
    settings = dataclasses.replace(SETTINGS, gw_address_offset=300)
    p = plan(snap(mapping("a"), services=[service()]), settings)
    assert p.desired.return_paths == ()
    assert any("SNCTRLR_GW_ADDRESS_OFFSET=300" in h for h in p.host_problems)
    assert p.verdicts[0].kind == VerdictKind.NOT_LOCAL


def test_snat_gives_backends_the_mappings_first_served_address():
    settings = dataclasses.replace(SETTINGS, setup_snat=True)
    p = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice()]), settings)
    assert [(str(e.source), str(e.to), e.interface) for e in p.desired.egress] == [
        ("10.244.1.2", "192.0.2.10", "ext1"),
        ("10.244.2.2", "192.0.2.10", "ext1"),
    ]
    assert plan(snap(mapping("a"), services=[service()], slices=[endpoint_slice()]), SETTINGS).desired.egress == ()


def test_managed_addresses_are_all_external_addresses():
    p = plan(snap(), SETTINGS)
    assert [str(a) for a in p.desired.managed_addresses] == ["192.0.2.10", "192.0.2.11", "198.51.100.10"]
    assert p.desired.external_interfaces == ("ext1", "ext2")


def test_empty_host_serves_nothing_and_says_no_interface_matched():
    p = plan(snap(mapping("a"), services=[service()], h=host()), SETTINGS)
    assert p.desired.dnats == () and p.verdicts[0].kind == VerdictKind.NOT_LOCAL
    # Valid settings that fit no interface (an image whose NICs are ens5, not eth1) must not
    # pass for a quiet box.
    assert p.host_problems == (
        f"no interface matches SNCTRLR_INTERFACES_PATTERN={SETTINGS.interfaces_pattern} (besides "
        f"SNCTRLR_DEFAULT_GW_INTERFACE={SETTINGS.default_gw_interface}); no address of this box is served",
    )
    assert plan(snap(mapping("a"), services=[service()]), SETTINGS).host_problems == ()


def test_offset_beyond_the_address_space_is_a_host_problem_not_a_crash():
    settings = dataclasses.replace(SETTINGS, gw_address_offset=2**31 - 1)
    p = plan(snap(h=host(("ext1", 3, ["200.0.0.10/24"]))), settings)
    assert p.desired.return_paths == () and p.host_problems


def test_down_interface_is_not_served_and_reported():
    from smartnatd.model import Host

    down = Host(interfaces=tuple(dataclasses.replace(i, up=(i.name != "ext2")) for i in HOST.interfaces))
    p = plan(snap(mapping("a", addresses=("198.51.100.10",)), services=[service()], h=down), SETTINGS)
    assert [r.interface for r in p.desired.return_paths] == ["ext1"]
    assert p.verdicts[0].kind == VerdictKind.NOT_LOCAL
    assert any("ext2 is down" in h for h in p.host_problems)


# --- targets that are never DNATed to: this box's own addresses, and never-a-pod ranges ---

# HOST, plus what discovery finds on the box's other interfaces: its cluster-side address
# (eth0) and loopback.
BOX = dataclasses.replace(HOST, local_addresses=frozenset(map(IPv4Address, ("10.10.0.2", "127.0.0.1"))))


def test_an_endpoint_that_is_an_address_of_this_box_is_refused_and_not_served_here():
    # NotLocal, a per-appliance state: Waiting would set the shared Ready condition to False
    # while the other appliance of a pair, which does not own 10.10.0.2, writes True.
    p = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=("10.10.0.2",))], h=BOX), SETTINGS)
    (v,) = p.verdicts
    assert (v.kind, v.event_reason) == (VerdictKind.NOT_LOCAL, "TargetRefused")
    assert v.reason == (
        "Service default/web: endpoint 10.10.0.2 (an address of this appliance) refused; "
        "no other endpoint is ready for port 80/TCP; not served by this appliance"
    )
    assert p.desired.dnats == () and v.pod_ips == ()


def test_an_external_address_of_this_box_is_refused_as_an_endpoint_even_without_discovery():
    # A Host built without local_addresses (tests, plan from a bare Host) still knows the
    # external interfaces' addresses.
    (v,) = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=("198.51.100.10",))]), SETTINGS).verdicts
    assert (v.kind, v.event_reason) == (VerdictKind.NOT_LOCAL, "TargetRefused")


def test_one_refused_endpoint_of_two_leaves_the_other_serving_and_says_so():
    settings = dataclasses.replace(SETTINGS, setup_snat=True)
    p = plan(
        snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=("10.10.0.2", "10.244.1.2"))], h=BOX),
        settings,
    )
    (v,) = p.verdicts
    assert v.kind == VerdictKind.CONFIGURED
    assert v.reason == "serving 192.0.2.10:80/tcp; endpoint 10.10.0.2 (an address of this appliance) refused"
    (d,) = p.desired.dnats
    assert [str(t) for t in d.targets] == ["10.244.1.2:8080"]
    # Egress SNAT is for pods only: never for an address of the box itself.
    assert [str(ip) for ip in v.pod_ips] == ["10.244.1.2"]
    assert [str(e.source) for e in p.desired.egress] == ["10.244.1.2"]


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.53", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("224.0.0.251", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("255.255.255.255", "the broadcast address"),
        ("0.1.2.3", "in 0.0.0.0/8, never a pod's"),
    ],
)
def test_an_endpoint_that_is_never_a_pod_is_refused(address, why):
    p = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=(address,))], h=BOX), SETTINGS)
    (v,) = p.verdicts
    assert (v.kind, v.event_reason) == (VerdictKind.WAITING, "TargetRefused")
    assert f"endpoint {address} ({why}) refused" in v.reason
    assert p.desired.dnats == ()


def test_addresses_next_to_the_refused_ranges_are_served():
    near = ("1.0.0.1", "126.255.255.254", "128.0.0.1", "169.253.0.1", "169.255.0.1", "223.255.255.254", "240.0.0.1", "255.255.255.254")
    p = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=near)], h=BOX), SETTINGS)
    assert p.verdicts[0].kind == VerdictKind.CONFIGURED
    assert sorted(str(t.address) for t in p.desired.dnats[0].targets) == sorted(near)


def test_refused_draining_endpoints_are_left_out_too():
    p = plan(
        snap(mapping("a", mode="direct"), services=[service()],
             slices=[endpoint_slice(ready=("10.244.1.2",), draining=("127.0.0.1", "10.10.0.2"))], h=BOX),
        SETTINGS,
    )
    (d,) = p.desired.dnats
    assert (d.targets[0].address, d.draining) == (IPv4Address("10.244.1.2"), ())
    # ...and a refused ready endpoint does not push a serving terminating pod aside.
    p = plan(
        snap(mapping("a", mode="direct"), services=[service()],
             slices=[endpoint_slice(ready=("10.10.0.2",), draining=("10.244.1.2",))], h=BOX),
        SETTINGS,
    )
    assert [str(t) for t in p.desired.dnats[0].targets] == ["10.244.1.2:8080"]


def test_a_long_refusal_names_a_few_addresses_and_counts_the_rest():
    loopbacks = tuple(f"127.0.0.{i}" for i in range(1, 8))
    (v,) = plan(snap(mapping("a", mode="direct"), services=[service()], slices=[endpoint_slice(ready=loopbacks)], h=BOX), SETTINGS).verdicts
    assert v.reason == (
        "Service default/web: endpoints 127.0.0.1 (a loopback address), 127.0.0.2 (a loopback address), "
        "127.0.0.3 (a loopback address) and 4 more refused; no other endpoint is ready for port 80/TCP"
    )


def test_a_cluster_ip_that_is_an_address_of_this_box_is_refused_in_service_mode():
    p = plan(snap(mapping("a"), services=[service(cluster_ip="10.10.0.2")], h=BOX), SETTINGS)
    (v,) = p.verdicts
    assert (v.kind, v.event_reason, v.reason) == (
        VerdictKind.NOT_LOCAL, "TargetRefused",
        "Service default/web: ClusterIP 10.10.0.2 (an address of this appliance) refused; not served by this appliance",
    )
    assert p.desired.dnats == ()
    (v,) = plan(snap(mapping("a"), services=[service(cluster_ip="127.0.0.1")]), SETTINGS).verdicts
    assert (v.kind, v.reason) == (VerdictKind.WAITING, "Service default/web: ClusterIP 127.0.0.1 (a loopback address) refused")


def test_service_mode_leaves_refused_pod_ips_out_of_egress_snat():
    settings = dataclasses.replace(SETTINGS, setup_snat=True)
    p = plan(snap(mapping("a"), services=[service()], slices=[endpoint_slice(ready=("10.10.0.2", "10.244.1.2"))], h=BOX), settings)
    assert p.verdicts[0].kind == VerdictKind.CONFIGURED
    assert [str(e.source) for e in p.desired.egress] == ["10.244.1.2"]


def test_an_own_address_endpoint_of_a_mapping_not_served_here_is_not_local():
    # Another appliance of a pair may serve it: a box refuses its own addresses only where it
    # serves the Mapping, so both write the same shared Ready condition otherwise.
    (v,) = plan(
        snap(mapping("a", mode="direct", addresses=("203.0.113.99",)), services=[service()],
             slices=[endpoint_slice(ready=("10.10.0.2",))], h=BOX),
        SETTINGS,
    ).verdicts
    assert v.kind == VerdictKind.NOT_LOCAL and v.pod_ips == ()
    # A never-a-pod endpoint is refused on every appliance alike.
    (v,) = plan(
        snap(mapping("a", mode="direct", addresses=("203.0.113.99",)), services=[service()],
             slices=[endpoint_slice(ready=("127.0.0.1",))], h=BOX),
        SETTINGS,
    ).verdicts
    assert (v.kind, v.event_reason) == (VerdictKind.WAITING, "TargetRefused")
