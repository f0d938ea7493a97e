"""apply(desired): nftables, then policy routing, then conntrack cleanup; one pass at a time.

The first pass after start, and the first after any failure, replaces the whole table in one
transaction; every other pass applies only the difference from the last applied ruleset, so its
cost follows the size of the change, not the number of Mappings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from smartnatd.conntrack import ConntrackEdge, EgressFlowFilter, FlowFilter, stale_egress_filters, stale_flow_filters
from smartnatd.desired import HAIRPIN_MARK, MARK_MASK, DesiredState, EgressSnat, ExternalEndpoint
from smartnatd.errors import DataplaneError
from smartnatd.nft import names
from smartnatd.nft.render import Renderer, Ruleset, cleanup_text
from smartnatd.nft.runner import NftRunner, make_runner
from smartnatd.routing import RoutingEdge, RoutingReport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyReport:
    full: bool
    nft_operations: int  # incremental: elements and chains touched; full: sets and maps rewritten (>= 1); 0: no change
    routing: RoutingReport
    flows_deleted: int
    took: float

    @property
    def changed(self) -> bool:
        return self.nft_operations > 0 or self.flows_deleted > 0 or self.routing.changes > 0


@dataclass(frozen=True)
class _FlowCleanup:
    """The conntrack work of one pass, worked out while nft runs."""

    filters: tuple[FlowFilter, ...]
    egress_filters: tuple[EgressFlowFilter, ...]
    known: set[ExternalEndpoint] | None  # until the first sweep: every endpoint served
    egress: tuple[EgressSnat, ...]  # the plan's egress entries, for that sweep
    marks: frozenset[int]  # the plan's interface marks, for that sweep


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else f"{text[:limit]}\n... ({len(text) - limit} more characters)"


class Dataplane:
    def __init__(
        self,
        *,
        netns: str | None,
        table_base: int,
        rule_priority: int,
        nft_backend: str = "auto",
        state_dir: Path | None = None,
    ) -> None:
        self._netns = netns
        self._runner: NftRunner = make_runner(netns=netns, backend=nft_backend, state_dir=state_dir)
        self._routing = RoutingEdge(netns=netns, table_base=table_base, rule_priority=rule_priority)
        self._conntrack = ConntrackEdge(netns=netns)
        self._renderer = Renderer()  # re-renders only changed entries; diffs from what it moved
        self._applied: Ruleset | None = None  # what the kernel holds, as far as we know
        self._desired: DesiredState | None = None
        self._swept = False

    @property
    def runner(self) -> NftRunner:
        return self._runner

    async def open(self) -> None:
        await self._routing.open()
        await self._conntrack.open()

    async def close(self) -> None:
        await self._routing.close()
        await self._conntrack.close()
        self._runner.close()

    async def __aenter__(self) -> Dataplane:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def invalidate(self) -> None:
        """Forget what was applied: the next pass is full (after a failure, or to repair drift)."""
        self._applied = None

    async def apply(self, desired: DesiredState, *, full: bool = False) -> ApplyReport:
        started = time.monotonic()
        ruleset = self._renderer.render(desired)
        loop = asyncio.get_running_loop()
        step = None if full or self._applied is None else self._renderer.diff(self._applied, ruleset)
        if step is None:
            text, after, ops, is_full = ruleset.text(), ruleset, max(1, len(ruleset.sets)), True
            if self._applied is not None and ruleset == self._applied:
                # A periodic resync of an unchanged plan: the transaction still runs (it repairs
                # drift nobody told us about) but it is not a change worth reporting.
                ops = 0
        else:
            text, after, ops, is_full = step.text, step.after, step.operations, False
            if text and logger.isEnabledFor(logging.DEBUG):
                logger.debug("nft transaction:\n%s", _clip(text))
        committed = False  # the nft transaction is in: a later failure leaves a partial pass
        try:
            if text:
                running = loop.run_in_executor(None, self._runner.run, text)
                try:
                    # Worked out while nft runs: its library call releases the GIL, and at
                    # start-up this is ~50 ms of Python at 10k Mappings.
                    cleanup = self._flow_cleanup(desired)
                finally:
                    await running
                    committed = True
            else:
                cleanup = self._flow_cleanup(desired)
            self._applied = after
            if (
                is_full
                or self._desired is None
                or desired.return_paths != self._desired.return_paths
                or bool(desired.egress) != bool(self._desired.egress)
            ):
                # While pod egress is marked, marked packets take the main table's specific
                # routes first: the egress mark only overrides the main default route.
                routing = await self._routing.apply(desired.return_paths, specific_routes_first=bool(desired.egress))
            else:
                # Unchanged paths: reading every owned rule and route back costs more than the
                # whole nft step of a small change. Drift (a route the kernel dropped with a
                # flapping link) is repaired by the next full pass.
                routing = RoutingReport()
        except DataplaneError as err:
            self._applied = None
            err.nft_committed = committed
            raise
        except Exception as err:  # an unexpected netlink or runner failure: next pass is full
            self._applied = None
            failure = DataplaneError(f"apply failed: {err}")
            failure.nft_committed = committed
            raise failure from err
        flows = await self._cleanup_flows(cleanup)
        self._desired = desired
        took = time.monotonic() - started
        logger.debug(
            "dataplane applied full=%s ops=%d routes=%s flows_deleted=%d took=%.3fs",
            is_full, ops, routing, flows, took,
        )
        return ApplyReport(full=is_full, nft_operations=ops, routing=routing, flows_deleted=flows, took=took)

    def _flow_cleanup(self, desired: DesiredState) -> _FlowCleanup:
        """What the move from the last applied state to `desired` must stop: filters per
        endpoint and per pod egress entry and, until the first sweep, every endpoint served
        (the sweep keeps those)."""
        known = None if self._swept else {d.external for d in desired.dnats}
        return _FlowCleanup(
            self._dnat_filters(desired), self._egress_filters(desired), known, desired.egress,
            frozenset(p.mark for p in desired.return_paths),
        )

    def _egress_filters(self, desired: DesiredState) -> tuple[EgressFlowFilter, ...]:
        """The pods' egress flows the move to `desired` re-routes: those of the entries it
        removed or changed. Unknown before the first pass; the sweep judges them then."""
        old = self._desired
        if old is None or old.egress is desired.egress:
            return ()
        changed = self._renderer.egress_changes(since=old)
        gone, came = (old.egress, desired.egress) if changed is None else changed
        return stale_egress_filters(old=gone, new=came, marks={p.mark for p in desired.return_paths})

    def _dnat_filters(self, desired: DesiredState) -> tuple[FlowFilter, ...]:
        changed = self._renderer.dnat_changes(since=self._desired)
        old = self._desired
        if changed is None or old is None or old.return_paths != desired.return_paths:
            # A return path's mark changing touches every endpoint on its interface, changed or not.
            return stale_flow_filters(old=old, new=desired)
        # Only Dnats that changed can need a filter: comparing these gives the same filters as
        # comparing every Dnat, without a pass over all of them.
        gone, came = changed
        return stale_flow_filters(
            old=DesiredState(dnats=gone, return_paths=old.return_paths),
            new=DesiredState(dnats=came, return_paths=desired.return_paths, drop_unmapped=desired.drop_unmapped),
        )

    async def _cleanup_flows(self, cleanup: _FlowCleanup) -> int:
        # Only after the new rules are in: a flow deleted earlier could be re-created by the old ones.
        try:
            deleted = await self._conntrack.delete(cleanup.filters) if cleanup.filters else 0
            deleted += await self._conntrack.delete_egress(cleanup.egress_filters) if cleanup.egress_filters else 0
            if cleanup.known is not None:
                # Clients' flows carry their interface's mark, pods' hairpin flows HAIRPIN_MARK.
                deleted += await self._conntrack.sweep(
                    mark_mask=MARK_MASK | HAIRPIN_MARK, known=cleanup.known, egress=cleanup.egress,
                    marks=cleanup.marks,
                )
                self._swept = True
        except Exception as err:  # stale flows expire by themselves; never fail a pass for them
            logger.warning("conntrack cleanup failed; stale flows will expire on their own: %s", err, exc_info=logger.isEnabledFor(logging.DEBUG))
            return 0
        return deleted

    async def cleanup(self) -> None:
        """Remove everything smartnatd owns in the kernel and nothing else."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._runner.run, cleanup_text())
        await self._routing.cleanup()
        self._applied = None
        self._desired = None
        logger.info("removed table %s %s and owned routes and rules", names.FAMILY, names.TABLE)
