"""KubeSource: the Kubernetes edge as the daemon sees it: watches in, write-back out, a Lease.

    kube = await KubeSource.create(settings=settings, store=store)   # kubeconfig or in-cluster
    reconciler = Reconciler(..., writeback=kube.writeback)
    tg.create_task(kube.run())     # watches, Lease renewal, write-back's retry timer
    ...
    await kube.close()

Mappings are watched in all namespaces through CustomObjectsApi, Services and EndpointSlices
(only those labelled kubernetes.io/service-name, the only ones the planner can use) through
the core and discovery APIs. The store is marked synced once each kind has listed once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping

from kubernetes_asyncio.client import ApiClient, CoordinationV1Api, CoreV1Api, CustomObjectsApi, DiscoveryV1Api

from smartnatd.kube.api import load_configuration, new_api_client
from smartnatd.kube.cache import MappingCache
from smartnatd.kube.lease import Leases
from smartnatd.kube.objects import GROUP, PLURAL, SERVICE_NAME_LABEL, VERSION, parse_endpoint_slice, parse_mapping, parse_service
from smartnatd.kube.watch import WATCH_TIMEOUT, Backoff, Resource, Watcher
from smartnatd.kube.writeback import KubeWriteback, Timer
from smartnatd.settings import Settings
from smartnatd.store import Kind, Store

logger = logging.getLogger(__name__)


class KubeSource:
    def __init__(
        self,
        *,
        api_client: ApiClient,
        settings: Settings,
        store: Store,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        watch_timeout: int = WATCH_TIMEOUT,
        backoff: Callable[[], Backoff] = Backoff,
        rng: random.Random | None = None,
    ) -> None:
        self.api_client = api_client
        self.store = store
        self.cache = MappingCache()
        self.leases = Leases(
            api=CoordinationV1Api(api_client),
            namespace=settings.lease_namespace,
            instance=settings.instance_name,
            duration=settings.lease_duration_sec,
            wall_clock=wall_clock,
            sleep=sleep,
        )
        self.writeback = KubeWriteback(
            api_client=api_client, cache=self.cache, leases=self.leases, settings=settings,
            wall_clock=wall_clock, rng=rng,
        )
        custom = CustomObjectsApi(api_client)
        resources = (
            (Resource(kind=Kind.MAPPINGS, list_method=custom.list_cluster_custom_object,
                      list_args=(GROUP, VERSION, PLURAL), parse=parse_mapping), self.cache),
            (Resource(kind=Kind.SERVICES, list_method=CoreV1Api(api_client).list_service_for_all_namespaces,
                      parse=parse_service), None),
            (Resource(kind=Kind.ENDPOINT_SLICES,
                      list_method=DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
                      parse=parse_endpoint_slice, label_selector=SERVICE_NAME_LABEL), None),
        )
        self.watchers = tuple(
            Watcher(resource=r, store=store, sink=sink, backoff=backoff(), sleep=sleep,
                    watch_timeout=watch_timeout, rng=rng)
            for r, sink in resources
        )

    @classmethod
    async def create(cls, *, settings: Settings, store: Store, environ: Mapping[str, str] = os.environ) -> KubeSource:
        """From $KUBECONFIG, ~/.kube/config, /etc/smartnat/kubeconfig or in-cluster configuration."""
        config, origin = await load_configuration(environ=environ)
        logger.info("kubernetes api=%s from %s instance=%s", config.host, origin, settings.instance_name)
        return cls(api_client=new_api_client(config), settings=settings, store=store)

    async def run(self) -> None:
        """Watch, renew the Lease and fire write-back's retries until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for watcher in self.watchers:
                tg.create_task(watcher.run(), name=f"watch-{watcher.name}")
            tg.create_task(self.leases.run(), name="lease")
            # Write-back asks for a pass later (a conflict, a Lease about to expire): a dirty mark.
            tg.create_task(self.writeback.timer.run(self.store.dirty.set), name="writeback-timer")

    async def close(self) -> None:
        await self.api_client.close()
