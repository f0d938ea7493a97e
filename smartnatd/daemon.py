"""Wiring: builds the edges, runs sources, reconciler and HTTP in one TaskGroup; graceful stop.

Stopping leaves the kernel state in place, so live connections survive a restart or upgrade;
the next process re-adopts it with a full pass and removes only what is stale.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from smartnatd import __version__, logs
from smartnatd.dataplane import ApplyReport, Dataplane
from smartnatd.errors import SettingsError
from smartnatd.health import Monitor, build_app
from smartnatd.host import HostWatcher
from smartnatd.metrics import Metrics, nft_counter_reader
from smartnatd.reconciler import LogWriteback, Reconciler, Writeback
from smartnatd.settings import Settings
from smartnatd.sourcedir import RACY, SourceCache, load_source_dir, source_files
from smartnatd.store import Kind, Store
from smartnatd.systemd import SystemdNotifier

logger = logging.getLogger(__name__)

EXIT_CONFIG = SettingsError.exit_code  # 78: the unit's RestartPreventExitStatus
STOP_DEADLINE = 15.0  # with PUBLISH_DRAIN (5 s), 10 s below the unit's TimeoutStopSec=30s for the pass
SOURCE_POLL = 0.25
# A pass over 10^4 Mappings allocates ~10^6 short-lived objects; at Python's default (700)
# the young collections it triggers, and the full ones they lead to over a heap of that size,
# took a third to half of a start-up pass (bench/sync.py). The data has no reference cycles
# to speak of: reference counting frees it, so collecting less often costs little memory.
GC_THRESHOLDS = (50_000, 20, 10)


def settle_heap() -> None:
    """After a full pass: collect once, then move every object alive into the permanent generation.

    The state of 10^4 Mappings is ~10^6 objects; a full collection walking them stalled the loop
    for ~0.5-1 s at unpredictable moments (a 1 s outlier in bench/kube_latency.py). Frozen
    objects are still freed by reference counting when they go (the state holds no cycles);
    later collections walk only what was made since the last full pass.
    """
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    if logger.isEnabledFor(logging.DEBUG):
        # Not an argument evaluated for nothing: get_freeze_count() walks the whole frozen list,
        # ~80 ms at 10k Mappings, 0.6 s at 50k, after every full pass.
        logger.debug("heap settled objects_frozen=%d took=%.3fs", gc.get_freeze_count(), time.monotonic() - started)


def run_daemon(*, settings: Settings, source: Path | None, netns: str | None) -> int:
    logs.setup(debug=settings.debug_enabled)
    gc.set_threshold(*GC_THRESHOLDS)
    if netns is not None:
        # pyroute2 opens sockets in another namespace from a forked child and ends it with
        # SIGTERM; the child inherited asyncio's signal wakeup fd, so without this the parent
        # took the child's SIGTERM for its own and stopped right after starting.
        import pyroute2.config

        pyroute2.config.disable_mp_signal = True
    try:
        return asyncio.run(_main(settings=settings, source=source, netns=netns))
    except KeyboardInterrupt:
        return 0


def _state_dir(settings: Settings) -> Path | None:
    path = Path(settings.state_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # failed transactions show the whole ruleset
        return path
    except OSError as err:
        logger.warning("state directory %s unusable (%s); failed transactions will not be saved", path, err)
        return None


class SourceState(Protocol):
    """How a source is doing, for smartnat_source_up and STATUS= while waiting: each Kubernetes
    watch (kube.watch.Watcher) or the --source directory (SourceDirState)."""

    @property
    def name(self) -> str: ...
    @property
    def up(self) -> bool: ...  # listed (or read) once and not failing now
    @property
    def problem(self) -> str: ...  # why it is failing, "" when fine


@dataclass
class SourceDirState:
    """The --source directory's SourceState, kept up to date by watch_source_dir."""

    up: bool = False
    problem: str = ""
    name: str = "directory"


async def _main(*, settings: Settings, source: Path | None, netns: str | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    resync: list[Callable[[], None]] = []  # the reconciler's, once it exists

    def hangup() -> None:
        # Without a handler SIGHUP ended the daemon silently, and cleanly enough that
        # Restart=on-failure did not bring it back.
        logger.warning("SIGHUP: settings are read at start only; restart to apply (a full resync runs now)")
        for request in resync:
            request()

    loop.add_signal_handler(signal.SIGHUP, hangup)
    logger.info(
        "smartnatd %s starting instance=%s source=%s interfaces=%r",
        __version__, settings.instance_name, source or "kubernetes", settings.interfaces_pattern,
    )
    store = Store()
    notifier = SystemdNotifier()
    dataplane = Dataplane(
        netns=netns,
        table_base=settings.route_table_base,
        rule_priority=settings.rule_priority,
        nft_backend=settings.nft_backend,
        state_dir=_state_dir(settings),
    )
    await dataplane.open()
    writeback: Writeback
    watched: Sequence[SourceState]
    kube = None
    dir_state = SourceDirState()
    if source is None:
        from smartnatd.kube.client import KubeSource

        try:
            kube = await KubeSource.create(settings=settings, store=store)
        except SettingsError as err:  # no usable kubeconfig: a restart cannot fix it (exit 78)
            for problem in err.problems:
                logger.critical("%s", problem)
            await dataplane.close()
            return err.exit_code
        writeback, watched = kube.writeback, kube.watchers
    else:
        writeback, watched = LogWriteback(), (dir_state,)
    host_watcher: HostWatcher

    def sources_up() -> dict[str, bool]:
        return {"host": host_watcher.host is not None, **{s.name: s.up for s in watched}}

    def source_problems() -> dict[str, str]:
        return {s.name: s.problem for s in watched}

    metrics = Metrics(
        health=lambda: reconciler.health, counters=nft_counter_reader(dataplane.runner), sources=sources_up,
        links=lambda: host_watcher.links,
    )

    def after_pass(report: ApplyReport | None, took: float, ok: bool) -> None:
        metrics.observe_pass(report, took, ok)
        if ok and report is not None and report.full:
            settle_heap()

    reconciler = Reconciler(
        store=store, dataplane=dataplane, settings=settings, writeback=writeback, notifier=notifier,
        on_pass=after_pass, source_problems=source_problems,
    )
    resync.append(reconciler.request_full_resync)
    watchdog = notifier.watchdog_interval or 10.0
    app = build_app(
        health=lambda: reconciler.health,
        metrics=metrics,
        max_pass_age=max(3 * settings.full_resync_period_sec, 60.0),
        max_loop_stall=max(3 * watchdog, 30.0),
    )
    try:
        http = await Monitor.start(app, host=settings.monitor_ip or None, port=settings.monitor_port)
    except OSError as err:
        # A port someone else holds, or one we may not bind, is a setting to change: exit 78, no
        # restart loop. Anything else (the address not up yet: late DHCP, a moving address)
        # may pass: exit 1 and let the unit's Restart=on-failure try again.
        settled = err.errno in (errno.EADDRINUSE, errno.EACCES)
        reason = os.strerror(err.errno) if err.errno else str(err)
        logger.critical(
            "cannot listen on SNCTRLR_MONITOR_IP:SNCTRLR_MONITOR_PORT=%s:%d: %s; %s",
            settings.monitor_ip or "*", settings.monitor_port, reason,
            "free it or choose another" if settled else "retrying through the unit's restart",
        )
        if kube is not None:
            await kube.close()
        await dataplane.close()
        return EXIT_CONFIG if settled else 1
    logger.info("monitoring on http://%s:%d/ (healthz, readyz, metrics)", settings.monitor_ip or "*", settings.monitor_port)
    host_watcher = HostWatcher(
        netns=netns,
        pattern=settings.interfaces_regex,
        default_gw_interface=settings.default_gw_interface,
        on_change=lambda: store.set_host(host_watcher.host) if host_watcher.host is not None else None,
        refresh_period=float(settings.autorefresh_period_sec),
        link_down_hold=float(settings.link_down_hold_sec),
        # A held link that came back lost its routes (an admin down deletes them): a full pass
        # re-reads the kernel's routes and puts them back.
        on_link_bounce=reconciler.request_full_resync,
    )
    try:
        async with asyncio.TaskGroup() as tg:
            sources = [tg.create_task(host_watcher.run(), name="host")]
            if source is not None:
                sources.append(tg.create_task(watch_source_dir(source, store=store, state=dir_state), name="source-dir"))
            elif kube is not None:
                sources.append(tg.create_task(kube.run(), name="kubernetes"))
            await reconciler.run(stop=stop, watchdog_interval=notifier.watchdog_interval)
            logger.info("stopping: sources stop, kernel state stays in place")
            notifier.stopping()
            for task in sources:
                task.cancel()
    finally:
        try:
            async with asyncio.timeout(STOP_DEADLINE):
                if kube is not None:
                    await kube.close()
                await http.close()
                await dataplane.close()
        except TimeoutError:
            # Only connections are left to close; the kernel state stays either way.
            logger.warning("closing connections took over %.0fs; exiting without waiting", STOP_DEADLINE)
    logger.info("stopped")
    return 0


def _signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    entries = []
    for p in source_files(path):  # the files load_source_dir reads: no dotfiles, no directories
        st = p.stat()
        # ctime too: a chmod that makes an unreadable file readable changes only that.
        entries.append((p.name, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return tuple(entries)


def _source_unreadable(path: Path, err: OSError, state: SourceDirState) -> None:
    if state.up or not state.problem:  # once per outage, not every poll
        logger.warning("source directory %s unreadable: %s; keeping the last state", path, err)
    state.up, state.problem = False, f"{path} unreadable: {err.strerror or err}"


async def watch_source_dir(
    path: Path, *, store: Store, poll: float = SOURCE_POLL, state: SourceDirState | None = None
) -> None:
    """The file source: re-read DIR whenever a file in it changes (a cluster snapshot on disk)."""
    state = state if state is not None else SourceDirState()
    seen: tuple[tuple[str, int, int, int], ...] | None = None
    problems: tuple[str, ...] = ()
    # Files that did not change are not parsed again (10k Mappings: ~3.6 s to parse them all).
    cache = SourceCache()
    recheck_at = 0.0  # read once more then: a file changed in the timestamp tick of the read
    while True:
        sig: tuple[tuple[str, int, int, int], ...] | None
        signed_at = time.time()
        try:
            sig = await asyncio.to_thread(_signature, path)
        except OSError as err:
            _source_unreadable(path, err, state)
            sig = seen = None  # read it all again once it is back
        recheck = sig is not None and sig == seen and 0.0 < recheck_at <= signed_at
        if recheck:
            seen = None  # a write in that tick changed nothing the signature shows
        if sig is not None and sig != seen:
            try:
                loaded = await asyncio.to_thread(load_source_dir, path, cache=cache)
            except OSError as err:
                _source_unreadable(path, err, state)
                seen = None  # not read: try again at the next poll, changed or not
                await asyncio.sleep(poll)
                continue
            seen = sig
            newest = max((max(mtime, ctime) for _, mtime, ctime, _ in sig), default=0) / 1e9
            recheck_at = signed_at + RACY if signed_at - newest < RACY else 0.0
            if loaded.problems != problems:
                problems = loaded.problems
                for problem in problems:
                    logger.warning("source: %s", problem)
            if loaded.unreadable:
                # Unknown is not absent: deleting those files' Mappings would cut live traffic.
                if not recheck or state.problem != "cannot read " + ", ".join(loaded.unreadable):
                    logger.warning(
                        "source: keeping the last good state until %s can be read", ", ".join(loaded.unreadable)
                    )
                state.up, state.problem = False, "cannot read " + ", ".join(loaded.unreadable)
            else:
                store.replace(Kind.MAPPINGS, loaded.mappings)
                store.replace(Kind.SERVICES, loaded.services)
                store.replace(Kind.ENDPOINT_SLICES, loaded.endpoint_slices)
                state.up, state.problem = True, ""
        await asyncio.sleep(poll)
