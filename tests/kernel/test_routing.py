"""RoutingEdge against real network namespaces: rules, tables, ownership and one packet.

IP plan (all inside namespaces this module creates):

    appliance ns                                  gateway ns
    e1  192.0.2.10/24    (peer e1p, same ns)
    e2  198.51.100.10/24 ---------- veth -------- gw0 198.51.100.1/24
                                                  lo  203.0.113.5/32   (a "far" host)

The appliance's main table has no route to 203.0.113.0/24, so a ping to 203.0.113.5 only
succeeds when it is routed by e2's owned table via 198.51.100.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from smartnatd.desired import EGRESS_MARK, MARK_MASK, ReturnPath, interface_mark
from smartnatd.errors import NetlinkApplyError
from smartnatd.routing import ROUTE_PROTO, TABLE_SPAN, RoutingEdge, RoutingReport

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

TABLE_BASE = 20000
PRIORITY = 1000


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], str]]:
    """Makes namespaces `sn-<id>` with lo up; deletes every one of them at teardown."""
    made: list[str] = []

    def make() -> str:
        name = f"sn-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            sh("ip", "netns", "del", name, check=False)


@dataclass(frozen=True)
class Box:
    appliance: str
    gateway: str
    p1: ReturnPath
    p2: ReturnPath


def ifindex(ns: str, name: str) -> int:
    return int(json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", name))[0]["ifindex"])


@pytest.fixture
def box(netns_factory: Callable[[], str]) -> Box:
    app, gw = netns_factory(), netns_factory()
    sh("ip", "-n", app, "link", "add", "e1", "type", "veth", "peer", "name", "e1p")
    sh("ip", "-n", app, "link", "add", "e2", "type", "veth", "peer", "name", "gw0", "netns", gw)
    for name in ("e1", "e1p", "e2"):
        sh("ip", "-n", app, "link", "set", name, "up")
    sh("ip", "-n", gw, "link", "set", "gw0", "up")
    sh("ip", "-n", app, "addr", "add", "192.0.2.10/24", "dev", "e1")
    sh("ip", "-n", app, "addr", "add", "198.51.100.10/24", "dev", "e2")
    sh("ip", "-n", gw, "addr", "add", "198.51.100.1/24", "dev", "gw0")
    sh("ip", "-n", gw, "addr", "add", "203.0.113.5/32", "dev", "lo")

    def path(name: str, network: str, source: str, gateway: str) -> ReturnPath:
        index = ifindex(app, name)
        return ReturnPath(
            interface=name,
            ifindex=index,
            mark=interface_mark(index),
            table=TABLE_BASE + index,
            gateway=IPv4Address(gateway),
            network=IPv4Network(network),
            source=IPv4Address(source),
        )

    return Box(
        appliance=app,
        gateway=gw,
        p1=path("e1", "192.0.2.0/24", "192.0.2.10", "192.0.2.1"),
        p2=path("e2", "198.51.100.0/24", "198.51.100.10", "198.51.100.1"),
    )


@pytest.fixture
async def edge(box: Box) -> AsyncIterator[RoutingEdge]:
    async with RoutingEdge(netns=box.appliance, table_base=TABLE_BASE, rule_priority=PRIORITY) as edge:
        yield edge


def rules(ns: str) -> list[str]:
    return [line.strip() for line in sh("ip", "-n", ns, "rule", "show").splitlines()]


def added_rules(ns: str) -> list[str]:
    """Every rule but the three a namespace starts with (local, main, default)."""
    return sorted(line for line in rules(ns) if line.split(":")[0] not in ("0", "32766", "32767"))


def owned_rules(ns: str) -> list[str]:
    return [line for line in rules(ns) if line.startswith(f"{PRIORITY}:")]


def table(ns: str, table_id: int) -> list[str]:
    return sorted(line.strip() for line in sh("ip", "-n", ns, "route", "show", "table", str(table_id)).splitlines())


def expected_rule(path: ReturnPath) -> str:
    return f"{PRIORITY}:\tfrom all fwmark {path.mark:#x}/{MARK_MASK:#x} lookup {path.table} proto {ROUTE_PROTO}"


def expected_table(path: ReturnPath) -> list[str]:
    return sorted(
        [
            f"default via {path.gateway} dev {path.interface} proto {ROUTE_PROTO}",
            f"{path.network} dev {path.interface} proto {ROUTE_PROTO} scope link src {path.source}",
        ]
    )


async def test_apply_creates_one_rule_and_one_table_per_path(box: Box, edge: RoutingEdge) -> None:
    report = await edge.apply([box.p1, box.p2])

    assert report == RoutingReport(added=6)  # 2 rules, 2 x (connected + default)
    assert owned_rules(box.appliance) == sorted([expected_rule(box.p1), expected_rule(box.p2)])
    assert table(box.appliance, box.p1.table) == expected_table(box.p1)
    assert table(box.appliance, box.p2.table) == expected_table(box.p2)


async def test_reapplying_the_same_paths_changes_nothing(box: Box, edge: RoutingEdge) -> None:
    await edge.apply([box.p1, box.p2])
    before = (rules(box.appliance), table(box.appliance, box.p1.table), table(box.appliance, box.p2.table))

    report = await edge.apply([box.p2, box.p1])

    assert report == RoutingReport()
    assert report.changes == 0
    assert (rules(box.appliance), table(box.appliance, box.p1.table), table(box.appliance, box.p2.table)) == before


async def test_changed_gateway_replaces_the_default_route(box: Box, edge: RoutingEdge) -> None:
    await edge.apply([box.p1, box.p2])
    moved = replace(box.p2, gateway=IPv4Address("198.51.100.2"))

    report = await edge.apply([box.p1, moved])

    assert report == RoutingReport(replaced=1)
    assert table(box.appliance, box.p2.table) == expected_table(moved)
    assert owned_rules(box.appliance) == sorted([expected_rule(box.p1), expected_rule(moved)])


async def test_changed_mark_replaces_the_rule(box: Box, edge: RoutingEdge) -> None:
    await edge.apply([box.p1, box.p2])
    remarked = replace(box.p2, mark=interface_mark(77))

    report = await edge.apply([box.p1, remarked])

    assert report == RoutingReport(replaced=1)
    assert owned_rules(box.appliance) == sorted([expected_rule(box.p1), expected_rule(remarked)])


async def test_dropped_path_loses_its_rule_and_table(box: Box, edge: RoutingEdge) -> None:
    await edge.apply([box.p1, box.p2])

    report = await edge.apply([box.p1])

    assert report == RoutingReport(deleted=3)
    assert owned_rules(box.appliance) == [expected_rule(box.p1)]
    assert table(box.appliance, box.p1.table) == expected_table(box.p1)
    assert table(box.appliance, box.p2.table) == []


async def test_drift_in_owned_state_is_repaired(box: Box, edge: RoutingEdge) -> None:
    await edge.apply([box.p1, box.p2])
    app, t1 = box.appliance, str(box.p1.table)
    sh("ip", "-n", app, "route", "del", "default", "table", t1)
    sh("ip", "-n", app, "route", "add", "10.9.0.0/16", "via", "192.0.2.1", "table", t1, "proto", str(ROUTE_PROTO))
    sh("ip", "-n", app, "rule", "del", "priority", str(PRIORITY), "fwmark", f"{box.p2.mark:#x}/{MARK_MASK:#x}")
    sh("ip", "-n", app, "rule", "add", "priority", str(PRIORITY), "fwmark", "0x7770000/0xfff0000", "lookup", t1)
    sh("ip", "-n", app, "route", "append", "default", "via", "198.51.100.2", "table", str(box.p2.table), "proto", "200")

    report = await edge.apply([box.p1, box.p2])

    # Added: e1's default route, e2's rule. Deleted: the extra route, the odd rule. Replaced:
    # the slot holding two default routes now holds one.
    assert report == RoutingReport(added=2, replaced=1, deleted=2)
    assert owned_rules(app) == sorted([expected_rule(box.p1), expected_rule(box.p2)])
    assert table(app, box.p1.table) == expected_table(box.p1)
    assert table(app, box.p2.table) == expected_table(box.p2)


async def test_foreign_rules_and_routes_survive_apply_and_cleanup(box: Box, edge: RoutingEdge) -> None:
    app, t1 = box.appliance, str(box.p1.table)
    outside = str(TABLE_BASE + TABLE_SPAN)  # first table id past the owned range
    foreign_rules = [
        ("priority", str(PRIORITY), "fwmark", f"{box.p1.mark:#x}/{MARK_MASK:#x}", "lookup", "100"),
        ("priority", str(PRIORITY), "fwmark", "0x1/0x1", "lookup", t1),  # mark outside MARK_MASK
        ("priority", str(PRIORITY), "fwmark", "0x30000/0xfff0000", "lookup", outside),
        ("priority", "900", "fwmark", f"{box.p1.mark:#x}/{MARK_MASK:#x}", "lookup", t1),
    ]
    for rule in foreign_rules:
        sh("ip", "-n", app, "rule", "add", *rule)
    sh("ip", "-n", app, "route", "add", "203.0.113.0/24", "via", "192.0.2.1", "table", "100")
    sh("ip", "-n", app, "route", "add", "203.0.113.0/24", "via", "192.0.2.1")  # main table
    sh("ip", "-n", app, "route", "add", "203.0.113.0/24", "via", "192.0.2.1", "table", outside, "proto", "200")
    sh("ip", "-n", app, "route", "add", "10.8.0.0/16", "via", "192.0.2.1", "table", t1)  # proto boot, in our range
    foreign_rule_lines = added_rules(app)
    foreign_routes = {t: table(app, int(t)) for t in ("100", "254", outside)}
    assert len(foreign_rule_lines) == len(foreign_rules)

    await edge.apply([box.p1, box.p2])
    await edge.apply([box.p2])
    assert {t: table(app, int(t)) for t in foreign_routes} == foreign_routes
    assert set(foreign_rule_lines) <= set(rules(app))
    assert "10.8.0.0/16 via 192.0.2.1 dev e1" in table(app, box.p1.table)

    report = await edge.cleanup()

    assert report == RoutingReport(deleted=3)  # e2's rule and routes; e1's went in the last apply
    assert added_rules(app) == foreign_rule_lines
    assert {t: table(app, int(t)) for t in foreign_routes} == foreign_routes
    assert table(app, box.p1.table) == ["10.8.0.0/16 via 192.0.2.1 dev e1"]


async def test_cleanup_removes_everything_owned(box: Box, edge: RoutingEdge) -> None:
    await edge.apply([box.p1, box.p2])

    report = await edge.cleanup()

    assert report == RoutingReport(deleted=6)
    assert owned_rules(box.appliance) == []
    assert sh("ip", "-n", box.appliance, "route", "show", "table", "all", "proto", str(ROUTE_PROTO)) == ""
    assert await edge.cleanup() == RoutingReport()


async def test_failing_path_names_interface_and_table_and_others_still_apply(box: Box, edge: RoutingEdge) -> None:
    # 203.0.113.77 is no address of the box: the kernel refuses it as a preferred source.
    broken = replace(box.p1, source=IPv4Address("203.0.113.77"))

    with pytest.raises(NetlinkApplyError) as caught:
        await edge.apply([broken, box.p2])

    message = str(caught.value)
    print(f"\nerror: {message}")
    assert "interface e1" in message and f"table {box.p1.table}" in message, message
    assert owned_rules(box.appliance) == [expected_rule(box.p2)]  # e1's table is incomplete: no rule
    assert table(box.appliance, box.p2.table) == expected_table(box.p2)


async def test_missing_namespace_is_an_error_not_created() -> None:
    name = f"sn-{secrets.token_hex(4)}"
    with pytest.raises(OSError):
        await RoutingEdge(netns=name, table_base=TABLE_BASE, rule_priority=PRIORITY).open()
    assert not os.path.exists(f"/var/run/netns/{name}")


def ping(ns: str, address: str, *, mark: int | None = None) -> bool:
    argv = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "1"]
    if mark is not None:
        argv += ["-m", str(mark)]
    return subprocess.run([*argv, address], capture_output=True, timeout=10).returncode == 0


async def poll(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_marked_packet_leaves_by_its_interfaces_table(box: Box, edge: RoutingEdge) -> None:
    far = "203.0.113.5"
    # Without the owned table the far host is unreachable from the appliance, marked or not.
    assert not ping(box.appliance, far, mark=box.p2.mark)

    await edge.apply([box.p1, box.p2])

    lookup = sh("ip", "-n", box.appliance, "route", "get", far, "mark", str(box.p2.mark))
    assert f"via {box.p2.gateway} dev e2 table {box.p2.table}" in lookup, lookup
    # The first ping may wait for ARP; retry within a deadline rather than sleeping.
    await poll(lambda: ping(box.appliance, far, mark=box.p2.mark), timeout=10, what=f"a marked ping to reach {far}")
    assert not ping(box.appliance, far), "an unmarked packet must still use the main table"
    assert not ping(box.appliance, far, mark=box.p1.mark), "e1's mark must use e1's table (no such host there)"


MAIN_FIRST = (
    f"{PRIORITY - 1}:\tfrom all fwmark {EGRESS_MARK:#x}/{EGRESS_MARK:#x} lookup main suppress_prefixlength 0 "
    f"proto {ROUTE_PROTO}"
)


async def test_specific_routes_first_owns_one_main_rule_before_the_fwmark_rules(box: Box, edge: RoutingEdge) -> None:
    app = box.appliance

    report = await edge.apply([box.p1, box.p2], specific_routes_first=True)

    assert report == RoutingReport(added=7)  # the main rule, 2 fwmark rules, 4 routes
    assert added_rules(app) == sorted([MAIN_FIRST, expected_rule(box.p1), expected_rule(box.p2)])
    assert await edge.apply([box.p2, box.p1], specific_routes_first=True) == RoutingReport()
    # Turned off, it goes; no paths, no rule either.
    assert await edge.apply([box.p1, box.p2]) == RoutingReport(deleted=1)
    assert MAIN_FIRST not in rules(app)
    assert await edge.apply([box.p1, box.p2], specific_routes_first=True) == RoutingReport(added=1)
    assert await edge.apply([], specific_routes_first=True) == RoutingReport(deleted=7)
    assert added_rules(app) == []


async def test_main_rule_drift_is_repaired_and_foreign_main_rules_survive(box: Box, edge: RoutingEdge) -> None:
    app, before = box.appliance, str(PRIORITY - 1)
    foreign_rules = [
        ("priority", before, "lookup", "main", "suppress_prefixlength", "0"),  # no fwmark: wg-quick's shape
        ("priority", before, "not", "fwmark", "0/0xff", "lookup", "main", "suppress_prefixlength", "0"),
        ("priority", before, "not", "fwmark", f"0/{MARK_MASK:#x}", "lookup", "100", "suppress_prefixlength", "0"),
    ]
    for rule in foreign_rules:
        sh("ip", "-n", app, "rule", "add", *rule)
    foreign_rule_lines = added_rules(app)
    await edge.apply([box.p1, box.p2], specific_routes_first=True)
    # Ours by its selector (priority, fwmark EGRESS_MARK/EGRESS_MARK, main), but with another prefix length.
    egress = f"{EGRESS_MARK:#x}/{EGRESS_MARK:#x}"
    sh("ip", "-n", app, "rule", "del", "priority", before, "fwmark", egress, "lookup", "main")
    sh("ip", "-n", app, "rule", "add", "priority", before, "fwmark", egress, "lookup", "main",
       "suppress_prefixlength", "8")

    report = await edge.apply([box.p1, box.p2], specific_routes_first=True)

    assert report == RoutingReport(replaced=1)
    assert [line for line in rules(app) if "lookup main suppress_prefixlength 8" in line] == []
    assert MAIN_FIRST in rules(app)
    assert await edge.cleanup() == RoutingReport(deleted=7)
    assert added_rules(app) == foreign_rule_lines


async def test_rule_priority_1_puts_the_main_rule_right_after_the_local_rule(box: Box) -> None:
    app = box.appliance
    async with RoutingEdge(netns=app, table_base=TABLE_BASE, rule_priority=1) as edge:
        assert await edge.apply([box.p1], specific_routes_first=True) == RoutingReport(added=4)
        assert rules(app)[:3] == [
            "0:\tfrom all lookup local",
            f"0:\tfrom all fwmark {EGRESS_MARK:#x}/{EGRESS_MARK:#x} lookup main suppress_prefixlength 0 proto {ROUTE_PROTO}",
            f"1:\tfrom all fwmark {box.p1.mark:#x}/{MARK_MASK:#x} lookup {box.p1.table} proto {ROUTE_PROTO}",
        ]
        # The kernel dumps priority 0 without its attribute: it is still found as owned.
        assert await edge.apply([box.p1], specific_routes_first=True) == RoutingReport()
        assert await edge.cleanup() == RoutingReport(deleted=4)
        assert rules(app) == ["0:\tfrom all lookup local", "32766:\tfrom all lookup main", "32767:\tfrom all lookup default"]


async def test_marked_packet_takes_a_specific_main_route_but_not_the_main_default(box: Box, edge: RoutingEdge) -> None:
    app, far, near = box.appliance, "203.0.113.5", "198.51.100.1"
    # A main default route that leads nowhere (nobody has 192.0.2.1): only the owned tables work.
    sh("ip", "-n", app, "route", "add", "default", "via", "192.0.2.1", "dev", "e1")

    await edge.apply([box.p1, box.p2])
    # Without the main rule e1's mark sends even e2's connected network to e1's gateway.
    lookup = sh("ip", "-n", app, "route", "get", near, "mark", str(box.p1.mark))
    assert f"via 192.0.2.1 dev e1 table {box.p1.table}" in lookup, lookup

    await edge.apply([box.p1, box.p2], specific_routes_first=True)
    # For a pod's own connection (EGRESS_MARK too) the specific (connected) main route wins...
    egress_p1, egress_p2 = box.p1.mark | EGRESS_MARK, box.p2.mark | EGRESS_MARK
    lookup = sh("ip", "-n", app, "route", "get", near, "mark", str(egress_p1))
    assert "dev e2" in lookup and "table" not in lookup, lookup
    await poll(lambda: ping(app, near, mark=egress_p1), timeout=10, what=f"an e1 egress ping to reach {near}")
    # ...a reply to a client (the interface's mark alone) keeps to its interface's table...
    lookup = sh("ip", "-n", app, "route", "get", near, "mark", str(box.p1.mark))
    assert f"via 192.0.2.1 dev e1 table {box.p1.table}" in lookup, lookup
    # ...and the main default route is still overridden by the mark's table.
    lookup = sh("ip", "-n", app, "route", "get", far, "mark", str(egress_p2))
    assert f"via {box.p2.gateway} dev e2 table {box.p2.table}" in lookup, lookup
    await poll(lambda: ping(app, far, mark=egress_p2), timeout=10, what=f"an e2 egress ping to reach {far}")
    assert not ping(app, far), "an unmarked packet still takes the main default route"
