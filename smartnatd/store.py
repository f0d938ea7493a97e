"""The latest object of each kind and key, what has been listed, and one `dirty` event.

Sources (Kubernetes watches, the file source, host discovery) only write here; the reconciler
is the only reader. Nothing is applied before every expected source has synced once: a plan
from a partial view would delete live Mappings at start-up.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable

from smartnatd.model import EndpointSlice, Host, Mapping, ObjectKey, Service, Snapshot


class Kind(enum.StrEnum):
    MAPPINGS = "mappings"
    SERVICES = "services"
    ENDPOINT_SLICES = "endpointslices"
    HOST = "host"


Object = Mapping | Service | EndpointSlice


class Store:
    def __init__(self, *, expect: Iterable[Kind] = tuple(Kind)) -> None:
        self._objects: dict[Kind, dict[ObjectKey, Object]] = {k: {} for k in Kind if k != Kind.HOST}
        self._host: Host | None = None
        self._expected = frozenset(expect)
        self._synced: set[Kind] = set()
        self.dirty = asyncio.Event()
        self.synced = asyncio.Event()
        self.generation = 0  # bumped on every change; lets the reconciler skip no-op wakeups

    def _changed(self) -> None:
        self.generation += 1
        self.dirty.set()

    def _mark_synced(self, kind: Kind) -> None:
        self._synced.add(kind)
        if self._expected <= self._synced:
            self.synced.set()

    def replace(self, kind: Kind, objects: Iterable[Object]) -> None:
        """A (re)list: the complete set of objects of `kind`."""
        fresh = {o.key: o for o in objects}
        if fresh != self._objects[kind]:
            self._objects[kind] = fresh
            self._changed()
        self._mark_synced(kind)

    def upsert(self, kind: Kind, obj: Object) -> None:
        if self._objects[kind].get(obj.key) != obj:
            self._objects[kind][obj.key] = obj
            self._changed()

    def delete(self, kind: Kind, key: ObjectKey) -> None:
        if self._objects[kind].pop(key, None) is not None:
            self._changed()

    def set_host(self, host: Host) -> None:
        if host != self._host:
            self._host = host
            self._changed()
        self._mark_synced(Kind.HOST)

    def get(self, kind: Kind, key: ObjectKey) -> Object | None:
        return self._objects[kind].get(key)

    @property
    def is_synced(self) -> bool:
        return self.synced.is_set()

    def unsynced(self) -> list[str]:
        return sorted(str(k) for k in self._expected - self._synced)

    def snapshot(self) -> Snapshot:
        def sort(kind: Kind) -> tuple:
            objs = self._objects[kind]
            return tuple(objs[k] for k in sorted(objs))

        return Snapshot(
            mappings=sort(Kind.MAPPINGS),
            services=sort(Kind.SERVICES),
            endpoint_slices=sort(Kind.ENDPOINT_SLICES),
            host=self._host or Host(),
        )
