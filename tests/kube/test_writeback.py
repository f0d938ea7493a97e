"""Write-back against the emulated API server: status, Events, finalizer, Leases, both CRDs.

Each `Appliance` is what one smartnatd process has of the Kubernetes edge: a KubeSource
(watches into its own store and cache, its Lease, write-back) with its own instance name and
host addresses, and a real kubernetes_asyncio client. A test plays the reconciler: it plans
from the appliance's store and calls `publish()`, as a pass does after a successful apply.
Assertions are on the requests the emulator recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration, CoordinationV1Api

from smartnatd.errors import KubeApiError
from smartnatd.kube import status as status_mod
from smartnatd.kube.client import KubeSource
from smartnatd.kube.events import Budget, EventRecorder, Recent, event_name
from smartnatd.kube.lease import Leases
from smartnatd.kube.objects import FINALIZER
from smartnatd.planner import Plan, plan
from smartnatd.reconciler import LogWriteback
from smartnatd.settings import Settings
from smartnatd.store import Store
from tests.builders import host
from tests.kernel.harness import async_wait_until

from .conftest import mapping_body, service_body, slice_body
from .emulator import EVENTS, JSON_PATCH, LEASES, MAPPINGS, MERGE_PATCH, SERVICES, ENDPOINTSLICES, KubeEmulator

NS = 'demo'
HOSTS = {
    'ap1': host(('ext1', 3, ['192.0.2.10/24'])),
    'ap2': host(('ext2', 4, ['198.51.100.10/24'])),
    # Both hold 192.0.2.10 (anycast, or a failover caught half way).
    'ap3': host(('ext1', 3, ['192.0.2.10/24'])),
}


class Clock:
    """A wall clock the test moves forward (Lease expiry, the finalize deadline)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return datetime.datetime.now(datetime.UTC).timestamp() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclasses.dataclass
class Appliance:
    name: str
    source: KubeSource
    settings: Settings
    client: ApiClient
    task: asyncio.Task[None] | None = None
    previous: Plan | None = None

    @property
    def writeback(self) -> Any:
        return self.source.writeback

    def plan(self) -> Plan:
        return plan(self.source.store.snapshot(), self.settings)

    async def sync(self) -> Plan:
        """One pass as the reconciler makes it once the apply succeeded."""
        new = self.plan()
        await self.source.writeback.publish(new, previous=self.previous)
        self.previous = new
        return new

    async def stop(self) -> None:
        """The process dies: no more watches, no Lease renewals."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None


@pytest.fixture()
async def appliances(kube_api: KubeEmulator) -> AsyncIterator[Callable[..., Any]]:
    made: list[Appliance] = []

    async def start(name: str = 'ap1', *, clock: Callable[[], float] | None = None,
                    max_wait_minutes: int = 60) -> Appliance:
        settings = Settings(interfaces_pattern=r'^ext[0-9]+$', instance_name=name,
                            max_finalize_wait_minutes=max_wait_minutes, lease_duration_sec=15)
        client = ApiClient(Configuration(host=kube_api.url))
        store = Store()
        store.set_host(HOSTS.get(name, host()))
        source = KubeSource(api_client=client, settings=settings, store=store,
                            **({'wall_clock': clock} if clock else {}))
        appliance = Appliance(name=name, source=source, settings=settings, client=client)
        appliance.task = asyncio.create_task(source.run())
        made.append(appliance)
        await async_wait_until(lambda: store.is_synced, timeout=5, message=f'{name} synced')
        await async_wait_until(lambda: kube_api.current(LEASES, f'smartnat-{name}', namespace='smartnat-system'),
                               timeout=5, message=f'{name} Lease')
        return appliance

    yield start
    for appliance in made:
        await appliance.stop()
        await appliance.client.close()


async def caught_up(kube_api: KubeEmulator, *appliances: Appliance) -> None:
    """Every watch of these appliances has seen every change made so far."""
    running = [a for a in appliances if a.task is not None]
    await kube_api.wait_for_watches(count=3 * len(running))
    kube_api.send_bookmarks()
    target = kube_api.resource_version
    await async_wait_until(
        lambda: all(w.resource_version == target for a in running for w in a.source.watchers),
        timeout=5, message='watches caught up')


async def echo_cluster(kube_api: KubeEmulator, *, addresses: tuple[str, ...] = ('192.0.2.10',),
                       name: str = 'echo', **kw: Any) -> None:
    if kube_api.current(SERVICES, 'echo', namespace=NS) is None:
        await kube_api.create_object(SERVICES, service_body())
        await kube_api.create_object(ENDPOINTSLICES, slice_body())
    await kube_api.create_object(MAPPINGS, mapping_body(name, addresses=addresses, **kw))


def current(kube_api: KubeEmulator, name: str = 'echo', namespace: str = NS) -> dict[str, Any]:
    obj = kube_api.current(MAPPINGS, name, namespace=namespace)
    assert obj is not None, f'{namespace}/{name} is gone'
    return obj


def writes(kube_api: KubeEmulator, name: str | None = None) -> list[tuple[str, str | None, Any]]:
    """(subresource or 'main', content type, body) of every Mapping patch, oldest first."""
    return [(r.subresource or 'main', r.content_type, r.body)
            for r in kube_api.recorded(verb='patch', resource=MAPPINGS, **({'name': name} if name else {}))]


def events(kube_api: KubeEmulator) -> list[tuple[str, str, str]]:
    return [(r.body['type'], r.body['reason'], r.body['message'])
            for r in kube_api.recorded(verb='create', resource=EVENTS) if r.status == 201]


# --- status ----------------------------------------------------------------------------

async def test_status_is_written_once_not_at_every_pass(kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()

    [(finalizer_to, finalizer_type, finalizer_body), (status_to, status_type, status_body)] = writes(kube_api)
    assert (finalizer_to, finalizer_type) == ('main', MERGE_PATCH)
    assert finalizer_body['metadata']['finalizers'] == [FINALIZER]
    assert finalizer_body['metadata']['resourceVersion']  # a precondition: no lost update of the list
    assert (status_to, status_type) == ('status', MERGE_PATCH)
    assert status_body['metadata']['resourceVersion']  # shared fields: precondition too
    st = current(kube_api)['status']
    assert st['invalid'] == 'no' and st['serviceVIP'] == '10.96.0.10'
    assert st['observedGeneration'] == current(kube_api)['metadata']['generation']
    assert st['configuredAddresses'] == {'192.0.2.10': {'podIPs': ['10.244.1.2']}}
    assert st['appliances']['ap1']['configured'] == ['192.0.2.10:80/tcp']
    assert {c['type']: c['status'] for c in st['conditions']} == {'Ready': 'True', 'Invalid': 'False', 'Conflict': 'False'}
    assert events(kube_api) == [('Normal', 'Configured', 'appliance ap1 serves 192.0.2.10:80/tcp')]
    [event] = kube_api.recorded(verb='create', resource=EVENTS)
    assert event.body['metadata']['name'].startswith('echo.') and event.body['involvedObject']['uid']

    for _ in range(3):
        await caught_up(kube_api, ap1)
        await ap1.sync()
    assert len(writes(kube_api)) == 2 and len(events(kube_api)) == 1

    # Only the pods change: one patch of this appliance's key, no Event, no precondition needed.
    await kube_api.patch_object(ENDPOINTSLICES, 'echo-1', {'endpoints': [
        {'addresses': ['10.244.1.2'], 'conditions': {'ready': True}},
        {'addresses': ['10.244.2.2'], 'conditions': {'ready': True}}]}, namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    *_, (_, _, body) = writes(kube_api)
    assert body == {'status': {'configuredAddresses': {'192.0.2.10': {'podIPs': ['10.244.1.2', '10.244.2.2']}}}}
    assert len(events(kube_api)) == 1


async def test_events_on_transitions_only_and_none_after_a_restart(kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    await kube_api.delete_object(SERVICES, 'echo', namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    await ap1.sync()
    assert events(kube_api)[1:] == [('Warning', 'ServiceNotFound', 'Service demo/echo not found')]
    st = current(kube_api)['status']
    assert 'ap1' not in st.get('appliances', {}) and st['configuredAddresses'] == {}
    assert [c['reason'] for c in st['conditions'] if c['type'] == 'Ready'] == ['ServiceNotFound']

    await ap1.stop()
    restarted = await appliances('ap1')  # a new process: no previous plan, the status shows it all
    await caught_up(kube_api, restarted)
    before = len(kube_api.recorded(verb='patch', resource=MAPPINGS))
    await restarted.sync()
    assert len(kube_api.recorded(verb='patch', resource=MAPPINGS)) == before
    assert len(events(kube_api)) == 2

    await kube_api.create_object(SERVICES, service_body())
    await caught_up(kube_api, restarted)
    await restarted.sync()
    assert events(kube_api)[2:] == [('Normal', 'Configured', 'appliance ap1 serves 192.0.2.10:80/tcp')]


async def test_conflicts_across_namespaces_the_oldest_wins_and_both_appliances_agree(
        kube_api: KubeEmulator, appliances: Any) -> None:
    await kube_api.create_object(SERVICES, service_body(namespace='team-a'))
    await kube_api.create_object(ENDPOINTSLICES, slice_body(namespace='team-a'))
    await kube_api.create_object(SERVICES, service_body(namespace='team-b'))
    await kube_api.create_object(ENDPOINTSLICES, slice_body(namespace='team-b'))
    await kube_api.create_object(MAPPINGS, mapping_body('web', namespace='team-a'),
                                 creation_timestamp='2024-01-02T00:00:00Z')
    await kube_api.create_object(MAPPINGS, mapping_body('web', namespace='team-b'),
                                 creation_timestamp='2024-01-01T00:00:00Z')  # older: it wins
    ap1 = await appliances('ap1')
    ap2 = await appliances('ap2')  # does not hold 192.0.2.10, yet computes the same conditions
    await caught_up(kube_api, ap1, ap2)
    # Both at once, from the same view: one wins each shared write, the other gets a 409.
    await asyncio.gather(ap1.sync(), ap2.sync())
    for _ in range(3):
        await caught_up(kube_api, ap1, ap2)
        await asyncio.gather(ap1.sync(), ap2.sync())

    loser = current(kube_api, 'web', 'team-a')['status']
    winner = current(kube_api, 'web', 'team-b')['status']
    conflict = {c['type']: (c['status'], c['reason'], c['message']) for c in loser['conditions']}
    assert conflict['Conflict'] == ('True', 'EndpointConflict', 'port 80/TCP on 192.0.2.10 is already mapped by team-b/web')
    assert conflict['Ready'][:2] == ('False', 'EndpointConflict')
    assert loser['invalid'] == 'port 80/TCP on 192.0.2.10 is already mapped by team-b/web'
    assert 'appliances' not in loser or not loser['appliances']
    assert winner['invalid'] == 'no' and list(winner['appliances']) == ['ap1']
    # One Event for the conflict, whichever appliance won the write.
    assert [e for e in events(kube_api) if e[1] == 'EndpointConflict'] == [
        ('Warning', 'EndpointConflict', 'port 80/TCP on 192.0.2.10 is already mapped by team-b/web')]
    # Settled: nobody writes any more.
    settled = len(kube_api.recorded(verb='patch', resource=MAPPINGS))
    await caught_up(kube_api, ap1, ap2)
    await asyncio.gather(ap1.sync(), ap2.sync())
    assert len(kube_api.recorded(verb='patch', resource=MAPPINGS)) == settled


async def test_a_verdict_planned_from_an_older_generation_is_not_written(
        kube_api: KubeEmulator, appliances: Any) -> None:
    body = mapping_body('echo')
    body['spec']['ports'][0]['port'] = 0
    await kube_api.create_object(SERVICES, service_body())
    await kube_api.create_object(ENDPOINTSLICES, slice_body())
    await kube_api.create_object(MAPPINGS, body)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    stale = ap1.plan()  # planned from generation 1: invalid
    await kube_api.patch_object(MAPPINGS, 'echo', {'spec': {'ports': [{'port': 80, 'protocol': 'tcp', 'servicePort': 80}]}},
                                namespace=NS)
    await caught_up(kube_api, ap1)  # the cache holds generation 2: valid
    assert current(kube_api)['metadata']['generation'] == 2
    await ap1.writeback.publish(stale, previous=None)
    assert writes(kube_api) == []
    assert events(kube_api) == []

    ap1.previous = stale
    await ap1.sync()  # the pass the spec change triggered
    obj = current(kube_api)
    assert (obj['status']['observedGeneration'], obj['status']['invalid']) == (2, 'no')
    assert [e[1] for e in events(kube_api)] == ['Configured']


async def not_local_mappings(kube_api: KubeEmulator, count: int) -> None:
    """m00, m01, ... on another appliance's address: ap1 writes their status only, no finalizer."""
    await kube_api.create_object(SERVICES, service_body())
    await kube_api.create_object(ENDPOINTSLICES, slice_body())
    for i in range(count):
        await kube_api.create_object(MAPPINGS, mapping_body(f'm{i:02}', addresses=('203.0.113.5',), port=1000 + i))


async def test_a_refused_write_stops_the_batch_backs_off_and_is_logged_once(
        kube_api: KubeEmulator, appliances: Any, caplog: pytest.LogCaptureFixture) -> None:
    await not_local_mappings(kube_api, 40)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    refused = kube_api.fail_next(10_000, status=403, verb='patch', resource=MAPPINGS, subresource='status',
                                 message='mappings.smartnat.aureacentral.com "m00" is forbidden')
    caplog.set_level(logging.DEBUG, logger='smartnatd.kube.writeback')
    await ap1.sync()
    first = len(refused.hits)
    assert 1 <= first <= 16  # the writes already in flight; the rest of the batch waits
    assert ap1.writeback.timer.due_in is not None
    for _ in range(3):
        await ap1.sync()  # the timer's passes while it keeps failing: one write finds out
    assert len(refused.hits) == first + 3
    assert ap1.writeback._retry_delay == 4.0  # 0.5, 1, 2, 4: the next pass is backed off
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and 'check etc/rbac.yaml' in warnings[0]

    refused.remaining = 0  # the Role is fixed
    await ap1.sync()
    assert all(current(kube_api, f'm{i:02}').get('status', {}).get('invalid') == 'no' for i in range(40))
    assert 'status write-back works again' in caplog.text


async def test_finalizers_added_in_one_pass_are_one_log_line(
        kube_api: KubeEmulator, appliances: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The first start on a cluster of 10k Mappings logged 5,000 "finalizer added" lines.
    await kube_api.create_object(SERVICES, service_body())
    await kube_api.create_object(ENDPOINTSLICES, slice_body())
    for i in range(5):
        await kube_api.create_object(MAPPINGS, mapping_body(f'm{i:02}', port=1000 + i))
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    caplog.set_level(logging.INFO, logger='smartnatd.kube.writeback')
    await ap1.sync()
    assert all(FINALIZER in current(kube_api, f'm{i:02}')['metadata']['finalizers'] for i in range(5))
    lines = [r.getMessage() for r in caplog.records if 'finalizer' in r.getMessage()]
    assert lines == [f'finalizer {FINALIZER} added to 5 Mappings: demo/m00, demo/m01, demo/m02 and 2 more']

    caplog.clear()
    await kube_api.create_object(MAPPINGS, mapping_body('m05', port=1005))
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert [r.getMessage() for r in caplog.records if 'finalizer' in r.getMessage()] == [
        f'mapping demo/m05: finalizer {FINALIZER} added'
    ]


async def test_a_write_refused_for_one_mapping_does_not_hold_up_the_others(
        kube_api: KubeEmulator, appliances: Any, caplog: pytest.LogCaptureFixture) -> None:
    await not_local_mappings(kube_api, 5)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    # m00 sorts first: a 422 for it alone (its object breaks a webhook's rule, say).
    refused = kube_api.fail_next(10_000, status=422, verb='patch', resource=MAPPINGS, subresource='status', name='m00',
                                 message='admission webhook denied the request')
    caplog.set_level(logging.DEBUG, logger='smartnatd.kube.writeback')
    for _ in range(3):
        await ap1.sync()
    assert all(current(kube_api, f'm{i:02}').get('status', {}).get('invalid') == 'no' for i in range(1, 5))
    assert refused.hits
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and 'refused for mapping demo/m00' in warnings[0], warnings


async def test_a_surprise_in_one_mapping_is_logged_once_and_the_others_are_written(
        kube_api: KubeEmulator, appliances: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await echo_cluster(kube_api, name='echo')
    await echo_cluster(kube_api, name='odd', addresses=('203.0.113.5',))
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    compute = status_mod.compute

    def exploding(*, verdict: Any, **kw: Any) -> Any:  # a bug that only this Mapping's status hits
        if verdict.key.name == 'odd':
            raise RuntimeError('surprise')
        return compute(verdict=verdict, **kw)

    monkeypatch.setattr(status_mod, 'compute', exploding)
    await ap1.sync()
    assert current(kube_api)['status']['appliances'].keys() == {'ap1'}
    assert 'status' not in current(kube_api, 'odd')
    await kube_api.patch_object(MAPPINGS, 'odd', {'metadata': {'labels': {'touched': 'yes'}}}, namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    skipped = [r for r in caplog.records if 'skipped mapping demo/odd' in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING and skipped[0].exc_info


async def test_a_surprise_every_mapping_hits_logs_one_traceback(
        kube_api: KubeEmulator, appliances: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ('a', 'b', 'c'):
        await echo_cluster(kube_api, name=name, addresses=('203.0.113.5',), port={'a': 80, 'b': 81, 'c': 82}[name])
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)

    def exploding(**kw: Any) -> Any:  # a bug every Mapping's status hits
        raise RuntimeError('surprise')

    monkeypatch.setattr(status_mod, 'compute', exploding)
    await ap1.sync()
    skipped = [r for r in caplog.records if 'status write-back skipped mapping' in r.getMessage()]
    assert len(skipped) == 3  # each Mapping named once...
    assert sum(1 for r in skipped if r.exc_info) == 1  # ...with one traceback for the one bug


async def test_a_malformed_status_is_overwritten_not_fatal(kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    await kube_api.patch_object(MAPPINGS, 'echo', {'status': {'conditions': [{'type': ['Ready']}, 5]}},
                                namespace=NS, subresource='status')
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert [c['type'] for c in current(kube_api)['status']['conditions']] == ['Ready', 'Invalid', 'Conflict']


async def test_a_verdict_for_a_deleted_and_recreated_namesake_is_not_written(
        kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    stale = ap1.plan()
    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await echo_cluster(kube_api, addresses=('198.51.100.99',))
    await caught_up(kube_api, ap1)
    await ap1.writeback.publish(stale, previous=None)
    assert writes(kube_api) == []


async def test_a_failed_write_is_retried_on_a_later_pass(kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    kube_api.fail_next(1, status=503, verb='patch', resource=MAPPINGS, subresource='status')
    await ap1.sync()
    assert 'status' not in current(kube_api)
    assert ap1.writeback.timer.due_in is not None  # a pass is asked for, with backoff
    await ap1.sync()
    assert current(kube_api)['status']['appliances']['ap1']
    assert [e[1] for e in events(kube_api)] == ['Configured']


async def test_a_conflict_on_write_is_looked_at_again(kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    kube_api.fail_next(1, status=409, verb='patch', resource=MAPPINGS, subresource='status')
    await ap1.sync()
    assert 'status' not in current(kube_api) and events(kube_api) == []
    assert ap1.writeback.timer.due_in is not None and ap1.writeback.timer.due_in <= 0.5
    await ap1.sync()
    assert current(kube_api)['status']['appliances']['ap1']
    assert [e[1] for e in events(kube_api)] == ['Configured']


# --- Events: repeats aggregated --------------------------------------------------------

async def set_ready(kube_api: KubeEmulator, ready: bool) -> None:
    """The one pod of echo goes ready or not ready (another client: the EndpointSlice controller)."""
    await kube_api.patch_object(ENDPOINTSLICES, 'echo-1', {'endpoints': [
        {'addresses': ['10.244.1.2'], 'conditions': {'ready': ready}}]}, namespace=NS)


async def flap(kube_api: KubeEmulator, ap: Appliance, clock: Clock, times: int) -> list[Plan]:
    """The pod goes not ready and ready again `times` times, a pass after each change, 5 s apart."""
    plans = []
    for _ in range(times):
        for ready in (False, True):
            clock.advance(5)
            await set_ready(kube_api, ready)
            await caught_up(kube_api, ap)
            plans.append(await ap.sync())
    return plans


async def stored_events(kube_api: KubeEmulator) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The Event objects the API server holds, by (reason, message)."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in (await kube_api.list_objects(EVENTS, namespace=NS))['items']:
        found.setdefault((e['reason'], e['message']), []).append(e)
    return found


CONFIGURED = ('Configured', 'appliance ap1 serves 192.0.2.10:80/tcp')
NOT_READY = ('NoReadyEndpoints', 'Service demo/echo has no ready endpoints for port 80/TCP')


async def test_a_flapping_mapping_makes_one_event_per_reason_and_message_with_a_count(
        kube_api: KubeEmulator, appliances: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1', clock=clock)
    await caught_up(kube_api, ap1)
    plans = [await ap1.sync()]
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    plans += await flap(kube_api, ap1, clock, 4)

    stored = await stored_events(kube_api)
    assert sorted(stored) == [CONFIGURED, NOT_READY]
    [configured], [not_ready] = stored[CONFIGURED], stored[NOT_READY]
    assert (configured['count'], not_ready['count']) == (5, 4)
    for e in (configured, not_ready):
        assert e['lastTimestamp'] > e['firstTimestamp']  # 5 s apart at least, second resolution
    assert configured['lastTimestamp'] > not_ready['lastTimestamp']  # the pod ended ready, 5 s later
    assert len(events(kube_api)) == 2  # created once each...
    patches = kube_api.recorded(verb='patch', resource=EVENTS)
    assert len(patches) == 7 and {(p.status, p.content_type) for p in patches} == {(200, MERGE_PATCH)}
    assert set(patches[-1].body) == {'count', 'lastTimestamp'}  # ...and only the count moves

    # The transitions are logged once each, in the same lines the file source's write-back writes.
    kube_lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == 'smartnatd.kube.writeback']
    assert kube_lines.count((logging.WARNING, 'mapping demo/echo NoReadyEndpoints: ' + NOT_READY[1])) == 4
    assert kube_lines.count((logging.INFO, 'mapping demo/echo problem cleared (NoReadyEndpoints); now Configured: '
                             'serving 192.0.2.10:80/tcp')) == 4
    caplog.clear()
    log_writeback = LogWriteback()
    for previous, new in zip(plans, plans[1:]):
        await log_writeback.publish(new, previous=previous)
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == 'smartnatd.reconciler'] == kube_lines


async def test_a_repeat_after_the_window_is_a_new_event(kube_api: KubeEmulator, appliances: Any) -> None:
    clock = Clock()
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1', clock=clock)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    await flap(kube_api, ap1, clock, 1)
    clock.advance(11 * 60)  # past the 10 minutes since the last occurrence
    await flap(kube_api, ap1, clock, 1)
    stored = await stored_events(kube_api)
    assert sorted((key, e['count']) for key, items in stored.items() for e in items) == [
        (CONFIGURED, 1), (CONFIGURED, 2), (NOT_READY, 1), (NOT_READY, 1)]
    assert len({e['metadata']['name'] for items in stored.values() for e in items}) == 4


async def test_a_patch_answered_404_creates_the_event_again(kube_api: KubeEmulator, appliances: Any) -> None:
    clock = Clock()
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1', clock=clock)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    [configured] = (await stored_events(kube_api))[CONFIGURED]
    name = configured['metadata']['name']
    await kube_api.delete_object(EVENTS, name, namespace=NS)  # as the API server's Event TTL does
    await flap(kube_api, ap1, clock, 1)

    [patch] = kube_api.recorded(verb='patch', resource=EVENTS)
    assert (patch.name, patch.status) == (name, 404)
    [again] = (await stored_events(kube_api))[CONFIGURED]
    assert again['metadata']['name'] == name and again['count'] == 2
    assert again['firstTimestamp'] == configured['firstTimestamp'] < again['lastTimestamp']


def recorder_on(client: ApiClient, **kw: Any) -> EventRecorder:
    from kubernetes_asyncio.client import CoreV1Api
    return EventRecorder(core=CoreV1Api(client), instance='ap1', **kw)


def a_mapping(name: str, rv: str = '1') -> dict[str, Any]:
    return {'metadata': {'name': name, 'namespace': NS, 'uid': f'uid-{name}', 'resourceVersion': rv}}


async def test_the_event_cache_is_bounded_and_forgets_the_least_recent(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    recorder = recorder_on(kube_client, recent=Recent(size=3))
    event = status_mod.Event('Warning', 'NoReadyEndpoints', 'no ready endpoints')
    now = Clock()()
    for n in range(5):
        await recorder.post(a_mapping(f'm{n}'), event, now)
    assert len(recorder.recent) == 3
    await recorder.post(a_mapping('m4', rv='2'), event, now + 1)  # remembered: patched
    await recorder.post(a_mapping('m0', rv='2'), event, now + 1)  # forgotten: a new Event
    assert [r.name.split('.')[0] for r in kube_api.recorded(verb='patch', resource=EVENTS)] == ['m4']
    assert len(kube_api.recorded(verb='create', resource=EVENTS)) == 6
    assert len(recorder.recent) == 3


async def test_over_budget_repeats_are_counted_and_sent_with_the_next_patch(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    recorder = recorder_on(kube_client, budget=Budget(burst=2, refill=300))
    event = status_mod.Event('Warning', 'NoReadyEndpoints', 'no ready endpoints')
    now = Clock()()
    for n in range(5):
        await recorder.post(a_mapping('m', rv=str(n)), event, now + n)
    assert len(kube_api.recorded(verb='create', resource=EVENTS)) == 1
    assert [p.body['count'] for p in kube_api.recorded(verb='patch', resource=EVENTS)] == [2]
    await recorder.post(a_mapping('m', rv='9'), event, now + 300)  # a token again
    assert [p.body['count'] for p in kube_api.recorded(verb='patch', resource=EVENTS)] == [2, 6]


async def test_without_rbac_to_patch_events_each_repeat_is_a_new_event_said_once(
        kube_api: KubeEmulator, kube_client: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    recorder = recorder_on(kube_client)
    event = status_mod.Event('Normal', 'Configured', 'appliance ap1 serves 192.0.2.10:80/tcp')
    now = Clock()()
    kube_api.fail_next(1, status=403, verb='patch', resource=EVENTS)
    for n in range(3):
        await recorder.post(a_mapping('m', rv=str(n)), event, now + n)
    assert len(kube_api.recorded(verb='patch', resource=EVENTS)) == 1
    created = [r.body for r in kube_api.recorded(verb='create', resource=EVENTS) if r.status == 201]
    assert len(created) == 3 and {c['count'] for c in created} == {1}
    assert len({c['metadata']['name'] for c in created}) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 'Apply etc/rbac.yaml' in warnings[0]


async def test_a_403_on_patches_in_flight_together_is_said_once(
        kube_api: KubeEmulator, kube_client: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    # Write-back posts up to 16 Mappings' Events at once (a node going down flaps them all):
    # every patch already in flight gets the 403, but the RBAC hint is one line.
    recorder = recorder_on(kube_client)
    event = status_mod.Event('Normal', 'Configured', 'appliance ap1 serves 192.0.2.10:80/tcp')
    now = Clock()()
    names = [f'm{n}' for n in range(4)]
    for name in names:
        await recorder.post(a_mapping(name), event, now)
    kube_api.fail_next(4, status=403, verb='patch', resource=EVENTS)
    await asyncio.gather(*(recorder.post(a_mapping(name, rv='2'), event, now + 1) for name in names))
    assert len(kube_api.recorded(verb='patch', resource=EVENTS)) == 4
    assert len([r for r in kube_api.recorded(verb='create', resource=EVENTS) if r.status == 201]) == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 'Apply etc/rbac.yaml' in warnings[0], warnings


@pytest.mark.parametrize('cut', ['.', '-'])
async def test_event_names_of_the_longest_mapping_names_are_dns_subdomains(
        kube_api: KubeEmulator, kube_client: ApiClient, cut: str) -> None:
    long_name = 'a' * 235 + cut + 'b' * 17  # 253 characters; the cut lands after the '.' or '-'
    name = event_name(long_name, ['uid', '1'])
    assert len(name) <= 253 and name == 'a' * 235 + '.' + name.rsplit('.', 1)[1]
    await recorder_on(kube_client).post(a_mapping(long_name), status_mod.Event('Normal', 'Configured', 'x'), 0.0)
    [created] = kube_api.recorded(verb='create', resource=EVENTS)
    assert created.status == 201  # the API server took it: a valid name
    assert created.body['metadata']['name'].startswith('a' * 235 + '.') and len(created.body['metadata']['name']) <= 253


# --- finalizer, deletion, Leases -------------------------------------------------------

async def test_two_appliances_the_last_to_finish_removes_the_finalizer(
        kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api, addresses=('192.0.2.10', '198.51.100.10'))
    ap1 = await appliances('ap1')
    ap2 = await appliances('ap2')
    await caught_up(kube_api, ap1, ap2)
    await ap1.sync()
    await caught_up(kube_api, ap1, ap2)
    await ap2.sync()
    obj = current(kube_api)
    assert obj['metadata']['finalizers'] == [FINALIZER]
    assert sorted(obj['status']['appliances']) == ['ap1', 'ap2']
    assert sorted(obj['status']['configuredAddresses']) == ['192.0.2.10', '198.51.100.10']

    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1, ap2)
    kube_api.clear_recorded()
    await ap1.sync()  # ap1 is done; ap2 still holds it and its Lease is fresh
    obj = current(kube_api)
    assert list(obj['status']['appliances']) == ['ap2']
    assert list(obj['status']['configuredAddresses']) == ['198.51.100.10']
    assert obj['metadata']['finalizers'] == [FINALIZER]
    assert ap1.writeback.timer.due_in is not None  # looks again when ap2's Lease would expire

    await caught_up(kube_api, ap2)
    await ap2.sync()
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None
    [ap1_release, ap2_release, removal] = writes(kube_api)
    assert ap1_release[:2] == ('status', MERGE_PATCH) and ap1_release[2]['status'] == {
        'appliances': {'ap1': None}, 'configuredAddresses': {'192.0.2.10': None}}
    assert ap1_release[2]['metadata']['resourceVersion']  # which keys go depends on the others
    assert ap2_release[0] == 'status'
    assert removal == ('main', JSON_PATCH, [{'op': 'test', 'path': '/metadata/finalizers/0', 'value': FINALIZER},
                                            {'op': 'remove', 'path': '/metadata/finalizers/0'}])
    assert [r.name for r in kube_api.recorded(verb='get', resource=LEASES)] == ['smartnat-ap2']


async def test_two_appliances_releasing_one_address_at_once_leave_no_key_behind(
        kube_api: KubeEmulator, appliances: Any) -> None:
    # Each computed its release from a view where the other still held 192.0.2.10, so each
    # kept the key; unguarded, both writes went through and left a key nobody's entry claims,
    # which the finalizer takes for SmartNat's and waits for up to MAX_FINALIZE_WAIT_MINUTES.
    await echo_cluster(kube_api)
    ap1 = await appliances('ap1')
    ap3 = await appliances('ap3')
    await caught_up(kube_api, ap1, ap3)
    await ap1.sync()
    await caught_up(kube_api, ap1, ap3)
    await ap3.sync()
    assert sorted(current(kube_api)['status']['appliances']) == ['ap1', 'ap3']

    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1, ap3)
    await asyncio.gather(ap1.sync(), ap3.sync())  # both from the same view
    for _ in range(3):  # the one that got a 409 looks again
        if kube_api.current(MAPPINGS, 'echo', namespace=NS) is None:
            break
        await caught_up(kube_api, ap1, ap3)
        await asyncio.gather(ap1.sync(), ap3.sync())
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None


async def test_a_dead_appliance_s_entry_is_released_once_its_lease_expired(
        kube_api: KubeEmulator, appliances: Any) -> None:
    clock = Clock()
    await echo_cluster(kube_api, addresses=('192.0.2.10', '198.51.100.10'))
    ap1 = await appliances('ap1', clock=clock)
    ap2 = await appliances('ap2')
    await caught_up(kube_api, ap1, ap2)
    await ap1.sync()
    await caught_up(kube_api, ap1, ap2)
    await ap2.sync()
    await ap2.stop()  # dies: its Lease is no longer renewed
    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1)

    await ap1.sync()  # within ap2's Lease: wait for it
    assert list(current(kube_api)['status']['appliances']) == ['ap2']
    due = ap1.writeback.timer.due_in
    assert due is not None and 5 < due <= 17  # the Lease's 15 s from its last renewal, plus a margin

    clock.advance(20)
    await ap1.sync()  # the timer's pass: ap2's Lease has expired
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None
    [*_, release, removal] = writes(kube_api)
    assert release[:2] == ('status', MERGE_PATCH) and release[2]['status'] == {
        'appliances': {'ap2': None}, 'configuredAddresses': {'198.51.100.10': None}}
    assert release[2]['metadata']['resourceVersion']
    assert removal[1] == JSON_PATCH


async def test_after_max_finalize_wait_the_finalizer_goes_with_a_warning(
        kube_api: KubeEmulator, appliances: Any) -> None:
    clock = Clock()
    await echo_cluster(kube_api, addresses=('192.0.2.10', '198.51.100.10'))
    ap1 = await appliances('ap1', clock=clock, max_wait_minutes=5)
    ap2 = await appliances('ap2', clock=clock)
    await caught_up(kube_api, ap1, ap2)
    await ap1.sync()
    await caught_up(kube_api, ap1, ap2)
    await ap2.sync()
    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1, ap2)
    await ap1.sync()
    assert current(kube_api)['metadata']['finalizers'] == [FINALIZER]
    # ap2 is alive (its Lease is renewed) but never finishes, e.g. its kernel keeps failing.
    clock.advance(6 * 60)
    await ap2.source.leases.renew()
    await ap1.sync()
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None
    assert events(kube_api)[-1] == (
        'Warning', 'FinalizerTimeout',
        'appliances ap2 did not confirm removing the Mapping within SNCTRLR_MAX_FINALIZE_WAIT_MINUTES=5; '
        'finalizer removed anyway')


async def smartnat_serves(kube_api: KubeEmulator, address: str) -> None:
    """SmartNat, still running on the old box during a cut-over, records the address it serves."""
    await kube_api.patch_object(MAPPINGS, 'echo', {'status': {'configuredAddresses': {address: {'podIPs': ['10.244.1.2']}}}},
                                namespace=NS, subresource='status')


async def test_deletion_waits_for_addresses_smartnat_still_serves(kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api, addresses=('192.0.2.10', '203.0.113.5'), finalizers=[FINALIZER])
    await smartnat_serves(kube_api, '203.0.113.5')
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert sorted(current(kube_api)['status']['configuredAddresses']) == ['192.0.2.10', '203.0.113.5']

    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()  # ap1 is done; SmartNat's key has no appliance entry: SmartNat is not
    obj = current(kube_api)
    assert obj['metadata']['finalizers'] == [FINALIZER]
    assert 'ap1' not in obj['status'].get('appliances', {})
    assert list(obj['status']['configuredAddresses']) == ['203.0.113.5']
    assert ap1.writeback.timer.due_in is not None  # at the deadline at the latest

    # SmartNat cleans up and removes its key (it would also drop the finalizer: both may).
    await kube_api.patch_object(MAPPINGS, 'echo', {'status': {'configuredAddresses': {'203.0.113.5': None}}},
                                namespace=NS, subresource='status')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None


async def test_smartnat_s_addresses_are_waited_for_only_until_max_finalize_wait(
        kube_api: KubeEmulator, appliances: Any) -> None:
    clock = Clock()
    await echo_cluster(kube_api, addresses=('203.0.113.5',), finalizers=[FINALIZER])
    await smartnat_serves(kube_api, '203.0.113.5')
    ap1 = await appliances('ap1', clock=clock, max_wait_minutes=5)
    await caught_up(kube_api, ap1)
    await ap1.sync()  # NotLocal here
    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert current(kube_api)['metadata']['finalizers'] == [FINALIZER]
    clock.advance(6 * 60)
    await ap1.sync()
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None
    assert events(kube_api)[-1] == (
        'Warning', 'FinalizerTimeout',
        'SmartNat (status.configuredAddresses 203.0.113.5) did not confirm removing the Mapping within '
        'SNCTRLR_MAX_FINALIZE_WAIT_MINUTES=5; finalizer removed anyway')


async def test_an_invalid_mapping_gets_no_finalizer_and_deletes_cleanly(kube_api: KubeEmulator, appliances: Any) -> None:
    body = mapping_body('broken')
    body['spec']['ports'][0]['port'] = 0
    await kube_api.create_object(MAPPINGS, body)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    obj = current(kube_api, 'broken')
    assert 'finalizers' not in obj['metadata']
    assert obj['status']['invalid'].startswith('spec.ports[0].port: 0 is not a port number')
    assert [(e[0], e[1]) for e in events(kube_api)] == [('Warning', 'InvalidMapping')]
    await kube_api.delete_object(MAPPINGS, 'broken', namespace=NS)
    assert kube_api.current(MAPPINGS, 'broken', namespace=NS) is None


async def test_an_invalid_mapping_finalized_by_smartnat_is_released_on_deletion(
        kube_api: KubeEmulator, appliances: Any) -> None:
    body = mapping_body('broken', finalizers=[FINALIZER])  # SmartNat added it, and served nothing
    body['spec']['addresses'] = ['not-an-ip']
    await kube_api.create_object(MAPPINGS, body)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    await kube_api.delete_object(MAPPINGS, 'broken', namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert kube_api.current(MAPPINGS, 'broken', namespace=NS) is None


async def test_the_finalizer_is_never_added_while_the_mapping_is_deleted(
        kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api, finalizers=['example.com/keep'])
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    stale = ap1.plan()  # planned before the deletion: the Mapping is still Configured here
    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.writeback.publish(stale, previous=None)
    assert writes(kube_api) == []
    assert current(kube_api)['metadata']['finalizers'] == ['example.com/keep']


async def test_the_lease_is_created_then_renewed_by_merge_patch(kube_api: KubeEmulator, appliances: Any) -> None:
    ap1 = await appliances('ap1')
    lease = kube_api.current(LEASES, 'smartnat-ap1', namespace='smartnat-system')
    assert lease['spec']['holderIdentity'] == 'ap1' and lease['spec']['leaseDurationSeconds'] == 15
    await ap1.source.leases.renew()
    [created] = kube_api.recorded(verb='create', resource=LEASES)
    [renewed] = kube_api.recorded(verb='patch', resource=LEASES)
    assert created.namespace == 'smartnat-system'
    assert renewed.content_type == MERGE_PATCH and set(renewed.body['spec']) == {
        'holderIdentity', 'leaseDurationSeconds', 'renewTime'}


async def test_a_lease_renewal_gives_up_after_a_third_of_the_duration(kube_api: KubeEmulator) -> None:
    async with ApiClient(Configuration(host=kube_api.url)) as client:
        leases = Leases(api=CoordinationV1Api(client), namespace='smartnat-system', instance='ap9', duration=3)
        await leases.renew()  # created
        kube_api.fail_next(1, status=0, verb='patch', resource=LEASES, stall=5.0)  # then served, too late
        with pytest.raises(KubeApiError) as raised:
            await leases.renew()  # the default request timeout (30 s) would wait the stall out
        assert raised.value.status == 0  # no answer in time (1 s): retried, not a 5 s stall per try
        await leases.renew()
        assert not leases.duplicate


async def test_two_appliances_with_one_instance_name_are_reported_once(
        kube_api: KubeEmulator, caplog: pytest.LogCaptureFixture) -> None:
    async with ApiClient(Configuration(host=kube_api.url)) as client:
        ours = Leases(api=CoordinationV1Api(client), namespace='smartnat-system', instance='ap1', duration=15)
        twin = Leases(api=CoordinationV1Api(client), namespace='smartnat-system', instance='ap1', duration=15)
        await ours.renew()
        await ours.renew()
        assert not ours.duplicate  # our own renewals are no sign of a twin
        await twin.renew()  # the Lease exists: renewed without a precondition
        await ours.renew()
        await twin.renew()
        await ours.renew()
    assert ours.duplicate and twin.duplicate
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all('two appliances run with SNCTRLR_INSTANCE_NAME=ap1' in e for e in errors)


# --- SmartNat's old CRD ----------------------------------------------------------------

@pytest.mark.kube_api(mapping_status_subresource=False)
async def test_without_a_status_subresource_status_goes_with_the_object_and_that_is_remembered(
        kube_api: KubeEmulator, appliances: Any) -> None:
    await echo_cluster(kube_api)
    await echo_cluster(kube_api, name='other', addresses=('192.0.2.10',), port=81)
    ap1 = await appliances('ap1')
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert ap1.writeback.status_subresource is False
    st = current(kube_api)['status']
    assert st['appliances']['ap1']['configured'] == ['192.0.2.10:80/tcp']
    assert 'observedGeneration' not in st  # every status write bumps the generation here
    status_tries = kube_api.recorded(verb='patch', subresource='status')
    assert len(status_tries) == 1 and status_tries[0].status == 404  # found out once
    assert current(kube_api, 'other')['status']['appliances']['ap1']['configured'] == ['192.0.2.10:81/tcp']

    patches = len(kube_api.recorded(verb='patch', resource=MAPPINGS))
    for _ in range(2):
        await caught_up(kube_api, ap1)
        await ap1.sync()
    assert len(kube_api.recorded(verb='patch', resource=MAPPINGS)) == patches

    await kube_api.delete_object(MAPPINGS, 'echo', namespace=NS)
    await caught_up(kube_api, ap1)
    await ap1.sync()
    assert kube_api.current(MAPPINGS, 'echo', namespace=NS) is None
