"""The incremental path: store change reports, IncrementalPlanner and Renderer, case by case.

tests/property/test_incremental_properties.py checks random sequences; these pin the cases
that are easy to get wrong and the cost claims (what is reused, what a diff touches).
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

from smartnatd.conntrack import stale_flow_filters
from smartnatd.desired import DesiredState, Dnat, ExternalEndpoint, Target
from smartnatd.model import Mapping, ObjectKey, Protocol, Snapshot
from smartnatd.nft.render import Renderer, diff, render
from smartnatd.planner import IncrementalPlanner, VerdictKind, plan
from smartnatd.store import Changes, Kind, Store
from tests.builders import HOST, SETTINGS, endpoint_slice, mapping, service

SNAT = dataclasses.replace(SETTINGS, setup_snat=True)


class Pass:
    """A store and the incremental planner, driven like the reconciler drives them."""

    def __init__(self, settings=SETTINGS, *, mappings=(), services=(service(),), slices=(endpoint_slice(),)):
        self.settings = settings
        self.store = Store()
        self.store.replace(Kind.MAPPINGS, mappings)
        self.store.replace(Kind.SERVICES, services)
        self.store.replace(Kind.ENDPOINT_SLICES, slices)
        self.store.set_host(HOST)
        self.planner = IncrementalPlanner(settings)

    def run(self):
        snapshot, changes = self.store.snapshot_with_changes()
        got = self.planner.plan(snapshot, changes)
        assert got == plan(snapshot, self.settings)
        return got


def kinds(p) -> dict[str, str]:
    return {str(v.key): str(v.kind) for v in p.verdicts}


def test_deleting_the_oldest_claimant_passes_its_endpoint_down_a_chain_of_conflicts():
    a = mapping("a", created="2026-01-01T00:00:00Z", addresses=("192.0.2.10",))
    b = mapping("b", created="2026-01-02T00:00:00Z", addresses=("192.0.2.10", "192.0.2.11"))
    c = mapping("c", created="2026-01-03T00:00:00Z", addresses=("192.0.2.11",))
    run = Pass(mappings=(a, b, c))
    assert kinds(run.run()) == {"default/a": "Configured", "default/b": "Conflict", "default/c": "Configured"}
    run.store.delete(Kind.MAPPINGS, a.key)
    after = run.run()
    # b now holds both addresses, so c, younger, loses the one it shared with b.
    assert kinds(after) == {"default/b": "Configured", "default/c": "Conflict"}
    assert after.verdict(c.key).winner == b.key


def test_making_a_mapping_older_moves_pod_egress_to_it():
    first = mapping("first", created="2026-01-01T00:00:00Z", mode="direct")
    second = mapping("second", created="2026-01-02T00:00:00Z", addresses=("198.51.100.10",), mode="direct")
    run = Pass(SNAT, mappings=(first, second))
    assert {str(e.to) for e in run.run().desired.egress} == {"192.0.2.10"}
    run.store.upsert(Kind.MAPPINGS, dataclasses.replace(second, creation_timestamp="2025-12-31T00:00:00Z"))
    # Same verdicts and Dnats as before; only who is oldest changed.
    assert {str(e.to) for e in run.run().desired.egress} == {"198.51.100.10"}


def test_an_interface_renumbered_changes_the_egress_mark():
    run = Pass(SNAT, mappings=(mapping("a", mode="direct"),))
    before = run.run()
    ext1 = next(i for i in HOST.interfaces if i.name == "ext1")
    renumbered = dataclasses.replace(HOST, interfaces=tuple(dataclasses.replace(i, index=7) if i is ext1 else i for i in HOST.interfaces))
    run.store.set_host(renumbered)
    after = run.run()
    assert {e.mark for e in after.desired.egress} == {7 << 16} != {e.mark for e in before.desired.egress}


def test_a_pass_without_changes_returns_the_same_plan_object():
    run = Pass(mappings=(mapping("a"), mapping("b", addresses=("192.0.2.11",))))
    first = run.run()
    run.store.upsert(Kind.MAPPINGS, mapping("a"))  # equal to what is there: no change
    assert run.run() is first


def test_an_unchanged_mapping_keeps_its_very_dnat_objects():
    run = Pass(mappings=(mapping("a"), mapping("b", addresses=("192.0.2.11",))))
    before = run.run()
    run.store.upsert(Kind.MAPPINGS, mapping("b", addresses=("192.0.2.11",), ports=((81, "tcp", 80),)))
    after = run.run()
    kept = [d for d in after.desired.dnats if str(d.owner) == "default/a"]
    assert kept and all(any(d is old for old in before.desired.dnats) for d in kept)


def test_store_reports_each_changed_key_once_with_its_object_now():
    store = Store()
    a, b = mapping("a"), mapping("b")
    store.replace(Kind.MAPPINGS, [a, b])
    store.set_host(HOST)
    _, first = store.snapshot_with_changes()
    assert (first.base, first.serial) == (0, 1)
    assert first.mappings == {a.key: a, b.key: b} and first.host
    b2 = mapping("b", ports=((81, "tcp", 80),))
    store.upsert(Kind.MAPPINGS, b2)
    store.upsert(Kind.MAPPINGS, a)  # no change
    store.delete(Kind.MAPPINGS, a.key)
    store.upsert(Kind.SERVICES, service())
    snapshot, second = store.snapshot_with_changes()
    assert second == Changes(
        base=1,
        serial=2,
        mappings={a.key: None, b.key: b2},
        services={service().key: service()},
        endpoint_slices={},
        host=False,
    )
    assert snapshot.mappings == (b2,)
    _, third = store.snapshot_with_changes()
    assert (third.mappings, third.services, third.host) == ({}, {}, False)


def test_store_snapshot_stays_sorted_by_key_through_inserts_and_deletes():
    store = Store()
    names = ["m", "c", "x", "a", "k"]
    for name in names:
        store.upsert(Kind.MAPPINGS, mapping(name, namespace="ns-b" if name < "k" else "ns-a"))
    store.delete(Kind.MAPPINGS, ObjectKey("ns-b", "c"))
    keys = [m.key for m in store.snapshot().mappings]
    assert keys == sorted(keys) and len(keys) == 4


def test_changes_that_skip_a_snapshot_make_the_planner_rebuild():
    run = Pass(mappings=(mapping("a"),))
    run.run()
    run.store.upsert(Kind.MAPPINGS, mapping("b", addresses=("192.0.2.11",)))
    run.store.snapshot_with_changes()  # a snapshot the planner never sees
    run.store.upsert(Kind.MAPPINGS, mapping("c", addresses=("198.51.100.10",)))
    after = run.run()  # asserts equality with plan() inside
    assert kinds(after) == {"default/a": "Configured", "default/b": "Configured", "default/c": "Configured"}


def test_duplicate_keys_in_a_snapshot_give_what_plan_gives():
    dup = Snapshot(mappings=(mapping("a"), mapping("a", addresses=("192.0.2.11",))), services=(service(),), host=HOST)
    assert IncrementalPlanner(SETTINGS).plan(dup) == plan(dup, SETTINGS)


# --- Renderer ---------------------------------------------------------------------------------


def many(n: int, **changed) -> tuple[Mapping, ...]:
    """n Mappings on one address, one port each; keyword arguments change the middle one."""
    ms = [mapping(f"m{i:03d}", ports=((1000 + i, "tcp", 80),)) for i in range(n)]
    if changed:
        ms[n // 2] = mapping(f"m{n // 2:03d}", **changed)
    return tuple(ms)


def desired(ms, settings=SETTINGS) -> DesiredState:
    return plan(Snapshot(mappings=ms, services=(service(),), endpoint_slices=(endpoint_slice(),), host=HOST), settings).desired


class Desired:
    """Desired states from one incremental planner: unchanged Dnats stay the same objects."""

    def __init__(self) -> None:
        self.run = Pass()

    def __call__(self, ms) -> DesiredState:
        self.run.store.replace(Kind.MAPPINGS, ms)
        return self.run.run().desired


def test_renderer_diff_of_one_changed_mapping_touches_only_its_elements():
    renderer, planned = Renderer(), Desired()
    before = renderer.render(planned(many(200)))
    after = renderer.render(planned(many(200, ports=((2000, "tcp", 80),), sources=("203.0.113.0/28",))))
    step = renderer.diff(before, after)
    assert step == diff(before, after)
    assert step.operations == 2 + 2 + 1 + 1  # ports and targets: out and in; its filter; its chain
    assert all("1100" in line or "2000" in line or "sources-" in line for line in step.text.splitlines())


def test_renderer_output_equals_render_after_each_change():
    renderer = Renderer()
    for ms in (many(50), many(50, mode="direct"), many(50, sources=("203.0.113.0/28",)), many(3), many(50)):
        d = desired(ms, SNAT)
        assert renderer.render(d) == render(d)


def test_renderer_compares_everything_for_a_ruleset_it_did_not_render_last():
    renderer = Renderer()
    other = render(desired(many(20, ports=((3000, "tcp", 80),))))
    renderer.render(desired(many(20)))
    new = renderer.render(desired(many(20, ports=((2000, "tcp", 80),))))
    assert renderer.diff(other, new) == diff(other, new)


def test_renderer_follows_a_desired_state_with_duplicate_endpoints_like_render():
    ext = ExternalEndpoint(IPv4Address("192.0.2.10"), Protocol.TCP, 80)
    one = Dnat(ext, (Target(IPv4Address("10.0.0.1"), 80),), (IPv4Network("0.0.0.0/0"),), ObjectKey("a", "a"), "ext1")
    two = dataclasses.replace(one, owner=ObjectKey("b", "b"), targets=(Target(IPv4Address("10.0.0.2"), 80),))
    renderer = Renderer()
    for d in (DesiredState(dnats=(one,)), DesiredState(dnats=(one, two)), DesiredState(dnats=(two,)), DesiredState()):
        assert renderer.render(d) == render(d)


def test_dnat_changes_name_the_dnats_that_changed_and_give_the_same_flow_filters():
    renderer, planned = Renderer(), Desired()
    old = planned(many(100, mode="direct"))
    renderer.render(old)
    new = planned(many(100, mode="direct", ports=((2000, "tcp", 80),)))
    renderer.render(new)
    gone, came = renderer.dnat_changes(since=old)
    assert [str(d.owner) for d in gone + came] == ["default/m050", "default/m050"]
    filters = stale_flow_filters(old=DesiredState(dnats=gone), new=DesiredState(dnats=came))
    assert filters == stale_flow_filters(old=old, new=new)


def test_dnat_changes_are_unknown_from_a_state_the_renderer_did_not_start_from():
    renderer = Renderer()
    first = desired(many(10))
    renderer.render(first)
    renderer.render(desired(many(10, ports=((2000, "tcp", 80),))))
    renderer.render(desired(many(10, ports=((2001, "tcp", 80),))))
    assert renderer.dnat_changes(since=first) is None
