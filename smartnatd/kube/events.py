"""Events on Mappings, aggregated as client-go's EventRecorder does: a repeat patches, never piles up.

A Mapping that flaps (a pod going ready and not ready every few seconds) makes the same
transition again and again. Posting each one as a new Event filled etcd without bound;
client-go's EventCorrelator instead remembers the Events it posted and, for a repeat (same
object, type, reason and message), merge-patches the existing Event's `count` and
`lastTimestamp`. This module does the useful core of that:

* `Recent`: the Events posted in the last `AGGREGATE_WINDOW` seconds, keyed by (namespace,
  name, uid, type, reason, message); an LRU of at most `CACHE_SIZE` entries (client-go's
  4096), so memory stays bounded whatever the number of Mappings. A repeat within the window of
  the previous occurrence patches; after it, or once its entry was evicted, a new Event starts.
* `Budget`: client-go's spam filter, a token bucket per involved object: `BURST` (25) Events,
  then one per `REFILL` (300) seconds. An occurrence over budget is still counted, so the next
  patch that goes out carries the true count; it just makes no request itself.
* A patch answered 404 (the API server's Event TTL, one hour by default, or someone deleted it)
  creates the Event again under its name, with the count so far, as client-go does. A 403 (an
  RBAC from before aggregation, without `patch` on events) is said once; each repeat is then a
  new Event again, as before aggregation, until a restart.

Posting is best effort: a failure is logged and never fails write-back, and nothing is retried
(a late Event would be out of order).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from kubernetes_asyncio.client import CoreV1Api

from smartnatd.errors import KubeApiError
from smartnatd.kube.api import MERGE_PATCH, call
from smartnatd.kube.objects import API_VERSION, KIND
from smartnatd.kube.status import Event

logger = logging.getLogger(__name__)

COMPONENT = "smartnatd"
AGGREGATE_WINDOW = 600.0  # seconds after an occurrence in which a repeat patches its Event
CACHE_SIZE = 4096  # Events remembered at most (client-go: maxLruCacheEntries)
BURST = 25  # Events (creates or patches) per Mapping at once (client-go: defaultSpamBurst)
REFILL = 300.0  # seconds per further one (client-go: defaultSpamQPS = 1/300)
MESSAGE_LIMIT = 1024  # client-go cuts Event messages at 1 KiB too
NAME_LIMIT = 253  # a DNS subdomain
DIGEST_LENGTH = 16

Key = tuple[str, ...]


def rfc3339(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_name(mapping: str, identity: list[str]) -> str:
    """`<mapping name>.<16 hex digits of identity>`: a DNS subdomain of at most 253 characters.

    A Mapping's name is a DNS subdomain already; cut short it may end in `.` or `-`, which
    cannot precede the `.` (an empty label, a label ending in `-`), so those are dropped too.
    """
    digest = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:DIGEST_LENGTH]
    prefix = mapping[: NAME_LIMIT - DIGEST_LENGTH - 1].rstrip(".-")
    return f"{prefix}.{digest}"


@dataclass(frozen=True)
class Posted:
    """What is known of an Event this appliance posted (or would have, but for the budget)."""

    name: str
    count: int
    first: str  # firstTimestamp, as sent
    last: float  # wall time of the latest occurrence


class Recent:
    """The Events of the last `window` seconds, at most `size` of them, least recently seen first out."""

    def __init__(self, *, size: int = CACHE_SIZE, window: float = AGGREGATE_WINDOW) -> None:
        self._size = size
        self._window = window
        self._entries: OrderedDict[Key, Posted] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, now: float) -> Posted | None:
        posted = self._entries.get(key)
        if posted is None:
            return None
        if now - posted.last > self._window:
            del self._entries[key]
            return None
        return posted

    def put(self, key: Key, posted: Posted) -> None:
        self._entries[key] = posted
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Budget:
    """A token bucket per involved object: `burst` at once, then one per `refill` seconds.

    Bounded like `Recent`: an object not seen for long has a full bucket anyway, so forgetting
    the least recently used one loses nothing that matters.
    """

    def __init__(self, *, burst: int = BURST, refill: float = REFILL, size: int = CACHE_SIZE) -> None:
        self._burst = burst
        self._refill = refill
        self._size = size
        self._buckets: OrderedDict[Key, tuple[float, float]] = OrderedDict()  # tokens, as of when

    def take(self, key: Key, now: float) -> bool:
        tokens, then = self._buckets.pop(key, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + max(0.0, now - then) / self._refill)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self._size:
            self._buckets.popitem(last=False)
        return allowed


class EventRecorder:
    """Posts core/v1 Events on Mappings for one appliance, aggregating repeats."""

    def __init__(self, *, core: CoreV1Api, instance: str, recent: Recent | None = None,
                 budget: Budget | None = None) -> None:
        self._core = core
        self._instance = instance
        self.recent = Recent() if recent is None else recent  # not `or`: an empty one is falsy
        self._budget = Budget() if budget is None else budget
        self._patch_forbidden = False

    async def post(self, obj: dict[str, Any], event: Event, now: float) -> None:
        """Record `event` on the Mapping `obj` at wall time `now`; never raises KubeApiError."""
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        name, namespace, uid = str(meta.get("name")), str(meta.get("namespace")), str(meta.get("uid"))
        message = event.message[:MESSAGE_LIMIT]
        key = (namespace, name, uid, event.type, event.reason, message)
        stamp = rfc3339(now)
        seen = None if self._patch_forbidden else self.recent.get(key, now)
        posted = self._first(meta, event, message, now) if seen is None else replace(seen, count=seen.count + 1, last=now)
        self.recent.put(key, posted)
        if not self._budget.take((namespace, name, uid), now):
            logger.debug("event %s on mapping %s/%s over budget; counted, not sent", event.reason, namespace, name)
            return
        try:
            if seen is not None:
                try:
                    await call(self._core.patch_namespaced_event, posted.name, namespace,
                               {"count": posted.count, "lastTimestamp": stamp}, _content_type=MERGE_PATCH)
                    return
                except KubeApiError as err:
                    if err.status == 403:
                        # An RBAC from before aggregation grants create only: every repeat
                        # becomes an Event of its own again, as before, until a restart. Said
                        # once, though the other patches in flight get their 403 too.
                        if not self._patch_forbidden:
                            logger.warning("events cannot be patched (%s); posting each repeat as a new Event. "
                                           "Apply etc/rbac.yaml", err)
                        self._patch_forbidden = True
                        posted = self._first(meta, event, message, now)
                        self.recent.put(key, posted)
                    elif err.status != 404:
                        raise
                    # 404: expired (the API server's Event TTL) or deleted: created again below.
            await call(self._core.create_namespaced_event, namespace, self._body(meta, event, message, posted, stamp))
        except KubeApiError as err:
            if err.status != 409:  # 409 on create: the same Event exists already
                logger.warning("event %s on mapping %s/%s not posted: %s", event.reason, namespace, name, err)

    def _first(self, meta: dict[str, Any], event: Event, message: str, now: float) -> Posted:
        """A new Event. The write that recorded the transition (its resourceVersion) and the time
        make its name unique; type and message keep two Events of one write apart."""
        stamp = rfc3339(now)
        identity = [str(meta.get("uid")), str(meta.get("resourceVersion")), self._instance,
                    event.type, event.reason, message, stamp]
        return Posted(name=event_name(str(meta.get("name")), identity), count=1, first=stamp, last=now)

    def _body(self, meta: dict[str, Any], event: Event, message: str, posted: Posted, stamp: str) -> dict[str, Any]:
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": posted.name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": event.reason,
            "message": message,
            "type": event.type,
            "source": {"component": COMPONENT, "host": self._instance},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
            "firstTimestamp": posted.first,
            "lastTimestamp": stamp,
            "count": posted.count,
        }
