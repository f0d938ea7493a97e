"""argv -> command; exit codes.

plan         print verdicts and the exact ruleset; touches nothing
apply        one full pass (plan, apply, conntrack cleanup); prints verdicts
cleanup      remove everything smartnatd owns in the kernel
check-config report every bad SNCTRLR_* variable at once (exit 78)
run          the daemon

Exit codes (docs/operator-guide.md, "Exit codes", lists them for operators):
  0   done
  1   the kernel refused the pass or the cleanup
  2   bad usage: arguments, an unusable --source directory, a --netns that does not exist
  65  --source could not be read completely: apply changed nothing; plan printed a partial view
  74  the output could not be written (a full disk, an I/O error)
  78  bad SNCTRLR_* settings
  141 the reader of the output went away (`| head`): what a shell reports for a tool killed by
      SIGPIPE, so `set -o pipefail` scripts see the same as with cat or grep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from smartnatd import __version__
from smartnatd.errors import DataplaneError, SettingsError
from smartnatd.model import Host, Snapshot
from smartnatd.planner import Plan, plan
from smartnatd.settings import Settings, load, load_subset

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65  # EX_DATAERR: --source could not be read completely
EXIT_IOERR = 74  # EX_IOERR: stdout could not be written
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141

# What cleanup reads; a bad value of any other setting only warns, so it never blocks cleanup.
CLEANUP_SETTINGS = frozenset({"route_table_base", "rule_priority", "nft_backend"})
# Where `ip netns add NAME` puts a namespace; a name with a '/' is a path (pyroute2's rule).
NETNS_RUN_DIR = Path("/var/run/netns")


def _source_arg(raw: str) -> Path:
    if not raw:
        raise argparse.ArgumentTypeError("must name a directory (an empty value would mean the current one)")
    return Path(raw)


def _netns_arg(raw: str) -> str:
    if not raw:
        raise argparse.ArgumentTypeError("must name a network namespace (an empty value would mean this host's)")
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartnatd", description="NAT appliance for Kubernetes Mappings")
    p.add_argument("--version", action="version", version=f"smartnatd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--netns", type=_netns_arg, help="act inside this network namespace (tests, demos)")

    source_help = "directory of Mapping/Service/EndpointSlice YAML or JSON files (e.g. kubectl get -o yaml)"
    sp = sub.add_parser("plan", help="print each Mapping's verdict and the ruleset; change nothing")
    sp.add_argument("--source", required=True, type=_source_arg, help=source_help)
    sp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    common(sp)
    sp = sub.add_parser("apply", help="one full pass: plan, apply, clean up stale flows")
    sp.add_argument(
        "--source",
        required=True,
        type=_source_arg,
        help=source_help + "; nothing is applied unless every file can be read",
    )
    sp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    common(sp)
    sp = sub.add_parser("cleanup", help="remove every table, rule and route smartnatd owns")
    common(sp)
    sub.add_parser("check-config", help="validate SNCTRLR_* settings")
    sp = sub.add_parser("run", help="run the daemon")
    sp.add_argument("--source", type=_source_arg, help="watch this directory instead of a Kubernetes cluster")
    common(sp)
    return p


class _OutputError(Exception):
    """Writing stdout failed; `error` is the OSError."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        super().__init__(str(error))


def _out(text: str = "", end: str = "\n") -> None:
    """Print to stdout. A write error is an _OutputError, so it is not taken for a failed command."""
    try:
        sys.stdout.write(text + end)
    except OSError as err:
        raise _OutputError(err) from err


def _flush() -> None:
    try:
        sys.stdout.flush()
    except OSError as err:
        raise _OutputError(err) from err


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            code = _command(argv)
        except SystemExit as done:  # argparse after --help, --version or a usage error
            code = done.code if isinstance(done.code, int) else (EXIT_OK if done.code is None else EXIT_USAGE)
        _flush()  # here, not at exit, so a write error is reported rather than a traceback
    except _OutputError as err:
        return _output_failed(err.error)
    return code


def _output_failed(err: OSError) -> int:
    # The interpreter flushes stdout once more at exit; pointed at /dev/null that cannot fail again
    # (it would print "Exception ignored" and exit 120). The recipe of the Python docs (signal, "Note
    # on SIGPIPE").
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (tests capture it): nothing will flush it
        fd = -1
    if fd >= 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    if isinstance(err, BrokenPipeError):
        return EXIT_BROKEN_PIPE  # the reader has what it wanted (`| head`); say nothing
    print(f"smartnatd: cannot write the output: {err.strerror or err}", file=sys.stderr)
    return EXIT_IOERR


def _command(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config()
    unused_problems: list[str] = []
    try:
        if args.command == "cleanup":
            settings, notices, unused_problems = load_subset(os.environ, CLEANUP_SETTINGS)
        else:
            settings, notices = load(os.environ)
    except SettingsError as err:
        for problem in err.problems:
            print(f"smartnatd: {problem}", file=sys.stderr)
        for notice in err.notices:
            print(f"smartnatd: notice: {notice}", file=sys.stderr)
        return EXIT_CONFIG
    for problem in unused_problems:
        print(f"smartnatd: warning: {problem}", file=sys.stderr)
    for notice in notices:
        print(f"smartnatd: notice: {notice}", file=sys.stderr)
    usage = [
        problem
        for problem in (_netns_problem(args.netns), _source_problem(getattr(args, "source", None)))
        if problem is not None
    ]
    if usage:
        for problem in usage:
            print(f"smartnatd: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.command in ("plan", "apply"):
        return asyncio.run(_plan_or_apply(args, settings))
    if args.command == "cleanup":
        return asyncio.run(_cleanup(args, settings))
    if args.command == "run":
        from smartnatd.daemon import run_daemon

        return run_daemon(settings=settings, source=args.source, netns=args.netns)
    return EXIT_USAGE


def _netns_problem(name: str | None) -> str | None:
    """Why --netns NAME cannot be entered, or None; pyroute2 would raise FileNotFoundError later."""
    if name is None:
        return None
    path = Path(name) if "/" in name else NETNS_RUN_DIR / name
    if not path.exists():
        return f"--netns {name}: no such network namespace ({path} does not exist; see `ip netns list`)"
    return None


def _source_problem(path: Path | None) -> str | None:
    """Why DIR cannot be a --source, or None. An unusable DIR must not read as an empty cluster."""
    if path is None:
        return None
    try:
        with os.scandir(path):
            pass
    except FileNotFoundError:
        return f"--source {path}: does not exist"
    except NotADirectoryError:
        return f"--source {path}: not a directory"
    except OSError as err:
        return f"--source {path}: cannot be read ({err.strerror or err})"
    return None


def _check_config() -> int:
    try:
        settings, notices = load(os.environ)
    except SettingsError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        for notice in err.notices:  # a "did you mean" often names the cause of an error above
            print(f"notice: {notice}", file=sys.stderr)
        print(f"{len(err.problems)} problem(s) found", file=sys.stderr)
        return EXIT_CONFIG
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    from smartnatd.settings import describe

    for name, value, origin in describe(settings, os.environ):
        _out(f"{name}={value!s}  # {origin}")
    return EXIT_OK


async def _discover(settings: Settings, netns: str | None) -> Host:
    from pyroute2 import AsyncIPRoute

    from smartnatd.host import discover

    async with AsyncIPRoute(netns=netns, flags=0) if netns else AsyncIPRoute() as ipr:
        return await discover(
            ipr, pattern=settings.interfaces_regex, default_gw_interface=settings.default_gw_interface,
            own_namespace=netns is None,
        )


async def _plan_or_apply(args: argparse.Namespace, settings: Settings) -> int:
    from smartnatd.sourcedir import load_source_dir

    try:
        source = load_source_dir(args.source)
    except OSError as err:  # DIR itself went away or became unreadable since the check
        print(f"smartnatd: --source {args.source}: cannot be read ({err.strerror or err})", file=sys.stderr)
        return EXIT_USAGE
    for problem in source.problems:
        print(f"smartnatd: {problem}", file=sys.stderr)
    if args.command == "apply" and source.problems:
        # A full pass from a partial view would remove the rules of every Mapping it did not see.
        print(
            f"smartnatd: nothing was applied: --source {args.source} could not be read completely "
            f"({len(source.problems)} problem(s) above)",
            file=sys.stderr,
        )
        return EXIT_DATAERR
    host = await _discover(settings, args.netns)
    snapshot = Snapshot(
        mappings=source.mappings, services=source.services, endpoint_slices=source.endpoint_slices, host=host
    )
    result = plan(snapshot, settings)
    for problem in result.host_problems:
        print(f"smartnatd: {problem}", file=sys.stderr)
    from smartnatd.nft.render import render

    ruleset_text = render(result.desired).text()
    if args.command == "plan":
        _print_plan(result, ruleset_text, args.output, source_problems=source.problems)
        if source.problems:
            print(
                f"smartnatd: this plan is from a partial view: --source {args.source} could not be read "
                f"completely ({len(source.problems)} problem(s) above)",
                file=sys.stderr,
            )
            return EXIT_DATAERR
        return EXIT_OK

    from smartnatd.dataplane import Dataplane

    dataplane = Dataplane(
        netns=args.netns,
        table_base=settings.route_table_base,
        rule_priority=settings.rule_priority,
        nft_backend=settings.nft_backend,
        state_dir=Path(settings.state_dir) if os.access(Path(settings.state_dir).parent, os.W_OK) else None,
    )
    try:
        async with dataplane:
            report = await dataplane.apply(result.desired, full=True)
    except DataplaneError as err:
        if err.nft_committed:
            print(
                f"smartnatd: the nftables rules were applied, but a later step failed: {err}\n"
                "smartnatd: the kernel holds the new rules without all of their routes; "
                "run apply again, or cleanup to remove everything",
                file=sys.stderr,
            )
        else:
            print(f"smartnatd: the kernel rejected the pass; nothing was changed: {err}", file=sys.stderr)
        return EXIT_FAILED
    applied = {
        "endpoints": len(result.desired.dnats),
        "routing": {
            "added": report.routing.added,
            "replaced": report.routing.replaced,
            "deleted": report.routing.deleted,
            "changes": report.routing.changes,
        },
        "flowsDeleted": report.flows_deleted,
        "took": round(report.took, 3),
    }
    _print_plan(result, None, args.output, source_problems=(), applied=applied)
    if args.output == "text":
        routing = report.routing
        _out(
            f"applied: {len(result.desired.dnats)} endpoints; routes and rules {routing.added} added, "
            f"{routing.replaced} replaced, {routing.deleted} deleted; "
            f"{report.flows_deleted} stale flows deleted; took {report.took:.3f}s"
        )
    return EXIT_OK


def _verdict_json(v: Any) -> dict[str, Any]:
    return {
        "mapping": str(v.key),
        "verdict": str(v.kind),
        "reason": v.reason,
        "eventReason": v.event_reason,
        "winner": str(v.winner) if v.winner else None,
        "served": [str(e) for e in v.served],
        "serviceVIP": str(v.service_vip) if v.service_vip else None,
        "podIPs": [str(ip) for ip in v.pod_ips],
    }


def _print_plan(
    result: Plan,
    ruleset_text: str | None,
    output: str,
    *,
    source_problems: tuple[str, ...],
    applied: dict[str, Any] | None = None,
) -> None:
    if output == "json":
        doc: dict[str, Any] = {
            "verdicts": [_verdict_json(v) for v in result.verdicts],
            "hostProblems": list(result.host_problems),
            "sourceProblems": list(source_problems),
        }
        if ruleset_text is not None:
            doc["ruleset"] = ruleset_text
        if applied is not None:
            doc["applied"] = applied
        _out(json.dumps(doc, indent=2))
        return
    for v in result.verdicts:
        _out(f"{v.key} {v.kind}: {v.reason}")
    if ruleset_text is not None:
        _out()
        _out(ruleset_text, end="")


async def _cleanup(args: argparse.Namespace, settings: Settings) -> int:
    from smartnatd.dataplane import Dataplane

    dataplane = Dataplane(
        netns=args.netns, table_base=settings.route_table_base, rule_priority=settings.rule_priority,
        nft_backend=settings.nft_backend,
    )
    try:
        async with dataplane:
            await dataplane.cleanup()
    except DataplaneError as err:
        print(f"smartnatd: cleanup failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    _out("removed everything smartnatd owned")
    return EXIT_OK
