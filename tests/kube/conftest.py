"""
Fixtures for tests of the Kubernetes edge against an emulated API server (emulator.py).

    kube_api     a started KubeEmulator on 127.0.0.1 (url, helpers, failure injection,
                 recorded requests); options per test with
                 @pytest.mark.kube_api(mapping_status_subresource=False, history_limit=...)
    kube_client  a kubernetes_asyncio ApiClient with Configuration.host = kube_api.url
"""

from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from .emulator import KubeEmulator


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        'markers',
        'kube_api(**options): KubeEmulator options for the kube_api fixture, e.g.'
        ' mapping_status_subresource=False (SmartNat\'s old CRD) or history_limit=3',
    )


@pytest.fixture()
async def kube_api(request: pytest.FixtureRequest) -> AsyncIterator[KubeEmulator]:
    marker = request.node.get_closest_marker('kube_api')
    options = dict(marker.kwargs) if marker is not None else {}
    async with KubeEmulator(**options) as emulator:
        yield emulator


@pytest.fixture()
async def kube_client(kube_api: KubeEmulator) -> AsyncIterator[ApiClient]:
    configuration = Configuration(host=kube_api.url)
    async with ApiClient(configuration) as client:
        yield client
