"""Verdict transitions to the log, once each: what both write-backs (cluster and file source) say.

A problem is logged when it starts, with its Event reason, at warning level, and when it clears
(`problem cleared (…); now …`) at info level, never at every pass. Other changes are logged at
info level, NotLocal ones at debug level only, and at the first publish after a start nothing
but problems: the reconciler's `mappings at start:` line counts the rest, and 10,000 lines
saying "Configured" help nobody. Each caller passes its own logger, so the lines keep the
logger name they have always had (smartnatd.kube.writeback, smartnatd.reconciler).
"""

from __future__ import annotations

import logging

from smartnatd.planner import OK_KINDS, TARGET_REFUSED, Plan, VerdictKind


def log_transitions(plan: Plan, previous: Plan | None, *, log: logging.Logger) -> None:
    before = {v.key: v for v in previous.verdicts} if previous else {}
    for v in plan.verdicts:
        old = before.get(v.key)
        if old is not None and (old.kind, old.reason) == (v.kind, v.reason):
            continue
        if problem(v.kind, v.event_reason):
            log.warning("mapping %s %s: %s", v.key, v.event_reason, v.reason)
        elif old is not None and problem(old.kind, old.event_reason):
            log.info("mapping %s problem cleared (%s); now %s: %s", v.key, old.event_reason, v.kind, v.reason)
        elif v.kind == VerdictKind.NOT_LOCAL:
            log.debug("mapping %s %s: %s", v.key, v.kind, v.reason)
        else:
            log.log(logging.DEBUG if previous is None else logging.INFO, "mapping %s %s: %s", v.key, v.kind, v.reason)
    for key in sorted(set(before) - {v.key for v in plan.verdicts}):
        log.info("mapping %s removed", key)


def problem(kind: VerdictKind, event_reason: str) -> bool:
    """Whether a verdict of this kind and Event reason is a problem: logged at warning level
    here, counted by smartnat_mapping_problems. By kind and reason, not by Verdict, so the
    reconciler can decide it once per distinct pair instead of once per Mapping."""
    # Not ok (Verdict.ok) and not being deleted; and a NotLocal verdict
    # when this box refused the Mapping's targets, not just because its addresses are elsewhere.
    return kind not in _NOT_PROBLEMS or event_reason == TARGET_REFUSED


_NOT_PROBLEMS = OK_KINDS | {VerdictKind.DELETING}
