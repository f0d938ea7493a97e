"""HTTP on SNCTRLR_MONITOR_IP:PORT: /healthz, /readyz, /metrics and SmartNat's /healthcheck."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from aiohttp import web

from smartnatd.metrics import CONTENT_TYPE, Metrics
from smartnatd.reconciler import Health


def build_app(
    *,
    health: Callable[[], Health],
    metrics: Metrics,
    max_pass_age: float,
    max_loop_stall: float,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    def check() -> tuple[bool, str]:
        """(healthy, body). The body starts with the state: ok, starting, degraded or unhealthy."""
        h = health()
        now = clock()
        if h.loop_heartbeat and now - h.loop_heartbeat > max_loop_stall:
            return False, f"unhealthy: reconcile loop stalled for {now - h.loop_heartbeat:.0f}s"
        if not h.ready:
            # Starting up, even with failing passes, is healthy for max_pass_age; /readyz says
            # whether it is serving yet.
            age = now - h.started
            if age > max_pass_age:
                return False, f"unhealthy: no successful pass in {age:.0f}s: {h.waiting()}"
            return True, ("degraded: " if h.consecutive_failures else "starting: ") + h.waiting()
        age = now - (h.last_success_monotonic or h.started)
        if age > max_pass_age:
            return False, f"unhealthy: last successful pass {age:.0f}s ago: {h.last_error or 'no pass since'}"
        if h.consecutive_failures:
            return True, h.summary()  # "degraded: last N passes failed: …"
        return True, "ok: " + h.summary()

    async def healthz(_: web.Request) -> web.Response:
        ok, body = check()
        return web.Response(status=200 if ok else 503, text=body + "\n")

    async def readyz(_: web.Request) -> web.Response:
        h = health()
        if h.ready:
            return web.Response(text="ready: " + h.summary() + "\n")
        return web.Response(status=503, text=f"not ready: {h.waiting()}\n")

    async def healthcheck(_: web.Request) -> web.Response:
        # SmartNat answered its heartbeat text; monitors only looked at 200 vs not.
        ok, body = check()
        return web.Response(status=200 if ok else 503, text=body.split(": ", 1)[1])

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

    async def metrics_handler(_: web.Request) -> web.Response:
        # Reading nft counters blocks briefly: keep it off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthcheck", healthcheck)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics_handler)
    return app
