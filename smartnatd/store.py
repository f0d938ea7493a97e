"""The latest object of each kind and key, what has been listed, and one `dirty` event.

Sources (Kubernetes watches, the file source, host discovery) only write here; the reconciler
is the only reader. Nothing is applied before every expected source has synced once: a plan
from a partial view would delete live Mappings at start-up.

Snapshots cost what changed: each kind keeps its keys sorted as they come and go, and its
sorted tuple is rebuilt only after a change. snapshot_with_changes() also says which keys
changed since the previous call, so the planner can re-decide just those.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
from collections.abc import Iterable
from collections.abc import Mapping as ReadOnlyDict
from dataclasses import dataclass

from smartnatd.model import EndpointSlice, Host, Mapping, ObjectKey, Service, Snapshot


class Kind(enum.StrEnum):
    MAPPINGS = "mappings"
    SERVICES = "services"
    ENDPOINT_SLICES = "endpointslices"
    HOST = "host"


Object = Mapping | Service | EndpointSlice
_KINDS = (Kind.MAPPINGS, Kind.SERVICES, Kind.ENDPOINT_SLICES)


def _key_order(key: ObjectKey) -> tuple[str, str]:
    # ObjectKey's own order, at C speed (its generated __lt__ is slow on 50k keys).
    return (key.namespace, key.name)


@dataclass(frozen=True)
class Changes:
    """What differs between two snapshots of one store: each changed key with its object in the
    later snapshot (None: deleted). Serials chain the snapshots, so a reader can tell that it
    saw every snapshot in between (planner.SnapshotChanges)."""

    base: int  # serial of the earlier snapshot
    serial: int  # serial of the later one
    mappings: ReadOnlyDict[ObjectKey, Mapping | None]
    services: ReadOnlyDict[ObjectKey, Service | None]
    endpoint_slices: ReadOnlyDict[ObjectKey, EndpointSlice | None]
    host: bool


class Store:
    def __init__(self, *, expect: Iterable[Kind] = tuple(Kind)) -> None:
        self._objects: dict[Kind, dict[ObjectKey, Object]] = {k: {} for k in _KINDS}
        # Each kind's keys in order (as tuples: they sort and bisect in C) and its objects in
        # the same order, so a snapshot copies a list instead of looking up every key.
        self._keys: dict[Kind, list[tuple[str, str]]] = {k: [] for k in _KINDS}
        self._ordered: dict[Kind, list[Object]] = {k: [] for k in _KINDS}
        self._sorted: dict[Kind, tuple[Object, ...] | None] = {k: () for k in _KINDS}  # None: stale
        self._pending: dict[Kind, set[ObjectKey]] = {k: set() for k in _KINDS}  # since the last call
        self._host_pending = False
        self._serial = 0  # snapshot_with_changes() calls so far
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
        old = self._objects[kind]
        if fresh != old:
            self._pending[kind].update(k for k in old.keys() | fresh.keys() if old.get(k) != fresh.get(k))
            self._objects[kind] = fresh
            ordered = sorted(fresh, key=_key_order)
            self._keys[kind] = [_key_order(k) for k in ordered]
            self._ordered[kind] = [fresh[k] for k in ordered]
            self._sorted[kind] = None
            self._changed()
        self._mark_synced(kind)

    def upsert(self, kind: Kind, obj: Object) -> None:
        objects = self._objects[kind]
        old = objects.get(obj.key)
        if old != obj:
            keys, ordered = self._keys[kind], self._ordered[kind]
            at = _key_order(obj.key)
            i = bisect.bisect_left(keys, at)
            if old is None:
                keys.insert(i, at)
                ordered.insert(i, obj)
            else:
                ordered[i] = obj
            objects[obj.key] = obj
            self._pending[kind].add(obj.key)
            self._sorted[kind] = None
            self._changed()

    def delete(self, kind: Kind, key: ObjectKey) -> None:
        if self._objects[kind].pop(key, None) is not None:
            i = bisect.bisect_left(self._keys[kind], _key_order(key))
            del self._keys[kind][i], self._ordered[kind][i]
            self._pending[kind].add(key)
            self._sorted[kind] = None
            self._changed()

    def set_host(self, host: Host) -> None:
        if host != self._host:
            self._host = host
            self._host_pending = True
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
        """Every object, each kind sorted by key."""
        return Snapshot(
            mappings=self._sorted_objects(Kind.MAPPINGS),  # type: ignore[arg-type]
            services=self._sorted_objects(Kind.SERVICES),  # type: ignore[arg-type]
            endpoint_slices=self._sorted_objects(Kind.ENDPOINT_SLICES),  # type: ignore[arg-type]
            host=self._host or Host(),
        )

    def snapshot_with_changes(self) -> tuple[Snapshot, Changes]:
        """A snapshot and what changed since the previous call (since the start, the first time)."""
        snapshot = self.snapshot()

        def changed(kind: Kind) -> dict[ObjectKey, Object | None]:
            objects = self._objects[kind]
            keys = self._pending[kind]
            result = {k: objects.get(k) for k in keys}
            keys.clear()
            return result

        changes = Changes(
            base=self._serial,
            serial=self._serial + 1,
            mappings=changed(Kind.MAPPINGS),  # type: ignore[arg-type]
            services=changed(Kind.SERVICES),  # type: ignore[arg-type]
            endpoint_slices=changed(Kind.ENDPOINT_SLICES),  # type: ignore[arg-type]
            host=self._host_pending,
        )
        self._host_pending = False
        self._serial += 1
        return snapshot, changes

    def _sorted_objects(self, kind: Kind) -> tuple[Object, ...]:
        cached = self._sorted[kind]
        if cached is None:
            cached = self._sorted[kind] = tuple(self._ordered[kind])
        return cached
