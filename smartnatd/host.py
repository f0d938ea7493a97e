"""The box's external interfaces and their IPv4 addresses, and every IPv4 address local to
the box: a source, like a Kubernetes watch.

discover() reads links and addresses once. HostWatcher keeps a current Host: it subscribes to
link and IPv4 address events, re-discovers after each burst of them (plus a periodic safety
refresh) and calls on_change() when what it saw differs. It never touches the kernel state.

Link-down hold: an external interface that was reported up and goes down (administratively
or without carrier) is still reported up, with the addresses it has, until it has stayed down
for `link_down_hold` seconds. Back up within that time, nothing is reported, so a short flap
re-plans nothing and deletes no connection; on_link_bounce() is called instead, because an
administrative down made the kernel delete every route through the link (smartnatd's
per-interface table included) and someone must put them back. Removal of the link, a new
ifindex or name, and address changes are never held.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from socket import AF_INET
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK

from smartnatd.model import Host, HostInterface
from smartnatd.settings import InterfacePattern

logger = logging.getLogger(__name__)

_IFF_UP = 0x1
_IFF_LOWER_UP = 0x10000  # carrier
_IFA_F_SECONDARY = 0x1
# RFC 2863 states in which an interface passes packets; UNKNOWN is what drivers without
# carrier reporting (dummy, some virtual NICs) show while working.
_OPER_UP = {"UP", "UNKNOWN"}
# kube-proxy in IPVS mode (`mode: service`) binds every ClusterIP, external IP and load-balancer
# address of the cluster to this dummy interface of the box: the Services' virtual addresses,
# which IPVS takes at local-in, not the box's own. Counted as local, they would refuse every
# `mode: service` target, and each Service created anywhere would re-plan every Mapping.
_KUBE_IPVS = "kube-ipvs0"


async def discover(
    ipr: AsyncIPRoute, *, pattern: InterfacePattern, default_gw_interface: str, own_namespace: bool = False
) -> Host:
    """External interfaces: names matching `pattern` anywhere, except the default gateway's;
    and every IPv4 address local to the box, on any interface but kube-proxy's kube-ipvs0, as
    `local_addresses`.

    `pattern.search` keeps SmartNat's Go regexp.MatchString semantics (unanchored). Addresses
    are IPv4 only, primaries before secondaries, otherwise in the kernel's order; interfaces
    are sorted by name so equal states compare equal.
    """
    links: dict[int, tuple[str, bool]] = {}
    virtual: set[int] = set()  # kube-ipvs0's ifindex
    async for msg in await ipr.link("dump"):
        name = msg.get_attr("IFLA_IFNAME")
        if name == _KUBE_IPVS:
            virtual.add(msg["index"])
        if not name or name == default_gw_interface or not pattern.search(name):
            continue
        links[msg["index"]] = (name, _link_up(msg))

    addresses: dict[int, list[tuple[bool, IPv4Interface]]] = {index: [] for index in links}
    everywhere: set[IPv4Address] = set()
    async for msg in await ipr.addr("dump", family=AF_INET):
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point links.
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if local and msg["index"] not in virtual:
            everywhere.add(IPv4Address(local))  # on any interface: never a DNAT target
        found = addresses.get(msg["index"])
        if found is None:
            continue  # not an external interface, or a link created after the link dump
        flags = msg.get_attr("IFA_FLAGS")
        secondary = bool((msg["flags"] if flags is None else flags) & _IFA_F_SECONDARY)
        found.append((secondary, IPv4Interface(f"{local}/{msg['prefixlen']}")))

    interfaces = [
        HostInterface(
            name=name,
            index=index,
            # A stable sort: primaries first, the kernel's order otherwise.
            addresses=tuple(address for _, address in sorted(addresses[index], key=lambda pair: pair[0])),
            up=up,
        )
        for index, (name, up) in links.items()
    ]
    return Host(
        interfaces=tuple(sorted(interfaces, key=lambda iface: (iface.name, iface.index))),
        # /proc/sys/net is the reading process's own namespace: known only when `ipr` is in it.
        forwarding=read_ip_forward() if own_namespace else None,
        local_addresses=frozenset(everywhere),
    )


def _link_up(msg: Any) -> bool:
    return bool(msg["flags"] & _IFF_UP) and msg.get_attr("IFLA_OPERSTATE") in _OPER_UP


def _link_down_now(msg: Any) -> bool:
    """Down by the flags of a link event. Not by its operstate: that lags (a link coming up is
    announced as up with the old operstate, then again when the state catches up)."""
    return msg["flags"] & (_IFF_UP | _IFF_LOWER_UP) != _IFF_UP | _IFF_LOWER_UP


IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def read_ip_forward(path: Path = IP_FORWARD) -> bool | None:
    """Whether this network namespace forwards IPv4 (None when it cannot be read)."""
    try:
        return path.read_text().strip() != "0"
    except OSError:
        return None


@dataclass(frozen=True)
class LinkState:
    """An external interface as the watcher reports it, for smartnat_external_interface_up and
    smartnat_external_interface_held."""

    name: str
    up: bool  # reported up: up, or down but still held
    held: bool  # down, but reported up until its hold runs out


@dataclass(frozen=True)
class _Hold:
    """An interface reported up while it is down, since `since` (the watcher's clock)."""

    name: str
    since: float


class HostWatcher:
    """Keeps `host` current and calls `on_change()` each time it differs from the last one.

    The first discovery counts as a change (from nothing) and sets `synced`. See the module
    docstring for `link_down_hold` and `on_link_bounce`.
    """

    def __init__(
        self,
        *,
        netns: str | None,
        pattern: InterfacePattern,
        default_gw_interface: str,
        on_change: Callable[[], None],
        refresh_period: float,
        link_down_hold: float = 0.0,
        on_link_bounce: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_period <= 0:
            raise ValueError(f"refresh_period {refresh_period} must be positive")
        if link_down_hold < 0:
            raise ValueError(f"link_down_hold {link_down_hold} must not be negative")
        self._netns = netns
        self._pattern = pattern
        self._default_gw_interface = default_gw_interface
        self._on_change = on_change
        self._refresh_period = refresh_period
        self._hold_time = link_down_hold
        self._on_link_bounce = on_link_bounce
        self._clock = clock
        self._host: Host | None = None
        self._holds: dict[int, _Hold] = {}  # ifindex -> hold, for interfaces reported up while down
        # Ifindexes a link event showed down since the last discovery: a flap quicker than the
        # discovery still bounced the link (and cost it its routes) though both dumps saw it up.
        self._went_down: set[int] = set()
        self._links: tuple[LinkState, ...] = ()
        self.synced = asyncio.Event()

    @property
    def host(self) -> Host | None:
        return self._host

    @property
    def links(self) -> tuple[LinkState, ...]:
        """Each external interface of the current Host: whether it is reported up and whether
        that is a hold. Empty before the first discovery. Replaced whole after each discovery,
        never changed in place: /metrics reads it from a thread of its own."""
        return self._links

    async def run(self) -> None:
        """Discover, then follow link/address events until cancelled."""
        wake = asyncio.Event()
        # Two sockets: events carry the sequence number of whoever made the change, so on a
        # socket that also sends requests one could be taken for a reply to our own dump.
        events = await self._subscribe()
        try:
            async with AsyncIPRoute(netns=self._netns, flags=0) as dumper, asyncio.TaskGroup() as tasks:
                tasks.create_task(self._listen(events, wake))
                # Subscribed before the first dump: a change racing with it still wakes us.
                while True:
                    wake.clear()
                    await self._refresh(dumper)
                    try:
                        async with asyncio.timeout(self._next_wake()):
                            await wake.wait()
                    except TimeoutError:
                        pass  # a hold ran out, or the periodic safety refresh (an event was lost)
        finally:
            events.close()  # normally closed by _listen already; closing twice is harmless

    async def _subscribe(self) -> AsyncIPRoute:
        sock = AsyncIPRoute(netns=self._netns, flags=0)
        try:
            # bind() must come before any request: the socket autobinds on its first send.
            await sock.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _listen(self, sock: AsyncIPRoute, wake: asyncio.Event) -> None:
        try:
            while True:
                try:
                    async for msg in sock.get():
                        # Any link or IPv4 address message, of any interface (an address on the
                        # cluster side or on lo matters too); discovery decides whether it mattered.
                        if msg.get("event") == "RTM_NEWLINK" and _link_down_now(msg):
                            self._went_down.add(msg["index"])
                        wake.set()
                except (NetlinkError, OSError) as err:
                    if _code(err) != errno.ENOBUFS:
                        raise
                    # The kernel dropped events because we read too slowly, and the socket is
                    # unusable after that: subscribe again and re-discover everything.
                    logger.warning("host events overflowed; resubscribing and rediscovering")
                    sock.close()
                    sock = await self._subscribe()
                    wake.set()
        finally:
            sock.close()

    def _next_wake(self) -> float:
        """Seconds until the next discovery without an event: the periodic refresh, or sooner
        the end of a hold (a link that stays down sends no event when its hold runs out)."""
        left = [self._refresh_period]
        left += [hold.since + self._hold_time - self._clock() for hold in self._holds.values()]
        return max(0.0, min(left))

    async def _refresh(self, dumper: AsyncIPRoute) -> None:
        # Taken before the dump: an event arriving during it wakes us for one more discovery.
        went_down, self._went_down = self._went_down, set()
        seen = await discover(
            dumper, pattern=self._pattern, default_gw_interface=self._default_gw_interface,
            own_namespace=self._netns is None,
        )
        host, bounced = self._held(seen, went_down=went_down)
        # Every discovery: a hold starting changes it without changing the reported Host.
        self._links = tuple(
            LinkState(name=iface.name, up=iface.up, held=iface.index in self._holds) for iface in host.interfaces
        )
        if bounced and self._on_link_bounce is not None:
            self._on_link_bounce()
        if host == self._host:
            return
        previous, self._host = self._host, host
        logger.info("host interfaces changed %s", _summary(host))
        if previous is not None:
            logger.debug("host interfaces were %s", _summary(previous))
        self.synced.set()
        self._on_change()

    def _held(self, seen: Host, *, went_down: set[int]) -> tuple[Host, bool]:
        """`seen` with the interfaces under a hold reported up; and whether a reported-up link
        went down and came back (its routes need restoring)."""
        was = {iface.index: iface for iface in self._host.interfaces} if self._host else {}
        now = self._clock()
        bounced = False
        present = {iface.index: iface.name for iface in seen.interfaces}
        for index, ended in list(self._holds.items()):
            if present.get(index) != ended.name:
                # Deleted, renamed, or re-created under a new ifindex: reported at once.
                del self._holds[index]
                logger.info("%s gone while held; reporting it at once", ended.name)
        interfaces: list[HostInterface] = []
        for iface in seen.interfaces:
            before = was.get(iface.index)
            reported_up = before is not None and before.up and before.name == iface.name
            hold = self._holds.get(iface.index)
            if iface.up:
                if hold is not None:
                    del self._holds[iface.index]
                    logger.info("%s up again after %.1fs; state kept", iface.name, now - hold.since)
                    bounced = True
                elif reported_up and iface.index in went_down:
                    logger.info("%s went down and up again; state kept", iface.name)
                    bounced = True
            elif reported_up and self._hold_time > 0:
                if hold is None:
                    hold = self._holds[iface.index] = _Hold(name=iface.name, since=now)
                    logger.info("%s down; holding its state for %gs", iface.name, self._hold_time)
                if now - hold.since < self._hold_time:
                    # As it was, but with the addresses it has now: address changes are never held.
                    interfaces.append(replace(iface, up=True))
                    continue
                del self._holds[iface.index]
                logger.info("%s still down after %gs; reporting it down", iface.name, self._hold_time)
            interfaces.append(iface)
        return replace(seen, interfaces=tuple(interfaces)), bounced


def _code(err: BaseException) -> Any:
    return getattr(err, "code", None) or getattr(err, "errno", None)


def _summary(host: Host) -> str:
    interfaces = " ".join(
        f"{iface.name}={'up' if iface.up else 'down'}:{','.join(str(a) for a in iface.addresses) or '-'}"
        for iface in host.interfaces
    ) or "none"
    local = ",".join(str(a) for a in sorted(host.local_addresses)) or "-"
    return f"{interfaces} local={local}"
