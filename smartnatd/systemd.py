"""sd_notify: READY, STATUS, WATCHDOG, STOPPING. A no-op without NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os

import sdnotify

logger = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, *, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        usec = env.get("WATCHDOG_USEC", "")
        # Ping at a third of systemd's timeout: one missed tick is not yet a restart.
        self.watchdog_interval: float | None = int(usec) / 1e6 / 3 if usec.isdigit() and int(usec) > 0 else None
        self._last_status = ""

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")
        logger.info("ready: %s", status)

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping; kernel state left in place")
