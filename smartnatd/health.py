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
        h = health()
        now = clock()
        if h.loop_heartbeat and now - h.loop_heartbeat > max_loop_stall:
            return False, f"reconcile loop stalled for {now - h.loop_heartbeat:.0f}s"
        if not h.ready:
            # Starting up is healthy for a while; readiness says whether it is serving yet.
            return now - h.started < max_pass_age, "starting: " + (", ".join(h.unsynced) or "first pass") + " pending"
        age = now - (h.last_success_monotonic or h.started)
        if age > max_pass_age:
            return False, f"last successful pass {age:.0f}s ago: {h.last_error or 'no pass since'}"
        return True, h.summary()

    async def healthz(_: web.Request) -> web.Response:
        ok, why = check()
        return web.Response(status=200 if ok else 503, text=("ok: " if ok else "unhealthy: ") + why + "\n")

    async def readyz(_: web.Request) -> web.Response:
        h = health()
        if h.ready:
            return web.Response(text="ready: " + h.summary() + "\n")
        pending = ", ".join(h.unsynced) or "first pass"
        return web.Response(status=503, text=f"not ready: waiting for {pending}\n")

    async def healthcheck(_: web.Request) -> web.Response:
        # SmartNat answered its heartbeat text; monitors only looked at 200 vs not.
        ok, why = check()
        return web.Response(status=200 if ok else 503, text=why)

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
