"""
Fixtures for tests of the Kubernetes edge against an emulated API server (emulator.py).

    kube_api     a started KubeEmulator on 127.0.0.1 (url, helpers, failure injection,
                 recorded requests); options per test with
                 @pytest.mark.kube_api(mapping_status_subresource=False, history_limit=...)
    kube_client  a kubernetes_asyncio ApiClient with Configuration.host = kube_api.url

and plain helpers for the tests of smartnatd's Kubernetes edge: bodies of Mappings, Services
and EndpointSlices as another client writes them, and ManualSleep (backoff without waiting).
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

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


# --- bodies of the objects smartnatd watches, as "another client" creates them --------------

def mapping_body(name: str, *, namespace: str = 'demo', addresses: tuple[str, ...] = ('192.0.2.10',),
                 port: int = 80, service: str = 'echo', mode: str = 'direct',
                 finalizers: list[str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {'name': name, 'namespace': namespace}
    if finalizers:
        meta['finalizers'] = finalizers
    return {
        'apiVersion': 'smartnat.aureacentral.com/v1alpha1', 'kind': 'Mapping', 'metadata': meta,
        'spec': {'addresses': list(addresses), 'serviceName': service, 'mode': mode,
                 'ports': [{'port': port, 'protocol': 'tcp', 'servicePort': 80}]},
    }


def service_body(name: str = 'echo', *, namespace: str = 'demo',
                 cluster_ip: str = '10.96.0.10') -> dict[str, Any]:
    return {
        'apiVersion': 'v1', 'kind': 'Service', 'metadata': {'name': name, 'namespace': namespace},
        'spec': {'clusterIP': cluster_ip, 'ports': [
            {'name': 'http', 'protocol': 'TCP', 'port': 80, 'targetPort': 8080}]},
    }


def slice_body(name: str = 'echo-1', *, namespace: str = 'demo', service: str = 'echo',
               pods: tuple[str, ...] = ('10.244.1.2',)) -> dict[str, Any]:
    return {
        'apiVersion': 'discovery.k8s.io/v1', 'kind': 'EndpointSlice',
        'metadata': {'name': name, 'namespace': namespace,
                     'labels': {'kubernetes.io/service-name': service}},
        'addressType': 'IPv4',
        'ports': [{'name': 'http', 'protocol': 'TCP', 'port': 8080}],
        'endpoints': [{'addresses': [pod], 'conditions': {'ready': True}} for pod in pods],
    }


class ManualSleep:
    """An injected `sleep` the test releases by hand: backoff runs without wall-clock waits.

    Each call records its delay and parks until the test takes it from `calls` and
    resolves it (`await sleeps.next()` returns the delay; `release()` lets it go on).
    """

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.calls: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        future = asyncio.get_running_loop().create_future()
        await self.calls.put((delay, future))
        await future

    async def next(self, *, timeout: float = 5.0) -> tuple[float, asyncio.Future[None]]:
        async with asyncio.timeout(timeout):
            return await self.calls.get()
