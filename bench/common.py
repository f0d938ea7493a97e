"""What the benchmarks share. They run as scripts, so this is imported as `common`."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def exit_on_sigterm(main_pid: int) -> Callable[[int, Any], None]:
    """A SIGTERM handler that unwinds like Ctrl-C, so a benchmark still deletes its namespaces."""

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            # A child pyroute2 forked (to open a socket in a namespace) inherits this handler;
            # it is ended with SIGTERM and must die of it, not unwind the benchmark's code.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(143)

    return handler
