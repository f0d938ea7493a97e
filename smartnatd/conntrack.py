"""Stale-flow cleanup after a successful apply: delete only the flows the new plan says must stop.

nftables DNATs only the first packet of a connection; every later packet follows the conntrack
entry. So after a Mapping is removed, loses a target or narrows its allowed sources, flows set up
under the old rules keep going where they went (a long-lived UDP flow to a removed pod for ever).
This module computes which flows are stale (`stale_flow_filters`, pure) and deletes exactly those
(`ConntrackEdge`). It never flushes the table: flows the plan still allows keep running through
restarts and resyncs (kubernetes/kubernetes:pkg/proxy/conntrack/cleanup.go does the same).
A pod's hairpin flow (a pod calling a Mapping's external endpoint through the box, masqueraded,
conntrack mark HAIRPIN_MARK) is a flow to that endpoint like a client's: the filters select by
original destination, reply source and original source, never by mark, so they take it too.

Pods' own connections through the box (egress SNAT) follow their conntrack entry the same way:
the entry holds the mark that routes them (their interface's) and the address they were SNATed
to. When a pod's egress entry changes (its interface came back with a new ifindex, its Mapping's
address moved, another Mapping took the pod), `stale_egress_filters` names the flows made
under the old entry and `ConntrackEdge.delete_egress` deletes them; the next packet starts over
under the new rules. A pod left with no entry (terminating, not ready) keeps its open flows
while their interface's mark is still one: they finish as they began. Only the packet mark
carries EGRESS_MARK, not the conntrack mark, so an egress flow is told by what only the egress
rules make: original source a pod, conntrack mark an interface's, replies addressed to the
egress address it was SNATed to. Clients' flows (replies go to the client), pods' hairpin flows
(DNATed) and the box's own (original source the box) never match.

Kernel mechanism (pyroute2 0.9.7; its sync `Conntrack` fails inside a running event loop, so
`AsyncConntrack(netns=…, flags=0)`, opened once):
- selecting: a dump filtered kernel-side by a partial original tuple (CTA_FILTER, kernel >= 5.8;
  older kernels ignore the filter and every entry is checked again here anyway). Entries are
  read by `_parse_flow`, plugged in as a per-request parser: pyroute2's generic decoding costs
  ~0.2 ms per entry and its ConntrackEntry drops SCTP ports;
- deleting a group of flows sharing a key: one CT_DELETE carrying a partial tuple plus CTA_FILTER
  (kernel >= 6.11). Older kernels refuse it (EOPNOTSUPP, or EINVAL before 5.8) without deleting
  anything; `open()` probes it once with a tuple no flow can have and falls back if refused;
- deleting single flows: CT_DELETE with the full original tuple and the entry's CTA_ID, so a new
  connection that reused the tuple since the dump is left alone; ENOENT means already gone.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from types import TracebackType
from typing import Any, Self

from pyroute2 import AsyncConntrack
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    NFCTAttrTuple,
    nfct_msg,
)
from pyroute2.netlink.nlsocket import NetlinkRequest

from smartnatd.desired import MARK_MASK, DesiredState, Dnat, EgressSnat, ExternalEndpoint, Target
from smartnatd.errors import NetlinkApplyError
from smartnatd.model import Protocol

logger = logging.getLogger(__name__)

_IPPROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: socket.IPPROTO_SCTP}
_PROTOCOL = {number: protocol for protocol, number in _IPPROTO.items()}

# A filtered dump makes the kernel walk the whole table (~0.5 us per entry measured); a full dump
# costs ~20 us per entry to parse here. Past this many endpoints one full dump is cheaper.
_FULL_DUMP_MIN_FILTERS = 32
# A kernel-side filtered delete walks the whole table too, while a single delete is a hash lookup
# costing ~0.3 ms of netlink round trip here. A group of flows goes to the kernel in one call
# when it has at least max(_KERNEL_GROUP_MIN, table size / _WALK_PER_LOOKUP) flows.
_KERNEL_GROUP_MIN = 16
_WALK_PER_LOOKUP = 500

# An egress flow's status: SNATed (to the egress address), never DNATed (that is a client's flow,
# or a pod's to a Mapping of the box). Value, mask, as CTA_STATUS and CTA_STATUS_MASK.
_EGRESS_STATUS = (IPS_SRC_NAT, IPS_SRC_NAT | IPS_DST_NAT)

# How a kernel without filtered delete refuses one: 6.x before 6.11 / before 5.8.
_NO_FILTERED_DELETE = {errno.EOPNOTSUPP, errno.EINVAL}


@dataclass(frozen=True)
class FlowFilter:
    """Which flows to one external endpoint must stop.

    keep_targets None: every flow to `external` (its Mapping is gone; keep_sources is ignored).
    Otherwise a flow is deleted when its reply source is not one of keep_targets (the target it
    was DNATed to is no longer wanted, or it was never DNATed), or when keep_sources is not None
    and its original source lies outside every network of keep_sources.

    check_targets False (a virtual target, Dnat.virtual_target): the reply source is whatever
    the next NAT layer chose, so it says nothing about keep_targets; only flows never DNATed
    (reply source = `external` itself) and flows from sources outside keep_sources are deleted.

    lost_targets, set by stale_flow_filters from a diff of two applied plans: the targets the
    old plan had and the new one lacks. The previous successful pass left no flow to `external`
    going anywhere else, so when keep_sources is None the doomed flows are exactly those to
    lost_targets plus the never-DNATed ones, and a kernel that deletes by filter needs no dump.
    """

    external: ExternalEndpoint
    keep_targets: frozenset[Target] | None
    keep_sources: tuple[IPv4Network, ...] | None
    check_targets: bool = True
    lost_targets: frozenset[Target] | None = None

    @property
    def needs_dump(self) -> bool:
        """Whether only a look at each flow can tell what goes (CIDRs, or unknown old targets)."""
        return self.keep_sources is not None or (self.keep_targets is not None and self.lost_targets is None)

    def __str__(self) -> str:
        if self.keep_targets is None:
            return f"{self.external} (all)"
        sources = "any" if self.keep_sources is None else ",".join(map(str, self.keep_sources))
        targets = ",".join(sorted(map(str, self.keep_targets))) if self.check_targets else "virtual"
        return f"{self.external} (keep targets={targets} sources={sources})"


def stale_flow_filters(*, old: DesiredState | None, new: DesiredState) -> tuple[FlowFilter, ...]:
    """The flows that must stop when the kernel moves from `old` to `new`, sorted by endpoint.

    old None (first pass after start: what the kernel ran before is unknown): one filter per
    endpoint of `new` keeping exactly its targets and allowed sources.

    A virtual target (a ClusterIP that kube-proxy in IPVS mode translates again on the box) does
    not show in conntrack: the reply source is the pod. Its flows are judged by source only,
    plus the never-DNATed ones; when its targets change (another Service, a mode switch), which
    flow went where cannot be told, so every flow to the endpoint goes.
    """
    if old is None:
        # DesiredState holds its dnats sorted by endpoint, one each: no dict and no sort of 12k
        # dataclasses (their generated __lt__ and __hash__ run in Python) at start-up.
        return tuple(map(_keep_only, new.dnats))
    wanted = {d.external: d for d in new.dnats}
    before = {d.external: d for d in old.dnats}
    # A flow's replies follow the mark it got when it came in: the mark of its interface then.
    old_marks = {p.interface: p.mark for p in old.return_paths}
    new_marks = {p.interface: p.mark for p in new.return_paths}
    filters: list[FlowFilter] = []
    for external in sorted(before.keys() | wanted.keys()):
        was, now = before.get(external), wanted.get(external)
        if now is None:
            filters.append(FlowFilter(external=external, keep_targets=None, keep_sources=None))
        elif was is None:
            if new.drop_unmapped:
                # Unmapped ports were dropped before conntrack confirmed a flow: nothing to find,
                # and a look would walk the whole conntrack table for nothing.
                continue
            # A new endpoint can have flows that were never DNATed: datagrams that reached the
            # box before the Mapping existed (drop_unmapped off) and that conntrack would keep
            # delivering locally. None of them goes to a target, so the filter deletes only them.
            filters.append(
                FlowFilter(
                    external=external,
                    keep_targets=_kept_targets(now),
                    keep_sources=None,
                    check_targets=not now.virtual_target,
                    lost_targets=frozenset(),
                )
            )
        else:
            # A mode switch changes what the reply source means: a target change whatever the
            # addresses. Towards a real target the usual check keeps flows already reaching one.
            switched = was.virtual_target != now.virtual_target
            kept_before, kept_now = _kept_targets(was), _kept_targets(now)
            lost = switched or not kept_before <= kept_now
            shrank = _sources_shrank(before=was.allowed_sources, after=now.allowed_sources)
            if old_marks.get(was.interface) != new_marks.get(now.interface):
                # The address moved to another interface, or its interface came back with a new
                # ifindex: the flows' marks route replies by a path that is gone (the client's
                # rp_filter drops them). Their next packets start over with the right mark.
                filters.append(FlowFilter(external=external, keep_targets=None, keep_sources=None))
            elif lost and now.virtual_target:
                filters.append(FlowFilter(external=external, keep_targets=None, keep_sources=None))
            elif lost or shrank:
                filters.append(
                    FlowFilter(
                        external=external,
                        keep_targets=kept_now,
                        keep_sources=_kept_sources(now) if shrank else None,
                        check_targets=not now.virtual_target,
                        # After a switch from a virtual target the old flows' pods are unknown.
                        lost_targets=None if switched else kept_before - kept_now,
                    )
                )
    return tuple(filters)


@dataclass(frozen=True, order=True)
class EgressFlowFilter:
    """Pods' own flows made under an egress entry the new plan no longer has: conntrack mark
    `mark` (under MARK_MASK), SNATed to `to`, from `source`, or from any pod when None (no
    interface has `mark` any more, so no pod's egress is still made with it)."""

    mark: int
    to: IPv4Address
    source: IPv4Address | None

    def matches(self, flow: _Flow) -> bool:
        return (
            flow.mark & MARK_MASK == self.mark
            and flow.reply_destination == self.to
            and flow.status & _EGRESS_STATUS[1] == _EGRESS_STATUS[0]
            and (self.source is None or flow.source == self.source)
        )

    def __str__(self) -> str:
        return f"egress from {self.source or 'any pod'} mark={self.mark:#x} snat={self.to}"


def stale_egress_filters(
    *, old: Iterable[EgressSnat], new: Iterable[EgressSnat], marks: Collection[int]
) -> tuple[EgressFlowFilter, ...]:
    """The egress flows that must stop when the pods' egress entries go from `old` to `new`.

    `old` and `new` may be whole plans or just the entries that changed between them (what a
    pass removed and added): an entry of `old` dooms its flows when `new` gives its pod another
    mark or SNAT address, or when its mark is gone. `marks` are the new plan's interface marks:
    an old mark outside them can be on no pod's egress now, so one filter per (mark, address)
    takes every pod's flows instead of one per pod.

    A pod that `new` gives no entry at all (terminating in a rolling update, not ready, out of
    its Service) keeps its flows while their mark is an interface's: they still leave by it.
    Deleted, their next packet would leave unSNATed, from the pod's own address, which the peer
    does not know: the pod could not finish its open connections. Its new ones get no SNAT.
    """
    now = {e.source: (e.mark, e.to) for e in new}
    in_use = set(marks).union(m for m, _ in now.values())
    doomed: set[EgressFlowFilter] = set()
    for e in old:
        got = now.get(e.source)
        if got != (e.mark, e.to) and (got is not None or e.mark not in in_use):
            source = None if e.mark not in in_use else e.source
            doomed.add(EgressFlowFilter(mark=e.mark, to=e.to, source=source))
    return tuple(sorted(doomed, key=lambda f: (f.mark, f.to, -1 if f.source is None else int(f.source))))


def _kept_targets(dnat: Dnat) -> frozenset[Target]:
    """Targets whose flows may go on: the current ones and those draining (terminating pods)."""
    return frozenset(dnat.targets + dnat.draining)


def _keep_only(dnat: Dnat) -> FlowFilter:
    return FlowFilter(
        external=dnat.external,
        keep_targets=_kept_targets(dnat),
        keep_sources=_kept_sources(dnat),
        check_targets=not dnat.virtual_target,
    )


def _kept_sources(dnat: Dnat) -> tuple[IPv4Network, ...] | None:
    return None if dnat.allows_anyone else dnat.allowed_sources


def _sources_shrank(*, before: Sequence[IPv4Network], after: Sequence[IPv4Network]) -> bool:
    """Whether some address allowed before is not allowed after."""
    # The collapsed form is the set of maximal blocks inside the union, so a block covered by the
    # union is inside one of them: a subnet test per old network is exact.
    covering = list(collapse_addresses(after))
    return any(not any(net.subnet_of(c) for c in covering) for net in before)


@dataclass(frozen=True, slots=True)
class _Flow:
    """The parts of a conntrack entry the cleanup looks at."""

    protocol: Protocol
    source: IPv4Address  # original direction
    source_port: int
    destination: IPv4Address
    destination_port: int
    reply_source: IPv4Address  # the DNAT target (a pod behind a virtual one), or the destination when not DNATed
    reply_source_port: int
    reply_destination: IPv4Address  # the SNAT address of a SNATed flow, else the source
    mark: int
    status: int
    id: int | None  # CTA_ID: tells this entry from a later one with the same tuple
    zone: int | None

    @property
    def external(self) -> ExternalEndpoint:
        return ExternalEndpoint(address=self.destination, protocol=self.protocol, port=self.destination_port)

    @property
    def reply_target(self) -> Target:
        return Target(address=self.reply_source, port=self.reply_source_port)


# Attribute numbers (linux/netfilter/nfnetlink_conntrack.h) read by the dump parser below.
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_STATUS, _CTA_MARK, _CTA_ID, _CTA_ZONE = 1, 2, 3, 8, 12, 18
_CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 2
_CTA_IP_V4_SRC, _CTA_IP_V4_DST = 1, 2
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSG_HEADER = struct.Struct("=IHHII")
_NFGENMSG_LEN = 4
_CT_ENTRY = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW  # what a dump answers with


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes between start and end: type -> (payload start, payload end)."""
    found = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            break
        found[kind & _NLA_TYPE_MASK] = (start + 4, start + length)
        start += (length + 3) & ~3
    return found


def _tuple(data: bytes, span: tuple[int, int]) -> tuple[int, IPv4Address, IPv4Address, int, int] | None:
    """(protocol number, source, destination, source port, destination port) of a CTA_TUPLE_*."""
    parts = _attrs(data, *span)
    if _CTA_TUPLE_IP not in parts or _CTA_TUPLE_PROTO not in parts:
        return None
    ip, proto = _attrs(data, *parts[_CTA_TUPLE_IP]), _attrs(data, *parts[_CTA_TUPLE_PROTO])
    needed = (_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT)
    if _CTA_IP_V4_SRC not in ip or _CTA_IP_V4_DST not in ip or any(k not in proto for k in needed):
        return None
    return (
        data[proto[_CTA_PROTO_NUM][0]],
        IPv4Address(data[ip[_CTA_IP_V4_SRC][0] : ip[_CTA_IP_V4_SRC][0] + 4]),
        IPv4Address(data[ip[_CTA_IP_V4_DST][0] : ip[_CTA_IP_V4_DST][0] + 4]),
        struct.unpack_from("!H", data, proto[_CTA_PROTO_SRC_PORT][0])[0],
        struct.unpack_from("!H", data, proto[_CTA_PROTO_DST_PORT][0])[0],
    )


def _parse_flow(data: bytes, offset: int, length: int) -> _Flow | None:
    """One dumped entry as a _Flow, or None for flows smartnatd never maps (ICMP, GRE, IPv6…).

    Reads only the attributes the cleanup needs: pyroute2's generic decoding costs ~0.2 ms per
    entry, which would dominate a cleanup of a few thousand flows.
    """
    top = _attrs(data, offset + _NLMSG_HEADER.size + _NFGENMSG_LEN, offset + length)
    if _CTA_TUPLE_ORIG not in top or _CTA_TUPLE_REPLY not in top:
        return None
    orig, reply = _tuple(data, top[_CTA_TUPLE_ORIG]), _tuple(data, top[_CTA_TUPLE_REPLY])
    if orig is None or reply is None or orig[0] not in _PROTOCOL:
        return None

    def be(attr: int, fmt: str) -> int | None:
        return struct.unpack_from(fmt, data, top[attr][0])[0] if attr in top else None

    return _Flow(
        protocol=_PROTOCOL[orig[0]],
        source=orig[1],
        source_port=orig[3],
        destination=orig[2],
        destination_port=orig[4],
        reply_source=reply[1],
        reply_source_port=reply[3],
        reply_destination=reply[2],
        mark=be(_CTA_MARK, "!I") or 0,  # the kernel leaves out a zero mark
        status=be(_CTA_STATUS, "!I") or 0,
        id=be(_CTA_ID, "!I"),
        zone=be(_CTA_ZONE, "!H"),
    )


def _dump_parser(marshal: Any) -> Callable[[bytes, int, int], Any]:
    """A pyroute2 per-request parser: entries become {"header", "flow"}; the rest (done, errors)
    go through pyroute2's own decoding so that its dump loop ends and raises as usual."""

    def parse(data: bytes, offset: int, length: int) -> Any:
        _, kind, flags, seq, pid = _NLMSG_HEADER.unpack_from(data, offset)
        if kind != _CT_ENTRY:
            return marshal.parse_one_message(kind, flags, seq, data, offset, length)
        header = {"length": length, "type": kind, "flags": flags, "sequence_number": seq, "pid": pid, "error": None}
        return {"header": header, "flow": _parse_flow(data, offset, length)}

    return parse


@dataclass(frozen=True)
class _Group:
    """Doomed flows sharing a key the kernel can match: one filtered delete removes them all.

    Every flow matching the key is doomed by the same rule, so deleting by key never takes a
    flow the plan still allows, even one that appeared after the dump.
    """

    orig: NFCTAttrTuple | None
    reply: NFCTAttrTuple | None = None
    mark: tuple[int, int] | None = None  # value, mask
    status: tuple[int, int] | None = None  # value, mask


def _endpoint_tuple(external: ExternalEndpoint, *, source: IPv4Address | None = None) -> NFCTAttrTuple:
    return NFCTAttrTuple(
        saddr=None if source is None else str(source),
        daddr=str(external.address),
        proto=_IPPROTO[external.protocol],
        dport=external.port,
    )


def _doom(flow: _Flow, flt: FlowFilter) -> Hashable | None:
    """Why `flow` must go under `flt`, as a group key; None to keep it."""
    if flt.keep_targets is None:
        return ("endpoint",)
    if flt.check_targets:
        if flow.reply_target not in flt.keep_targets:
            return ("target", flow.reply_target)
    elif flow.reply_target == Target(address=flow.destination, port=flow.destination_port):
        # Never DNATed. Keyed like a lost target: the kernel selects these by reply source too.
        return ("target", flow.reply_target)
    if flt.keep_sources is not None and not any(flow.source in net for net in flt.keep_sources):
        return ("source", flow.source)
    return None


def _egress_group(flt: EgressFlowFilter) -> _Group:
    """The kernel filter matching exactly the egress flows `flt` dooms (EgressFlowFilter.matches)."""
    return _Group(
        orig=None if flt.source is None else NFCTAttrTuple(saddr=str(flt.source)),
        reply=NFCTAttrTuple(daddr=str(flt.to)),
        mark=(flt.mark, MARK_MASK),
        status=_EGRESS_STATUS,
    )


def _kernel_keys(flt: FlowFilter) -> list[Hashable]:
    """The _doom keys of every flow `flt` dooms, for a filter that needs no dump (see
    FlowFilter.lost_targets): the lost targets and the never-DNATed flows, or the endpoint."""
    if flt.keep_targets is None:
        return [("endpoint",)]
    assert flt.lost_targets is not None and flt.keep_sources is None, flt
    itself = Target(address=flt.external.address, port=flt.external.port)  # never DNATed
    keys: list[Hashable] = [("target", t) for t in sorted(flt.lost_targets - {itself})]
    if itself not in flt.keep_targets:
        keys.append(("target", itself))
    return keys


def _group(key: Hashable, flt: FlowFilter) -> _Group:
    """The kernel filter matching exactly the flows to flt.external doomed for reason `key`."""
    match key:
        case ("target", Target() as target):
            reply = NFCTAttrTuple(saddr=str(target.address), proto=_IPPROTO[flt.external.protocol], sport=target.port)
            return _Group(orig=_endpoint_tuple(flt.external), reply=reply)
        case ("source", IPv4Address() as source):
            return _Group(orig=_endpoint_tuple(flt.external, source=source))
        case _:
            return _Group(orig=_endpoint_tuple(flt.external))


class ConntrackEdge:
    """Deletes stale flows in one network namespace's conntrack table; opened once, one user."""

    def __init__(self, *, netns: str | None) -> None:
        self._netns = netns
        self._ct: AsyncConntrack | None = None
        self.filtered_delete = False  # the kernel deletes by partial tuple + CTA_FILTER

    async def open(self) -> None:
        # flags=0: a missing namespace is an error instead of being created.
        ct = AsyncConntrack() if self._netns is None else AsyncConntrack(netns=self._netns, flags=0)
        try:
            await ct.setup_endpoint()
            self.filtered_delete = await self._probe(ct)
        except BaseException:
            ct.close()
            raise
        self._ct = ct
        logger.debug("conntrack opened netns=%s filtered_delete=%s", self._netns, self.filtered_delete)

    async def close(self) -> None:
        if self._ct is not None:
            self._ct.close()
            self._ct = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def delete(self, filters: Sequence[FlowFilter]) -> int:
        """Delete the flows `filters` select; returns how many were deleted.

        A group removed by one kernel-side delete counts the flows the dump just before found.
        """
        if not filters:
            return 0
        started = time.monotonic()
        deleted, touched = 0, 0
        if self.filtered_delete:
            # Each kernel-side delete costs ~0.3 ms; any dump walks the whole hash table (~10 ms
            # at 262,144 buckets), so filters that need no look at the flows skip it.
            direct = [f for f in filters if not f.needs_dump]
            if direct:
                deleted += await self._delete_without_dump(direct)
                touched += len(direct)
            filters = [f for f in filters if f.needs_dump]
            if not filters:
                self._log_deleted(deleted, touched, started)
                return deleted
        by_external = {f.external: f for f in filters}
        flows = await self._flows_to(by_external)
        table_size = await self._table_size()
        for external in sorted(by_external):
            flt = by_external[external]
            groups: dict[Hashable, list[_Flow]] = defaultdict(list)
            for flow in flows.get(external, ()):
                key = _doom(flow, flt)
                if key is not None:
                    groups[key].append(flow)
            if not groups:
                continue
            count = 0
            for key, doomed in groups.items():
                group = _group(key, flt)
                count += await self._delete_group(group, doomed, table_size=table_size, what=f"{external} {key}")
            logger.debug("conntrack flows deleted endpoint=%s flows=%d filter=%s", external, count, flt)
            deleted += count
            touched += 1
        self._log_deleted(deleted, touched, started)
        return deleted

    async def _delete_without_dump(self, filters: Sequence[FlowFilter]) -> int:
        """Kernel-side deletes for filters that need no dump; returns how much the table shrank
        meanwhile (the kernel does not count: flows created or expiring at the same moment
        make this a close estimate, not an exact figure)."""
        before = await self._table_size()
        for flt in sorted(filters, key=lambda f: f.external):
            for key in _kernel_keys(flt):
                await self._filtered_delete(_group(key, flt), what=f"{flt.external} {key}")
            logger.debug("conntrack flows deleted kernel-side endpoint=%s filter=%s", flt.external, flt)
        return max(0, before - await self._table_size())

    async def delete_egress(self, filters: Sequence[EgressFlowFilter]) -> int:
        """Delete the pods' egress flows `filters` select; returns how many were deleted (after
        kernel-side deletes, how much the table shrank meanwhile: a close estimate)."""
        if not filters:
            return 0
        started = time.monotonic()
        if self.filtered_delete and len(filters) < _FULL_DUMP_MIN_FILTERS:
            # Each filter matches exactly the flows it dooms, so no dump is needed; each delete
            # walks the table, so many filters are better served by one dump below.
            before = await self._table_size()
            for flt in filters:
                await self._filtered_delete(_egress_group(flt), what=str(flt))
            deleted = max(0, before - await self._table_size())
        else:
            table_size = await self._table_size()
            deleted = 0
            for flt, doomed in (await self._egress_flows(filters)).items():
                deleted += await self._delete_group(_egress_group(flt), doomed, table_size=table_size, what=str(flt))
        if deleted:
            logger.info(
                "conntrack stale egress flows deleted flows=%d filters=%d took=%.3fs",
                deleted, len(filters), time.monotonic() - started,
            )
        return deleted

    async def _egress_flows(self, filters: Sequence[EgressFlowFilter]) -> dict[EgressFlowFilter, list[_Flow]]:
        """The flows each filter selects, by one dump of SNATed flows or one per pod."""
        found: dict[EgressFlowFilter, list[_Flow]] = defaultdict(list)
        if len(filters) >= _FULL_DUMP_MIN_FILTERS or any(f.source is None for f in filters):
            # A filter from any pod has only the mark and address to go by: one look at every
            # SNATed flow (kernel-side status filter since 5.15) serves them all.
            by_key = {(f.source, f.mark, f.to): f for f in filters}
            async for flow in self._dump(status=IPS_SRC_NAT):
                mark = flow.mark & MARK_MASK
                flt = by_key.get((flow.source, mark, flow.reply_destination)) or by_key.get(
                    (None, mark, flow.reply_destination)
                )
                if flt is not None and flt.matches(flow):
                    found[flt].append(flow)
            return found
        for flt in filters:
            async for flow in self._dump(tuple_orig=NFCTAttrTuple(saddr=str(flt.source))):
                if flt.matches(flow):  # kernels before 5.8 ignore the tuple filter
                    found[flt].append(flow)
        return found

    def _log_deleted(self, deleted: int, touched: int, started: float) -> None:
        if deleted:
            logger.info(
                "conntrack stale flows deleted flows=%d endpoints=%d took=%.3fs",
                deleted, touched, time.monotonic() - started,
            )

    async def sweep(
        self,
        *,
        mark_mask: int,
        known: Collection[ExternalEndpoint],
        egress: Collection[EgressSnat] | None = None,
        marks: Collection[int] = (),
    ) -> int:
        """Delete DNATed flows marked inside `mark_mask` whose destination is no known endpoint,
        and, when `egress` is given, pods' egress flows that it does not route the same way.

        The former are flows of Mappings deleted while the daemon was down: clients' (an
        interface's mark) and pods' hairpin flows (HAIRPIN_MARK), when `mark_mask` holds both.
        Only DNATed flows count there: pod egress connections carry the interface marks too.
        Those are judged against `egress`, the plan's entries: an egress flow (SNATed, not
        DNATed, marked) from a pod survives when the plan still gives that pod its mark and SNAT
        address; it goes when its interface's mark is gone (re-created with a new ifindex while
        the daemon was down), its SNAT address or interface changed, or the pod has no egress
        entry any more while its mark is no interface's (see stale_egress_filters; `marks` are
        the plan's interface marks).
        """
        deleted = await self._sweep_endpoints(mark_mask=mark_mask, known=known)
        if egress is not None:
            deleted += await self._sweep_egress(mark_mask=mark_mask, egress=egress, marks=marks)
        return deleted

    async def _sweep_egress(self, *, mark_mask: int, egress: Collection[EgressSnat], marks: Collection[int]) -> int:
        started = time.monotonic()
        wanted = {e.source: (e.mark & mark_mask, e.to) for e in egress}
        in_use = {m & mark_mask for m in marks}.union(m for m, _ in wanted.values())
        table_size = await self._table_size()
        groups: dict[EgressFlowFilter, list[_Flow]] = defaultdict(list)
        # The status filter is kernel-side since 5.15; older kernels send everything.
        async for flow in self._dump(status=IPS_SRC_NAT):
            mark = flow.mark & mark_mask
            if not mark or flow.status & _EGRESS_STATUS[1] != _EGRESS_STATUS[0]:
                continue
            want = wanted.get(flow.source)
            if want is None and mark in in_use:
                continue  # a pod without egress now (terminating...): its open flows finish
            if want != (mark, flow.reply_destination):
                groups[EgressFlowFilter(mark=mark, to=flow.reply_destination, source=flow.source)].append(flow)
        deleted = 0
        for flt, doomed in sorted(groups.items()):
            deleted += await self._delete_group(_egress_group(flt), doomed, table_size=table_size, what=str(flt))
        if deleted:
            logger.info(
                "conntrack egress flows the plan no longer routes so deleted flows=%d pods=%d took=%.3fs",
                deleted, len({f.source for f in groups}), time.monotonic() - started,
            )
        return deleted

    async def _sweep_endpoints(self, *, mark_mask: int, known: Collection[ExternalEndpoint]) -> int:
        started = time.monotonic()
        known = frozenset(known)
        table_size = await self._table_size()
        groups: dict[tuple[ExternalEndpoint, int], list[_Flow]] = defaultdict(list)
        # The status filter is kernel-side since 5.15; older kernels send everything.
        async for flow in self._dump(status=IPS_DST_NAT):
            mark = flow.mark & mark_mask
            if mark and flow.status & IPS_DST_NAT and flow.external not in known:
                groups[flow.external, mark].append(flow)
        deleted = 0
        for (external, mark), doomed in sorted(groups.items()):
            group = _Group(orig=_endpoint_tuple(external), mark=(mark, mark_mask), status=(IPS_DST_NAT, IPS_DST_NAT))
            count = await self._delete_group(group, doomed, table_size=table_size, what=f"{external} mark={mark:#x}")
            logger.debug(
                "conntrack unknown-endpoint flows deleted endpoint=%s mark=%#x flows=%d", external, mark, count
            )
            deleted += count
        if deleted:
            logger.info(
                "conntrack flows of unknown endpoints deleted flows=%d endpoints=%d took=%.3fs",
                deleted, len({e for e, _ in groups}), time.monotonic() - started,
            )
        return deleted

    # -- selecting ---------------------------------------------------------------------------

    async def _flows_to(self, externals: Collection[ExternalEndpoint]) -> dict[ExternalEndpoint, list[_Flow]]:
        found: dict[ExternalEndpoint, list[_Flow]] = defaultdict(list)
        if len(externals) >= _FULL_DUMP_MIN_FILTERS:
            async for flow in self._dump():
                if flow.external in externals:
                    found[flow.external].append(flow)
            return found
        for external in externals:
            async for flow in self._dump(tuple_orig=_endpoint_tuple(external)):
                # Kernels before 5.8 ignore the tuple filter: check every entry again.
                if flow.external == external:
                    found[external].append(flow)
        return found

    async def _dump(self, **filters: Any) -> AsyncIterator[_Flow]:
        ct = self._socket()
        msg = _dump_msg(**filters)
        msg["nfgen_family"] = socket.AF_INET
        # NetlinkRequest rather than ct.request(): only it takes a per-request parser in 0.9.7.
        request = NetlinkRequest(
            ct,
            msg,
            msg_type=(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            msg_flags=NLM_F_REQUEST | NLM_F_DUMP,
            parser=_dump_parser(ct.marshal),
        )
        try:
            await request.send()
            async for answer in request.response():
                flow = answer.get("flow")
                if flow is not None:
                    yield flow
        except NetlinkError as err:
            raise NetlinkApplyError(f"conntrack dump failed: {err}") from err

    async def _table_size(self) -> int:
        try:
            return int(await self._socket().count() or 0)
        except NetlinkError as err:
            raise NetlinkApplyError(f"conntrack count failed: {err}") from err

    # -- deleting ----------------------------------------------------------------------------

    async def _delete_group(self, group: _Group, doomed: list[_Flow], *, table_size: int, what: str) -> int:
        if self.filtered_delete and len(doomed) >= max(_KERNEL_GROUP_MIN, table_size // _WALK_PER_LOOKUP):
            await self._filtered_delete(group, what=what)
            return len(doomed)  # as dumped; the kernel does not say how many it removed
        deleted = 0
        for flow in doomed:
            deleted += await self._delete_one(flow)
        return deleted

    async def _delete_one(self, flow: _Flow) -> bool:
        orig = NFCTAttrTuple(
            saddr=str(flow.source),
            daddr=str(flow.destination),
            proto=_IPPROTO[flow.protocol],
            sport=flow.source_port,
            dport=flow.destination_port,
        )
        msg = nfct_msg.create_from(tuple_orig=orig, id=flow.id, zone=flow.zone)
        try:
            await _acked(self._socket(), msg)
        except NetlinkError as err:
            if err.code == errno.ENOENT:  # expired, or deleted by someone else, since the dump
                return False
            raise NetlinkApplyError(f"conntrack delete of {flow} failed: {err}") from err
        return True

    async def _filtered_delete(self, group: _Group, *, what: str) -> None:
        try:
            await _acked(self._socket(), _filtered_delete_msg(group))
        except NetlinkError as err:
            raise NetlinkApplyError(f"conntrack filtered delete of flows to {what} failed: {err}") from err

    async def _probe(self, ct: AsyncConntrack) -> bool:
        try:
            # No flow can be addressed to 0.0.0.0 port 0: a kernel that accepts deletes nothing.
            probe = NFCTAttrTuple(daddr="0.0.0.0", proto=socket.IPPROTO_UDP, dport=0)
            await _acked(ct, _filtered_delete_msg(_Group(orig=probe)))
        except NetlinkError as err:
            if err.code in _NO_FILTERED_DELETE:
                logger.debug("conntrack filtered delete refused (%s): deleting flow by flow", err)
                return False
            raise NetlinkApplyError(f"conntrack probe failed: {err}") from err
        return True

    def _socket(self) -> AsyncConntrack:
        if self._ct is None:
            raise RuntimeError("ConntrackEdge used before open()")
        return self._ct


def _dump_msg(*, tuple_orig: NFCTAttrTuple | None = None, status: int | None = None) -> Any:
    """A dump request: by partial original tuple (CTA_FILTER), by status bits, or everything."""
    if tuple_orig is not None:
        tuple_orig.attrs()  # computes .flags
        flags = [["CTA_FILTER_ORIG_FLAGS", tuple_orig.flags]]
        return nfct_msg.create_from(tuple_orig=tuple_orig, cta_filter={"attrs": flags})
    if status is not None:
        return nfct_msg.create_from(status=status, status_mask=status)
    return nfct_msg()


def _filtered_delete_msg(group: _Group) -> Any:
    flags = []
    extra: dict[str, Any] = {}
    if group.orig is not None:
        group.orig.attrs()  # computes .flags, the CTA_FILTER bits for the attributes given
        flags.append(["CTA_FILTER_ORIG_FLAGS", group.orig.flags])
        extra["tuple_orig"] = group.orig
    if group.reply is not None:
        group.reply.attrs()
        flags.append(["CTA_FILTER_REPLY_FLAGS", group.reply.flags])
        extra["tuple_reply"] = group.reply
    if group.mark is not None:
        extra["mark"], extra["mark_mask"] = group.mark
    if group.status is not None:
        extra["status"], extra["status_mask"] = group.status
    msg = nfct_msg.create_from(cta_filter={"attrs": flags}, **extra)
    # Version 1: the kernel filters by nfgen_family (AF_INET) rather than every family.
    msg["version"] = 1
    return msg


def _is_ack(msg: Any) -> bool:
    return bool(msg["header"]["type"] == NLMSG_ERROR)


async def _acked(ct: AsyncConntrack, msg: Any) -> None:
    """Send one CT_DELETE and wait for its acknowledgement; a netlink error raises."""
    async for _ in await ct.request(msg, IPCTNL_MSG_CT_DELETE, msg_flags=NLM_F_REQUEST | NLM_F_ACK, terminate=_is_ack):
        pass
