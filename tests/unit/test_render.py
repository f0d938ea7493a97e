"""Rendering: golden text, stability, and the incremental difference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from smartnatd.desired import EGRESS_MARK, HAIRPIN_MARK, MARK_MASK
from smartnatd.model import Snapshot
from smartnatd.nft import names
from smartnatd.nft.render import diff, render
from smartnatd.planner import plan
from tests.builders import HOST, SETTINGS, endpoint_slice, mapping, service

GOLDEN = Path(__file__).parent.parent / "golden"


def desired_of(*ms, settings=SETTINGS, slices=None):
    svc = service(ports=(("http", "tcp", 80, 8080), ("dns", "udp", 53, 5353)))
    sl = slices if slices is not None else [endpoint_slice(ports=(("http", "tcp", 8080), ("dns", "udp", 5353)))]
    return plan(Snapshot(mappings=ms, services=(svc,), endpoint_slices=tuple(sl), host=HOST), settings).desired


def golden(name: str, text: str, request: pytest.FixtureRequest) -> None:
    path = GOLDEN / name
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run pytest --update-golden"
    assert text == path.read_text(), f"{name} differs from the golden file; if intended, run pytest --update-golden"


def test_golden_full_transaction(request):
    settings = dataclasses.replace(SETTINGS, setup_snat=True)
    d = desired_of(
        mapping("svc", ports=((80, "tcp", 80),), sources=("203.0.113.10/32",)),
        mapping("direct", addresses=("198.51.100.10",), mode="direct", ports=((53, "udp", 53),)),
        settings=settings,
    )
    golden("full.nft", render(d).text(), request)


def test_render_is_byte_stable():
    d = desired_of(mapping("a"), mapping("b", addresses=("192.0.2.11",), mode="direct"))
    assert render(d).text() == render(d).text()


def test_same_allow_list_shares_one_chain():
    d = desired_of(
        mapping("a", sources=("203.0.113.0/28",)),
        mapping("b", addresses=("192.0.2.11",), sources=("203.0.113.0/28",)),
    )
    rs = render(d)
    assert len([c for c in rs.chains if c.name.startswith(names.SOURCES_PREFIX)]) == 1
    assert len(rs.set(names.SOURCE_FILTERS).elements) == 2


def test_diff_of_identical_rulesets_is_empty():
    rs = render(desired_of(mapping("a")))
    step = diff(rs, rs)
    assert step is not None and step.text == "" and step.operations == 0


def test_diff_changing_one_mapping_touches_only_its_elements():
    before = render(desired_of(mapping("a"), mapping("b", addresses=("192.0.2.11",))))
    after = render(desired_of(mapping("a"), mapping("b", addresses=("192.0.2.11",), ports=((81, "tcp", 80),))))
    step = diff(before, after)
    assert step is not None
    lines = step.text.splitlines()
    assert all("192.0.2.11" in line for line in lines), lines
    assert step.after == after


def test_diff_removes_dynamic_chain_in_two_passes():
    with_chain = render(desired_of(mapping("a", sources=("203.0.113.0/28",))))
    without = render(desired_of(mapping("a")))
    first = diff(with_chain, without)
    assert first is not None
    chain = next(c.name for c in with_chain.chains if names.is_dynamic(c.name))
    assert f"flush chain ip smartnat {chain}" in first.text
    assert "delete chain" not in first.text
    second = diff(first.after, without)
    assert second is not None and f"delete chain ip smartnat {chain}" in second.text
    assert diff(second.after, without).text == ""


def test_diff_needs_full_pass_when_base_chain_hook_changes():
    a = render(desired_of(mapping("a")))
    b = render(desired_of(mapping("a"), settings=dataclasses.replace(SETTINGS, setup_masquerade=False)))
    step = diff(a, b)
    assert step is not None and "flush chain ip smartnat nat-postrouting" in step.text


def test_hairpin_mark_is_a_bit_of_its_own():
    # Apart from the interface marks, the egress bit, and kube-proxy's 0x4000/0x8000.
    assert HAIRPIN_MARK & (MARK_MASK | EGRESS_MARK | 0xC000) == 0
    assert HAIRPIN_MARK & (HAIRPIN_MARK - 1) == 0


@pytest.mark.parametrize("masquerade", [True, False], ids=["masquerade", "no-masquerade"])
def test_hairpin_connections_are_masqueraded_whatever_setup_masquerade_says(masquerade):
    settings = dataclasses.replace(SETTINGS, setup_masquerade=masquerade)
    rules = render(desired_of(mapping("a"), settings=settings)).chain(names.NAT_POSTROUTING).rules
    assert rules[0] == "ct mark & 0x20000000 == 0x20000000 masquerade"
    assert sum("masquerade" in r for r in rules) == (2 if masquerade else 1)


def test_a_pods_connection_to_a_mapping_is_marked_a_hairpin_after_its_egress_mark():
    # The egress mark comes first, so the hairpin mark replaces it: replies of a hairpin must
    # route by the main table, not by the pod's egress interface's table.
    rs = render(desired_of(mapping("a", mode="direct"), settings=dataclasses.replace(SETTINGS, setup_snat=True)))
    rules = rs.chain(names.FILTER_PREROUTING).rules
    egress = next(i for i, r in enumerate(rules) if f"@{names.EGRESS_MARKS}" in r)
    marked = next(i for i, r in enumerate(rules) if f"jump {names.MARK_CONNECTION}" in r)
    assert egress < marked
    assert rs.chain(names.MARK_CONNECTION).rules == (
        f"ct mark set iifname map @{names.INTERFACE_MARKS}",
        f'iifname != @{names.EXTERNAL_INTERFACES} iifname != "lo" ct mark set 0x20000000',
    )


def test_the_box_own_connection_to_a_mapping_is_a_hairpin_translated_on_the_output_hook():
    rs = render(desired_of(mapping("a", mode="direct"), mapping("b", addresses=("192.0.2.11",))))
    key = "ip daddr . meta l4proto . th dport"
    # Marked before the DNAT (mangle < -110), for the masquerade of nat-postrouting; no
    # allow-list on the output hook.
    marking = rs.chain(names.FILTER_OUTPUT)
    assert marking.hook == "type filter hook output priority mangle; policy accept;"
    assert marking.rules == (f"{key} @{names.EXTERNAL_PORTS} ct state new ct mark set 0x20000000",)
    # The very lookups of nat-prerouting: one map lookup per new connection, whatever the count.
    translating = rs.chain(names.NAT_OUTPUT)
    assert translating.hook == "type nat hook output priority -110; policy accept;"
    assert translating.rules == rs.chain(names.NAT_PREROUTING).rules
    assert not any(names.SOURCE_FILTERS in r for c in (marking, translating) for r in c.rules)


@pytest.mark.parametrize("drop", [True, False], ids=["drop-unmapped", "keep-unmapped"])
def test_the_box_own_connection_to_an_unmapped_port_is_not_dropped(drop):
    # It comes back in on lo, still new: the drop is for packets from outside.
    settings = dataclasses.replace(SETTINGS, drop_unmapped=drop)
    rules = [r for r in render(desired_of(mapping("a"), settings=settings)).chain(names.FILTER_PREROUTING).rules
             if r.endswith(" drop")]
    assert rules == ([f'ct state new iifname != "lo" ip daddr @{names.MANAGED_ADDRESSES} meta l4proto {{ tcp, udp, sctp }} '
                      f"ip daddr . meta l4proto . th dport != @{names.EXTERNAL_PORTS} counter drop"] if drop else [])
