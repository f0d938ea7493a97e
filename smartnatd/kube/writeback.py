"""Status merge-patches, Events and the finalizer, after each successful apply; only what changed.

The reconciler calls `publish(plan, previous=...)` once the kernel holds the plan. For each
Mapping whose verdict changed, whose object changed (a watch event, our own write) or whose
last write failed, this module computes the status with kube/status.py against the object's
current status (MappingCache) and writes the difference, if any:

* status: a merge patch (`application/merge-patch+json`) of /status, or of the object itself
  where SmartNat's old CRD has no status subresource (found out from a 404 on /status while
  the object exists, and remembered). 404: the object is gone. 409: looked at again on a
  pass shortly after (`Timer`). Any other failure, transient (no answer, 429, 5xx) or not
  (403, 422), is an outage: the rest of the batch waits, retried with capped backoff and
  logged once; it would fail alike for every Mapping. A surprise (a bug) in one Mapping is
  logged once and skipped, never the end of the daemon.
* Events: on transitions only, posted after the patch recording them succeeded, so a restart
  (whose status already shows the state) or a second appliance (whose patch lost the
  resourceVersion race) posts none. A repeat of a recent one patches its count (kube/events.py).
* finalizer: added (merge patch of the list, resourceVersion precondition) once this appliance
  serves the Mapping and never while it is being deleted. When it is deleted, each appliance
  drops its entry after its kernel dropped the Mapping; entries of appliances whose Lease
  expired are dropped by any live one; whoever leaves no entry behind removes the finalizer
  (JSON patch with a test op), unless `configuredAddresses` keys no entry lists remain: those
  are SmartNat's (a side-by-side cut-over), which removes them when its rules are gone. After SNCTRLR_MAX_FINALIZE_WAIT_MINUTES it goes regardless,
  with a Warning Event naming the appliances that never confirmed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi

from smartnatd.errors import KubeApiError
from smartnatd.kube import status as status_mod
from smartnatd.kube.api import JSON_PATCH, MERGE_PATCH, call
from smartnatd.kube.cache import MappingCache, Raw
from smartnatd.kube.events import EventRecorder, rfc3339
from smartnatd.kube.lease import LeaseState, Leases, parse_time
from smartnatd.kube.objects import FINALIZER, GROUP, PLURAL, VERSION
from smartnatd.model import ObjectKey
from smartnatd.planner import Plan, Verdict, VerdictKind
from smartnatd.settings import Settings
from smartnatd.transitions import log_transitions

logger = logging.getLogger(__name__)

CONCURRENCY = 16  # writes in flight at once (the first pass after a start may write thousands)
RETRY_MIN = 0.5
RETRY_MAX = 30.0


class Timer:
    """Asks for a pass later: write-back needs another look at some Mappings by then.

    A source like a watch: `run(fire)` calls `fire()` (which sets the store's dirty event) when
    the earliest scheduled time comes.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: float | None = None
        self._changed = asyncio.Event()

    @property
    def due_in(self) -> float | None:
        return None if self._due is None else max(0.0, self._due - self._clock())

    def schedule(self, delay: float) -> None:
        due = self._clock() + max(0.0, delay)
        if self._due is None or due < self._due:
            self._due = due
            self._changed.set()

    async def run(self, fire: Callable[[], None]) -> None:
        while True:
            self._changed.clear()
            wait = self.due_in
            if wait is not None and wait <= 0:
                self._due = None
                fire()
                continue
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass


class KubeWriteback:
    def __init__(
        self,
        *,
        api_client: ApiClient,
        cache: MappingCache,
        leases: Leases,
        settings: Settings,
        timer: Timer | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._custom = CustomObjectsApi(api_client)
        self.events = EventRecorder(core=CoreV1Api(api_client), instance=settings.instance_name)
        self._cache = cache
        self._leases = leases
        self._instance = settings.instance_name
        self._max_wait = settings.max_finalize_wait_minutes * 60
        self.timer = timer or Timer()
        self._wall = wall_clock
        self._rng = rng or random.Random()
        # True: our CRD (/status); False: SmartNat's (status written with the object); None: not known yet.
        self.status_subresource: bool | None = None
        self._probing = asyncio.Lock()
        self._retry: set[ObjectKey] = set()
        self._retry_delay = 0.0
        self._failing = False
        self._failed_now = False
        self._outage = False
        self._leases_seen: dict[str, LeaseState | None] = {}
        self._broken: dict[ObjectKey, str] = {}  # Mappings whose write-back raised a surprise, logged once
        self._finalizers_added: list[ObjectKey] = []  # in this publish, for one log line

    # --- the Writeback protocol --------------------------------------------------------

    async def publish(self, plan: Plan, *, previous: Plan | None) -> None:
        log_transitions(plan, previous, log=logger)
        before = {v.key: v for v in previous.verdicts} if previous else {}
        touched = self._cache.take_changed() | self._retry
        self._retry = set()
        todo = [v for v in plan.verdicts if previous is None or v.key in touched or before.get(v.key) != v]
        if not todo:
            return
        now = self._wall()
        self._outage = False
        self._failed_now = False
        self._leases_seen = {}
        semaphore = asyncio.Semaphore(CONCURRENCY)
        if self._failing:
            # Still failing since the last publish: one write finds out before all of them try.
            await self._guarded(todo[0], now, semaphore)
            todo = todo[1:]
        try:
            async with asyncio.TaskGroup() as tg:
                for verdict in todo:
                    tg.create_task(self._guarded(verdict, now, semaphore))
        finally:
            self._log_finalizers_added()
        if self._failed_now:
            self._retry_delay = min(RETRY_MAX, max(RETRY_MIN, self._retry_delay * 2))
            self.timer.schedule(self._rng.uniform(self._retry_delay / 2, self._retry_delay))
        else:
            self._retry_delay = 0.0
            if self._failing:
                logger.info("status write-back works again")
                self._failing = False

    def _log_finalizers_added(self) -> None:
        # One line per publish: the first start on a cluster of 10k Mappings wrote 5,000 lines.
        added, self._finalizers_added = sorted(self._finalizers_added), []
        if len(added) == 1:
            logger.info("mapping %s: finalizer %s added", added[0], FINALIZER)
        elif added:
            named = ", ".join(str(k) for k in added[:3])
            more = f" and {len(added) - 3} more" if len(added) > 3 else ""
            logger.info("finalizer %s added to %d Mappings: %s%s", FINALIZER, len(added), named, more)

    async def _guarded(self, verdict: Verdict, now: float, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            if self._outage:  # the API server is unreachable: the rest waits for the retry
                self._retry.add(verdict.key)
                return
            try:
                await self._sync(verdict, now)
            except KubeApiError as err:
                self._retry.add(verdict.key)
                self._failed_now = True
                if err.status == 409:
                    # Someone wrote in between (another appliance, a user): look again soon.
                    logger.debug("mapping %s: write-back conflict (%s); retrying", verdict.key, err)
                    return
                if err.status == 422:
                    # This object's write breaks its schema or a webhook's rule: this Mapping's
                    # problem, not the server's. Treated as an outage it stalled every other
                    # Mapping behind it for as long as it lasted.
                    text = str(err)
                    if self._broken.get(verdict.key) != text:
                        self._broken[verdict.key] = text
                        logger.warning("status write-back refused for mapping %s: %s; retrying with backoff",
                                       verdict.key, err)
                    return
                # Unreachable, or refused (403 without RBAC): the same for the next Mapping.
                self._outage = True
                if not self._failing:
                    hint = "" if err.transient else " (check etc/rbac.yaml and etc/crd/mappings.yaml are applied)"
                    logger.warning("status write-back failed for mapping %s: %s; retrying with backoff%s",
                                   verdict.key, err, hint)
                    self._failing = True
                else:
                    logger.debug("status write-back still failing for mapping %s: %s", verdict.key, err)
            except Exception as err:  # a bug or a status shape nobody foresaw: this Mapping only
                text = f"{type(err).__name__}: {err}"
                if self._broken.get(verdict.key) != text:
                    # The traceback once per kind of error: a bug every Mapping hits would log
                    # 10k of them at a start.
                    first = text not in self._broken.values()
                    self._broken[verdict.key] = text
                    logger.warning("status write-back skipped mapping %s: %s", verdict.key, text, exc_info=first)
            else:
                self._broken.pop(verdict.key, None)

    # --- one Mapping -------------------------------------------------------------------

    async def _sync(self, verdict: Verdict, now: float) -> None:
        raw = self._cache.get(verdict.key)
        if raw is None:
            return  # gone, or not seen yet: its watch event brings it back here
        if not _same_object(verdict, raw):
            # The plan is older than the object (a spec change, a re-creation arrived since):
            # its verdict is not this object's status. The pass the change triggered writes it.
            logger.debug("mapping %s: verdict for generation %d is stale; not written", verdict.key, verdict.generation)
            self._retry.add(verdict.key)
            return
        deleting = bool(_meta(raw).get("deletionTimestamp"))
        if verdict.kind == VerdictKind.DELETING:
            if deleting:
                await self._finalize(verdict.key, raw, now)
            return
        if deleting:
            return  # the plan predates the deletion; the pass the deletion triggered handles it
        if verdict.kind == VerdictKind.CONFIGURED and FINALIZER not in _finalizers(raw):
            added = await self._add_finalizer(verdict.key, raw)
            if added is None:
                return
            raw = added
        for _ in range(2):  # twice at most: once more after finding out the CRD has no /status
            known = self.status_subresource
            change = status_mod.compute(
                verdict=verdict,
                current=raw.get("status"),
                instance=self._instance,
                now=rfc3339(now),
                generation=None if known is False else _meta(raw).get("generation"),
            )
            if change.patch is None:
                return
            written = await self._write_status(verdict.key, raw, change.patch, precondition=change.shared, assumed=known)
            if written is None:
                return
            if written is _RETRY:
                continue
            for event in change.events:
                await self.events.post(written, event, now)
            return

    async def _write_status(
        self, key: ObjectKey, raw: Raw, patch: dict[str, Any], *, precondition: bool, assumed: bool | None
    ) -> Any:
        """Merge-patch .status; the new object, None if it is gone, _RETRY after finding the old CRD.

        `assumed` is what the patch was computed for; until the kind of CRD is known, one write
        at a time finds it out and the others then recompute their patch.
        """
        if self.status_subresource is not None:
            return await self._patch_status(key, raw, patch, precondition=precondition)
        async with self._probing:
            if self.status_subresource is False and assumed is not False:
                return _RETRY
            return await self._patch_status(key, raw, patch, precondition=precondition)

    async def _patch_status(self, key: ObjectKey, raw: Raw, patch: dict[str, Any], *, precondition: bool) -> Any:
        body: dict[str, Any] = {"status": patch}
        if precondition:
            body["metadata"] = {"resourceVersion": _meta(raw).get("resourceVersion")}
        args = (GROUP, VERSION, key.namespace, PLURAL, key.name, body)
        if self.status_subresource is not False:
            try:
                obj = await call(self._custom.patch_namespaced_custom_object_status, *args, _content_type=MERGE_PATCH)
            except KubeApiError as err:
                if err.status != 404:
                    raise
                if self.status_subresource or not await self._exists(key):
                    return None
                logger.info(
                    "Mappings have no status subresource (SmartNat's CRD); writing status with the object. "
                    "Apply etc/crd/mappings.yaml for the new CRD"
                )
                self.status_subresource = False
                return _RETRY
            self.status_subresource = True
            self._cache.upsert(obj)
            return obj
        try:
            obj = await call(self._custom.patch_namespaced_custom_object, *args, _content_type=MERGE_PATCH)
        except KubeApiError as err:
            if err.status == 404:
                return None
            raise
        if obj.get("status") == raw.get("status"):
            # The object ignored .status: the CRD has gained a status subresource since.
            logger.info("Mappings now have a status subresource; writing status through /status")
            self.status_subresource = None
            return _RETRY
        self._cache.upsert(obj)
        return obj

    async def _exists(self, key: ObjectKey) -> bool:
        try:
            obj = await call(self._custom.get_namespaced_custom_object, GROUP, VERSION, key.namespace, PLURAL, key.name)
        except KubeApiError as err:
            if err.status == 404:
                return False
            raise
        self._cache.upsert(obj)
        return True

    async def _add_finalizer(self, key: ObjectKey, raw: Raw) -> Raw | None:
        # The whole list with a resourceVersion precondition: a concurrent change to the list
        # (another controller's finalizer, a deletion) makes this a 409, never a lost update.
        body = {"metadata": {"finalizers": [*_finalizers(raw), FINALIZER], "resourceVersion": _meta(raw).get("resourceVersion")}}
        try:
            obj = await call(self._custom.patch_namespaced_custom_object, GROUP, VERSION, key.namespace, PLURAL,
                             key.name, body, _content_type=MERGE_PATCH)
        except KubeApiError as err:
            if err.status == 404:
                return None
            raise
        self._finalizers_added.append(key)
        self._cache.upsert(obj)
        return obj

    async def _remove_finalizer(self, key: ObjectKey, raw: Raw) -> None:
        finalizers = _finalizers(raw)
        index = finalizers.index(FINALIZER)
        ops = [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        try:
            obj = await call(self._custom.patch_namespaced_custom_object, GROUP, VERSION, key.namespace, PLURAL,
                             key.name, ops, _content_type=JSON_PATCH)
        except KubeApiError as err:
            if err.status == 404:
                return
            raise
        if obj and len(finalizers) > 1:
            self._cache.upsert(obj)  # still there for other finalizers; if gone, the watch says so

    async def _finalize(self, key: ObjectKey, raw: Raw, now: float) -> None:
        """The Mapping is being deleted and our kernel no longer serves it."""
        current = raw.get("status")
        entries = status_mod.holders(current)
        released = {self._instance} & entries.keys()
        waiting_until: list[float] = []
        for name in sorted(entries.keys() - {self._instance}):
            state = await self._lease(name)
            if state is None:
                continue  # unknown (the Lease could not be read): not dead
            if state.alive(now):
                assert state.expires is not None
                waiting_until.append(state.expires)
            else:
                released.add(name)
        patch = status_mod.release(current=current, instances=released)
        if patch is not None:
            # Guarded: which address keys go depends on the other entries, and two appliances
            # releasing at once from one view each kept the key the other held: a key nobody
            # claims, taken for SmartNat's, holds the finalizer for MAX_FINALIZE_WAIT_MINUTES.
            obj = await self._write_status(key, raw, patch, precondition=True, assumed=self.status_subresource)
            if obj is None:
                return
            if obj is _RETRY:
                obj = await self._write_status(key, raw, patch, precondition=True, assumed=self.status_subresource)
                if obj is None or obj is _RETRY:
                    self._retry.add(key)
                    return
            raw = obj
            for name in sorted(released - {self._instance}):
                logger.warning("mapping %s: released the entry of appliance %s, whose Lease expired", key, name)
            if self._instance in released:
                logger.info("mapping %s: removed from this appliance", key)
        if FINALIZER not in _finalizers(raw):
            return
        remaining = sorted(status_mod.holders(raw.get("status")))
        # Addresses SmartNat still serves (a side-by-side cut-over): it removes their keys when done.
        foreign = sorted(status_mod.foreign_addresses(raw.get("status")))
        if not remaining and not foreign:
            await self._remove_finalizer(key, raw)
            logger.info("mapping %s: no appliance serves it any more; finalizer removed", key)
            return
        deleted = parse_time(_meta(raw).get("deletionTimestamp")) or now
        deadline = deleted + self._max_wait
        holders = [f"appliances {', '.join(remaining)}"] if remaining else []
        if foreign:
            holders.append(f"SmartNat (status.configuredAddresses {', '.join(foreign)})")
        if now >= deadline:
            minutes = self._max_wait // 60
            message = (
                f"{' and '.join(holders)} did not confirm removing the Mapping within "
                f"SNCTRLR_MAX_FINALIZE_WAIT_MINUTES={minutes}; finalizer removed anyway"
            )
            await self.events.post(raw, status_mod.Event("Warning", status_mod.FINALIZER_TIMEOUT, message), now)
            await self._remove_finalizer(key, raw)
            logger.warning("mapping %s: %s", key, message)
            return
        # Look again when the first live holder's Lease would expire, or at the deadline; SmartNat
        # has no Lease: its removing a key is a watch event that brings the Mapping back here.
        self._retry.add(key)
        self.timer.schedule(min([deadline, *waiting_until]) - now + 1.0)
        logger.debug("mapping %s: deletion waits for %s", key, " and ".join(holders))

    async def _lease(self, instance: str) -> LeaseState | None:
        if instance not in self._leases_seen:
            try:
                self._leases_seen[instance] = await self._leases.state(instance)
            except KubeApiError as err:
                logger.debug("lease of appliance %s unreadable: %s", instance, err)
                self._leases_seen[instance] = None
        return self._leases_seen[instance]


_RETRY: Any = object()


def _meta(obj: Raw) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _same_object(verdict: Verdict, raw: Raw) -> bool:
    """The verdict was planned from this object at its current generation (as objects.py parses them)."""
    meta = _meta(raw)
    generation, uid = meta.get("generation"), meta.get("uid")
    generation = generation if isinstance(generation, int) and not isinstance(generation, bool) else 0
    return (verdict.generation, verdict.uid) == (generation, uid if isinstance(uid, str) else "")


def _finalizers(obj: Raw) -> list[str]:
    finalizers = _meta(obj).get("finalizers")
    return [f for f in finalizers if isinstance(f, str)] if isinstance(finalizers, list) else []
