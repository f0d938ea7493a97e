"""Properties of plan() that must hold for every cluster view (STYLE.md §3)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from smartnatd.model import Invalid, Mapping, ObjectKey
from smartnatd.nft.render import render
from smartnatd.planner import VerdictKind, plan
from tests.builders import SETTINGS
from tests.strategies import MAPPING_LISTS, mappings, snapshot_of

SNAT = dataclasses.replace(SETTINGS, setup_snat=True)


def _entries_of(p, key):
    return sorted((d for d in p.desired.dnats if d.owner == key), key=lambda d: d.external)


@given(MAPPING_LISTS, st.randoms(use_true_random=False))
def test_input_order_does_not_change_the_plan(ms, rnd):
    shuffled = list(ms)
    rnd.shuffle(shuffled)
    assert plan(snapshot_of(ms), SNAT) == plan(snapshot_of(shuffled), SNAT)


@given(MAPPING_LISTS)
def test_no_two_dnat_entries_share_an_external_endpoint(ms):
    p = plan(snapshot_of(ms), SETTINGS)
    endpoints = [d.external for d in p.desired.dnats]
    assert len(endpoints) == len(set(endpoints))


@given(MAPPING_LISTS)
def test_each_mapping_gets_exactly_one_verdict_and_configured_ones_have_entries(ms):
    p = plan(snapshot_of(ms), SETTINGS)
    assert [v.key for v in p.verdicts] == sorted(m.key for m in ms)
    for v in p.verdicts:
        entries = _entries_of(p, v.key)
        if v.kind == VerdictKind.CONFIGURED:
            assert entries and [d.external for d in entries] == list(v.served)
        else:
            assert entries == []


@given(MAPPING_LISTS, st.data())
def test_adding_an_invalid_mapping_leaves_every_other_mapping_unchanged(ms, data):
    name = data.draw(st.sampled_from(["zz-new", "web"]))
    key = ObjectKey("ns-new", name)
    bad = Mapping(key=key, spec=Invalid("spec.ports: port 80/tcp is listed twice"), creation_timestamp="2000-01-01T00:00:00Z")
    before = plan(snapshot_of(ms), SETTINGS)
    after = plan(snapshot_of(ms + [bad]), SETTINGS)
    assert after.desired == before.desired
    assert [v for v in after.verdicts if v.key != key] == list(before.verdicts)
    assert after.verdict(key).kind == VerdictKind.INVALID


@given(MAPPING_LISTS, st.data())
def test_removing_a_mapping_removes_exactly_its_entries(ms, data):
    if not ms:
        return
    victim = data.draw(st.sampled_from(ms))
    before = plan(snapshot_of(ms), SETTINGS)
    rest = [m for m in ms if m.key != victim.key]
    after = plan(snapshot_of(rest), SETTINGS)
    if before.verdict(victim.key).kind == VerdictKind.CONFIGURED:
        # Nothing that was not the victim's disappears; what appears was blocked by the victim.
        gone = set(before.desired.dnats) - set(after.desired.dnats)
        assert all(d.owner == victim.key for d in gone)
        for d in set(after.desired.dnats) - set(before.desired.dnats):
            assert before.verdict(d.owner).winner == victim.key
    elif before.verdict(victim.key).kind in (VerdictKind.INVALID, VerdictKind.DELETING):
        assert after.desired.dnats == before.desired.dnats
    assert after.verdict(victim.key) is None


@settings(max_examples=50)
@given(MAPPING_LISTS)
def test_rendered_names_are_unique_short_and_stable(ms):
    p = plan(snapshot_of(ms), SNAT)
    rs = render(p.desired)
    names = [c.name for c in rs.chains] + [s.name for s in rs.sets]
    assert len(names) == len(set(names))
    assert all(len(x) <= 64 for x in names)
    assert render(plan(snapshot_of(list(reversed(ms))), SNAT).desired).text() == rs.text()
