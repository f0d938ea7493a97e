"""kube/status.py: status patches and Events from verdicts, pure (no API server)."""

import dataclasses
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smartnatd.desired import ExternalEndpoint
from smartnatd.kube import status
from smartnatd.model import ObjectKey, Protocol
from smartnatd.planner import EVENT_REASONS, Verdict, VerdictKind

from .emulator import merge_patch

KEY = ObjectKey('demo', 'echo')
T0, T1, T2 = '2024-05-01T12:00:00Z', '2024-05-01T12:05:00Z', '2024-05-01T12:10:00Z'
A, B = IPv4Address('192.0.2.10'), IPv4Address('198.51.100.10')
PODS = (IPv4Address('10.244.1.2'), IPv4Address('10.244.2.2'))
VIP = IPv4Address('10.96.0.10')


def configured(*addresses: IPv4Address, pods: tuple[IPv4Address, ...] = PODS) -> Verdict:
    served = tuple(ExternalEndpoint(a, Protocol.TCP, 80) for a in addresses)
    return Verdict(key=KEY, kind=VerdictKind.CONFIGURED, reason='serving ' + ', '.join(map(str, served)),
                   event_reason='Configured', served=served, addresses=addresses, service_vip=VIP, pod_ips=pods)


def not_local() -> Verdict:
    return Verdict(key=KEY, kind=VerdictKind.NOT_LOCAL, reason='none of the addresses 192.0.2.10 is here',
                   event_reason=EVENT_REASONS[VerdictKind.NOT_LOCAL], service_vip=VIP, pod_ips=PODS)


def waiting(event_reason: str = 'ServiceNotFound', reason: str = 'Service demo/echo not found') -> Verdict:
    return Verdict(key=KEY, kind=VerdictKind.WAITING, reason=reason, event_reason=event_reason)


def problem(kind: VerdictKind, reason: str) -> Verdict:
    return Verdict(key=KEY, kind=kind, reason=reason, event_reason=EVENT_REASONS[kind])


def write(current: dict[str, Any], verdict: Verdict, *, instance: str = 'ap1', now: str = T0,
          generation: int | None = 3) -> tuple[dict[str, Any], status.StatusChange]:
    change = status.compute(verdict=verdict, current=current, instance=instance, now=now, generation=generation)
    return (merge_patch(current, change.patch) if change.patch else current), change


def conditions(st: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c['type']: (c['status'], c['reason'], c['lastTransitionTime']) for c in st['conditions']}


def test_a_configured_mapping_gets_smartnat_fields_conditions_and_its_appliance_entry() -> None:
    st, change = write({}, configured(A))
    assert st['invalid'] == 'no' and st['serviceVIP'] == '10.96.0.10' and st['observedGeneration'] == 3
    assert st['configuredAddresses'] == {'192.0.2.10': {'podIPs': ['10.244.1.2', '10.244.2.2']}}
    assert st['appliances'] == {'ap1': {'configured': ['192.0.2.10:80/tcp'], 'message': 'serving 192.0.2.10:80/tcp',
                                        'lastSync': T0}}
    assert conditions(st) == {'Ready': ('True', 'Resolved', T0), 'Invalid': ('False', 'Valid', T0),
                              'Conflict': ('False', 'NoConflict', T0)}
    assert [c['type'] for c in st['conditions']] == ['Ready', 'Invalid', 'Conflict']
    assert all(c['observedGeneration'] == 3 for c in st['conditions'])
    assert change.shared
    assert change.events == (status.Event('Normal', 'Configured', 'appliance ap1 serves 192.0.2.10:80/tcp'),)


def test_the_same_verdict_later_writes_nothing() -> None:
    st, _ = write({}, configured(A))
    again = status.compute(verdict=configured(A), current=st, instance='ap1', now=T1, generation=3)
    assert again == status.StatusChange(patch=None, shared=False, events=())


def test_only_new_pod_ips_patch_only_this_appliance_s_address_key() -> None:
    st, _ = write({}, configured(A))
    st, change = write(st, configured(A, pods=PODS[:1]), now=T1)
    assert change.patch == {'configuredAddresses': {'192.0.2.10': {'podIPs': ['10.244.1.2']}}}
    assert not change.shared and change.events == ()


def test_transition_time_stays_while_status_and_reason_stay() -> None:
    st, change = write({}, waiting())
    assert change.events == (status.Event('Warning', 'ServiceNotFound', 'Service demo/echo not found'),)
    st, change = write(st, waiting(reason='Service demo/echo not found (renamed?)'), now=T1)
    assert conditions(st)['Ready'] == ('False', 'ServiceNotFound', T0) and change.events == ()
    st, change = write(st, waiting('NoReadyEndpoints', 'no ready endpoints'), now=T2)
    assert conditions(st)['Ready'] == ('False', 'NoReadyEndpoints', T2)
    assert conditions(st)['Invalid'] == ('False', 'Valid', T0)
    assert [e.reason for e in change.events] == ['NoReadyEndpoints']


def test_invalid_and_conflict_are_warnings_and_smartnat_s_invalid_field() -> None:
    st, change = write({}, problem(VerdictKind.INVALID, 'spec.ports[0].port: 0 is not a port number (1-65535)'))
    assert st['invalid'] == 'spec.ports[0].port: 0 is not a port number (1-65535)'
    assert conditions(st)['Invalid'][:2] == ('True', 'InvalidMapping')
    assert conditions(st)['Ready'][:2] == ('False', 'InvalidMapping')
    assert [(e.type, e.reason) for e in change.events] == [('Warning', 'InvalidMapping')]

    st, change = write(st, problem(VerdictKind.CONFLICT, 'port 80/TCP on 192.0.2.10 is already mapped by a/web'), now=T1)
    assert st['invalid'] == 'port 80/TCP on 192.0.2.10 is already mapped by a/web'
    assert conditions(st)['Conflict'] == ('True', 'EndpointConflict', T1)
    assert conditions(st)['Invalid'] == ('False', 'Valid', T1)
    assert [(e.type, e.reason) for e in change.events] == [('Warning', 'EndpointConflict')]


def test_every_appliance_computes_the_same_shared_fields() -> None:
    # ap1 has the address, ap2 has not: their shared fields agree, so ap2 writes nothing.
    st, _ = write({}, configured(A), instance='ap1')
    after = status.compute(verdict=not_local(), current=st, instance='ap2', now=T1, generation=3)
    assert after.patch is None


def test_two_appliances_keep_their_own_keys_and_entries() -> None:
    st, _ = write({}, configured(A), instance='ap1')
    st, change = write(st, configured(B), instance='ap2', now=T1)
    assert change.patch == {
        'configuredAddresses': {'198.51.100.10': {'podIPs': ['10.244.1.2', '10.244.2.2']}},
        'appliances': {'ap2': {'configured': ['198.51.100.10:80/tcp'], 'message': 'serving 198.51.100.10:80/tcp',
                               'lastSync': T1}},
    }
    # ap1 loses its address: it nulls its own key and entry, and warns once.
    st, change = write(st, not_local(), instance='ap1', now=T2)
    assert change.patch == {'configuredAddresses': {'192.0.2.10': None}, 'appliances': {'ap1': None}}
    assert [(e.type, e.reason) for e in change.events] == [('Warning', 'AddressNotOnHost')]
    assert status.compute(verdict=not_local(), current=st, instance='ap1', now=T2, generation=3).patch is None


def test_an_address_another_appliance_still_serves_keeps_its_key() -> None:
    st, _ = write({}, configured(A), instance='ap1')
    st, _ = write(st, configured(A), instance='ap2')
    st, change = write(st, not_local(), instance='ap1', now=T1)
    assert change.patch == {'appliances': {'ap1': None}}
    assert '192.0.2.10' in st['configuredAddresses']


def test_without_a_status_subresource_no_generation_is_written() -> None:
    st, _ = write({}, configured(A), generation=None)
    assert 'observedGeneration' not in st
    assert all('observedGeneration' not in c for c in st['conditions'])


def test_a_restart_with_the_status_already_right_posts_no_event() -> None:
    for verdict in (configured(A), waiting(), problem(VerdictKind.INVALID, 'bad')):
        st, first = write({}, verdict)
        assert first.events
        assert status.compute(verdict=verdict, current=st, instance='ap1', now=T2, generation=3).events == ()


def test_release_drops_entries_and_the_addresses_nobody_else_claims() -> None:
    st, _ = write({}, configured(A), instance='ap1')
    st, _ = write(st, configured(A, B), instance='ap2')
    st, _ = write(st, configured(B), instance='ap3')
    patch = status.release(current=st, instances=['ap2'])
    assert patch == {'appliances': {'ap2': None}}  # A is still ap1's, B still ap3's
    patch = status.release(current=st, instances=['ap1', 'ap2'])
    assert patch == {'appliances': {'ap1': None, 'ap2': None}, 'configuredAddresses': {'192.0.2.10': None}}
    assert status.release(current=st, instances=['gone']) is None
    assert sorted(status.holders(st)) == ['ap1', 'ap2', 'ap3']


def test_merge_diff_nulls_removed_keys_and_recurses_into_objects() -> None:
    old = {'a': 1, 'b': {'x': 1, 'y': 2}, 'c': [1], 'd': 'gone'}
    new = {'a': 1, 'b': {'x': 1, 'y': 3, 'z': 4}, 'c': [1, 2]}
    patch = status.merge_diff(old, new)
    assert patch == {'b': {'y': 3, 'z': 4}, 'c': [1, 2], 'd': None}
    assert merge_patch(old, patch) == new


def test_unknown_fields_and_conditions_of_others_are_kept() -> None:
    current = {'conditions': [{'type': 'Audited', 'status': 'True', 'reason': 'Yes', 'message': '',
                               'lastTransitionTime': T0}],
               'configuredAddresses': {'192.0.2.10': {'podIPs': [], 'note': 'kept'}}}
    st, _ = write(current, configured(A))
    assert [c['type'] for c in st['conditions']] == ['Ready', 'Invalid', 'Conflict', 'Audited']
    assert st['configuredAddresses']['192.0.2.10']['note'] == 'kept'


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=12)
FIELDS = st.sampled_from(['conditions', 'appliances', 'configuredAddresses', 'invalid', 'observedGeneration', 'x'])
VERDICTS = st.sampled_from([configured(A), configured(A, B), not_local(), waiting(),
                            problem(VerdictKind.INVALID, 'bad'), problem(VerdictKind.DELETING, 'going')])


@settings(max_examples=300, deadline=None)
@example(current={'conditions': 5}, verdict=problem(VerdictKind.INVALID, 'bad'))
@example(current={'conditions': [{'type': ['x']}]}, verdict=problem(VerdictKind.INVALID, 'bad'))
@example(current={'appliances': {'ap1': 5}, 'configuredAddresses': [1]}, verdict=configured(A))
@given(current=JSON | st.dictionaries(FIELDS, JSON | st.lists(st.dictionaries(st.sampled_from(['type', 'status']), JSON))),
       verdict=VERDICTS)
def test_compute_is_total_over_any_json_status(current: Any, verdict: Verdict) -> None:
    change = status.compute(verdict=verdict, current=current, instance='ap1', now=T0, generation=3)
    status.release(current=current, instances=['ap1', 'ap2'])
    status.foreign_addresses(current)
    if change.patch is not None and isinstance(current, dict):
        # The result is well-formed, so computing again from it changes nothing.
        again = status.compute(verdict=verdict, current=merge_patch(current, {**change.patch}), instance='ap1',
                               now=T0, generation=3)
        assert again.patch is None


def test_long_reasons_are_clipped_below_the_crd_limit() -> None:
    reason = 'spec.ports: ' + 'port 80/tcp is listed twice; ' * 1000
    obj, change = write({}, problem(VerdictKind.INVALID, reason))
    assert len(obj['invalid']) == status.MESSAGE_LIMIT and obj['invalid'].endswith('…')
    assert all(len(c['message']) <= status.MESSAGE_LIMIT for c in obj['conditions'])
    assert write(obj, problem(VerdictKind.INVALID, reason))[1].patch is None


@pytest.mark.parametrize("endpoints", [("10.10.0.2",), ("10.10.0.2", "127.0.0.5")], ids=["own", "own-and-loopback"])
def test_an_appliance_refusing_its_own_address_does_not_fight_its_pair_over_ready(endpoints: tuple[str, ...]) -> None:
    # Box a owns 10.10.0.2 and refuses it as the only endpoint; box b does not own it and
    # serves the Mapping. Each rewrote the shared Ready condition in turn while box a's
    # refusal was a Waiting verdict; as NotLocal (per appliance) the shared part agrees.
    import dataclasses

    from smartnatd.model import Snapshot
    from smartnatd.planner import plan
    from tests.builders import HOST, SETTINGS, endpoint_slice, mapping, service

    cluster = dict(mappings=(mapping("a", mode="direct"),), services=(service(),),
                   endpoint_slices=(endpoint_slice(ready=endpoints),))
    box_a = dataclasses.replace(HOST, local_addresses=frozenset({IPv4Address("10.10.0.2")}))
    (on_a,) = plan(Snapshot(host=box_a, **cluster), SETTINGS).verdicts  # type: ignore[arg-type]
    (on_b,) = plan(Snapshot(host=HOST, **cluster), SETTINGS).verdicts  # type: ignore[arg-type]
    assert (on_a.kind, on_a.event_reason, on_b.kind) == (VerdictKind.NOT_LOCAL, "TargetRefused", VerdictKind.CONFIGURED)

    st, _ = write({}, on_b, instance="b")
    st, change = write(st, on_a, instance="a", now=T1)
    assert not change.shared, change.patch
    st, change = write(st, on_b, instance="b", now=T2)
    assert change.patch is None
    assert conditions(st)["Ready"] == ("True", "Resolved", T0)
    assert list(st["appliances"]) == ["b"]


def test_patches_that_add_or_drop_an_entry_or_an_address_key_carry_a_precondition() -> None:
    # Two appliances trading an address computed these from views that missed the other's
    # latest write; unguarded, the address key was lost (tests/e2e/test_failover.py).
    st, first = write({}, configured(A), instance='ap1')
    assert first.shared  # shared fields, the entry and the key all new
    st, joined = write(st, configured(A), instance='ap2', now=T1)
    assert joined.shared and set(joined.patch or ()) == {'appliances'}  # only its entry: still guarded
    st, renamed = write(st, dataclasses.replace(configured(A), reason='serving 192.0.2.10:80/tcp, now named'),
                        instance='ap2', now=T2)
    assert renamed.patch is not None and not renamed.shared  # its own entry's message: nobody else's business
    st, released = write(st, not_local(), instance='ap1', now=T2)
    assert released.shared and set(st['appliances']) == {'ap2'} and st['configuredAddresses'] == {
        '192.0.2.10': {'podIPs': ['10.244.1.2', '10.244.2.2']}}
