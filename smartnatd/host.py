"""The box's external interfaces and their IPv4 addresses, and every IPv4 address local to
the box: a source, like a Kubernetes watch.

discover() reads links and addresses once. HostWatcher keeps a current Host: it subscribes to
link and IPv4 address events, re-discovers after each burst of them (plus a periodic safety
refresh) and calls on_change() when what it saw differs. It never touches the kernel state.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
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
_IFA_F_SECONDARY = 0x1
# RFC 2863 states in which an interface passes packets; UNKNOWN is what drivers without
# carrier reporting (dummy, some virtual NICs) show while working.
_OPER_UP = {"UP", "UNKNOWN"}


async def discover(
    ipr: AsyncIPRoute, *, pattern: InterfacePattern, default_gw_interface: str, own_namespace: bool = False
) -> Host:
    """External interfaces: names matching `pattern` anywhere, except the default gateway's;
    and every IPv4 address local to the box, on any interface, as `local_addresses`.

    `pattern.search` keeps SmartNat's Go regexp.MatchString semantics (unanchored). Addresses
    are IPv4 only, primaries before secondaries, otherwise in the kernel's order; interfaces
    are sorted by name so equal states compare equal.
    """
    links: dict[int, tuple[str, bool]] = {}
    async for msg in await ipr.link("dump"):
        name = msg.get_attr("IFLA_IFNAME")
        if not name or name == default_gw_interface or not pattern.search(name):
            continue
        up = bool(msg["flags"] & _IFF_UP) and msg.get_attr("IFLA_OPERSTATE") in _OPER_UP
        links[msg["index"]] = (name, up)

    addresses: dict[int, list[tuple[bool, IPv4Interface]]] = {index: [] for index in links}
    everywhere: set[IPv4Address] = set()
    async for msg in await ipr.addr("dump", family=AF_INET):
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point links.
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if local:
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


IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def read_ip_forward(path: Path = IP_FORWARD) -> bool | None:
    """Whether this network namespace forwards IPv4 (None when it cannot be read)."""
    try:
        return path.read_text().strip() != "0"
    except OSError:
        return None


class HostWatcher:
    """Keeps `host` current and calls `on_change()` each time it differs from the last one.

    The first discovery counts as a change (from nothing) and sets `synced`.
    """

    def __init__(
        self,
        *,
        netns: str | None,
        pattern: InterfacePattern,
        default_gw_interface: str,
        on_change: Callable[[], None],
        refresh_period: float,
    ) -> None:
        if refresh_period <= 0:
            raise ValueError(f"refresh_period {refresh_period} must be positive")
        self._netns = netns
        self._pattern = pattern
        self._default_gw_interface = default_gw_interface
        self._on_change = on_change
        self._refresh_period = refresh_period
        self._host: Host | None = None
        self.synced = asyncio.Event()

    @property
    def host(self) -> Host | None:
        return self._host

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
                        async with asyncio.timeout(self._refresh_period):
                            await wake.wait()
                    except TimeoutError:
                        pass  # periodic safety refresh, in case an event was lost
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
                    async for _ in sock.get():
                        # Any link or IPv4 address message, of any interface (an address on the
                        # cluster side or on lo matters too); discovery decides whether it mattered.
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

    async def _refresh(self, dumper: AsyncIPRoute) -> None:
        host = await discover(
            dumper, pattern=self._pattern, default_gw_interface=self._default_gw_interface,
            own_namespace=self._netns is None,
        )
        if host == self._host:
            return
        previous, self._host = self._host, host
        logger.info("host interfaces changed %s", _summary(host))
        if previous is not None:
            logger.debug("host interfaces were %s", _summary(previous))
        self.synced.set()
        self._on_change()


def _code(err: BaseException) -> Any:
    return getattr(err, "code", None) or getattr(err, "errno", None)


def _summary(host: Host) -> str:
    interfaces = " ".join(
        f"{iface.name}={'up' if iface.up else 'down'}:{','.join(str(a) for a in iface.addresses) or '-'}"
        for iface in host.interfaces
    ) or "none"
    local = ",".join(str(a) for a in sorted(host.local_addresses)) or "-"
    return f"{interfaces} local={local}"
