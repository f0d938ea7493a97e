"""Policy routing: packets marked for an external interface leave by that interface.

For each ReturnPath the kernel gets a routing table holding the interface's connected network
and a default route via its gateway, and an ip rule sending packets whose mark (under
MARK_MASK) is the interface's mark to that table. Replies to connections that came in on a
secondary interface, and pod egress SNATed to its addresses, then use the right gateway.

With `specific_routes_first` (the dataplane sets it while any pod egress is marked) one more
rule, at `rule_priority - 1`, sends the packets of pods' own connections (EGRESS_MARK, set by
the ruleset beside the interface's mark) to the main table first with `suppress_prefixlength
0`: a specific main-table route (a connected network, an internal network behind the box)
wins, only the main default route is overridden by the interface's table. Without it a marked
pod connection to an internal network would be forced out of the external interface. Replies
to clients do not carry EGRESS_MARK: they keep strictly to the interface they came in on.

What smartnatd owns, and therefore may change or delete:
- routes whose protocol is ROUTE_PROTO, in tables [table_base, table_base + TABLE_SPAN);
- rules at `rule_priority` whose fwmark lies inside MARK_MASK and whose table is in that range;
- rules at `rule_priority - 1` with fwmark EGRESS_MARK/EGRESS_MARK looking up the main table.
Everything else (the main table, other protocols, other priorities) is never touched, with one
exception: a route sitting in exactly the slot (table, destination) that a desired route needs
in an owned table is overwritten, since that table id is configured as smartnatd's.

Links going down: `ip link set X down` makes the kernel delete every route through X, ours
included (rules stay); a carrier loss keeps them, flagged `linkdown`. While the host watcher
holds a down link as up (SNCTRLR_LINK_DOWN_HOLD_SEC), its routes cannot be put back: the
kernel refuses a route through a down link (ENETDOWN). apply() then leaves that table as the
kernel has it, without failing the pass; when the link comes back the watcher asks for a full
pass, whose apply() reads the kernel's routes again and restores them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from types import TracebackType
from typing import Any, Self

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from smartnatd.desired import EGRESS_MARK, MARK_MASK, MARK_SHIFT, ReturnPath
from smartnatd.errors import NetlinkApplyError

logger = logging.getLogger(__name__)

# Route protocol (rtm_protocol) marking routes smartnatd installed. The kernel gives meaning
# only to values below RTPROT_STATIC (4); iproute2's rt_protos names 8-18, 42, 99 and 186-192;
# FRR's daemons use 186-198; bird 12, zebra 11, keepalived 18. 200 (0xC8) is unassigned in all
# of them, so a route with it is ours; `ip route show proto 200` lists exactly our routes.
ROUTE_PROTO = 200

# One table per markable interface: the mark is the ifindex under MARK_MASK, which has 12 bits.
TABLE_SPAN = (MARK_MASK >> MARK_SHIFT) + 1

# Kernel constants (linux/rtnetlink.h, linux/fib_rules.h) not exported by name in pyroute2.
_RTN_UNICAST = 1
_RT_SCOPE_UNIVERSE = 0
_RT_SCOPE_LINK = 253
_RTNH_F_ONLINK = 4  # the only next-hop flag a user sets; the others (dead, linkdown) are state
_FR_ACT_TO_TBL = 1
_FIB_RULE_INVERT = 2  # the `not` of `ip rule`
_RT_TABLE_MAIN = 254
_NO_SUPPRESS = 0xFFFFFFFF  # FRA_SUPPRESS_* value meaning "not set"

# Route attributes the desired routes use; any other attribute makes an owned route differ.
_ROUTE_ATTRS = {"RTA_TABLE", "RTA_DST", "RTA_GATEWAY", "RTA_OIF", "RTA_PREFSRC", "RTA_PRIORITY"}
# Rule attributes of a plain "[not] fwmark M/MASK lookup T [suppress_prefixlength N]" rule (as
# the kernel dumps it; it leaves out a zero FRA_FWMARK and a zero FRA_PRIORITY).
_RULE_ATTRS = {
    "FRA_TABLE", "FRA_PRIORITY", "FRA_FWMARK", "FRA_FWMASK", "FRA_PROTOCOL", "FRA_PAD", "FRA_SUPPRESS_PREFIXLEN"
}
# Deletion errors meaning "already gone": another actor or a link going down removed it.
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV}


@dataclass(frozen=True)
class RoutingReport:
    """What one apply or cleanup changed, counting rules and routes alike."""

    added: int = 0
    replaced: int = 0
    deleted: int = 0

    @property
    def changes(self) -> int:
        return self.added + self.replaced + self.deleted


@dataclass(frozen=True, order=True)
class _RouteKey:
    """What identifies a route inside the kernel's FIB: replace and delete act on this slot."""

    table: int
    dst: IPv4Network
    tos: int = 0
    priority: int = 0


@dataclass(frozen=True)
class _Route:
    """Everything about a route that apply compares; `extras` names unexpected attributes."""

    oif: int
    gateway: IPv4Address | None
    prefsrc: IPv4Address | None
    scope: int
    type: int = _RTN_UNICAST
    onlink: bool = False
    extras: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _DesiredRoute:
    key: _RouteKey
    route: _Route
    interface: str

    def describe(self) -> str:
        dst = "default" if self.key.dst.prefixlen == 0 else str(self.key.dst)
        via = f" via {self.route.gateway}" if self.route.gateway else ""
        src = f" src {self.route.prefsrc}" if self.route.prefsrc else ""
        return f"{dst}{via} dev {self.interface}{src} in table {self.key.table}"


@dataclass(frozen=True)
class _SeenRoute:
    key: _RouteKey
    route: _Route
    delete_spec: dict[str, Any]


@dataclass(frozen=True, order=True)
class _Rule:
    """An owned rule as apply compares it; `plain` is False when it has other selectors.

    The protocol is set on the rules smartnatd adds (for `ip rule` readers) but not compared:
    an identical rule added by hand serves just as well.
    """

    priority: int
    mark: int
    mask: int
    table: int
    invert: bool = False
    suppress_prefixlen: int = _NO_SUPPRESS
    plain: bool = True

    def describe(self) -> str:
        inverted = "not " if self.invert else ""
        lookup = "main" if self.table == _RT_TABLE_MAIN else str(self.table)
        suppress = f" suppress_prefixlength {self.suppress_prefixlen}" if self.suppress_prefixlen != _NO_SUPPRESS else ""
        return f"{self.priority}: {inverted}fwmark {self.mark:#x}/{self.mask:#x} lookup {lookup}{suppress}"


@dataclass(frozen=True)
class _SeenRule:
    rule: _Rule
    delete_spec: dict[str, Any]


class RoutingEdge:
    """Owns the fwmark rules and per-interface tables; one netlink socket, opened once.

    apply() and cleanup() must not run concurrently: the reconciler runs one pass at a time.
    """

    def __init__(self, *, netns: str | None, table_base: int, rule_priority: int) -> None:
        # Tables 253-255 are default/main/local and 0 is "unspecified": the range must avoid them.
        if not 256 <= table_base <= 2**32 - 1 - TABLE_SPAN:
            raise ValueError(f"table_base {table_base} must be within 256-{2**32 - 1 - TABLE_SPAN}")
        if not 1 <= rule_priority <= 32765:
            raise ValueError(f"rule_priority {rule_priority} must be within 1-32765 (before the main table's rule)")
        self._netns = netns
        self._table_base = table_base
        self._rule_priority = rule_priority
        # Priority 0 (when rule_priority is 1) still comes after the local table's rule: the
        # kernel appends a rule after those of equal priority.
        self._main_first_rule = _Rule(
            priority=rule_priority - 1, mark=EGRESS_MARK, mask=EGRESS_MARK, table=_RT_TABLE_MAIN, suppress_prefixlen=0
        )
        self._ipr: AsyncIPRoute | None = None

    @property
    def tables(self) -> range:
        return range(self._table_base, self._table_base + TABLE_SPAN)

    async def open(self) -> None:
        if self._ipr is not None:
            return
        # flags=0: a missing namespace is an error instead of being created empty.
        ipr = AsyncIPRoute(netns=self._netns, flags=0)
        try:
            # The socket is created lazily; create it now so a bad netns fails here, not mid-pass.
            await ipr.setup_endpoint()
        except BaseException:
            ipr.close()
            raise
        self._ipr = ipr

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- public operations -------------------------------------------------------------

    async def apply(self, paths: Sequence[ReturnPath], *, specific_routes_first: bool = False) -> RoutingReport:
        """Make the owned rules and routes equal `paths`; returns what changed.

        specific_routes_first: marked packets take a specific route of the main table before
        their interface's table (the `suppress_prefixlength 0` rule); see the module docstring.

        Order keeps traffic flowing: tables are filled before their rules appear, and stale
        rules go before the routes of their tables. A failing path does not stop the others;
        every failure is reported together at the end.
        """
        desired_routes, desired_rules = self._desired(paths, specific_routes_first=specific_routes_first)
        seen_routes = await self._owned_routes()
        seen_rules = await self._owned_rules()
        failures: list[str] = []
        failed_tables: set[int] = set()
        down_tables: set[int] = set()  # their link is down: the kernel takes no route through it
        added = replaced = deleted = 0

        seen_by_key: dict[_RouteKey, list[_SeenRoute]] = {}
        for seen in seen_routes:
            seen_by_key.setdefault(seen.key, []).append(seen)
        for want in desired_routes:
            slot = seen_by_key.get(want.key, [])
            if want.key.table in down_tables or (len(slot) == 1 and slot[0].route == want.route):
                continue
            try:
                if len(slot) > 1:
                    # Routes appended to one slot (`ip route append`): replace would change
                    # just one of them, so empty the slot first.
                    for seen in slot:
                        await self._delete_route(seen)
                if not await self._replace_route(want):
                    down_tables.add(want.key.table)
                    logger.info(
                        "routes of %s left out: the link is down; they are restored when it is back up",
                        want.interface,
                    )
                    continue
            except NetlinkApplyError as err:
                failures.append(str(err))
                failed_tables.add(want.key.table)
                continue
            if slot:
                replaced += 1
            else:
                added += 1

        present_rules = {seen_rule.rule for seen_rule in seen_rules}
        stale_rules = [seen_rule for seen_rule in seen_rules if seen_rule.rule not in desired_rules]
        # A new rule for a table that had a different owned rule is one change: replaced.
        replacing: set[int] = set()
        for rule, owner in desired_rules.items():
            if rule in present_rules:
                continue
            if rule.table in failed_tables:
                # Its table is incomplete: keep any old rule of that table rather than none.
                stale_rules = [stale for stale in stale_rules if stale.rule.table != rule.table]
                continue
            try:
                await self._add_rule(rule, owner=owner)
            except NetlinkApplyError as err:
                failures.append(str(err))
                stale_rules = [stale for stale in stale_rules if stale.rule.table != rule.table]
                continue
            if any(stale.rule.table == rule.table for stale in stale_rules):
                replacing.add(rule.table)
                replaced += 1
            else:
                added += 1

        for stale_rule in stale_rules:
            try:
                gone = await self._delete_rule(stale_rule)
            except NetlinkApplyError as err:
                failures.append(str(err))
                continue
            if stale_rule.rule.table in replacing:
                replacing.discard(stale_rule.rule.table)  # the other half of a replacement
            elif gone:
                deleted += 1

        wanted_keys = {want.key for want in desired_routes}
        for seen in seen_routes:
            if seen.key in wanted_keys:
                continue
            try:
                if await self._delete_route(seen):
                    deleted += 1
            except NetlinkApplyError as err:
                failures.append(str(err))

        report = RoutingReport(added=added, replaced=replaced, deleted=deleted)
        if report.changes:
            logger.debug(
                "routing applied added=%d replaced=%d deleted=%d", report.added, report.replaced, report.deleted
            )
        if failures:
            raise NetlinkApplyError("; ".join(failures))
        return report

    async def cleanup(self) -> RoutingReport:
        """Delete every owned rule, then every owned route."""
        failures: list[str] = []
        deleted = 0
        for seen_rule in await self._owned_rules():
            try:
                deleted += await self._delete_rule(seen_rule)
            except NetlinkApplyError as err:
                failures.append(str(err))
        for seen_route in await self._owned_routes():
            try:
                deleted += await self._delete_route(seen_route)
            except NetlinkApplyError as err:
                failures.append(str(err))
        if failures:
            raise NetlinkApplyError("; ".join(failures))
        return RoutingReport(deleted=deleted)

    # ---- desired state -----------------------------------------------------------------

    def _desired(
        self, paths: Iterable[ReturnPath], *, specific_routes_first: bool
    ) -> tuple[list[_DesiredRoute], dict[_Rule, str]]:
        routes: list[_DesiredRoute] = []
        rules: dict[_Rule, str] = {}
        tables: dict[int, str] = {}
        paths = sorted(paths)
        if specific_routes_first and paths:
            # First in the dict, so it is added before the fwmark rules it must precede.
            rules[self._main_first_rule] = "main table"
        for path in paths:
            # A path outside the owned range could never be found again: that is a planner bug.
            if path.table not in self.tables:
                raise ValueError(f"return path of {path.interface}: table {path.table} outside {self.tables}")
            if path.mark == 0 or path.mark & ~MARK_MASK:
                raise ValueError(f"return path of {path.interface}: mark {path.mark:#x} not inside {MARK_MASK:#x}")
            if tables.setdefault(path.table, path.interface) != path.interface:
                raise ValueError(f"return paths of {tables[path.table]} and {path.interface} share table {path.table}")
            # The connected route first: the kernel checks the gateway against the table.
            routes.append(
                _DesiredRoute(
                    key=_RouteKey(table=path.table, dst=path.network),
                    route=_Route(oif=path.ifindex, gateway=None, prefsrc=path.source, scope=_RT_SCOPE_LINK),
                    interface=path.interface,
                )
            )
            routes.append(
                _DesiredRoute(
                    key=_RouteKey(table=path.table, dst=IPv4Network("0.0.0.0/0")),
                    route=_Route(oif=path.ifindex, gateway=path.gateway, prefsrc=None, scope=_RT_SCOPE_UNIVERSE),
                    interface=path.interface,
                )
            )
            rules[_Rule(priority=self._rule_priority, mark=path.mark, mask=MARK_MASK, table=path.table)] = (
                f"interface {path.interface}"
            )
        return routes, rules

    # ---- kernel state ------------------------------------------------------------------

    @property
    def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("RoutingEdge is not open; call open() or use it as an async context manager")
        return self._ipr

    async def _owned_routes(self) -> list[_SeenRoute]:
        seen: list[_SeenRoute] = []
        try:
            async for msg in await self._socket.route("dump", family=AF_INET):
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                if msg["proto"] != ROUTE_PROTO or table not in self.tables:
                    continue
                seen.append(_parse_route(msg, table=table))
        except (NetlinkError, OSError) as err:
            raise NetlinkApplyError(f"could not list routes: {_describe(err)}") from err
        return seen

    async def _owned_rules(self) -> list[_SeenRule]:
        seen: list[_SeenRule] = []
        try:
            async for msg in await self._socket.rule("dump", family=AF_INET):
                table = msg.get_attr("FRA_TABLE") or msg["table"]
                priority = msg.get_attr("FRA_PRIORITY", 0)
                mark = msg.get_attr("FRA_FWMARK")
                if priority == self._rule_priority:
                    if mark is None or mark & ~MARK_MASK or table not in self.tables:
                        continue
                elif priority == self._main_first_rule.priority:
                    # Ours by its selector.
                    main_first = self._main_first_rule
                    if (
                        (mark or 0) != main_first.mark
                        or msg.get_attr("FRA_FWMASK") != main_first.mask
                        or table != main_first.table
                    ):
                        continue
                else:
                    continue
                seen.append(_parse_rule(msg, table=table, priority=priority, mark=mark or 0))
        except (NetlinkError, OSError) as err:
            raise NetlinkApplyError(f"could not list ip rules: {_describe(err)}") from err
        return seen

    async def _replace_route(self, want: _DesiredRoute) -> bool:
        """Creates or overwrites the route; False when its link is down (the kernel refuses it)."""
        spec: dict[str, Any] = {
            "family": AF_INET,
            "table": want.key.table,
            "dst": str(want.key.dst.network_address),
            "dst_len": want.key.dst.prefixlen,
            "oif": want.route.oif,
            "scope": want.route.scope,
            "proto": ROUTE_PROTO,
            "type": _RTN_UNICAST,
        }
        if want.route.gateway is not None:
            spec["gateway"] = str(want.route.gateway)
        if want.route.prefsrc is not None:
            spec["prefsrc"] = str(want.route.prefsrc)
        try:
            # "replace" creates or overwrites the (table, dst, tos, metric) slot in one call, so
            # a route someone else put at exactly our slot in our table is taken over.
            await self._socket.route("replace", **spec)
        except (NetlinkError, OSError) as err:
            if _code(err) == errno.ENETDOWN:
                return False
            raise NetlinkApplyError(
                f"interface {want.interface}: could not set route {want.describe()}: {_describe(err)}"
            ) from err
        logger.debug("route set %s", want.describe())
        return True

    async def _delete_route(self, seen: _SeenRoute) -> bool:
        try:
            await self._socket.route("del", **seen.delete_spec)
        except NetlinkError as err:
            if err.code in _GONE:
                return False
            raise NetlinkApplyError(
                f"table {seen.key.table}: could not delete stale route to {seen.key.dst}: {_describe(err)}"
            ) from err
        except OSError as err:
            raise NetlinkApplyError(
                f"table {seen.key.table}: could not delete stale route to {seen.key.dst}: {_describe(err)}"
            ) from err
        logger.debug("route deleted table=%d dst=%s", seen.key.table, seen.key.dst)
        return True

    async def _add_rule(self, rule: _Rule, *, owner: str) -> None:
        spec: dict[str, Any] = {
            "family": AF_INET,
            "priority": rule.priority,
            "fwmark": rule.mark,
            "fwmask": rule.mask,
            "table": rule.table,
            "action": _FR_ACT_TO_TBL,
            "protocol": ROUTE_PROTO,
        }
        if rule.invert:
            spec["flags"] = _FIB_RULE_INVERT
        if rule.suppress_prefixlen != _NO_SUPPRESS:
            spec["suppress_prefixlen"] = rule.suppress_prefixlen
        try:
            await self._socket.rule("add", **spec)
        except NetlinkError as err:
            if err.code == errno.EEXIST:
                return  # appeared since the dump (a concurrent apply): the state is as wanted
            raise NetlinkApplyError(f"{owner}: could not add rule {rule.describe()}: {_describe(err)}") from err
        except OSError as err:
            raise NetlinkApplyError(f"{owner}: could not add rule {rule.describe()}: {_describe(err)}") from err
        logger.debug("rule added %s", rule.describe())

    async def _delete_rule(self, seen: _SeenRule) -> bool:
        try:
            await self._socket.rule("del", **seen.delete_spec)
        except NetlinkError as err:
            if err.code in _GONE:
                return False
            raise NetlinkApplyError(
                f"table {seen.rule.table}: could not delete stale rule {seen.rule.describe()}: {_describe(err)}"
            ) from err
        except OSError as err:
            raise NetlinkApplyError(
                f"table {seen.rule.table}: could not delete stale rule {seen.rule.describe()}: {_describe(err)}"
            ) from err
        logger.debug("rule deleted %s", seen.rule.describe())
        return True


def _parse_route(msg: Any, *, table: int) -> _SeenRoute:
    dst_len = msg["dst_len"]
    dst = IPv4Network(f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{dst_len}", strict=False)
    priority = msg.get_attr("RTA_PRIORITY") or 0
    gateway = msg.get_attr("RTA_GATEWAY")
    prefsrc = msg.get_attr("RTA_PREFSRC")
    names = {name for name, _ in msg["attrs"]}
    route = _Route(
        oif=msg.get_attr("RTA_OIF") or 0,
        gateway=IPv4Address(gateway) if gateway else None,
        prefsrc=IPv4Address(prefsrc) if prefsrc else None,
        scope=msg["scope"],
        type=msg["type"],
        onlink=bool(msg["flags"] & _RTNH_F_ONLINK),
        extras=frozenset(names - _ROUTE_ATTRS),
    )
    key = _RouteKey(table=table, dst=dst, tos=msg["tos"], priority=priority)
    # Delete exactly this route: same slot, and our protocol so a foreign twin never matches.
    delete_spec: dict[str, Any] = {
        "family": AF_INET,
        "table": table,
        "dst": str(dst.network_address),
        "dst_len": dst_len,
        "tos": key.tos,
        "priority": priority,
        "proto": ROUTE_PROTO,
        "type": route.type,
        "scope": route.scope,
    }
    return _SeenRoute(key=key, route=route, delete_spec=delete_spec)


def _parse_rule(msg: Any, *, table: int, priority: int, mark: int) -> _SeenRule:
    attrs = dict(msg["attrs"])
    extras = set(attrs) - _RULE_ATTRS
    # The kernel always dumps the suppress attributes; "unset" is all ones. The prefix length
    # is compared as a field, the interface group makes a rule odd.
    if attrs.get("FRA_SUPPRESS_IFGROUP", _NO_SUPPRESS) == _NO_SUPPRESS:
        extras.discard("FRA_SUPPRESS_IFGROUP")
    plain = (
        not extras
        and msg["action"] == _FR_ACT_TO_TBL
        and msg["src_len"] == 0
        and msg["dst_len"] == 0
        and msg["tos"] == 0
        and msg["flags"] & ~_FIB_RULE_INVERT == 0
    )
    rule = _Rule(
        priority=priority,
        mark=mark,
        mask=attrs.get("FRA_FWMASK", 0xFFFFFFFF),
        table=table,
        invert=bool(msg["flags"] & _FIB_RULE_INVERT),
        suppress_prefixlen=attrs.get("FRA_SUPPRESS_PREFIXLEN", _NO_SUPPRESS),
        plain=plain,
    )
    # The kernel deletes the first rule matching every selector given: give all we saw so a
    # plain twin of an odd rule (or the reverse) is never deleted by mistake.
    delete_spec: dict[str, Any] = {
        "family": AF_INET,
        "priority": priority,
        "fwmark": mark,
        "fwmask": rule.mask,
        "table": table,
        "action": msg["action"],
        "tos": msg["tos"],
        "flags": msg["flags"],
    }
    if attrs.get("FRA_PROTOCOL"):
        delete_spec["protocol"] = attrs["FRA_PROTOCOL"]
    if rule.suppress_prefixlen != _NO_SUPPRESS:
        delete_spec["suppress_prefixlen"] = rule.suppress_prefixlen
    for name, key in (("FRA_SRC", "src"), ("FRA_DST", "dst"), ("FRA_IIFNAME", "iifname"), ("FRA_OIFNAME", "oifname")):
        if name in attrs:
            delete_spec[key] = attrs[name]
    if "FRA_SRC" in attrs:
        delete_spec["src_len"] = msg["src_len"]
    if "FRA_DST" in attrs:
        delete_spec["dst_len"] = msg["dst_len"]
    return _SeenRule(rule=rule, delete_spec=delete_spec)


def _code(err: BaseException) -> Any:
    return getattr(err, "code", None) or getattr(err, "errno", None)


def _describe(err: BaseException) -> str:
    code = _code(err)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{os.strerror(code)} ({errno.errorcode[code]})"
    return str(err) or type(err).__name__
