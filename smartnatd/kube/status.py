"""A Mapping's status from a verdict: what to merge-patch and which Events that makes. Pure.

Two kinds of fields, so that several appliances never fight over one object:

* shared, computed from the cluster-wide part of the verdict only, hence identical on every
  appliance: `invalid`, `serviceVIP`, `observedGeneration` and `conditions` (Ready, Invalid,
  Conflict). A condition keeps its lastTransitionTime while its status and reason stay.
  Write-back sends a patch touching these with a resourceVersion precondition, so of two
  appliances seeing the same transition one writes it (and posts its Event), the other gets a
  409 and then finds the status already right.
* per appliance, written only by that appliance (or released by another when it is dead):
  `appliances.<instance>` {configured: [endpoints], message, lastSync} and the
  `configuredAddresses` keys of the addresses it serves, {podIPs: [...]}. An appliance has an
  entry exactly while its kernel serves the Mapping: the entries are the holders the
  finalizer waits for. A patch that adds or drops an entry or a key carries the precondition
  too: whether a key stays depends on the other appliances' entries.

Whether a Mapping is served *here* (Configured) or not (NotLocal) differs between appliances,
so it never shows in a shared field: Ready means "valid, no conflict, Service usable"; the
appliances serving it are listed under `appliances`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from smartnatd.planner import Verdict, VerdictKind

READY = "Ready"
INVALID = "Invalid"
CONFLICT = "Conflict"
CONDITION_ORDER = (READY, INVALID, CONFLICT)
SHARED_FIELDS = frozenset({"invalid", "serviceVIP", "observedGeneration", "conditions"})
VALID_NO = "no"  # SmartNat's value of status.invalid for a valid Mapping
# The CRD allows condition messages of 32768 characters; a status holding a verdict's reason
# (one sentence per problem, unbounded) stays far below that, so no write gets a 422 for it.
MESSAGE_LIMIT = 4096

RESOLVED = "Resolved"
RESOLVED_MESSAGE = (
    "the Mapping is valid, conflicts with no other and its Service can be reached; "
    "status.appliances lists the appliances serving it"
)
DELETING_MESSAGE = "the Mapping is being deleted"
FINALIZER_TIMEOUT = "FinalizerTimeout"

Status = dict[str, Any]


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False"
    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass(frozen=True)
class StatusChange:
    patch: Status | None  # RFC 7386 merge patch of .status; None: the status is already right
    # Send the patch with a resourceVersion precondition: it touches shared fields, or what the
    # other appliances' patches are computed from (which address keys exist, or whether this
    # appliance holds an entry). Without it, two appliances trading an address wrote from stale views and
    # the address key was lost: the one releasing it did not see the other's new entry yet, the
    # other did not re-add a key it still saw.
    shared: bool
    events: tuple[Event, ...]  # transitions this patch records; post them once it succeeded


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text`, cut to `limit` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cluster_conditions(verdict: Verdict) -> tuple[Condition, ...]:
    """The conditions every appliance computes alike for this verdict (none while deleting)."""
    kind = verdict.kind
    if kind == VerdictKind.DELETING:
        return (Condition(READY, "False", verdict.event_reason, DELETING_MESSAGE),)
    invalid = (
        Condition(INVALID, "True", verdict.event_reason, verdict.reason)
        if kind == VerdictKind.INVALID
        else Condition(INVALID, "False", "Valid", "the Mapping's spec is valid")
    )
    conflict = (
        Condition(CONFLICT, "True", verdict.event_reason, verdict.reason)
        if kind == VerdictKind.CONFLICT
        else Condition(CONFLICT, "False", "NoConflict", "no older Mapping claims its addresses and ports")
    )
    if kind == VerdictKind.INVALID:
        # Conflicts are only looked for in valid Mappings: say nothing about them.
        conflict = Condition(CONFLICT, "False", "NotChecked", "conflicts are checked once the spec is valid")
    if verdict.ok:
        ready = Condition(READY, "True", RESOLVED, RESOLVED_MESSAGE)
    else:
        ready = Condition(READY, "False", verdict.event_reason, verdict.reason)
    return (ready, invalid, conflict)


def _by_type(conditions: Any) -> dict[str, dict[str, Any]]:
    """Well-formed conditions by type; anything else in the list (or no list) is ignored."""
    return {
        c["type"]: c
        for c in (conditions if isinstance(conditions, list) else ())
        if isinstance(c, dict) and isinstance(c.get("type"), str)
    }


def merge_conditions(
    current: Any, wanted: Iterable[Condition], *, now: str, generation: int | None
) -> list[dict[str, Any]]:
    """metav1.Condition list: wanted ones replace theirs, keeping lastTransitionTime if unchanged."""
    by_type = _by_type(current)
    for c in wanted:
        old = by_type.get(c.type) or {}
        unchanged = (old.get("status"), old.get("reason")) == (c.status, c.reason) and old.get("lastTransitionTime")
        entry: dict[str, Any] = {
            "type": c.type,
            "status": c.status,
            "reason": c.reason,
            "message": clip(c.message),
            "lastTransitionTime": old["lastTransitionTime"] if unchanged else now,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[c.type] = entry
    # A fixed order: lists are compared whole, and every appliance must produce the same one.
    rank = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return [by_type[t] for t in sorted(by_type, key=lambda t: (rank.get(t, len(rank)), t))]


def holders(status: Any) -> dict[str, dict[str, Any]]:
    """Appliances whose entry says their kernel serves the Mapping."""
    appliances = status.get("appliances") if isinstance(status, dict) else None
    if not isinstance(appliances, dict):
        return {}
    return {name: entry for name, entry in appliances.items() if isinstance(entry, dict)}


def foreign_addresses(status: Any) -> set[str]:
    """`configuredAddresses` keys no appliance entry lists: SmartNat's, from a side-by-side cut-over.

    SmartNat records only these keys and, when a Mapping is deleted, removes the finalizer once
    none is left; its own keys are the nodes it still has to clean up. smartnatd waits for them
    as for an appliance entry (up to SNCTRLR_MAX_FINALIZE_WAIT_MINUTES).
    """
    addresses = status.get("configuredAddresses") if isinstance(status, dict) else None
    if not isinstance(addresses, dict):
        return set()
    claimed = set().union(*(entry_addresses(e) for e in holders(status).values()))
    return {a for a in addresses if isinstance(a, str)} - claimed


def entry_addresses(entry: Any) -> set[str]:
    """The addresses in an entry's `configured` endpoints ("192.0.2.10:80/tcp")."""
    configured = entry.get("configured") if isinstance(entry, dict) else None
    if not isinstance(configured, list):
        return set()
    return {e.rpartition(":")[0] for e in configured if isinstance(e, str) and ":" in e}


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns `old` into `new` (`new` holds no nulls)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            if isinstance(old[key], dict) and isinstance(value, dict):
                patch[key] = merge_diff(old[key], value)
            else:
                patch[key] = copy.deepcopy(value)
    return patch


def _release(new: Status, instances: Iterable[str]) -> None:
    """Drop the entries of `instances` and their addresses no remaining entry claims."""
    appliances = new.get("appliances")
    if not isinstance(appliances, dict):
        return
    dropped: set[str] = set()
    for name in instances:
        if name in appliances:
            dropped |= entry_addresses(appliances.pop(name))
    claimed = set().union(*(entry_addresses(e) for e in appliances.values())) if appliances else set()
    addresses = new.get("configuredAddresses")
    if isinstance(addresses, dict):
        for address in dropped - claimed:
            addresses.pop(address, None)


def _keys_came_or_went(old: Status, patch: Status) -> bool:
    """The patch adds or drops a configuredAddresses key (new pod IPs under a key it keeps are
    this appliance's own business: a rolling update would otherwise meet 409s)."""
    keys = patch.get("configuredAddresses")
    if keys is None:
        return False
    if not isinstance(keys, dict):
        return True
    before = old.get("configuredAddresses")
    before = before if isinstance(before, dict) else {}
    return any(value is None or key not in before for key, value in keys.items())


def compute(
    *, verdict: Verdict, current: Any, instance: str, now: str, generation: int | None
) -> StatusChange:
    """The patch and Events that make `current` (the raw .status) show `verdict` on `instance`.

    Total over any JSON `current`: a malformed part (conditions not a list, an entry not an
    object, a type that is not a string) counts as absent and is overwritten.

    `generation` is the object's metadata.generation, or None where the CRD has no status
    subresource (every status write then bumps the generation, so it cannot be observed).
    """
    old: Status = current if isinstance(current, dict) else {}
    new: Status = copy.deepcopy(old)
    kind = verdict.kind
    events: list[Event] = []

    if kind != VerdictKind.DELETING:
        wanted = cluster_conditions(verdict)
        new["invalid"] = clip(verdict.reason) if kind in (VerdictKind.INVALID, VerdictKind.CONFLICT) else VALID_NO
        new["serviceVIP"] = str(verdict.service_vip) if verdict.service_vip else ""
        if generation is not None:
            new["observedGeneration"] = generation
        new["conditions"] = merge_conditions(old.get("conditions"), wanted, now=now, generation=generation)
        before = _by_type(old.get("conditions"))
        for c in wanted:
            was = before.get(c.type) or {}
            if (was.get("status"), was.get("reason")) == (c.status, c.reason):
                continue
            if c.type in (INVALID, CONFLICT) and c.status == "True":
                events.append(Event("Warning", c.reason, c.message))
            elif c.type == READY and c.status == "False" and kind == VerdictKind.WAITING:
                events.append(Event("Warning", c.reason, c.message))

    mine_before = holders(old).get(instance)
    if kind == VerdictKind.CONFIGURED:
        configured = [str(e) for e in verdict.served]
        message = clip(verdict.reason)
        unchanged = (
            mine_before is not None
            and mine_before.get("configured") == configured
            and mine_before.get("message") == message
            and mine_before.get("lastSync")
        )
        entry = {
            "configured": configured,
            "message": message,
            "lastSync": mine_before["lastSync"] if unchanged and mine_before else now,
        }
        appliances = new.get("appliances")
        new["appliances"] = {**(appliances if isinstance(appliances, dict) else {}), instance: entry}
        listed = new.get("configuredAddresses")
        addresses = dict(listed) if isinstance(listed, dict) else {}
        pods = [str(ip) for ip in verdict.pod_ips]
        for a in verdict.addresses:
            value = addresses.get(str(a))
            addresses[str(a)] = {**(value if isinstance(value, dict) else {}), "podIPs": pods}
        new["configuredAddresses"] = addresses
        gone = entry_addresses(mine_before) - {str(a) for a in verdict.addresses}
        if gone:
            # Addresses this appliance stopped serving: drop their keys unless another holds them.
            others = {n: e for n, e in holders(new).items() if n != instance}
            claimed = set().union(*(entry_addresses(e) for e in others.values())) if others else set()
            for address in gone - claimed:
                addresses.pop(address, None)
        if mine_before is None or mine_before.get("configured") != configured:
            events.append(Event("Normal", "Configured", f"appliance {instance} serves {', '.join(configured)}"))
    elif mine_before is not None:
        _release(new, [instance])
        if kind == VerdictKind.NOT_LOCAL:
            events.append(Event("Warning", verdict.event_reason, f"appliance {instance} stopped serving the Mapping: {verdict.reason}"))

    patch = merge_diff(old, new)
    if not patch:
        return StatusChange(patch=None, shared=False, events=())
    entry_came_or_went = (mine_before is None) != (instance not in holders(new))
    guarded = bool(SHARED_FIELDS & patch.keys()) or entry_came_or_went or _keys_came_or_went(old, patch)
    return StatusChange(patch=patch, shared=guarded, events=tuple(events))


def release(*, current: Any, instances: Iterable[str]) -> Status | None:
    """The patch removing the entries (and unclaimed address keys) of `instances`; None if none."""
    old: Status = current if isinstance(current, dict) else {}
    new = copy.deepcopy(old)
    _release(new, instances)
    return merge_diff(old, new) or None
