"""The incremental path equals the pure one, step after step (STYLE.md §3).

Random sequences of adds, updates and deletes of Mappings, Services and EndpointSlices, relists
and host changes go through the Store. After every step:
  - IncrementalPlanner.plan(snapshot, changes) == plan(snapshot, settings);
  - Renderer.render(desired) == render(desired);
  - Renderer.diff(applied, new) == diff(applied, new), and its transaction, played on the
    previous Ruleset by a small model of nft, leaves exactly the new Ruleset (plus the chains
    it empties for deletion next time);
and, in a throwaway namespace, nft accepts every transaction and ends with the same elements.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from smartnatd.model import (
    Endpoint,
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
)
from smartnatd.nft import names
from smartnatd.nft.render import Renderer, Ruleset, diff, render
from smartnatd.planner import IncrementalPlanner, plan
from smartnatd.store import Kind, Store
from tests.builders import HOST, SETTINGS, endpoint_slice, service
from tests.strategies import NAMESPACES, TIMESTAMPS, mappings

SETTINGS_VARIANTS = (
    SETTINGS,
    dataclasses.replace(SETTINGS, setup_snat=True),
    dataclasses.replace(SETTINGS, setup_snat=True, max_ports_per_mapping=2, setup_masquerade=False),
)
PODS = ("10.244.1.2", "10.244.2.2", "10.244.3.2", "10.244.4.2")
# Endpoint addresses: pods, and one that is never a pod's (refused wherever it appears).
ENDPOINTS = (*PODS, "169.254.0.9")
ALL_PORTS = (("http", "tcp", 80, 8080), ("dns", "udp", 53, 5353), ("s", "sctp", 80, 9000))


@st.composite
def services(draw: st.DrawFn) -> Service:
    ports = draw(st.sampled_from([ALL_PORTS, ALL_PORTS[:1], (("http", "tcp", 80, "web-port"), *ALL_PORTS[1:])]))
    cluster_ip = draw(st.sampled_from(["10.96.0.10", "10.96.0.11", None]))
    return service(namespace=draw(NAMESPACES), cluster_ip=cluster_ip, ports=ports)


@st.composite
def slices(draw: st.DrawFn) -> EndpointSlice:
    ready = tuple(draw(st.lists(st.sampled_from(ENDPOINTS), max_size=3, unique=True)))
    ports = draw(
        st.sampled_from(
            [
                (("http", "tcp", 8080), ("dns", "udp", 5353), ("s", "sctp", 9000)),
                (("http", "tcp", 9090), ("dns", "udp", 5353)),
                (),  # no ports: numeric targetPorts apply
            ]
        )
    )
    return endpoint_slice(
        namespace=draw(NAMESPACES),
        name=draw(st.sampled_from(["web-abc12", "web-xyz34"])),
        service_name=draw(st.sampled_from(["web", "missing"])),
        ready=ready,
        not_ready=tuple(draw(st.lists(st.sampled_from(PODS), max_size=1))),
        ports=ports,
    )


def _with(host: Host, name: str, **changes: object) -> Host:
    return Host(tuple(dataclasses.replace(i, **changes) if i.name == name else i for i in host.interfaces))  # type: ignore[arg-type]


HOSTS = (
    HOST,
    _with(HOST, "ext2", up=False),
    _with(HOST, "ext1", index=5),
    _with(HOST, "ext2", addresses=(IPv4Interface("198.51.100.10/24"), IPv4Interface("203.0.113.99/24"))),
    _with(HOST, "ext1", addresses=(IPv4Interface("192.0.2.11/24"),)),
    Host(interfaces=(HostInterface(name="ext1", index=3, addresses=(IPv4Interface("192.0.2.10/24"),)),)),
    Host(),
    # Addresses on the box's other interfaces that collide with pods and a ClusterIP: their
    # Mappings' targets are refused, and let through again when the address goes.
    dataclasses.replace(HOST, local_addresses=frozenset(map(IPv4Address, ("10.244.2.2", "127.0.0.1")))),
    dataclasses.replace(HOST, local_addresses=frozenset(map(IPv4Address, ("10.96.0.11", "10.244.1.2", "10.244.3.2")))),
)

KEYS = st.tuples(NAMESPACES, st.sampled_from(["web", "api", "dns", "db", "mail", "ftp"])).map(lambda t: ObjectKey(*t))

STEPS = st.one_of(
    st.tuples(st.just("upsert"), st.just(Kind.MAPPINGS), mappings()),
    st.tuples(st.just("upsert"), st.just(Kind.MAPPINGS), mappings()),
    st.tuples(st.just("delete"), st.just(Kind.MAPPINGS), KEYS),
    st.tuples(st.just("upsert"), st.just(Kind.SERVICES), services()),
    st.tuples(st.just("delete"), st.just(Kind.SERVICES), NAMESPACES.map(lambda ns: ObjectKey(ns, "web"))),
    st.tuples(st.just("upsert"), st.just(Kind.ENDPOINT_SLICES), slices()),
    st.tuples(
        st.just("delete"),
        st.just(Kind.ENDPOINT_SLICES),
        st.tuples(NAMESPACES, st.sampled_from(["web-abc12", "web-xyz34"])).map(lambda t: ObjectKey(*t)),
    ),
    st.tuples(st.just("host"), st.just(Kind.HOST), st.sampled_from(HOSTS)),
    st.tuples(st.just("relist"), st.just(Kind.MAPPINGS), st.lists(mappings(), max_size=6)),
    st.tuples(st.just("relist"), st.just(Kind.ENDPOINT_SLICES), st.lists(slices(), max_size=4)),
    st.tuples(st.just("nothing"), st.just(Kind.HOST), st.none()),
)


def apply_step(store: Store, step: tuple) -> None:
    action, kind, value = step
    if action == "upsert":
        store.upsert(kind, value)
    elif action == "delete":
        store.delete(kind, value)
    elif action == "host":
        store.set_host(value)
    elif action == "relist":
        store.replace(kind, {o.key: o for o in value}.values())


# --- a small model of what nft does with our transactions ----------------------------------

_T = f"{names.FAMILY} {names.TABLE}"
_ELEMENTS = re.compile(rf"^(add|delete) element {_T} (\S+) \{{ (.*) \}}$")


@dataclass
class Table:
    """Sets as key -> element text, chains as rule lists: what nft would hold."""

    sets: dict[str, dict[str, str]] = field(default_factory=dict)
    chains: dict[str, list[str]] = field(default_factory=dict)

    def play(self, text: str) -> None:
        """Apply a transaction; every command must make sense against what is there."""
        for line in text.splitlines():
            if line.startswith(f"add table {_T}"):
                continue
            if line == f"delete table {_T}":
                self.sets.clear()
                self.chains.clear()
            elif line.startswith((f"add set {_T} ", f"add map {_T} ")):
                self.sets[line.split()[4]] = {}
            elif line.startswith(f"add chain {_T} "):
                name = line.split()[4]
                assert name not in self.chains, f"chain {name} added twice"
                self.chains[name] = []
            elif line.startswith(f"add rule {_T} "):
                _, _, _, _, name, rule = line.split(" ", 5)
                self.chains[name].append(rule)
            elif line.startswith(f"flush chain {_T} "):
                self.chains[line.split()[4]] = []
            elif line.startswith(f"delete chain {_T} "):
                name = line.split()[4]
                assert self.chains.pop(name) == [], f"chain {name} deleted with rules in it"
            elif found := _ELEMENTS.match(line):
                action, name, body = found.groups()
                elements = self.sets[name]
                for item in body.split(", "):
                    key = item.split(" comment ")[0].split(" : ")[0]
                    if action == "add":
                        assert key not in elements, f"{name}: {key} added while present"
                        elements[key] = item
                    else:
                        assert item == key and key in elements, f"{name}: delete of {item!r}"
                        del elements[key]
            else:
                raise AssertionError(f"command the model does not know: {line}")

    @staticmethod
    def of(rs: Ruleset) -> Table:
        return Table(
            sets={s.name: {e.key: e.text for e in s.elements} for s in rs.sets},
            chains={c.name: list(c.rules) for c in rs.chains},
        )


def check_step(renderer: Renderer, applied: Ruleset | None, table: Table, desired) -> Ruleset:
    """Render, diff and play one pass; returns what the kernel holds after it."""
    ruleset = renderer.render(desired)
    assert ruleset == render(desired)
    if applied is None:
        table.play(ruleset.text())
        assert table == Table.of(ruleset)
        return ruleset
    step = renderer.diff(applied, ruleset)
    reference = diff(applied, ruleset)
    assert step == reference
    if step is None:  # only a full pass can do it (a base chain's hook changed)
        table.play(ruleset.text())
        assert table == Table.of(ruleset)
        return ruleset
    note(step.text)
    table.play(step.text)
    expected = Table.of(ruleset)
    expected.chains.update({name: [] for name in step.after.stale_chains})
    assert table == expected
    return step.after


# Denser than tests.strategies: few addresses and ports, so claims collide and chains of
# conflicts form; edits of one field at a time, as users make them.
DENSE_ADDRESSES = st.sampled_from(["192.0.2.10", "192.0.2.11", "203.0.113.99"]).map(IPv4Address)
DENSE_PORTS = st.lists(
    st.sampled_from([(80, Protocol.TCP), (53, Protocol.UDP), (80, Protocol.UDP)]), min_size=1, max_size=3, unique=True
)
SOURCE_LISTS = st.sampled_from(
    [(IPv4Network("0.0.0.0/0"),), (IPv4Network("203.0.113.0/28"),), (IPv4Network("198.51.100.0/24"), IPv4Network("203.0.113.0/28"))]
)


@st.composite
def dense_mappings(draw: st.DrawFn, key: ObjectKey | None = None) -> Mapping:
    spec: MappingSpec | Invalid = MappingSpec(
        addresses=tuple(draw(st.lists(DENSE_ADDRESSES, min_size=1, max_size=2, unique=True))),
        allowed_sources=draw(SOURCE_LISTS),
        service_name=draw(st.sampled_from(["web", "web", "missing"])),
        mode=draw(st.sampled_from(list(Mode))),
        ports=tuple(MappingPort(p, proto, 80 if proto == Protocol.TCP else 53) for p, proto in draw(DENSE_PORTS)),
    )
    if draw(st.integers(0, 9)) == 0:
        spec = Invalid("spec.ports[0].port: 0 is not a port number (1-65535)")
    return Mapping(
        key=key or draw(KEYS),
        spec=spec,
        creation_timestamp=draw(TIMESTAMPS),
        deleting=draw(st.integers(0, 11)) == 0,
    )


def _edit(m: Mapping, what: str, value: object) -> Mapping:
    if what == "created":
        return dataclasses.replace(m, creation_timestamp=value)  # type: ignore[arg-type]
    if what == "deleting":
        return dataclasses.replace(m, deleting=not m.deleting)
    if isinstance(m.spec, Invalid):
        return m
    return dataclasses.replace(m, spec=dataclasses.replace(m.spec, **{what: value}))


EDITS = st.one_of(
    st.tuples(st.just("allowed_sources"), SOURCE_LISTS),
    st.tuples(st.just("mode"), st.sampled_from(list(Mode))),
    st.tuples(st.just("service_name"), st.sampled_from(["web", "missing"])),
    st.tuples(st.just("addresses"), st.lists(DENSE_ADDRESSES, min_size=1, max_size=2, unique=True).map(tuple)),
    st.tuples(st.just("created"), TIMESTAMPS),
    st.tuples(st.just("deleting"), st.none()),
)


class IncrementalMachine(RuleBasedStateMachine):
    """A store driven by random events; after each one the incremental planner and renderer
    must agree with plan() and render(), and the transaction must do exactly the difference."""

    @initialize(config=st.sampled_from(SETTINGS_VARIANTS))
    def start(self, config):
        self.config = config
        self.store = Store()
        # Every namespace starts with a working Service, two of them with ready pods, so most
        # Mappings get configured and their entries move as the rules below change things.
        self.store.replace(Kind.SERVICES, [service(namespace=ns, ports=ALL_PORTS) for ns in ("ns-a", "ns-b", "ns-c")])
        ports = tuple((name, proto, int(target)) for name, proto, _, target in ALL_PORTS)
        self.store.replace(
            Kind.ENDPOINT_SLICES,
            [endpoint_slice(namespace=ns, name="web-abc12", ready=PODS[:2], ports=ports) for ns in ("ns-a", "ns-b")],
        )
        self.store.set_host(HOST)
        self.planner = IncrementalPlanner(config)
        self.renderer = Renderer()
        self.table = Table()
        self.applied: Ruleset | None = None

    def _keys(self, kind: Kind) -> list[ObjectKey]:
        return [o.key for o in getattr(self.store.snapshot(), str(kind).replace("endpointslices", "endpoint_slices"))]

    # Rules are drawn evenly: adds and edits come three times so the cluster grows.
    @rule(m=dense_mappings())
    def upsert_mapping(self, m):
        self.store.upsert(Kind.MAPPINGS, m)

    @rule(m=dense_mappings())
    def upsert_another_mapping(self, m):
        self.store.upsert(Kind.MAPPINGS, m)

    @rule(m=dense_mappings())
    def upsert_a_third_mapping(self, m):
        self.store.upsert(Kind.MAPPINGS, m)

    @rule(data=st.data(), edit=EDITS)
    def edit_another_mapping(self, data, edit):
        self.edit_mapping(data, edit)

    @rule(data=st.data(), edit=EDITS)
    def edit_a_third_mapping(self, data, edit):
        self.edit_mapping(data, edit)

    @rule(data=st.data(), edit=EDITS)
    def edit_mapping(self, data, edit):
        ms = self.store.snapshot().mappings
        if ms:
            m = data.draw(st.sampled_from(ms))
            self.store.upsert(Kind.MAPPINGS, _edit(m, *edit))

    @rule(data=st.data())
    def delete_mapping(self, data):
        keys = self._keys(Kind.MAPPINGS)
        if keys:
            self.store.delete(Kind.MAPPINGS, data.draw(st.sampled_from(keys)))

    @rule(svc=services())
    def upsert_service(self, svc):
        self.store.upsert(Kind.SERVICES, svc)

    @rule(data=st.data())
    def delete_service(self, data):
        keys = self._keys(Kind.SERVICES)
        if keys:
            self.store.delete(Kind.SERVICES, data.draw(st.sampled_from(keys)))

    @rule(sl=slices())
    def upsert_slice(self, sl):
        self.store.upsert(Kind.ENDPOINT_SLICES, sl)

    @rule(data=st.data(), pod=st.sampled_from(PODS))
    def replace_a_pod(self, data, pod):
        current = self.store.snapshot().endpoint_slices
        if current and current[0].endpoints:
            sl = data.draw(st.sampled_from(current))
            if sl.endpoints:
                fresh = Endpoint((IPv4Address(pod),), True)
                self.store.upsert(Kind.ENDPOINT_SLICES, dataclasses.replace(sl, endpoints=sl.endpoints[1:] + (fresh,)))

    @rule(data=st.data())
    def delete_slice(self, data):
        keys = self._keys(Kind.ENDPOINT_SLICES)
        if keys:
            self.store.delete(Kind.ENDPOINT_SLICES, data.draw(st.sampled_from(keys)))

    @rule(host=st.sampled_from(HOSTS))
    def change_host(self, host):
        self.store.set_host(host)

    @rule(ms=st.lists(dense_mappings(), max_size=8))
    def relist_mappings(self, ms):
        self.store.replace(Kind.MAPPINGS, {m.key: m for m in ms}.values())

    @rule(sls=st.lists(slices(), max_size=3))
    def relist_slices(self, sls):
        self.store.replace(Kind.ENDPOINT_SLICES, {s.key: s for s in sls}.values())

    @invariant()
    def incremental_equals_full(self):
        snapshot, changes = self.store.snapshot_with_changes()
        assert snapshot == self.store.snapshot()
        got = self.planner.plan(snapshot, changes)
        assert got == plan(snapshot, self.config)
        self.applied = check_step(self.renderer, self.applied, self.table, got.desired)


IncrementalMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_incremental_plan_and_transactions_equal_the_full_computation = IncrementalMachine.TestCase


@settings(max_examples=60, deadline=None)
@given(st.lists(STEPS, min_size=1, max_size=15), st.integers(0, 14))
def test_a_planner_that_missed_a_snapshot_rebuilds_and_stays_equal(steps, skipped):
    """Changes that do not start where the planner stopped (a snapshot it never saw) must not
    be trusted: the result is still the full computation."""
    store = Store()
    store.set_host(HOST)
    planner = IncrementalPlanner(SETTINGS)
    for i, step in enumerate(steps):
        apply_step(store, step)
        snapshot, changes = store.snapshot_with_changes()
        if i == skipped:
            continue  # this snapshot never reaches the planner
        assert planner.plan(snapshot, changes) == plan(snapshot, SETTINGS)


@settings(max_examples=60, deadline=None)
@given(st.lists(mappings(), max_size=12), st.sampled_from(SETTINGS_VARIANTS))
def test_rebuilding_from_a_snapshot_equals_plan(ms, config):
    store = Store()
    store.replace(Kind.MAPPINGS, {m.key: m for m in ms}.values())
    store.replace(Kind.SERVICES, [service(namespace=ns, ports=ALL_PORTS) for ns in ("ns-a", "ns-b")])
    slice_ports = tuple((p[0], p[1], int(p[3])) for p in ALL_PORTS)
    store.replace(Kind.ENDPOINT_SLICES, [endpoint_slice(namespace="ns-a", ready=PODS[:2], ports=slice_ports)])
    store.set_host(HOST)
    snapshot = store.snapshot()
    assert IncrementalPlanner(config).plan(snapshot) == plan(snapshot, config)


# --- the same transactions against nft --------------------------------------------------------


@pytest.mark.kernel
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(STEPS, min_size=1, max_size=12))
def test_nft_accepts_every_incremental_transaction_and_ends_with_the_same_elements(netns_prefix, steps):
    from smartnatd.nft.runner import LibraryRunner, parse_element_counters
    from tests.kernel.harness import NetnsFactory, sh

    config = SETTINGS_VARIANTS[1]
    with NetnsFactory(prefix=netns_prefix) as factory:
        ns = factory.create("inc")
        runner = LibraryRunner(netns=ns)
        try:
            store = Store()
            store.replace(Kind.SERVICES, [service(namespace=ns_, ports=ALL_PORTS) for ns_ in ("ns-a", "ns-b", "ns-c")])
            store.set_host(HOST)
            planner = IncrementalPlanner(config)
            renderer = Renderer()
            applied: Ruleset | None = None
            for step in [("nothing", Kind.HOST, None), *steps]:
                apply_step(store, step)
                snapshot, changes = store.snapshot_with_changes()
                ruleset = renderer.render(planner.plan(snapshot, changes).desired)
                transaction = None if applied is None else renderer.diff(applied, ruleset)
                if transaction is None:
                    runner.run(ruleset.text())
                    applied = ruleset
                else:
                    if transaction.text:
                        runner.run(transaction.text)
                    applied = transaction.after
            # The endpoint-keyed sets and maps: their keys print as ours do ("a . proto . port").
            for s in ruleset.sets:
                if s.name in (names.EXTERNAL_PORTS, names.DNAT_TARGETS, names.DNAT_CHAINS, names.DNAT_SPREAD,
                              names.SOURCE_FILTERS):
                    listing = sh(ns, "nft", "-j", "list", s.kind, names.FAMILY, names.TABLE, s.name).stdout
                    assert sorted(parse_element_counters(listing)) == sorted(e.key for e in s.elements), s.name
            chains = sh(ns, "nft", "list", "chains", names.FAMILY).stdout
            listed = sorted(re.findall(r"chain (\S+) \{", chains))
            assert listed == sorted({c.name for c in applied.chains})
        finally:
            runner.close()
