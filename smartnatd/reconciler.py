"""dirty -> debounce -> snapshot -> plan -> apply, one pass at a time; write-back beside it.

The reconciler is the only caller of plan, apply and write-back. A failed pass keeps the last
good kernel state and status, is retried with capped backoff, and makes the next pass full.

Write-back runs in its own task and always publishes the newest applied plan: the API server
can be slow (the first pass after a start writes thousands of statuses), and the kernel must
not wait for it. Plans applied while a publish is in flight are folded into the next one.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from smartnatd.dataplane import ApplyReport, Dataplane
from smartnatd.errors import DataplaneError
from smartnatd.planner import IncrementalPlanner, Plan, Verdict
from smartnatd.settings import Settings
from smartnatd.store import Store
from smartnatd.transitions import log_transitions, problem

logger = logging.getLogger(__name__)

_KIND_REASON = operator.attrgetter("kind", "event_reason")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
PUBLISH_DRAIN = 5.0  # seconds a stopping daemon gives write-back to publish the last pass


class Writeback(Protocol):
    async def publish(self, plan: Plan, *, previous: Plan | None) -> None:
        """Tell users what the last successful pass did (status, Events, log lines)."""


class Notifier(Protocol):
    def ready(self, status: str) -> None: ...
    def status(self, status: str) -> None: ...
    def watchdog(self) -> None: ...


@dataclass(frozen=True)
class Health:
    """What health, metrics and STATUS= read; replaced as a whole after each pass."""

    started: float  # monotonic
    ready: bool = False
    passes: int = 0
    full_passes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_success_monotonic: float | None = None
    last_success_wall: float | None = None
    last_duration: float = 0.0
    last_error: str = ""
    loop_heartbeat: float = 0.0  # monotonic time the loop last came round
    verdicts: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)  # Event reason -> Mappings with that problem
    endpoints: int = 0
    unsynced: tuple[str, ...] = ()
    waiting_why: str = ""  # what the sources said about the kinds still unsynced, if anything
    planned: int = 0  # Mappings in the plan of the last pass tried, applied or not

    def waiting(self) -> str:
        """What a daemon that has not applied anything yet waits for."""
        if self.consecutive_failures:
            return self.failing()
        if self.unsynced:
            why = f" ({self.waiting_why})" if self.waiting_why else ""
            return "waiting for " + ", ".join(self.unsynced) + why
        return "waiting for the first pass"

    def failing(self) -> str:
        n, err = self.consecutive_failures, self.last_error
        if not self.ready:
            return f"first pass failed ({n}x): {err}; {self.planned} Mappings not applied yet"
        return f"last {n} passes failed: {err}; the kernel keeps the last applied state ({self.served()})"

    def served(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.verdicts.items())) or "no Mappings"
        return f"{self.endpoints} endpoints served; {kinds}"

    def summary(self) -> str:
        """The one line of STATUS=, /healthz and /readyz: ready, degraded, first pass failed, waiting."""
        if not self.ready:
            return self.waiting()
        if self.consecutive_failures:
            return "degraded: " + self.failing()
        return "ready; " + self.served()


class Reconciler:
    def __init__(
        self,
        *,
        store: Store,
        dataplane: Dataplane,
        settings: Settings,
        writeback: Writeback,
        notifier: Notifier,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_pass: Callable[[ApplyReport | None, float, bool], None] | None = None,
        source_problems: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self._store = store
        self._dataplane = dataplane
        self._settings = settings
        self._writeback = writeback
        self._notifier = notifier
        self._clock = clock
        self._wall = wall_clock
        self._on_pass = on_pass
        self._source_problems = source_problems  # source name -> why it has not listed, if known
        self.health = Health(started=clock())
        self.plan: Plan | None = None
        self._planner = IncrementalPlanner(settings)  # re-decides only what the store says changed
        self._last_full = 0.0
        self._backoff = 0.0
        self._resync = asyncio.Event()  # a full pass asked for from outside (SIGHUP)
        self.published: Plan | None = None  # the plan write-back last published
        self._to_publish = asyncio.Event()
        # Every successful pass asks for a publish, even of an unchanged plan: write-back's own
        # retries (a conflict, a Lease to wait for) come back as a pass that changes nothing.
        self._publish_asked = 0
        self._publish_done = 0

    def _publish(self, **changes: object) -> None:
        from dataclasses import replace

        self.health = replace(self.health, loop_heartbeat=self._clock(), **changes)  # type: ignore[arg-type]

    async def run(self, *, stop: asyncio.Event, watchdog_interval: float | None = None) -> None:
        async with asyncio.TaskGroup() as tg:
            publisher = tg.create_task(self.publish_forever(), name="writeback")
            try:
                await self._loop(stop=stop, watchdog_interval=watchdog_interval)
            finally:
                await self._drain(publisher)

    async def _drain(self, publisher: asyncio.Task[None]) -> None:
        """Let write-back publish the last applied plan, for a bounded time, then stop it."""
        try:
            async with asyncio.timeout(PUBLISH_DRAIN):
                while self._publish_done < self._publish_asked and not publisher.done():
                    await asyncio.sleep(0.01)
        except TimeoutError:
            logger.warning("write-back not finished after %.0fs; the next start publishes the rest", PUBLISH_DRAIN)
        publisher.cancel()

    async def publish_forever(self) -> None:
        """Publish the newest applied plan after each successful pass (several fold into one)."""
        while True:
            await self._to_publish.wait()
            self._to_publish.clear()
            asked, plan = self._publish_asked, self.plan
            if plan is None:
                continue
            await self._writeback.publish(plan, previous=self.published)
            self.published, self._publish_done = plan, asked

    def request_full_resync(self) -> None:
        """Run a full pass as soon as the loop can (SIGHUP); one already under way finishes first."""
        self._resync.set()

    def _alive(self) -> None:
        """The loop came round: tell systemd's watchdog and health's stall check."""
        self._notifier.watchdog()
        self._publish()

    def _waiting(self) -> None:
        unsynced = tuple(self._store.unsynced())
        problems = self._source_problems() if self._source_problems else {}
        why = "; ".join(f"{name}: {problem}" for name, problem in sorted(problems.items()) if problem)
        self._publish(unsynced=unsynced, waiting_why=why)
        self._notifier.status(self.health.summary())
        self._notifier.watchdog()

    async def _loop(self, *, stop: asyncio.Event, watchdog_interval: float | None) -> None:
        tick = min(watchdog_interval or 5.0, 5.0)
        while not self._store.is_synced:
            self._waiting()
            # Any store change may shorten the pending list: /readyz and STATUS= follow at once.
            await _wait_any(self._store.synced, self._store.dirty, stop, timeout=tick)
            if stop.is_set():
                return
            self._store.dirty.clear()  # the first pass below runs whatever happened meanwhile
        self._publish(unsynced=(), waiting_why="")
        logger.info("all sources synced; first pass")
        due = True
        while not stop.is_set():
            if self._backoff:
                # Wait out the retry delay exactly as logged, still telling the watchdog we live.
                if await self._pause(stop, self._backoff, tick=tick):
                    return
                due = True
            resync = self._resync.is_set()
            full_due = resync or self._clock() - self._last_full >= self._settings.full_resync_period_sec
            if due or self._store.dirty.is_set() or full_due:
                if self._settings.sync_debounce_ms and not self._backoff:
                    # Coalesce a burst: events arriving now are part of this pass.
                    await asyncio.sleep(self._settings.sync_debounce_ms / 1000)
                    full_due = full_due or self._resync.is_set()  # a SIGHUP during the debounce
                self._resync.clear()
                await self.run_once(full=full_due)
                due = False
            self._alive()
            if not self._backoff:
                await _wait_any(self._store.dirty, self._resync, stop, timeout=tick)

    async def _pause(self, stop: asyncio.Event, delay: float, *, tick: float) -> bool:
        """Sleep `delay` seconds in steps of at most `tick`, pinging between; True if stopped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (left := deadline - loop.time()) > 0.001:  # a millisecond left is done (no spin on float residue)
            if await _wait_any(stop, timeout=min(tick, left)):
                return True
            self._alive()
        return stop.is_set()

    async def run_once(self, *, full: bool = False) -> bool:
        """One pass. Returns True when the kernel now matches the plan."""
        self._store.dirty.clear()
        started = self._clock()
        snapshot, changes = self._store.snapshot_with_changes()
        new_plan = self._planner.plan(snapshot, changes)
        if self.plan is None or new_plan.host_problems != self.plan.host_problems:
            for problem in new_plan.host_problems:
                logger.warning("host problem: %s", problem)
        try:
            report = await self._dataplane.apply(new_plan.desired, full=full)
        except DataplaneError as err:
            self._dataplane.invalidate()
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
            failures = self.health.consecutive_failures + 1
            if failures == 1:
                logger.error("sync failed; keeping the last applied state: %s (retry in %.1fs)", err, self._backoff)
            else:
                logger.debug("sync still failing (%d): %s", failures, err)
            self._publish(
                failures=self.health.failures + 1,
                consecutive_failures=failures,
                last_error=str(err),
                last_duration=self._clock() - started,
                planned=len(new_plan.verdicts),
            )
            self._notifier.status(self.health.summary())
            if self._on_pass:
                self._on_pass(None, self._clock() - started, False)
            return False
        if self.health.consecutive_failures:
            logger.warning("sync recovered after %d failed passes", self.health.consecutive_failures)
        self._backoff = 0.0
        if report.full:
            self._last_full = self._clock()
        self.plan = new_plan
        self._publish_asked += 1
        self._to_publish.set()
        took = self._clock() - started
        counts, problems = count_verdicts(new_plan.verdicts)
        first = not self.health.ready
        self._publish(
            ready=True,
            passes=self.health.passes + 1,
            full_passes=self.health.full_passes + int(report.full),
            consecutive_failures=0,
            last_error="",
            last_success_monotonic=self._clock(),
            last_success_wall=self._wall(),
            last_duration=took,
            verdicts=counts,
            problems=problems,
            endpoints=len(new_plan.desired.dnats),
            planned=len(new_plan.verdicts),
        )
        if report.changed or first:
            logger.info(
                "sync applied mappings=%d endpoints=%d full=%s ops=%d flows_deleted=%d took=%.3fs",
                len(new_plan.verdicts), len(new_plan.desired.dnats), report.full,
                report.nft_operations, report.flows_deleted, took,
            )
        if first:
            # One line for the whole start, not one per Mapping: write-back logs each problem
            # (and each Configured Mapping at debug level).
            logger.info("mappings at start: %s", self.health.served())
            self._notifier.ready(self.health.summary())
        else:
            self._notifier.status(self.health.summary())
        if self._on_pass:
            self._on_pass(report, took, True)
        return True


def count_verdicts(verdicts: Iterable[Verdict]) -> tuple[dict[str, int], dict[str, int]]:
    """Mappings by verdict kind (smartnat_mappings), and those whose verdict is a problem by
    Event reason (smartnat_mapping_problems): one count at C speed of the (kind, reason) pairs,
    then a loop over the few distinct pairs. str() of 10k enum members alone took ~5 ms a
    pass: count the members, name the few kinds."""
    kinds: dict[str, int] = {}
    problems: dict[str, int] = {}
    for (kind, reason), n in Counter(map(_KIND_REASON, verdicts)).items():
        kinds[str(kind)] = kinds.get(str(kind), 0) + n
        if problem(kind, reason):
            problems[reason] = problems.get(reason, 0) + n
    return kinds, problems


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait until one of `events` is set or the timeout passes; True if one was set."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class LogWriteback:
    """Write-back for the file source: verdict transitions go to the log, once each."""

    async def publish(self, plan: Plan, *, previous: Plan | None) -> None:
        log_transitions(plan, previous, log=logger)
