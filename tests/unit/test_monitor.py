"""The monitor server (health.py) over real sockets on 127.0.0.1: what a flood of scrapes or of
idle and slow clients can and cannot do to the daemon."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from smartnatd.health import build_app
from smartnatd.metrics import Metrics
from smartnatd.reconciler import Health

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


async def wait_until(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


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
async def serve() -> AsyncIterator[Callable[[web.Application], asyncio.Future[int]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, LOCALHOST, 0)
        await site.start()
        return runner.addresses[0][1]

    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


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
