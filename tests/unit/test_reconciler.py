"""The reconciler's loop: passes do not wait for write-back, which publishes the newest plan.

The dataplane here is a recording stand-in (the kernel side has its own tests); the store,
planner and reconciler are the real ones.
"""

from __future__ import annotations

import asyncio

import pytest

from smartnatd.dataplane import ApplyReport
from smartnatd.errors import NftError
from smartnatd.desired import DesiredState
from smartnatd.planner import Plan
from smartnatd.reconciler import Reconciler
from smartnatd.routing import RoutingReport
from smartnatd.store import Kind, Store
from tests.builders import HOST, SETTINGS, endpoint_slice, mapping, service


class RecordingDataplane:
    def __init__(self) -> None:
        self.applied: list[DesiredState] = []

    def invalidate(self) -> None:
        pass

    async def apply(self, desired: DesiredState, *, full: bool = False) -> ApplyReport:
        self.applied.append(desired)
        return ApplyReport(full=full, nft_operations=1, routing=RoutingReport(), flows_deleted=0, took=0.0)


class GatedWriteback:
    """Publishes only when the test opens the gate, and records what it was given."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[tuple[Plan, Plan | None]] = []
        self.started = asyncio.Event()

    async def publish(self, plan: Plan, *, previous: Plan | None) -> None:
        self.started.set()
        await self.gate.wait()
        self.calls.append((plan, previous))


class Notifier:
    def __init__(self) -> None:
        self.ready_calls: list[str] = []

    def ready(self, status: str) -> None:
        self.ready_calls.append(status)

    def status(self, status: str) -> None:
        pass

    def watchdog(self) -> None:
        pass


def ports(plan: Plan) -> list[int]:
    return [d.external.port for d in plan.desired.dnats]


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture
def store() -> Store:
    s = Store()
    s.replace(Kind.MAPPINGS, [mapping("a", ports=((80, "tcp", 80),))])
    s.replace(Kind.SERVICES, [service()])
    s.replace(Kind.ENDPOINT_SLICES, [endpoint_slice()])
    s.set_host(HOST)
    return s


async def test_passes_go_on_while_write_back_hangs_and_it_then_publishes_the_newest_plan(store: Store) -> None:
    dataplane, writeback, notifier = RecordingDataplane(), GatedWriteback(), Notifier()
    reconciler = Reconciler(store=store, dataplane=dataplane, settings=SETTINGS,  # type: ignore[arg-type]
                            writeback=writeback, notifier=notifier)
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop=stop))
    try:
        await until(lambda: writeback.started.is_set())  # first publish in flight, blocked
        assert notifier.ready_calls, "ready is told after the first apply, not after write-back"
        first = reconciler.plan
        assert first is not None and ports(first) == [80]

        # Two more changes are applied to the kernel while write-back still hangs.
        store.upsert(Kind.MAPPINGS, mapping("a", ports=((81, "tcp", 80),)))
        await until(lambda: len(dataplane.applied) >= 2)
        store.upsert(Kind.MAPPINGS, mapping("a", ports=((82, "tcp", 80),)))
        await until(lambda: len(dataplane.applied) >= 3)
        assert [d.external.port for d in dataplane.applied[-1].dnats] == [82]
        assert writeback.calls == []

        writeback.gate.set()
        await until(lambda: reconciler.published is reconciler.plan)
        # The pass for port 81 was never published on its own: folded into the newest one.
        assert [(ports(p), prev and ports(prev)) for p, prev in writeback.calls] == [([80], None), ([82], [80])]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_stopping_publishes_the_last_applied_plan(store: Store) -> None:
    dataplane, writeback, notifier = RecordingDataplane(), GatedWriteback(), Notifier()
    writeback.gate.set()
    reconciler = Reconciler(store=store, dataplane=dataplane, settings=SETTINGS,  # type: ignore[arg-type]
                            writeback=writeback, notifier=notifier)
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop=stop))
    await until(lambda: reconciler.published is not None)
    store.upsert(Kind.MAPPINGS, mapping("a", ports=((90, "tcp", 80),)))
    await until(lambda: len(dataplane.applied) >= 2)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert reconciler.published is reconciler.plan
    assert ports(writeback.calls[-1][0]) == [90]


async def test_a_pass_that_changes_nothing_still_publishes_so_write_back_can_retry(store: Store) -> None:
    # KubeWriteback asks for a retry (a 409, a Lease to wait for) by marking the store dirty;
    # the pass that follows has the very same plan, and write-back must still get it.
    dataplane, notifier = RecordingDataplane(), Notifier()

    class RetryingWriteback:
        def __init__(self) -> None:
            self.calls: list[tuple[Plan, Plan | None]] = []

        async def publish(self, plan: Plan, *, previous: Plan | None) -> None:
            self.calls.append((plan, previous))
            if len(self.calls) == 1:
                store.dirty.set()  # what writeback.Timer does when a retry is due

    writeback = RetryingWriteback()
    reconciler = Reconciler(store=store, dataplane=dataplane, settings=SETTINGS,  # type: ignore[arg-type]
                            writeback=writeback, notifier=notifier)
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop=stop))
    try:
        await until(lambda: len(writeback.calls) >= 2)
        (first, none), (again, previous) = writeback.calls[:2]
        assert none is None and again is first and previous is first
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


class FailingDataplane:
    """Rejects every pass, as a kernel refusing the transaction would; records when it was asked."""

    def __init__(self) -> None:
        self.attempts: list[tuple[float, bool]] = []

    def invalidate(self) -> None:
        pass

    async def apply(self, desired: DesiredState, *, full: bool = False) -> ApplyReport:
        self.attempts.append((asyncio.get_running_loop().time(), full))
        raise NftError("nft rejected the transaction at line 25: Could not process rule", errno_name="ENOENT")


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.watchdogs: list[float] = []
        self.statuses: list[str] = []

    def status(self, status: str) -> None:
        self.statuses.append(status)

    def watchdog(self) -> None:
        self.watchdogs.append(asyncio.get_running_loop().time())


@pytest.mark.looptime
async def test_failing_passes_retry_on_the_logged_backoff_while_the_watchdog_keeps_being_fed(
    store: Store, event_loop_policy: object  # looptime finds the loop to fast-forward through it
) -> None:
    loop = asyncio.get_running_loop()
    dataplane, notifier = FailingDataplane(), RecordingNotifier()
    reconciler = Reconciler(store=store, dataplane=dataplane, settings=SETTINGS,  # type: ignore[arg-type]
                            writeback=GatedWriteback(), notifier=notifier, clock=loop.time)
    stop = asyncio.Event()
    # WatchdogSec=30s: systemd's WATCHDOG_USEC gives a ping interval of 10 s, the loop ticks at 5 s.
    task = asyncio.create_task(reconciler.run(stop=stop, watchdog_interval=10.0))
    try:
        await asyncio.sleep(120)
        times = [t for t, _ in dataplane.attempts]
        delays = [round(b - a, 2) for a, b in zip(times, times[1:])]
        # What the log says ("retry in 0.5s") and the operator guide documents, nothing added.
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        gaps = [b - a for a, b in zip(notifier.watchdogs, notifier.watchdogs[1:])]
        assert max(gaps) <= 5.0 + 1e-6, f"watchdog gaps {gaps}"
        assert loop.time() - reconciler.health.loop_heartbeat <= 5.0 + 1e-6, "health would call the loop stalled"
        assert reconciler.health.consecutive_failures == 9
        assert not reconciler.health.ready
        assert notifier.statuses[-1].startswith("first pass failed (9x): nft rejected the transaction at line 25")
        assert "1 Mappings not applied yet" in notifier.statuses[-1]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
