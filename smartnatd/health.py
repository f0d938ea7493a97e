"""HTTP on SNCTRLR_MONITOR_IP:PORT: /healthz, /readyz, /metrics and SmartNat's /healthcheck."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from smartnatd.metrics import CONTENT_TYPE, Metrics
from smartnatd.reconciler import Health

logger = logging.getLogger(__name__)

# Connections beyond this are answered 503 and closed at once: idle or slow clients cannot
# take the file descriptors the daemon needs for netlink, nft and the API server.
MAX_CONNECTIONS = 64
# A connection must send a complete request head within this many seconds of opening, or of
# its previous answer (aiohttp's keep-alive timer covers both); then it is closed. A scraper
# that keeps connections between scrapes just opens a new one.
IDLE_TIMEOUT = 10.0
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n"
    b"Connection: close\r\n\r\ntoo many connections\n"
)


class SharedReading:
    """The /metrics exposition, made in a thread of its own, one at a time: scrapes that arrive
    while one is being made get that one.

    Not in the default executor: an exposition may list the nft counters (~0.2 s at 10k
    Mappings, up to metrics.COUNTER_TIMEOUT), and a flood of scrapes there held up the nft
    transaction of a pass (Dataplane.apply runs it in that pool). The counters themselves are
    read at most once per metrics.COUNTERS_MAX_AGE (Metrics does that).
    """

    def __init__(self, *, read: Callable[[], bytes], executor: concurrent.futures.Executor) -> None:
        self._read = read
        self._executor = executor
        self._pending: asyncio.Future[bytes] | None = None

    async def get(self) -> bytes:
        if self._pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self._executor, self._read)
            pending.add_done_callback(self._finished)
            self._pending = pending
        # A client hanging up cancels its own wait, not the reading the others wait for.
        return await asyncio.shield(self._pending)

    def _finished(self, future: asyncio.Future[bytes]) -> None:
        self._pending = None
        if not future.cancelled():
            future.exception()  # retrieved: it reaches the waiters, if any are left


@dataclass(frozen=True)
class Liveness:
    """What /healthz and /healthcheck answer, decided once for both."""

    healthy: bool
    state: str  # ok, starting, degraded or unhealthy
    sentence: str  # why, e.g. "ready; 3 endpoints served; 2 Configured"

    @property
    def status(self) -> int:
        return 200 if self.healthy else 503


def liveness(h: Health, *, now: float, max_pass_age: float, max_loop_stall: float) -> Liveness:
    if h.loop_heartbeat and now - h.loop_heartbeat > max_loop_stall:
        return Liveness(False, "unhealthy", f"reconcile loop stalled for {now - h.loop_heartbeat:.0f}s")
    if not h.ready:
        # Starting up, even with failing passes, is healthy for max_pass_age; /readyz says
        # whether it is serving yet.
        age = now - h.started
        if age > max_pass_age:
            return Liveness(False, "unhealthy", f"no successful pass in {age:.0f}s: {h.waiting()}")
        return Liveness(True, "degraded" if h.consecutive_failures else "starting", h.waiting())
    age = now - (h.last_success_monotonic or h.started)
    if age > max_pass_age:
        return Liveness(False, "unhealthy", f"last successful pass {age:.0f}s ago: {h.last_error or 'no pass since'}")
    if h.consecutive_failures:
        return Liveness(True, "degraded", h.failing())  # what Health.summary() says after "degraded: "
    return Liveness(True, "ok", h.summary())


def build_app(
    *,
    health: Callable[[], Health],
    metrics: Metrics,
    max_pass_age: float,
    max_loop_stall: float,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    def check() -> Liveness:
        return liveness(health(), now=clock(), max_pass_age=max_pass_age, max_loop_stall=max_loop_stall)

    async def healthz(_: web.Request) -> web.Response:
        state = check()
        return web.Response(status=state.status, text=f"{state.state}: {state.sentence}\n")

    async def readyz(_: web.Request) -> web.Response:
        h = health()
        if h.ready:
            return web.Response(text="ready: " + h.summary() + "\n")
        return web.Response(status=503, text=f"not ready: {h.waiting()}\n")

    async def healthcheck(_: web.Request) -> web.Response:
        # SmartNat answered its heartbeat text; monitors only looked at 200 vs not.
        state = check()
        return web.Response(status=state.status, text=state.sentence)

    async def status(_: web.Request) -> web.Response:
        h = health()
        body = {
            "ready": h.ready,
            "passes": h.passes,
            "failures": h.failures,
            "consecutiveFailures": h.consecutive_failures,
            "lastError": h.last_error,
            "lastSuccess": h.last_success_wall,
            "verdicts": h.verdicts,
            "endpoints": h.endpoints,
        }
        return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json")

    # Reading nft counters blocks: off the event loop, and off the default executor too.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="smartnatd-metrics")
    readings = SharedReading(read=metrics.exposition, executor=executor)

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=await readings.get(), headers={"Content-Type": CONTENT_TYPE})

    async def stop_readings(_: web.Application) -> None:
        # Without waiting: a reading under way ends within the counter timeout by itself.
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application()
    app.on_cleanup.append(stop_readings)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthcheck", healthcheck)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics_handler)
    return app


class _ClientErrorsAtDebug(logging.LoggerAdapter[logging.Logger]):
    """aiohttp.server's logger for the monitor: a malformed request (a port scan, a header over
    the size limit) is the client's problem, logged at debug with its traceback instead of at
    error; an exception in a handler of ours stays an error."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        level = logging.DEBUG if isinstance(exc_info, HttpProcessingError) else logging.ERROR
        self.log(level, msg, *args, exc_info=exc_info, **kwargs)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSED)
        transport.close()


class Monitor:
    """The monitor app listening on a TCP socket, bounded against clients that hold connections:
    at most `max_connections` at once, each closed when it sends no complete request within
    `idle_timeout` seconds."""

    def __init__(self, runner: web.AppRunner, *, max_connections: int) -> None:
        self._runner = runner
        self._max_connections = max_connections
        self._listener: asyncio.Server | None = None
        self._refusing = False

    @classmethod
    async def start(
        cls,
        app: web.Application,
        *,
        host: str | None,
        port: int,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> Monitor:
        """Listen on host:port (None: every address); OSError when that cannot be bound."""
        runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=idle_timeout,
            logger=_ClientErrorsAtDebug(logging.getLogger("aiohttp.server"), {}),
        )
        await runner.setup()
        monitor = cls(runner, max_connections=max_connections)
        try:
            # Not a web.TCPSite: its protocol factory is aiohttp's server itself, which accepts
            # every connection; this one counts them first.
            monitor._listener = await asyncio.get_running_loop().create_server(
                monitor._connection, host, port, reuse_address=True
            )
        except BaseException:
            await runner.cleanup()
            raise
        return monitor

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()

    def _connection(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self._max_connections:
            if not self._refusing:
                logger.warning("monitor connections at the limit, refusing more limit=%d", self._max_connections)
                self._refusing = True
            return _Refused()
        if self._refusing and len(server.connections) < self._max_connections // 2:
            # Half the limit, not one below it: a flood holding it at the limit would otherwise
            # log a refusing/recovered pair on every connection.
            logger.info("monitor connections below the limit again limit=%d", self._max_connections)
            self._refusing = False
        return server()
