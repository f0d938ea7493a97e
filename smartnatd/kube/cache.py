"""Raw Mapping objects as last seen, for write-back: current status, finalizers, resourceVersion.

The store keeps parsed Mappings for the planner and nothing of their status; write-back needs
the status exactly as the API server holds it to write only what differs. The Mapping watch and
write-back's own responses both feed this cache; the newer resourceVersion wins, so a watch
event that is older than our last write never makes us write the same change again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from smartnatd.kube.objects import object_key
from smartnatd.model import ObjectKey

Raw = dict[str, Any]


def resource_version(obj: Raw) -> int | None:
    # Opaque to clients by contract, but every API server issues integers (etcd revisions);
    # anything else compares as unknown, and unknown always replaces.
    value: Any = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _newer(new: Raw, old: Raw | None) -> bool:
    if old is None:
        return True
    if (new.get("metadata") or {}).get("uid") != (old.get("metadata") or {}).get("uid"):
        return True  # deleted and created again under the same name
    a, b = resource_version(new), resource_version(old)
    return a is None or b is None or a >= b


class MappingCache:
    def __init__(self) -> None:
        self._objects: dict[ObjectKey, Raw] = {}
        self._changed: set[ObjectKey] = set()

    def get(self, key: ObjectKey) -> Raw | None:
        return self._objects.get(key)

    def __len__(self) -> int:
        return len(self._objects)

    def replace(self, objects: Iterable[Raw]) -> None:
        """A (re)list: the complete set. Objects we wrote after the list keep our newer version."""
        fresh: dict[ObjectKey, Raw] = {}
        for obj in objects:
            key = object_key(obj)
            if key is None:
                continue
            old = self._objects.get(key)
            fresh[key] = obj if _newer(obj, old) else old  # type: ignore[assignment]
            if fresh[key] is not old:
                self._changed.add(key)
        self._changed |= set(self._objects) - set(fresh)
        self._objects = fresh

    def upsert(self, obj: Raw) -> None:
        key = object_key(obj)
        if key is None:
            return
        if _newer(obj, self._objects.get(key)):
            self._objects[key] = obj
            self._changed.add(key)

    def delete(self, key: ObjectKey) -> None:
        if self._objects.pop(key, None) is not None:
            self._changed.add(key)

    def take_changed(self) -> set[ObjectKey]:
        """Keys whose object changed since the last call (write-back looks at them again)."""
        changed, self._changed = self._changed, set()
        return changed
