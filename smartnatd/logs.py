"""Logging setup: journald-aware (priority prefixes, no timestamps) or a terminal format."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities journald reads from a "<N>" line prefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # journald splits on newlines; keep tracebacks at the same priority.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup(*, debug: bool, stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Client libraries are chatty at DEBUG and never needed at INFO.
    for noisy in ("aiohttp.access", "kubernetes_asyncio", "pyroute2", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
