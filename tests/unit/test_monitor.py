"""The monitor server (health.py) over real sockets on 127.0.0.1: what a flood of scrapes or of
idle and slow clients can and cannot do to the daemon."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from aiohttp import web

from smartnatd.health import Monitor, build_app
from smartnatd.host import LinkState
from smartnatd.metrics import Metrics
from smartnatd.model import MappingKey
from smartnatd.planner import TARGET_REFUSED, Verdict, VerdictKind
from smartnatd.reconciler import Health, count_verdicts

LOCALHOST = "127.0.0.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BlockingCounters:
    """Stands in for an nft listing: each reading waits until the test releases it, and the
    number of readings under way at once is recorded."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.reads = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, tuple[int, int, str]]:
        with self._lock:
            self.reads += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            self.release.wait(timeout=30)
            return {"192.0.2.1 . tcp . 80": (self.reads, 60 * self.reads, "ns-a/web")}
        finally:
            with self._lock:
                self.running -= 1


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Published:
    """The Health the reconciler publishes; the test replaces it as a pass would."""

    def __init__(self, clock: Clock) -> None:
        self.health = Health(started=clock())

    def __call__(self) -> Health:
        return self.health


def monitor_app(
    *, counters: Callable[[], dict[str, tuple[int, int, str]]] | None, clock: Clock, health: Published | None = None
) -> web.Application:
    health = health or Published(clock)
    return build_app(
        health=health,
        metrics=Metrics(health=health, counters=counters, clock=clock),
        max_pass_age=60,
        max_loop_stall=30,
        clock=clock,
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[int]]]:
    """Starts the monitor app as the daemon does, on 127.0.0.1 and a free port."""
    monitors: list[Monitor] = []

    async def start(app: web.Application, **limits: float) -> int:
        monitor = await Monitor.start(app, host=LOCALHOST, port=0, **limits)  # type: ignore[arg-type]
        monitors.append(monitor)
        return monitor.port

    yield start  # type: ignore[misc]
    for monitor in monitors:
        await monitor.close()


async def test_concurrent_scrapes_share_one_nft_reading_and_leave_the_default_executor_free(serve) -> None:
    counters, clock = BlockingCounters(), Clock()
    port = await serve(monitor_app(counters=counters, clock=clock))
    loop = asyncio.get_running_loop()
    scrapes = [asyncio.ensure_future(get(port, "/metrics")) for _ in range(40)]
    try:
        await loop.run_in_executor(None, counters.started.wait, 10)
        # What Dataplane.apply does for the nft transaction, while the reading is stuck: before,
        # 40 scrapes held every thread of this pool and the transaction queued behind them.
        async with asyncio.timeout(5):
            await asyncio.gather(*(loop.run_in_executor(None, lambda: None) for _ in range(50)))
    finally:
        counters.release.set()
        responses = await asyncio.gather(*scrapes)
    assert all(status == 200 for status, _ in responses)
    assert all(b'smartnat_mapping_packets_total{endpoint="192.0.2.1:80/tcp",mapping="ns-a/web"} 1.0' in body
               for _, body in responses)
    assert counters.reads == 1 and counters.most_at_once == 1


async def test_counters_are_read_again_after_a_second_and_the_state_at_every_scrape(serve) -> None:
    counters, clock = BlockingCounters(), Clock()
    counters.release.set()
    published = Published(clock)
    port = await serve(monitor_app(counters=counters, clock=clock, health=published))
    for endpoints in (1, 2, 3):
        published.health = Health(started=clock.now, endpoints=endpoints)  # a pass published
        status, body = await get(port, "/metrics")
        assert status == 200 and f"smartnat_endpoints {endpoints}.0".encode() in body
        assert b'mapping="ns-a/web"} 1.0' in body
    assert counters.reads == 1
    clock.now += 1.0
    _, body = await get(port, "/metrics")
    assert counters.reads == 2 and b'mapping="ns-a/web"} 2.0' in body


async def test_a_scrape_that_hangs_up_does_not_cancel_the_reading_others_wait_for(serve) -> None:
    counters, clock = BlockingCounters(), Clock()
    port = await serve(monitor_app(counters=counters, clock=clock))
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.get_running_loop().run_in_executor(None, counters.started.wait, 10)
    waiting = asyncio.ensure_future(get(port, "/metrics"))
    writer.close()  # the first client gives up while its reading runs
    await writer.wait_closed()
    counters.release.set()
    status, body = await waiting
    assert status == 200 and b"ns-a/web" in body and counters.reads == 1


async def test_healthcheck_answers_with_the_healthz_status_and_sentence_without_the_state(serve) -> None:
    """SmartNat's path keeps /healthz's status code; its body is the sentence after "ok: ",
    "starting: ", "degraded: " or "unhealthy: ", without a newline."""
    clock = Clock()
    published = Published(clock)
    port = await serve(monitor_app(counters=None, clock=clock, health=published))
    served = "3 endpoints served; 2 Configured"
    ready = Health(started=clock.now, ready=True, last_success_monotonic=clock.now,
                   verdicts={"Configured": 2}, endpoints=3)
    cases = [
        (Health(started=clock.now), 200, "starting", "waiting for the first pass"),
        (ready, 200, "ok", f"ready; {served}"),
        (replace(ready, consecutive_failures=2, last_error="nft rejected it"), 200, "degraded",
         f"last 2 passes failed: nft rejected it; the kernel keeps the last applied state ({served})"),
        (replace(ready, loop_heartbeat=clock.now - 31), 503, "unhealthy", "reconcile loop stalled for 31s"),
    ]
    for health, status, state, sentence in cases:
        published.health = health
        assert await get(port, "/healthz") == (status, f"{state}: {sentence}\n".encode())
        assert await get(port, "/healthcheck") == (status, sentence.encode())


async def test_connections_beyond_the_limit_are_refused_until_one_closes(serve, caplog) -> None:
    port = await serve(monitor_app(counters=None, clock=Clock()), max_connections=4)
    idle = [await asyncio.open_connection(LOCALHOST, port) for _ in range(4)]
    try:
        status, body = await get(port, "/healthz")
        assert (status, body) == (503, b"too many connections\n")
        assert "monitor connections at the limit, refusing more limit=4" in caplog.text
        _, writer = idle.pop()
        writer.close()
        await writer.wait_closed()
        status, body = await _get_when_accepted(port, "/healthz")
        assert status == 200 and body.startswith(b"starting:")
    finally:
        for _, writer in idle:
            writer.close()


async def _get_when_accepted(port: int, path: str) -> tuple[int, bytes]:
    """The server drops a closed connection from its count once its handler has ended."""
    async with asyncio.timeout(5):
        while (answer := await get(port, path))[0] != 200:
            await asyncio.sleep(0.01)
    return answer


async def test_silent_and_slow_clients_are_closed_after_the_idle_timeout(serve) -> None:
    port = await serve(monitor_app(counters=None, clock=Clock()), idle_timeout=0.3)
    silent_reader, silent = await asyncio.open_connection(LOCALHOST, port)
    slow_reader, slow = await asyncio.open_connection(LOCALHOST, port)
    slow.write(b"GET /healthz HTTP/1.1\r\nX-a: ")

    async def drip() -> None:  # one byte at a time, never finishing the header
        while not slow_reader.at_eof():
            slow.write(b"a")
            await asyncio.sleep(0.05)

    dripping = asyncio.ensure_future(drip())
    try:
        async with asyncio.timeout(5):
            assert await silent_reader.read() == b""
            assert await slow_reader.read() == b""
    finally:
        dripping.cancel()
        silent.close()
        slow.close()
    # A client that does send its request is answered as before.
    status, _ = await get(port, "/readyz")
    assert status == 503  # not ready yet: no pass in this test


async def test_a_malformed_request_is_answered_400_and_logged_at_debug_only(serve, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    port = await serve(monitor_app(counters=None, clock=Clock()))
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")
    answer = await reader.read(200)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400"
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records and all(r.levelno == logging.DEBUG for r in records)
    assert any("Error handling request" in r.getMessage() and r.exc_info for r in records)


def _verdict(name: str, kind: VerdictKind, event_reason: str) -> Verdict:
    return Verdict(key=MappingKey("demo", name), kind=kind, reason="why", event_reason=event_reason)


def _samples(body: bytes, metric: str) -> list[str]:
    return [line for line in body.decode().splitlines() if line.startswith(metric + "{")]


async def test_mapping_problems_are_counted_by_event_reason_including_a_refused_not_local_one(serve) -> None:
    clock = Clock()
    published = Published(clock)
    port = await serve(monitor_app(counters=None, clock=clock, health=published))
    verdicts = [
        _verdict("ok", VerdictKind.CONFIGURED, "Configured"),
        _verdict("elsewhere", VerdictKind.NOT_LOCAL, "AddressNotOnHost"),  # not a problem
        _verdict("own-address", VerdictKind.NOT_LOCAL, TARGET_REFUSED),  # a problem, though NotLocal
        _verdict("refused", VerdictKind.WAITING, TARGET_REFUSED),
        _verdict("no-svc-1", VerdictKind.WAITING, "ServiceNotFound"),
        _verdict("no-svc-2", VerdictKind.WAITING, "ServiceNotFound"),
        _verdict("bad", VerdictKind.INVALID, "InvalidMapping"),
        _verdict("late", VerdictKind.CONFLICT, "EndpointConflict"),
        _verdict("going", VerdictKind.DELETING, "Deleting"),  # not a problem
    ]
    kinds, problems = count_verdicts(verdicts)
    published.health = Health(started=clock.now, ready=True, verdicts=kinds, problems=problems)
    _, body = await get(port, "/metrics")
    assert _samples(body, "smartnat_mapping_problems") == [
        'smartnat_mapping_problems{reason="EndpointConflict"} 1.0',
        'smartnat_mapping_problems{reason="InvalidMapping"} 1.0',
        'smartnat_mapping_problems{reason="ServiceNotFound"} 2.0',
        'smartnat_mapping_problems{reason="TargetRefused"} 2.0',
    ]
    assert 'smartnat_mappings{verdict="NotLocal"} 2.0' in _samples(body, "smartnat_mappings")

    # The next pass: the problems solved but one. A reason back to zero loses its series.
    kinds, problems = count_verdicts([verdicts[0], verdicts[2]])
    published.health = Health(started=clock.now, ready=True, verdicts=kinds, problems=problems)
    _, body = await get(port, "/metrics")
    assert _samples(body, "smartnat_mapping_problems") == ['smartnat_mapping_problems{reason="TargetRefused"} 1.0']


async def test_external_interfaces_are_up_held_or_down_and_a_gone_one_has_no_series(serve) -> None:
    clock = Clock()
    published = Published(clock)
    links: list[tuple[LinkState, ...]] = [()]
    app = build_app(
        health=published,
        metrics=Metrics(health=published, counters=None, links=lambda: links[0], clock=clock),
        max_pass_age=60, max_loop_stall=30, clock=clock,
    )
    port = await serve(app)
    cases = [
        ((), [], []),  # before the first discovery
        (
            (LinkState("ext1", up=True, held=False), LinkState("ext2", up=True, held=True),
             LinkState("ext3", up=False, held=False)),
            ['{interface="ext1"} 1.0', '{interface="ext2"} 1.0', '{interface="ext3"} 0.0'],
            ['{interface="ext1"} 0.0', '{interface="ext2"} 1.0', '{interface="ext3"} 0.0'],
        ),
        ((LinkState("ext1", up=True, held=False),), ['{interface="ext1"} 1.0'], ['{interface="ext1"} 0.0']),
    ]
    for state, up, held in cases:
        links[0] = state
        _, body = await get(port, "/metrics")
        assert _samples(body, "smartnat_external_interface_up") == ["smartnat_external_interface_up" + s for s in up]
        assert _samples(body, "smartnat_external_interface_held") == [
            "smartnat_external_interface_held" + s for s in held
        ]
