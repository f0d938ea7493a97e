"""List-then-watch against the emulated API server, asserting on the requests it received."""

import asyncio
import logging
import random

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi, DiscoveryV1Api

from smartnatd.kube.objects import GROUP, PLURAL, SERVICE_NAME_LABEL, VERSION, parse_endpoint_slice, parse_mapping, parse_service
from smartnatd.kube.watch import Backoff, Resource, Watcher
from smartnatd.model import ObjectKey
from smartnatd.store import Kind, Store
from tests.kernel.harness import async_wait_until

from .conftest import ManualSleep, mapping_body, service_body, slice_body
from .emulator import ENDPOINTSLICES, MAPPINGS, SERVICES, KubeEmulator


def mappings_resource(client: ApiClient) -> Resource:
    return Resource(kind=Kind.MAPPINGS, list_method=CustomObjectsApi(client).list_cluster_custom_object,
                    list_args=(GROUP, VERSION, PLURAL), parse=parse_mapping)


def time_out_watches(kube_api: KubeEmulator) -> None:
    """End open watches as the server's timeoutSeconds does: after a while, so with a bookmark.

    A watch that ends at once without any event counts as a failure (MIN_WATCH)."""
    kube_api.send_bookmarks()
    kube_api.close_watches()


def names(store: Store, kind: Kind = Kind.MAPPINGS) -> list[str]:
    snapshot = store.snapshot()
    objects = {Kind.MAPPINGS: snapshot.mappings, Kind.SERVICES: snapshot.services,
               Kind.ENDPOINT_SLICES: snapshot.endpoint_slices}[kind]
    return [str(o.key) for o in objects]


async def test_lists_all_namespaces_then_watches_from_the_list_version(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    await kube_api.create_object(MAPPINGS, mapping_body('a', namespace='ns1'))
    await kube_api.create_object(MAPPINGS, mapping_body('b', namespace='ns2'))
    store = Store(expect={Kind.MAPPINGS})
    watcher = Watcher(resource=mappings_resource(kube_client), store=store)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.step())
        await kube_api.wait_for_watches(MAPPINGS)
        assert store.is_synced and names(store) == ['ns1/a', 'ns2/b']
        listed_at = watcher.resource_version
        await kube_api.create_object(MAPPINGS, mapping_body('c', namespace='ns3'))
        await kube_api.delete_object(MAPPINGS, 'a', namespace='ns1')
        await async_wait_until(lambda: names(store) == ['ns2/b', 'ns3/c'], timeout=5, message='watch events')
        time_out_watches(kube_api)
    await task

    [listed, watched] = kube_api.recorded(resource=MAPPINGS)
    assert (listed.verb, listed.path, listed.namespace) == ('list', f'/apis/{GROUP}/{VERSION}/mappings', None)
    assert listed.query['limit'] == '500'
    assert (watched.verb, watched.namespace) == ('watch', None)
    assert watched.query['resourceVersion'] == listed_at
    assert watched.query['allowWatchBookmarks'] == 'True'
    assert 270 <= int(watched.query['timeoutSeconds']) <= 330
    assert watcher.resource_version == kube_api.resource_version


async def test_after_the_server_ends_a_watch_it_resumes_without_listing(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    store = Store(expect={Kind.MAPPINGS})
    watcher = Watcher(resource=mappings_resource(kube_client), store=store)
    await watcher.relist()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.watch())
        await kube_api.wait_for_watches(MAPPINGS)
        await kube_api.create_object(MAPPINGS, mapping_body('a'))
        await async_wait_until(lambda: names(store) == ['demo/a'], timeout=5, message='ADDED')
        kube_api.close_watches()
    assert task.result() == 1
    resumed_from = watcher.resource_version

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.step())
        await kube_api.wait_for_watches(MAPPINGS)
        time_out_watches(kube_api)
    verbs = [r.verb for r in kube_api.recorded(resource=MAPPINGS)]
    assert verbs == ['list', 'watch', 'watch']
    assert kube_api.recorded(verb='watch')[-1].query['resourceVersion'] == resumed_from


async def test_410_gone_relists_and_replaces_the_store(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    await kube_api.create_object(MAPPINGS, mapping_body('a'))
    await kube_api.create_object(MAPPINGS, mapping_body('b'))
    store = Store(expect={Kind.MAPPINGS})
    watcher = Watcher(resource=mappings_resource(kube_client), store=store)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.step())
        await kube_api.wait_for_watches(MAPPINGS)
        kube_api.expire_watches()  # the watch cache fell behind: 410 and the history is gone
    await task
    assert watcher.resource_version is None
    # Missed while no watch was open, and older history is compacted away.
    await kube_api.delete_object(MAPPINGS, 'a', namespace='demo')
    await kube_api.create_object(MAPPINGS, mapping_body('c'))
    kube_api.compact()
    assert names(store) == ['demo/a', 'demo/b']  # the last good state until the relist

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.step())
        await kube_api.wait_for_watches(MAPPINGS)
        assert names(store) == ['demo/b', 'demo/c']
        time_out_watches(kube_api)
    assert [r.verb for r in kube_api.recorded(resource=MAPPINGS)] == ['list', 'watch', 'list', 'watch']


async def test_a_resume_version_older_than_the_history_gets_410_then_a_relist(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    store = Store(expect={Kind.MAPPINGS})
    watcher = Watcher(resource=mappings_resource(kube_client), store=store)
    await watcher.relist()
    await kube_api.create_object(MAPPINGS, mapping_body('a'))
    kube_api.compact()
    await watcher.step()  # the watch is answered with a 410 ERROR event at once
    assert watcher.resource_version is None and names(store) == []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watcher.step())
        await kube_api.wait_for_watches(MAPPINGS)
        assert names(store) == ['demo/a']
        time_out_watches(kube_api)


async def test_bookmarks_move_the_resume_version(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    store = Store(expect={Kind.MAPPINGS})
    watcher = Watcher(resource=mappings_resource(kube_client), store=store)
    await watcher.relist()
    await kube_api.create_object(SERVICES, service_body())  # another kind moves the version on
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watcher.watch())
        await kube_api.wait_for_watches(MAPPINGS)
        kube_api.send_bookmarks()
        await async_wait_until(lambda: watcher.resource_version == kube_api.resource_version, timeout=5,
                               message='the bookmark version')
        time_out_watches(kube_api)
    assert names(store) == []


async def test_lists_in_pages(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    for i in range(5):
        await kube_api.create_object(MAPPINGS, mapping_body(f'm{i}', namespace=f'ns{i % 2}'))
    store = Store(expect={Kind.MAPPINGS})
    watcher = Watcher(resource=mappings_resource(kube_client), store=store, page_size=2)
    await watcher.relist()
    assert len(names(store)) == 5
    lists = kube_api.recorded(verb='list')
    assert len(lists) == 3 and 'continue' not in lists[0].query and lists[1].query['continue']
    assert watcher.resource_version == kube_api.resource_version


async def test_api_down_keeps_the_store_backs_off_capped_and_resumes(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    await kube_api.create_object(MAPPINGS, mapping_body('a'))
    store = Store(expect={Kind.MAPPINGS})
    sleeps = ManualSleep()
    backoff = Backoff(base=1.0, cap=4.0, rng=random.Random(7))
    watcher = Watcher(resource=mappings_resource(kube_client), store=store, sleep=sleeps, backoff=backoff)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.run())
        await kube_api.wait_for_watches(MAPPINGS)
        kube_api.api_down()  # the open watch ends; every request gets 503

        for _ in range(5):
            _, release = await sleeps.next()
            assert names(store) == ['demo/a']  # the last good state is kept, never cleared
            release.set_result(None)
        _, last = await sleeps.next()
        # The first delay: the open watch ended at once without any event; then 503s.
        failed = [r for r in kube_api.recorded(resource=MAPPINGS) if r.status == 503]
        assert len(failed) == 5 and all(r.verb == 'watch' for r in failed)
        # Capped exponential with jitter in [d/2, d]: 1, 2, 4, 4, 4, 4.
        for delay, cap in zip(sleeps.delays, [1, 2, 4, 4, 4, 4], strict=True):
            assert cap / 2 <= delay <= cap

        kube_api.api_up()
        await kube_api.patch_object(MAPPINGS, 'a', {'spec': {'serviceName': 'other'}}, namespace='demo')
        await kube_api.create_object(MAPPINGS, mapping_body('b'))
        last.set_result(None)
        await async_wait_until(lambda: names(store) == ['demo/a', 'demo/b'], timeout=5, message='resumed')
        task.cancel()
    # Resumed from where it was: no new list, the missed changes came through the watch.
    assert [r.verb for r in kube_api.recorded(resource=MAPPINGS) if r.status != 503] == ['list', 'watch', 'watch']
    assert backoff.failures == 0


async def test_invalid_services_are_left_out_and_their_old_version_removed(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    store = Store(expect={Kind.SERVICES})
    resource = Resource(kind=Kind.SERVICES, list_method=CoreV1Api(kube_client).list_service_for_all_namespaces,
                        parse=parse_service)
    watcher = Watcher(resource=resource, store=store)
    await kube_api.create_object(SERVICES, service_body('good'))
    bad = service_body('bad')
    bad['spec']['ports'][0]['port'] = 0
    await kube_api.create_object(SERVICES, bad)
    await kube_api.create_object(SERVICES, service_body('flaky'))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watcher.step())
        await kube_api.wait_for_watches(SERVICES)
        assert names(store, Kind.SERVICES) == ['demo/flaky', 'demo/good']
        await kube_api.patch_object(SERVICES, 'flaky', {'spec': {'clusterIP': 'nonsense'}}, namespace='demo')
        await async_wait_until(lambda: names(store, Kind.SERVICES) == ['demo/good'], timeout=5, message='dropped')
        time_out_watches(kube_api)
    assert store.get(Kind.SERVICES, ObjectKey('demo', 'good')) is not None


async def test_endpoint_slices_are_selected_by_their_service_label(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    unlabelled = slice_body('orphan')
    del unlabelled['metadata']['labels']
    await kube_api.create_object(ENDPOINTSLICES, unlabelled)
    await kube_api.create_object(ENDPOINTSLICES, slice_body('echo-1'))
    store = Store(expect={Kind.ENDPOINT_SLICES})
    resource = Resource(kind=Kind.ENDPOINT_SLICES,
                        list_method=DiscoveryV1Api(kube_client).list_endpoint_slice_for_all_namespaces,
                        parse=parse_endpoint_slice, label_selector=SERVICE_NAME_LABEL)
    watcher = Watcher(resource=resource, store=store)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watcher.step())
        await kube_api.wait_for_watches(ENDPOINTSLICES)
        time_out_watches(kube_api)
    assert names(store, Kind.ENDPOINT_SLICES) == ['demo/echo-1']
    assert {r.query.get('labelSelector') for r in kube_api.recorded(resource=ENDPOINTSLICES)} == {SERVICE_NAME_LABEL}
    assert all(r.path == '/apis/discovery.k8s.io/v1/endpointslices' for r in kube_api.recorded(resource=ENDPOINTSLICES))


@pytest.mark.parametrize('status', [403, 404])
async def test_a_missing_crd_or_permission_is_retried_at_backoff_without_crashing(
        kube_api: KubeEmulator, kube_client: ApiClient, status: int) -> None:
    kube_api.fail_next(2, status=status, verb='list', resource=MAPPINGS)
    await kube_api.create_object(MAPPINGS, mapping_body('a'))
    store = Store(expect={Kind.MAPPINGS})
    sleeps = ManualSleep()
    watcher = Watcher(resource=mappings_resource(kube_client), store=store, sleep=sleeps)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.run())
        for _ in range(2):
            _, release = await sleeps.next()
            assert not store.is_synced
            release.set_result(None)
        await kube_api.wait_for_watches(MAPPINGS)
        assert store.is_synced and names(store) == ['demo/a']
        task.cancel()


def backing_off_watcher(kube_client: ApiClient) -> tuple[Store, ManualSleep, Watcher]:
    """A Mappings watcher whose sleeps the test releases, backing off 0.5 s doubling to 4 s."""
    store = Store(expect={Kind.MAPPINGS})
    sleeps = ManualSleep()
    watcher = Watcher(resource=mappings_resource(kube_client), store=store, sleep=sleeps,
                      backoff=Backoff(base=0.5, cap=4.0, rng=random.Random(1)))
    return store, sleeps, watcher


async def test_in_stream_errors_back_off_growing_and_are_logged_once(
        kube_api: KubeEmulator, kube_client: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger='smartnatd.kube.watch')
    store, sleeps, watcher = backing_off_watcher(kube_client)
    await watcher.relist()
    caplog.clear()
    # Each watch request is answered (200) and then ends with an ERROR event.
    kube_api.fail_next(6, status=500, verb='watch', resource=MAPPINGS, message='etcd is sad', in_stream=True)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.run())
        for _ in range(6):
            _, release = await sleeps.next()
            release.set_result(None)
        await kube_api.wait_for_watches(MAPPINGS)
        for delay, cap in zip(sleeps.delays, [0.5, 1, 2, 4, 4, 4], strict=True):
            assert cap / 2 <= delay <= cap
        assert not watcher.up
        await kube_api.create_object(MAPPINGS, mapping_body('a'))  # events flow again
        await async_wait_until(lambda: watcher.up, timeout=5, message='recovered')
        task.cancel()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(messages) == 2
    assert messages[0][0] == 'WARNING'
    assert messages[0][1].startswith(
        'watch mappings: ERROR event 500: etcd is sad; serving the last known state; retrying in ')
    assert messages[1] == ('INFO', 'watch mappings recovered')


async def test_a_watch_that_ends_at_once_without_events_backs_off(
        kube_api: KubeEmulator, kube_client: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger='smartnatd.kube.watch')
    store, sleeps, watcher = backing_off_watcher(kube_client)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.run())
        for _ in range(4):
            await kube_api.wait_for_watches(MAPPINGS)
            kube_api.close_watches()  # a proxy that ends every stream at once
            _, release = await sleeps.next()
            release.set_result(None)
        await kube_api.wait_for_watches(MAPPINGS)
        task.cancel()
    for delay, cap in zip(sleeps.delays, [0.5, 1, 2, 4], strict=True):
        assert cap / 2 <= delay <= cap
    assert [r.verb for r in kube_api.recorded(resource=MAPPINGS)] == ['list'] + ['watch'] * 5
    # The same trouble each time, only its seconds differ: one warning, not one per retry.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and 'ended the watch' in warnings[0], warnings


async def test_http_410_when_opening_a_watch_relists(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    await kube_api.create_object(MAPPINGS, mapping_body('a'))
    store = Store(expect={Kind.MAPPINGS})
    sleeps = ManualSleep()
    watcher = Watcher(resource=mappings_resource(kube_client), store=store, sleep=sleeps)
    await watcher.relist()
    kube_api.fail_next(1, status=410, verb='watch', resource=MAPPINGS, in_stream=False,
                       message='too old resource version')
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.run())
        await kube_api.wait_for_watches(MAPPINGS)
        task.cancel()
    assert [r.verb for r in kube_api.recorded(resource=MAPPINGS)] == ['list', 'watch', 'list', 'watch']
    assert sleeps.delays == [] and watcher.problem == ''


async def test_repeated_http_410_after_listing_backs_off(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    store, sleeps, watcher = backing_off_watcher(kube_client)
    kube_api.fail_next(4, status=410, verb='watch', resource=MAPPINGS, in_stream=False)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher.run())
        for _ in range(3):
            _, release = await sleeps.next()
            release.set_result(None)
        await kube_api.wait_for_watches(MAPPINGS)
        task.cancel()
    for delay, cap in zip(sleeps.delays, [0.5, 1, 2], strict=True):
        assert cap / 2 <= delay <= cap
    assert [r.verb for r in kube_api.recorded(resource=MAPPINGS)] == ['list', 'watch'] * 5


def test_a_problem_is_the_same_trouble_whatever_its_figures() -> None:
    from smartnatd.kube.watch import _kind_of

    # Logged once per trouble: these differ only in what changes on every retry.
    assert _kind_of('the server ended the watch after 0.3s without any event') == _kind_of(
        'the server ended the watch after 0.9s without any event')
    assert _kind_of("not a JSON event: 'abc'") == _kind_of("not a JSON event: 'xyz{'")
    assert _kind_of('500: etcd is sad') != _kind_of('403: forbidden')
