"""
The emulated API server answers a real kubernetes_asyncio client as a real apiserver would.

Each test drives the emulator through the client's public API (CustomObjectsApi,
CoreV1Api, DiscoveryV1Api, CoordinationV1Api, watch.Watch) or plain HTTP, and changes
objects "as another client" through the emulator's helpers, so watches see the changes.
"""

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from .emulator import ENDPOINTSLICES, JSON_PATCH, LEASES, MAPPINGS, MERGE_PATCH, SERVICES, \
    STRATEGIC_MERGE_PATCH, KubeApiCallError, KubeEmulator

GROUP, VERSION, PLURAL = MAPPINGS.group, MAPPINGS.version, MAPPINGS.plural
NS = 'ns1'
FINALIZER = 'smartnat.aureacentral.com/finalizer'


def mapping(name: str, *, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        'apiVersion': f'{GROUP}/{VERSION}', 'kind': 'Mapping',
        'metadata': {'name': name, **({'labels': labels} if labels else {})},
        'spec': spec or {'port': 80},
    }


def slice_of(name: str, service: str) -> dict[str, Any]:
    return {
        'apiVersion': 'discovery.k8s.io/v1', 'kind': 'EndpointSlice',
        'metadata': {'name': name, 'labels': {'kubernetes.io/service-name': service}},
        'addressType': 'IPv4', 'endpoints': [{'addresses': ['198.51.100.7']}],
    }


async def take(stream: AsyncIterator[dict[str, Any]], count: int, *,
               timeout: float = 5.0) -> list[tuple[str, dict[str, Any]]]:
    """The next `count` watch events as (type, raw object)."""
    events: list[tuple[str, dict[str, Any]]] = []
    if count == 0:
        return events
    async with asyncio.timeout(timeout):
        async for event in stream:
            events.append((event['type'], event['raw_object']))
            if len(events) == count:
                break
    return events


def names(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(kind, obj['metadata']['name']) for kind, obj in events]


@pytest.fixture()
def crd(kube_client: ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_client)


# --- kmock 0.8 blockers ----------------------------------------------------------------

async def test_create_answers_201_with_the_object_and_server_fields(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    body = mapping('m1')
    body['status'] = {'phase': 'Forged'}
    created = await crd.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    # kubernetes_asyncio maps only 201 to a body: a None here would mean 200.
    meta = created['metadata']
    assert meta['namespace'] == NS  # from the URL; the body had none
    assert meta['uid'] and meta['creationTimestamp'].endswith('Z')
    assert meta['generation'] == 1
    assert int(meta['resourceVersion']) > 0
    assert 'status' not in created  # our CRD has /status: create ignores .status
    [sent] = kube_api.recorded(verb='create')
    assert (sent.method, sent.path, sent.status) == ('POST', f'/apis/{GROUP}/{VERSION}/namespaces/{NS}/mappings', 201)
    assert sent.content_type == 'application/json' and sent.body['metadata'] == {'name': 'm1'}


async def test_create_of_an_existing_name_conflicts(kube_api: KubeEmulator,
                                                    crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    with pytest.raises(ApiException) as err:
        await crd.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, mapping('m1'))
    assert err.value.status == 409 and '"reason": "AlreadyExists"' in err.value.body


async def test_event_with_generate_name_gets_a_name_and_the_url_namespace(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name='m1.'),
        involved_object=client.V1ObjectReference(
            api_version=f'{GROUP}/{VERSION}', kind='Mapping', name='m1', namespace=NS),
        reason='Configured', message='spec.port 80 is mapped', type='Normal',
    )
    created = await core.create_namespaced_event(NS, event)

    assert created.metadata.name.startswith('m1.') and len(created.metadata.name) == len('m1.') + 5
    assert created.metadata.namespace == NS
    assert created.reason == 'Configured'
    [sent] = kube_api.recorded(verb='create', resource='events')
    assert sent.status == 201 and sent.body['metadata'] == {'generateName': 'm1.'}


async def test_event_merge_patch_updates_count_and_a_deleted_event_answers_404(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    body = {'metadata': {'name': 'm1.0123456789abcdef'}, 'reason': 'Configured', 'message': 'served',
            'type': 'Normal', 'count': 1, 'involvedObject': {'kind': 'Mapping', 'name': 'm1', 'namespace': NS},
            'firstTimestamp': '2024-01-01T00:00:00Z', 'lastTimestamp': '2024-01-01T00:00:00Z'}
    await core.create_namespaced_event(NS, body)
    patch = {'count': 2, 'lastTimestamp': '2024-01-01T00:00:09Z'}
    await core.patch_namespaced_event('m1.0123456789abcdef', NS, patch, _content_type=MERGE_PATCH)
    stored = kube_api.current('events', 'm1.0123456789abcdef', namespace=NS)
    assert stored is not None and (stored['count'], stored['lastTimestamp'], stored['message']) == (
        2, '2024-01-01T00:00:09Z', 'served')
    [sent] = kube_api.recorded(verb='patch', resource='events')
    assert (sent.status, sent.content_type, sent.body) == (200, MERGE_PATCH, patch)

    await kube_api.delete_object('events', 'm1.0123456789abcdef', namespace=NS)
    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_event('m1.0123456789abcdef', NS, patch, _content_type=MERGE_PATCH)
    assert err.value.status == 404


async def test_lease_replace_succeeds_with_the_current_version_and_conflicts_when_stale(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    leases = client.CoordinationV1Api(kube_client)
    now = datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC)
    lease = await leases.create_namespaced_lease(NS, client.V1Lease(
        metadata=client.V1ObjectMeta(name='smartnatd'),
        spec=client.V1LeaseSpec(holder_identity='appliance-a', lease_duration_seconds=15,
                                renew_time=now)))

    lease.spec.renew_time = now + datetime.timedelta(seconds=5)
    renewed = await leases.replace_namespaced_lease('smartnatd', NS, lease)
    assert int(renewed.metadata.resource_version) > int(lease.metadata.resource_version)
    assert renewed.spec.renew_time == now + datetime.timedelta(seconds=5)

    lease.spec.holder_identity = 'appliance-b'  # still the old resourceVersion
    with pytest.raises(ApiException) as err:
        await leases.replace_namespaced_lease('smartnatd', NS, lease)
    assert err.value.status == 409
    assert kube_api.current(LEASES, 'smartnatd', namespace=NS)['spec']['holderIdentity'] == 'appliance-a'
    [_, stale] = kube_api.recorded(verb='update')
    assert stale.method == 'PUT' and stale.status == 409


async def test_custom_object_replace_needs_a_resource_version(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    with pytest.raises(ApiException) as err:
        await crd.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', mapping('m1', port=81))
    assert err.value.status == 422


async def test_patch_with_a_stale_resource_version_conflicts(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    old = await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    await kube_api.patch_object(MAPPINGS, 'm1', {'spec': {'port': 81}}, namespace=NS)
    with pytest.raises(ApiException) as err:
        await crd.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, 'm1',
            {'metadata': {'resourceVersion': old['metadata']['resourceVersion']}, 'spec': {'port': 82}},
            _content_type=MERGE_PATCH)
    assert err.value.status == 409
    assert kube_api.current(MAPPINGS, 'm1', namespace=NS)['spec'] == {'port': 81}


# --- resourceVersion, list and watch ---------------------------------------------------

async def test_resource_versions_grow_per_write_and_lists_carry_the_latest(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    a = await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    b = await kube_api.create_object(MAPPINGS, mapping('b'), namespace='ns2')
    a2 = await kube_api.patch_object(MAPPINGS, 'a', {'spec': {'port': 81}}, namespace=NS)
    versions = [int(o['metadata']['resourceVersion']) for o in (a, b, a2)]
    assert versions == sorted(set(versions))

    everything = await crd.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert everything['metadata']['resourceVersion'] == a2['metadata']['resourceVersion']
    assert [o['metadata']['name'] for o in everything['items']] == ['a', 'b']
    in_ns = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [o['metadata']['name'] for o in in_ns['items']] == ['a']


async def test_watch_from_the_list_version_sees_only_later_changes(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    await kube_api.create_object(MAPPINGS, mapping('b'), namespace=NS)
    listed = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    await kube_api.create_object(MAPPINGS, mapping('c'), namespace=NS)  # before the watch: replayed
    await kube_api.create_object(MAPPINGS, mapping('elsewhere'), namespace='ns2')

    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=listed['metadata']['resourceVersion'], timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 3))
            await kube_api.wait_for_watches(MAPPINGS)
            await kube_api.patch_object(MAPPINGS, 'a', {'spec': {'port': 81}}, namespace=NS)
            await kube_api.delete_object(MAPPINGS, 'b', namespace=NS)
    events = collecting.result()

    assert names(events) == [('ADDED', 'c'), ('MODIFIED', 'a'), ('DELETED', 'b')]
    assert events[1][1]['spec'] == {'port': 81}
    [sent] = kube_api.recorded(verb='watch')
    assert sent.query['watch'] == 'True'  # as kubernetes_asyncio spells it
    assert sent.status == 200
    assert sent.query['resourceVersion'] == listed['metadata']['resourceVersion']


async def test_watch_without_a_version_starts_with_the_current_objects(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    await kube_api.create_object(MAPPINGS, mapping('b'), namespace=NS)
    await kube_api.patch_object(MAPPINGS, 'a', {'spec': {'port': 81}}, namespace=NS)
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=5)
        events = await take(stream, 2)
    assert names(events) == [('ADDED', 'a'), ('ADDED', 'b')]
    assert events[0][1]['spec'] == {'port': 81}


@pytest.mark.parametrize('flag', ['true', '1', 'True'])
async def test_watch_flag_spellings_all_stream(kube_api: KubeEmulator, flag: str) -> None:
    await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    async with aiohttp.ClientSession() as http:
        async with http.get(f'{kube_api.url}{MAPPINGS.path(namespace=NS)}',
                            params={'watch': flag, 'timeoutSeconds': '5'}) as response:
            line = await asyncio.wait_for(response.content.readline(), 5)
    assert response.status == 200
    assert b'"type": "ADDED"' in line and b'"name": "a"' in line


async def test_watch_timeout_seconds_ends_the_stream(kube_api: KubeEmulator,
                                                     crd: client.CustomObjectsApi) -> None:
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=1)
        async with asyncio.timeout(5):
            events = [event async for event in stream]
    assert events == []
    assert kube_api.watch_count() == 0


async def test_watch_from_a_compacted_version_gets_a_410_error_event(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    listed = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    kube_api.compact()

    # Raw: a 200 stream whose only event is an ERROR carrying a 410 Status.
    async with aiohttp.ClientSession() as http:
        async with http.get(f'{kube_api.url}{MAPPINGS.path(namespace=NS)}', params={
                'watch': 'true', 'resourceVersion': listed['metadata']['resourceVersion']}) as response:
            body = await asyncio.wait_for(response.read(), 5)
    assert response.status == 200
    assert b'"type": "ERROR"' in body and b'"code": 410' in body and b'"reason": "Expired"' in body

    # The client raises it as ApiException(410), which the watch loop answers with a relist.
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=listed['metadata']['resourceVersion'], timeout_seconds=5)
        with pytest.raises(ApiException) as err:
            await take(stream, 1)
    assert err.value.status == 410

    # A watch from the current version is still fine.
    relisted = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=relisted['metadata']['resourceVersion'], timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 1))
            await kube_api.wait_for_watches(MAPPINGS)
            await kube_api.create_object(MAPPINGS, mapping('b'), namespace=NS)
    assert names(collecting.result()) == [('ADDED', 'b')]


@pytest.mark.kube_api(history_limit=2)
async def test_watch_older_than_the_retained_window_gets_410(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    listed = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    for name in ('a', 'b', 'c'):
        await kube_api.create_object(MAPPINGS, mapping(name), namespace=NS)
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=listed['metadata']['resourceVersion'], timeout_seconds=5)
        with pytest.raises(ApiException) as err:
            await take(stream, 1)
    assert err.value.status == 410


async def test_open_watches_can_be_expired_and_bookmarked(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    created = await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=created['metadata']['resourceVersion'],
                          allow_watch_bookmarks=True, timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 1))
            await kube_api.wait_for_watches(MAPPINGS)
            kube_api.send_bookmarks()
        [(kind, obj)] = collecting.result()
        assert kind == 'BOOKMARK' and obj['metadata']['resourceVersion'] == kube_api.resource_version

        kube_api.expire_watches()
        with pytest.raises(ApiException) as err:
            await take(stream, 1)
    assert err.value.status == 410


async def test_list_pages_with_limit_and_continue(kube_api: KubeEmulator,
                                                  crd: client.CustomObjectsApi) -> None:
    for name in ('a', 'b', 'c'):
        await kube_api.create_object(MAPPINGS, mapping(name), namespace=NS)
    first = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, limit=2)
    rest = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, limit=2,
                                                   _continue=first['metadata']['continue'])
    assert [o['metadata']['name'] for o in first['items']] == ['a', 'b']
    assert first['metadata']['remainingItemCount'] == 1
    assert [o['metadata']['name'] for o in rest['items']] == ['c']
    assert 'continue' not in rest['metadata']
    assert rest['metadata']['resourceVersion'] == first['metadata']['resourceVersion']


# --- selectors -------------------------------------------------------------------------

async def test_label_selector_filters_lists_and_watches_with_transitions(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    discovery = client.DiscoveryV1Api(kube_client)
    await kube_api.create_object(ENDPOINTSLICES, slice_of('web-1', 'web'), namespace=NS)
    await kube_api.create_object(ENDPOINTSLICES, slice_of('db-1', 'db'), namespace=NS)
    selector = 'kubernetes.io/service-name=web'

    listed = await discovery.list_namespaced_endpoint_slice(NS, label_selector=selector)
    assert [s.metadata.name for s in listed.items] == ['web-1']
    assert listed.items[0].kind is None  # typed lists omit their items' kind, as the apiserver does

    async with watch.Watch() as w:
        stream = w.stream(discovery.list_namespaced_endpoint_slice, NS, label_selector=selector,
                          resource_version=listed.metadata.resource_version, timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 4))
            await kube_api.wait_for_watches(ENDPOINTSLICES)
            label = 'kubernetes.io/service-name'
            await kube_api.patch_object(ENDPOINTSLICES, 'db-1', {'endpoints': []}, namespace=NS)  # unseen
            await kube_api.create_object(ENDPOINTSLICES, slice_of('web-2', 'web'), namespace=NS)
            await kube_api.patch_object(ENDPOINTSLICES, 'db-1', {'metadata': {'labels': {label: 'web'}}}, namespace=NS)
            await kube_api.patch_object(ENDPOINTSLICES, 'web-1', {'endpoints': []}, namespace=NS)
            await kube_api.patch_object(ENDPOINTSLICES, 'db-1', {'metadata': {'labels': {label: 'db'}}}, namespace=NS)
    assert names(collecting.result()) == [
        ('ADDED', 'web-2'), ('ADDED', 'db-1'), ('MODIFIED', 'web-1'), ('DELETED', 'db-1')]


async def test_set_based_label_selectors(kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('a', labels={'tier': 'edge'}), namespace=NS)
    await kube_api.create_object(MAPPINGS, mapping('b', labels={'tier': 'core'}), namespace=NS)
    await kube_api.create_object(MAPPINGS, mapping('c'), namespace=NS)

    async def selected(selector: str) -> list[str]:
        found = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector=selector)
        return [o['metadata']['name'] for o in found['items']]

    assert await selected('tier in (edge, core)') == ['a', 'b']
    assert await selected('tier notin (edge)') == ['b', 'c']
    assert await selected('!tier') == ['c']
    assert await selected('tier,tier!=core') == ['a']
    with pytest.raises(ApiException) as err:
        await selected('tier in edge')
    assert err.value.status == 400


async def test_field_selector_on_name_and_namespace(kube_api: KubeEmulator,
                                                    crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('a'), namespace=NS)
    await kube_api.create_object(MAPPINGS, mapping('a'), namespace='ns2')
    await kube_api.create_object(MAPPINGS, mapping('b'), namespace=NS)

    by_name = await crd.list_cluster_custom_object(GROUP, VERSION, PLURAL, field_selector='metadata.name=a')
    assert [(o['metadata']['namespace'], o['metadata']['name']) for o in by_name['items']] == [(NS, 'a'), ('ns2', 'a')]
    by_both = await crd.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, field_selector='metadata.namespace=ns2,metadata.name==a')
    assert [o['metadata']['namespace'] for o in by_both['items']] == ['ns2']

    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          field_selector='metadata.name=b', timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 2))
            await kube_api.wait_for_watches(MAPPINGS)
            await kube_api.patch_object(MAPPINGS, 'a', {'spec': {'port': 1}}, namespace=NS)
            await kube_api.patch_object(MAPPINGS, 'b', {'spec': {'port': 2}}, namespace=NS)
    assert names(collecting.result()) == [('ADDED', 'b'), ('MODIFIED', 'b')]

    with pytest.raises(ApiException) as err:
        await crd.list_cluster_custom_object(GROUP, VERSION, PLURAL, field_selector='spec.port=80')
    assert err.value.status == 400


# --- status subresource, patches -------------------------------------------------------

async def test_with_status_subresource_main_ignores_status_and_status_takes_only_status(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    created = await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)

    main = await crd.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 81}, 'status': {'phase': 'Forged'}},
        _content_type=MERGE_PATCH)
    assert main['spec'] == {'port': 81} and 'status' not in main
    assert main['metadata']['generation'] == 2

    status = await crd.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 99}, 'status': {'phase': 'Configured'}},
        _content_type=MERGE_PATCH)
    assert status['spec'] == {'port': 81} and status['status'] == {'phase': 'Configured'}
    assert status['metadata']['generation'] == 2  # status does not count
    assert int(status['metadata']['resourceVersion']) > int(main['metadata']['resourceVersion'])
    labelled = await kube_api.patch_object(MAPPINGS, 'm1', {'metadata': {'labels': {'a': 'b'}}}, namespace=NS)
    assert labelled['metadata']['generation'] == 2  # nor does metadata
    status = labelled

    replaced = await crd.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {
        **mapping('m1', port=82), 'status': {'phase': 'Forged'},
        'metadata': {'name': 'm1', 'resourceVersion': status['metadata']['resourceVersion']}})
    assert replaced['spec'] == {'port': 82} and replaced['status'] == {'phase': 'Configured'}
    assert replaced['metadata']['uid'] == created['metadata']['uid']
    assert replaced['metadata']['creationTimestamp'] == created['metadata']['creationTimestamp']


@pytest.mark.kube_api(mapping_status_subresource=False)
async def test_without_status_subresource_status_is_written_with_the_object(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, {**mapping('m1'), 'status': {'phase': 'New'}}, namespace=NS)
    assert kube_api.current(MAPPINGS, 'm1', namespace=NS)['status'] == {'phase': 'New'}

    with pytest.raises(ApiException) as err:
        await crd.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, 'm1', {'status': {'phase': 'Configured'}}, _content_type=MERGE_PATCH)
    assert err.value.status == 404

    patched = await crd.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, 'm1', {'status': {'phase': 'Configured'}}, _content_type=MERGE_PATCH)
    assert patched['status'] == {'phase': 'Configured'}
    assert patched['metadata']['generation'] == 2  # without /status, status changes count


async def test_service_status_subresource_rules(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    await kube_api.create_object(SERVICES, {'metadata': {'name': 'web'}, 'spec': {'ports': [{'port': 80}]}},
                                 namespace=NS)
    patched = await core.patch_namespaced_service(
        'web', NS, {'spec': {'ports': [{'port': 8080}]},
                    'status': {'loadBalancer': {'ingress': [{'ip': '203.0.113.5'}]}}},
        _content_type=MERGE_PATCH)
    assert patched.spec.ports[0].port == 8080 and patched.status is None

    status = await core.patch_namespaced_service_status(
        'web', NS, {'spec': {'ports': [{'port': 1}]},
                    'status': {'loadBalancer': {'ingress': [{'ip': '203.0.113.5'}]}}},
        _content_type=MERGE_PATCH)
    assert status.spec.ports[0].port == 8080
    assert status.status.load_balancer.ingress[0].ip == '203.0.113.5'


async def test_patches_need_a_patch_content_type(kube_api: KubeEmulator,
                                                 crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    patch = {'spec': {'port': 81}}

    # kubernetes_asyncio's default for a dict is the JSON-patch type: a real server says 400.
    with pytest.raises(ApiException) as err:
        await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', patch)
    assert err.value.status == 400
    for content_type in ('application/json', STRATEGIC_MERGE_PATCH):  # none for custom resources
        with pytest.raises(ApiException) as err:
            await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', patch,
                                                     _content_type=content_type)
        assert err.value.status == 415
    assert kube_api.current(MAPPINGS, 'm1', namespace=NS)['spec'] == {'port': 80}

    await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', patch, _content_type=MERGE_PATCH)
    sent = kube_api.recorded(verb='patch')
    assert [(r.content_type, r.status) for r in sent] == [
        (JSON_PATCH, 400), ('application/json', 415), (STRATEGIC_MERGE_PATCH, 415), (MERGE_PATCH, 200)]
    assert sent[-1].body == patch and sent[-1].path.endswith('/namespaces/ns1/mappings/m1')


async def test_no_op_patch_keeps_the_resource_version(kube_api: KubeEmulator,
                                                      crd: client.CustomObjectsApi) -> None:
    created = await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    same = await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 80}},
                                                    _content_type=MERGE_PATCH)
    assert same['metadata']['resourceVersion'] == created['metadata']['resourceVersion']


# --- finalizers and deletion -----------------------------------------------------------

async def test_finalizer_lifecycle_from_delete_to_deleted_event(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 4))
            await kube_api.wait_for_watches(MAPPINGS)
            await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)

            # The daemon adds its finalizer with a JSON patch.
            await crd.patch_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, 'm1',
                [{'op': 'add', 'path': '/metadata/finalizers', 'value': [FINALIZER]}])
            deleting = await crd.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1')
            assert deleting['metadata']['deletionTimestamp']
            assert kube_api.current(MAPPINGS, 'm1', namespace=NS) is not None

            with pytest.raises(ApiException) as err:  # no new finalizers while deleting
                await crd.patch_namespaced_custom_object(
                    GROUP, VERSION, NS, PLURAL, 'm1',
                    [{'op': 'add', 'path': '/metadata/finalizers/-', 'value': 'other/finalizer'}])
            assert err.value.status == 422

            with pytest.raises(ApiException) as err:  # a failed JSON-patch test changes nothing
                await crd.patch_namespaced_custom_object(
                    GROUP, VERSION, NS, PLURAL, 'm1',
                    [{'op': 'test', 'path': '/metadata/finalizers/0', 'value': 'someone/else'},
                     {'op': 'remove', 'path': '/metadata/finalizers/0'}])
            assert err.value.status == 422

            await crd.patch_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, 'm1',
                [{'op': 'test', 'path': '/metadata/finalizers/0', 'value': FINALIZER},
                 {'op': 'remove', 'path': '/metadata/finalizers/0'}])

    events = collecting.result()
    assert names(events) == [('ADDED', 'm1'), ('MODIFIED', 'm1'), ('MODIFIED', 'm1'), ('DELETED', 'm1')]
    assert events[1][1]['metadata']['finalizers'] == [FINALIZER]
    assert events[2][1]['metadata']['deletionTimestamp']
    assert 'finalizers' not in events[3][1]['metadata']
    with pytest.raises(ApiException) as err:
        await crd.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1')
    assert err.value.status == 404


async def test_delete_without_finalizers_removes_at_once(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    created = await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=created['metadata']['resourceVersion'], timeout_seconds=5)
        async with asyncio.TaskGroup() as tg:
            collecting = tg.create_task(take(stream, 1))
            await kube_api.wait_for_watches(MAPPINGS)
            await crd.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1')
    [(kind, obj)] = collecting.result()
    assert kind == 'DELETED' and int(obj['metadata']['resourceVersion']) > int(created['metadata']['resourceVersion'])
    assert kube_api.current(MAPPINGS, 'm1', namespace=NS) is None


# --- test hooks: timestamps, failures, outages, restarts -------------------------------

async def test_creation_timestamp_can_be_set_by_the_test(kube_api: KubeEmulator) -> None:
    older = await kube_api.create_object(
        MAPPINGS, mapping('older'), namespace=NS,
        creation_timestamp=datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
    assert older['metadata']['creationTimestamp'] == '2020-01-02T03:04:05Z'


async def test_injected_failures_hit_the_next_matching_requests_and_change_nothing(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    created = await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    rule = kube_api.fail_next(2, status=500, verb='patch', resource=MAPPINGS, subresource=None)

    for _ in range(2):
        with pytest.raises(ApiException) as err:
            await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 81}},
                                                     _content_type=MERGE_PATCH)
        assert err.value.status == 500
    assert kube_api.current(MAPPINGS, 'm1', namespace=NS) == created
    await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)  # not matching: served
    patched = await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 81}},
                                                       _content_type=MERGE_PATCH)
    assert patched['spec'] == {'port': 81}
    assert rule.remaining == 0 and [hit.status for hit in rule.hits] == [500, 500]

    kube_api.fail_next(status=410, verb='watch')  # a watch gets 410 as an ERROR event
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=5)
        with pytest.raises(ApiException) as err:
            await take(stream, 1)
    assert err.value.status == 410


async def test_api_down_answers_503_until_it_comes_back(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL)

        async def watch_until_it_fails() -> int:
            with pytest.raises(ApiException) as err:
                await take(stream, 1)
            return err.value.status

        async with asyncio.TaskGroup() as tg:
            watching = tg.create_task(watch_until_it_fails())
            await kube_api.wait_for_watches(MAPPINGS)
            kube_api.api_down()  # the open watch ends; its reconnect is refused with 503
    assert watching.result() == 503

    with pytest.raises(ApiException) as err:
        await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert err.value.status == 503
    await kube_api.create_object(MAPPINGS, mapping('while-down'), namespace=NS)  # helpers still work

    kube_api.api_up()
    listed = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [o['metadata']['name'] for o in listed['items']] == ['while-down']


async def test_stop_and_restart_on_the_same_port_keep_the_objects(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    before = await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    url = kube_api.url
    await kube_api.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    with pytest.raises(RuntimeError):
        await kube_api.get_object(MAPPINGS, 'm1', namespace=NS)

    await kube_api.start()
    assert kube_api.url == url
    listed = await crd.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [o['metadata']['uid'] for o in listed['items']] == [before['metadata']['uid']]
    after = await kube_api.patch_object(MAPPINGS, 'm1', {'spec': {'port': 81}}, namespace=NS)
    assert int(after['metadata']['resourceVersion']) > int(before['metadata']['resourceVersion'])


async def test_stop_ends_an_open_watch_promptly(kube_api: KubeEmulator,
                                                crd: client.CustomObjectsApi) -> None:
    async with watch.Watch() as w:
        stream = w.stream(crd.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL)  # no timeout

        async def watch_until_refused() -> None:
            with pytest.raises(aiohttp.ClientConnectionError):  # EOF, then the reconnect is refused
                await take(stream, 1, timeout=10)

        async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
            tg.create_task(watch_until_refused())
            await kube_api.wait_for_watches(MAPPINGS)
            await kube_api.stop()
    assert kube_api.watch_count() == 0


async def test_helpers_report_api_errors(kube_api: KubeEmulator) -> None:
    with pytest.raises(KubeApiCallError) as err:
        await kube_api.patch_object(MAPPINGS, 'missing', {'spec': {}}, namespace=NS)
    assert err.value.status == 404
    assert await kube_api.get_object(MAPPINGS, 'missing', namespace=NS) is None
    assert kube_api.recorded() == []  # helper requests are left out by default
    assert len(kube_api.recorded(include_helpers=True)) == 2


async def test_scripted_kmock_reactions_come_first_and_change_nothing(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    kube_api['patch', MAPPINGS.resource][:1] << 503  # kmock's DSL: the next patch only
    with pytest.raises(ApiException) as err:
        await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 81}},
                                                 _content_type=MERGE_PATCH)
    assert err.value.status == 503
    assert kube_api.objects[MAPPINGS.resource, NS, 'm1'] >= {'spec': {'port': 80}}

    await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': 81}},
                                             _content_type=MERGE_PATCH)
    assert kube_api.objects[MAPPINGS.resource, NS, 'm1'] >= {'spec': {'port': 81}}


@pytest.mark.kube_api(kmock_history=2)
async def test_bounded_kmock_history_keeps_serving_and_recording(
        kube_api: KubeEmulator, crd: client.CustomObjectsApi) -> None:
    await kube_api.create_object(MAPPINGS, mapping('m1'), namespace=NS)
    for port in range(81, 91):
        await crd.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, 'm1', {'spec': {'port': port}},
                                                 _content_type=MERGE_PATCH)
    assert len(kube_api._requests) <= 2 * 2 + 1  # trimmed, so matching stays cheap
    assert len(kube_api.recorded(verb='patch')) == 10  # the emulator's own record keeps everything
    assert kube_api.objects[MAPPINGS.resource, NS, 'm1'] >= {'spec': {'port': 90}}


async def test_discovery_lists_the_declared_resources(kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    groups = await client.ApisApi(kube_client).get_api_versions()
    assert {g.name for g in groups.groups} >= {GROUP, 'coordination.k8s.io', 'discovery.k8s.io'}
    leases = await client.CoordinationV1Api(kube_client).get_api_resources()
    assert [r.name for r in leases.resources] == ['leases']
    core = await client.CoreV1Api(kube_client).get_api_resources()
    assert {r.name for r in core.resources} >= {'services', 'services/status', 'events'}
