"""KubeSource as the daemon builds it: configuration, the three watches, the synced flag."""

import asyncio
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient

from smartnatd.errors import SettingsError
from smartnatd.kube.client import KubeSource
from smartnatd.settings import Settings
from smartnatd.store import Kind, Store
from tests.builders import HOST
from tests.kernel.harness import async_wait_until

from .conftest import ManualSleep, mapping_body, service_body, slice_body
from .emulator import ENDPOINTSLICES, MAPPINGS, SERVICES, KubeEmulator

SETTINGS = Settings(interfaces_pattern=r'^ext[0-9]+$', instance_name='ap1')


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emulator, cluster: {{server: "{url}"}}}}]
users: [{{name: smartnat, user: {{token: not-a-secret}}}}]
contexts: [{{name: emulator, context: {{cluster: emulator, user: smartnat}}}}]
current-context: emulator
""")
    return path


async def test_created_from_kubeconfig_it_lists_then_watches_every_kind(
        kube_api: KubeEmulator, tmp_path: Path) -> None:
    await kube_api.create_object(MAPPINGS, mapping_body('echo'))
    await kube_api.create_object(SERVICES, service_body())
    await kube_api.create_object(ENDPOINTSLICES, slice_body())
    store = Store()
    store.set_host(HOST)
    config = kubeconfig(tmp_path / 'kubeconfig', kube_api.url)
    source = await KubeSource.create(settings=SETTINGS, store=store, environ={'KUBECONFIG': str(config)})
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(source.run())
            await kube_api.wait_for_watches(count=3)
            snapshot = store.snapshot()
            assert store.is_synced
            assert [str(m.key) for m in snapshot.mappings] == ['demo/echo']
            assert [str(s.key) for s in snapshot.services] == ['demo/echo']
            assert [str(s.key) for s in snapshot.endpoint_slices] == ['demo/echo-1']
            task.cancel()
    finally:
        await source.close()
    for resource in (MAPPINGS, SERVICES, ENDPOINTSLICES):
        assert [r.verb for r in kube_api.recorded(resource=resource)] == ['list', 'watch']
        assert all(r.namespace is None for r in kube_api.recorded(resource=resource))
    [sent] = kube_api.recorded(resource=MAPPINGS, verb='list')
    assert sent.path == '/apis/smartnat.aureacentral.com/v1alpha1/mappings'


async def test_the_store_is_synced_only_once_every_kind_has_listed(
        kube_api: KubeEmulator, kube_client: ApiClient) -> None:
    kube_api.fail_next(1, status=503, verb='list', resource=ENDPOINTSLICES)
    store = Store()
    store.set_host(HOST)
    sleeps = ManualSleep()
    source = KubeSource(api_client=kube_client, settings=SETTINGS, store=store, sleep=sleeps)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(source.run())
        _, release = await sleeps.next()  # the failed list of EndpointSlices backs off
        await kube_api.wait_for_watches(MAPPINGS)
        await kube_api.wait_for_watches(SERVICES)
        assert not store.is_synced and store.unsynced() == [str(Kind.ENDPOINT_SLICES)]
        release.set_result(None)
        await async_wait_until(lambda: store.is_synced, timeout=5, message='synced')
        task.cancel()


async def test_without_any_configuration_it_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        await KubeSource.create(settings=SETTINGS, store=Store(), environ={'HOME': str(tmp_path)})
    assert 'set KUBECONFIG' in str(err.value)
    broken = tmp_path / 'broken'
    broken.write_text('clusters: [')
    with pytest.raises(SettingsError) as err:
        await KubeSource.create(settings=SETTINGS, store=Store(), environ={'KUBECONFIG': str(broken)})
    assert str(broken) in str(err.value)
