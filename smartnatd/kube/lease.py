"""This appliance's Lease (`smartnat-<instance>`), and whether another appliance's is still held.

Each appliance renews a coordination.k8s.io/v1 Lease every lease_duration/3. It is no leader
election: every appliance holds its own Lease, and the others read it to tell a live appliance
from a dead one. A dead appliance's entry in a deleted Mapping's status can then be released at
once instead of waiting out SNCTRLR_MAX_FINALIZE_WAIT_MINUTES.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kubernetes_asyncio.client import CoordinationV1Api

from smartnatd.errors import KubeApiError
from smartnatd.kube.api import MERGE_PATCH, call
from smartnatd.kube.watch import api_server, describe

logger = logging.getLogger(__name__)

LEASE_PREFIX = "smartnat-"


def lease_name(instance: str) -> str:
    return f"{LEASE_PREFIX}{instance}"[:253]


def micro_time(when: float) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class LeaseState:
    holder: str
    expires: float | None  # wall-clock seconds; None: no Lease, or one without renewTime

    def alive(self, now: float) -> bool:
        return self.expires is not None and now < self.expires


class Leases:
    """Holds this appliance's Lease and reads the others'."""

    def __init__(
        self,
        *,
        api: CoordinationV1Api,
        namespace: str,
        instance: str,
        duration: int,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._instance = instance
        self._duration = duration
        self._wall = wall_clock
        self._sleep = sleep
        self._created = False
        self._failing = False
        # Renewals carry the resourceVersion of our last write: a 409 means someone else wrote.
        self._version: str | None = None
        self._sent: set[str] = set()  # renewTimes sent since the last answered write (one may have landed)
        self.duplicate = False  # another process renews this Lease: two appliances share the name

    @property
    def name(self) -> str:
        return lease_name(self._instance)

    async def renew(self) -> None:
        """Create the Lease once, then move renewTime forward. Raises KubeApiError.

        Each request may take a third of the duration: a slow answer must not outlast the
        Lease, and leaves time for retries before the others count this appliance as dead.
        """
        timeout = self._duration / 3
        now = micro_time(self._wall())
        spec = {"holderIdentity": self._instance, "leaseDurationSeconds": self._duration, "renewTime": now}
        if not self._created:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self._namespace,
                             "labels": {"app.kubernetes.io/name": "smartnat"}},
                "spec": {**spec, "acquireTime": now},
            }
            try:
                created = await call(self._api.create_namespaced_lease, self._namespace, body, timeout=timeout)
                self._created = True
                self._confirmed(created, now)
                logger.info("lease %s/%s created duration=%ds", self._namespace, self.name, self._duration)
                return
            except KubeApiError as err:
                if err.status != 409:  # 409: it exists from an earlier run; renew it below
                    raise
            self._created = True
        for attempt in range(2):
            patch: dict[str, object] = {"spec": spec}
            if self._version:
                patch["metadata"] = {"resourceVersion": self._version}
            self._sent.add(now)
            try:
                renewed = await call(self._api.patch_namespaced_lease, self.name, self._namespace, patch,
                                     _content_type=MERGE_PATCH, timeout=timeout)
            except KubeApiError as err:
                if err.status == 404:  # deleted by someone: create it again next time
                    self._created = False
                    self._version = None
                elif err.status == 409 and not attempt:
                    await self._written_by_someone_else(timeout)
                    continue
                raise
            self._confirmed(renewed, now)
            return

    def _confirmed(self, lease: object, sent: str) -> None:
        meta = lease.get("metadata") if isinstance(lease, dict) else None
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        self._version = str(version) if version else None
        self._sent = {sent}

    async def _written_by_someone_else(self, timeout: float) -> None:
        """A renewal met a Lease changed since our last write: by us (a lost answer) or another process."""
        lease = await call(self._api.read_namespaced_lease, self.name, self._namespace, timeout=timeout)
        spec = (lease or {}).get("spec") or {}
        renewed = spec.get("renewTime")
        if renewed not in self._sent and not self.duplicate:
            self.duplicate = True
            logger.error(
                "lease %s/%s was renewed by another process (renewTime %s, holderIdentity %s): two appliances "
                "run with SNCTRLR_INSTANCE_NAME=%s and overwrite each other's status entries; give each its own name",
                self._namespace, self.name, renewed, spec.get("holderIdentity"), self._instance,
            )
        self._version = str(((lease or {}).get("metadata") or {}).get("resourceVersion") or "") or None
        self._sent = set()

    async def run(self) -> None:
        """Renew every duration/3 for ever; after a failure retry sooner, logging start and end."""
        period = self._duration / 3
        while True:
            try:
                await self.renew()
            except KubeApiError as err:
                if not self._failing:
                    logger.warning(
                        "lease %s/%s not renewed: %s; retrying in %.0fs", self._namespace, self.name,
                        describe(err, server=api_server(self._api)), min(period, 2.0),
                    )
                    self._failing = True
                await self._sleep(min(period, 2.0))
                continue
            if self._failing:
                logger.info("lease %s/%s renewed again", self._namespace, self.name)
                self._failing = False
            await self._sleep(period)

    async def state(self, instance: str) -> LeaseState:
        """Another appliance's Lease. Raises KubeApiError for anything but 404 (unknown is not dead)."""
        try:
            lease = await call(self._api.read_namespaced_lease, lease_name(instance), self._namespace)
        except KubeApiError as err:
            if err.status == 404:
                return LeaseState(holder="", expires=None)
            raise
        spec = (lease or {}).get("spec") or {}
        renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
        duration = spec.get("leaseDurationSeconds")
        if renewed is None or not isinstance(duration, int):
            return LeaseState(holder=str(spec.get("holderIdentity") or ""), expires=None)
        return LeaseState(holder=str(spec.get("holderIdentity") or ""), expires=renewed + duration)
