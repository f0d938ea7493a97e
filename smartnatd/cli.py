"""argv -> command; exit codes.

plan         print verdicts and the exact ruleset; touches nothing
apply        one full pass (plan, apply, conntrack cleanup); prints verdicts
cleanup      remove everything smartnatd owns in the kernel
check-config report every bad SNCTRLR_* variable at once (exit 78)
run          the daemon
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from smartnatd import __version__
from smartnatd.errors import DataplaneError, SettingsError
from smartnatd.model import Host, Snapshot
from smartnatd.planner import Plan, plan
from smartnatd.settings import Settings, load

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartnatd", description="NAT appliance for Kubernetes Mappings")
    p.add_argument("--version", action="version", version=f"smartnatd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--netns", help="act inside this network namespace (tests, demos)")

    sp = sub.add_parser("plan", help="print each Mapping's verdict and the ruleset; change nothing")
    sp.add_argument("--source", required=True, type=Path, help="directory of Mapping/Service/EndpointSlice YAML")
    sp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    common(sp)
    sp = sub.add_parser("apply", help="one full pass: plan, apply, clean up stale flows")
    sp.add_argument("--source", required=True, type=Path)
    sp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    common(sp)
    sp = sub.add_parser("cleanup", help="remove every table, rule and route smartnatd owns")
    common(sp)
    sub.add_parser("check-config", help="validate SNCTRLR_* settings")
    sp = sub.add_parser("run", help="run the daemon")
    sp.add_argument("--source", type=Path, help="watch this directory instead of a Kubernetes cluster")
    common(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config()
    try:
        settings, notices = load(os.environ, require=args.command != "cleanup")
    except SettingsError as err:
        for problem in err.problems:
            print(f"smartnatd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    for notice in notices:
        print(f"smartnatd: notice: {notice}", file=sys.stderr)
    if args.command in ("plan", "apply"):
        return asyncio.run(_plan_or_apply(args, settings))
    if args.command == "cleanup":
        return asyncio.run(_cleanup(args, settings))
    if args.command == "run":
        from smartnatd.daemon import run_daemon

        return run_daemon(settings=settings, source=args.source, netns=args.netns)
    return EXIT_USAGE


def _check_config() -> int:
    try:
        settings, notices = load(os.environ)
    except SettingsError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(err.problems)} problem(s) found", file=sys.stderr)
        return EXIT_CONFIG
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    from smartnatd.settings import describe

    for name, value, origin in describe(settings, os.environ):
        print(f"{name}={value!s}  # {origin}")
    return EXIT_OK


async def _discover(settings: Settings, netns: str | None) -> Host:
    from pyroute2 import AsyncIPRoute

    from smartnatd.host import discover

    async with AsyncIPRoute(netns=netns, flags=0) if netns else AsyncIPRoute() as ipr:
        return await discover(
            ipr, pattern=settings.interfaces_regex, default_gw_interface=settings.default_gw_interface
        )


async def _plan_or_apply(args: argparse.Namespace, settings: Settings) -> int:
    from smartnatd.sourcedir import load_source_dir

    if not args.source.is_dir():
        print(f"smartnatd: --source {args.source}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    source = load_source_dir(args.source)
    for problem in source.problems:
        print(f"smartnatd: {problem}", file=sys.stderr)
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
        _print_plan(result, ruleset_text, args.output)
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
        print(f"smartnatd: the kernel rejected the pass; nothing was changed: {err}", file=sys.stderr)
        return EXIT_FAILED
    _print_plan(result, None, args.output)
    if args.output == "text":
        print(
            f"applied: {len(result.desired.dnats)} endpoints, {report.routing}, "
            f"{report.flows_deleted} stale flows deleted, took {report.took:.3f}s"
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


def _print_plan(result: Plan, ruleset_text: str | None, output: str) -> None:
    if output == "json":
        doc: dict[str, Any] = {
            "verdicts": [_verdict_json(v) for v in result.verdicts],
            "hostProblems": list(result.host_problems),
        }
        if ruleset_text is not None:
            doc["ruleset"] = ruleset_text
        print(json.dumps(doc, indent=2))
        return
    for v in result.verdicts:
        print(f"{v.key} {v.kind}: {v.reason}")
    if ruleset_text is not None:
        print()
        print(ruleset_text, end="")


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
    print("removed everything smartnatd owned")
    return EXIT_OK
