"""DesiredState -> Ruleset (data) -> nft text.

The Ruleset is data first so that one object gives the golden file, the dry-run output, the
full transaction and the incremental difference against the last applied one. Text is sorted
and byte-for-byte stable.

Renderer is render() for a process that renders every pass: it re-renders only the entries
that changed and diffs from the elements it moved, so one changed Mapping costs a few element
commands and about as much Python, whatever the number of Mappings.
"""

from __future__ import annotations

import bisect
import functools
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from itertools import compress, count
from socket import inet_ntoa
from typing import Any

from smartnatd.desired import (
    EGRESS_MARK,
    HAIRPIN_MARK,
    MARK_MASK,
    DesiredState,
    Dnat,
    EgressSnat,
    Target,
    allows_anyone,
)
from smartnatd.nft import names as n

L4 = "meta l4proto { tcp, udp, sctp }"
KEY = "ip daddr . meta l4proto . th dport"
ELEMENTS_PER_COMMAND = 2000  # keeps each command line of a 50k transaction reasonable


@dataclass(frozen=True, order=True)
class Element:
    key: str  # what identifies the element inside its set or map
    text: str  # the whole element: key, comment, data

    @staticmethod
    def of(key: str, *, owner: str = "", data: str = "") -> Element:
        text = key
        if owner:
            text += f" comment {n.comment(owner)}"
        if data:
            text += f" : {data}"
        return Element(key, text)


@dataclass(frozen=True)
class NftSet:
    name: str
    kind: str  # "set" or "map"
    declaration: str  # the body of the declaration, e.g. "type ipv4_addr; counter;"
    elements: tuple[Element, ...] = ()  # sorted by key, keys unique


@dataclass(frozen=True)
class NftChain:
    name: str
    hook: str = ""  # base chains: "type nat hook prerouting priority dstnat - 10; policy accept;"
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ruleset:
    sets: tuple[NftSet, ...] = ()
    chains: tuple[NftChain, ...] = ()
    # Dynamic chains emptied by the last transaction; deleted by the next one (on kernels before
    # 6.2 a just-removed verdict-map element may still reference them for a moment).
    stale_chains: tuple[str, ...] = field(default=())

    def set(self, name: str) -> NftSet:
        return next(s for s in self.sets if s.name == name)

    def chain(self, name: str) -> NftChain:
        return next(c for c in self.chains if c.name == name)

    def text(self) -> str:
        """The full transaction: atomically replace the whole table."""
        return full_text(self)


def _t() -> str:
    return f"{n.FAMILY} {n.TABLE}"


# Sets and maps in declaration order; the order of `Ruleset.sets` and of the transaction.
_ENDPOINT = "type ipv4_addr . inet_proto . inet_service;"
_DECLARATIONS = (
    (n.EXTERNAL_PORTS, "set", f"{_ENDPOINT} counter;"),
    (n.MANAGED_ADDRESSES, "set", "type ipv4_addr;"),
    (n.EXTERNAL_INTERFACES, "set", "type ifname;"),
    (n.INTERFACE_MARKS, "map", "type ifname : mark;"),
    (n.DNAT_TARGETS, "map", "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;"),
    (n.DNAT_CHAINS, "map", "type ipv4_addr . inet_proto . inet_service : verdict;"),
    # The key ends with the numgen of the spread chains; `mod 2` only names its type here.
    (n.DNAT_SPREAD, "map", f"typeof {KEY} . numgen random mod 2 : ip daddr . th dport;"),
    (n.SOURCE_FILTERS, "map", "type ipv4_addr . inet_proto . inet_service : verdict;"),
    (n.EGRESS_MARKS, "map", "type ipv4_addr : mark;"),
    (n.EGRESS_SOURCES, "map", "type ipv4_addr : ipv4_addr;"),
)
# Owners are namespace/name in DNS characters: their comment needs no cleaning, and checking
# that is cheaper than names.comment() on every element of a 50k-Mapping render.
_CLEAN_COMMENT = re.compile(r"[A-Za-z0-9_./:-]{1,%d}" % n.COMMENT_MAX)


_IP_TEXT: dict[int, str] = {}


def _ip(address: IPv4Address) -> str:
    """str(address), remembered: a render writes ~25k addresses, the box's own few thousands
    of times, and ipaddress formats in Python."""
    i = int(address)
    text = _IP_TEXT.get(i)
    if text is None:
        if len(_IP_TEXT) >= 1 << 18:  # bounded: pods come and go
            _IP_TEXT.clear()
        text = _IP_TEXT[i] = inet_ntoa(i.to_bytes(4, "big"))
    return text


def _comment(owner: str) -> str:
    return f'"{owner}"' if _CLEAN_COMMENT.fullmatch(owner) else n.comment(owner)


def _element(key: str, comment: str, data: str) -> Element:
    # Element.of with the comment already quoted.
    return Element(key, f"{key} comment {comment} : {data}" if data else f"{key} comment {comment}")


@dataclass(frozen=True)
class _Placed:
    """What one desired entry puts into the ruleset: elements by set, and dynamic chains."""

    elements: tuple[tuple[str, Element], ...]
    chains: tuple[NftChain, ...] = ()


class _Memo:
    """Per-pass caches for what many Dnats share: allow-list chains, and whether an allow-list
    lets anyone in. Keyed by id() of the allowed_sources tuple first (each Mapping's Dnats share
    one, and the Dnats keep it alive through the pass), then by value: hashing a tuple of
    IPv4Networks runs Python code for every network."""

    def __init__(self) -> None:
        self.sources: dict[tuple[IPv4Network, ...], tuple[str, NftChain] | None] = {}
        self.by_id: dict[int, tuple[str, NftChain] | None] = {}

    def sources_chain(self, allowed: tuple[IPv4Network, ...]) -> tuple[str, NftChain] | None:
        """The allow-list chain for these sources; None when they let anyone in."""
        i = id(allowed)
        if i in self.by_id:
            return self.by_id[i]
        if allowed in self.sources:
            found = self.sources[allowed]
        elif allows_anyone(allowed):
            found = self.sources[allowed] = None
        else:
            rules = _allow_rules(allowed)
            name = n.sources_chain("\n".join(rules))
            found = self.sources[allowed] = (name, NftChain(name, rules=(*rules, "counter drop")))
        self.by_id[i] = found
        return found


# Allow-lists up to this many networks are one plain rule per network; longer ones one rule
# with an anonymous set. nft 1.0.6 spends time on every anonymous set that grows with how many
# the transaction already holds (4,000 distinct two-network lists: 2.1 s of nft, against 0.27 s
# as plain rules), while a packet walks at most this many prefix matches.
ALLOW_RULES_MAX = 16


def _allow_rules(allowed: tuple[IPv4Network, ...]) -> tuple[str, ...]:
    if len(allowed) > ALLOW_RULES_MAX:
        return (f"ip saddr {{ {', '.join(map(str, allowed))} }} return",)
    return tuple(f"ip saddr {net} return" for net in allowed)


# Endpoints with 2..SPREAD_MAX targets go to the static chain spread-<k>: one rule, a random
# number below k picks the endpoint's target from dnat-spread, so each gets 1/k of the new
# connections. Map elements instead of a chain of k rules per endpoint: a 10k-Mapping
# transaction had ~1,400 such chains, a third of its kernel and nft time. Static because nft
# 1.0.6 cannot add a rule that uses dnat-spread once the map is in the kernel ("conflicting
# protocols specified: ip vs. th", reading back the map's `typeof`): the rules are only ever
# written in the transaction that declares the map. More targets than that take a chain of
# their own (_spread_rules).
SPREAD_MAX = 16  # pods; most Services have fewer, and each k is a chain in every listing


@functools.cache
def _spread_chains(most: int) -> tuple[NftChain, ...]:
    return tuple(
        NftChain(n.spread_chain(k), rules=(f"dnat ip to {KEY} . numgen random mod {k} map @{n.DNAT_SPREAD}",))
        for k in range(2, most + 1)
    )


def _spread_rules(protocol: str, targets: tuple[Target, ...]) -> tuple[str, ...]:
    """One rule per target: the i-th of k takes a new connection with chance 1/(k-i), the last
    takes the rest, so each gets 1/k. Not one `numgen ... map { ... }` rule: every anonymous
    map or set in a rule costs nft 1.0.6 time that grows with the number already in the
    transaction. The protocol match gives `dnat to addr:port` its transport context."""
    k = len(targets)
    return tuple(
        f"meta l4proto {protocol} "
        + (f"numgen random mod {k - i} == 0 " if k - i > 1 else "")
        + f"dnat ip to {_ip(t.address)}:{t.port}"
        for i, t in enumerate(targets)
    )


def _place_dnat(d: Dnat, memo: _Memo) -> _Placed:
    e = d.external
    key = f"{_ip(e.address)} . {e.protocol} . {e.port}"
    comment = _comment(str(d.owner))
    elements = [(n.EXTERNAL_PORTS, _element(key, comment, ""))]
    chains: list[NftChain] = []
    k = len(d.targets)
    if k == 1:
        t = d.targets[0]
        elements.append((n.DNAT_TARGETS, _element(key, comment, f"{_ip(t.address)} . {t.port}")))
    elif k <= SPREAD_MAX:
        elements.append((n.DNAT_CHAINS, _element(key, comment, f"goto {n.spread_chain(k)}")))
        # No comment: the dnat-chains element of the same endpoint names the owner.
        for i, t in enumerate(d.targets):
            spread_key = f"{key} . {i}"
            elements.append((n.DNAT_SPREAD, Element(spread_key, f"{spread_key} : {_ip(t.address)} . {t.port}")))
    else:
        rules = _spread_rules(e.protocol, d.targets)
        name = n.backends_chain("\n".join(rules))
        chains.append(NftChain(name, rules=rules))
        elements.append((n.DNAT_CHAINS, _element(key, comment, f"goto {name}")))
    filtered = memo.sources_chain(d.allowed_sources)
    if filtered is not None:
        name, sources = filtered
        chains.append(sources)
        elements.append((n.SOURCE_FILTERS, _element(key, comment, f"jump {name}")))
    return _Placed(tuple(elements), tuple(chains))


def _place_egress(e: EgressSnat) -> _Placed:
    key, comment = _ip(e.source), _comment(str(e.owner))
    return _Placed(
        (
            (n.EGRESS_MARKS, _element(key, comment, f"0x{e.mark:08x}")),
            (n.EGRESS_SOURCES, _element(key, comment, _ip(e.to))),
        )
    )


def _host_elements(desired: DesiredState) -> dict[str, tuple[Element, ...]]:
    """The small sets that follow the box, not the Mappings: rebuilt whole when they change."""
    ifaces = [n.ifname(i) for i in desired.external_interfaces]
    marks = [Element.of(n.ifname(p.interface), data=f"0x{p.mark:08x}") for p in desired.return_paths]
    return {
        n.MANAGED_ADDRESSES: _sorted(Element.of(str(a)) for a in desired.managed_addresses),
        n.EXTERNAL_INTERFACES: _sorted(Element.of(i) for i in ifaces),
        n.INTERFACE_MARKS: _sorted(marks),
    }


def _base_chains(desired: DesiredState) -> tuple[NftChain, ...]:
    mask = f"0x{MARK_MASK:08x}"
    prerouting = [
        # Allow-lists first: a refused client is dropped before any NAT or mark. Original
        # direction only: a reply to the box's own traffic (an NTP or DNS client whose local
        # port is a mapped one) is no client of the Mapping.
        f"ct direction original {KEY} vmap @{n.SOURCE_FILTERS}",
        # A backend pod's own new connection leaves by its Mapping's interface (egress SNAT);
        # the next rule takes that mark back when the connection is to a Mapping of the box.
        f"ct state new iifname != @{n.EXTERNAL_INTERFACES} ct mark set ip saddr map @{n.EGRESS_MARKS}",
        # Remember where every connection we serve came in, for its replies. The set lookup
        # comes first so its element counters see every client packet, not only the first.
        f"{KEY} @{n.EXTERNAL_PORTS} ct state new jump {n.MARK_CONNECTION}",
    ]
    if desired.drop_unmapped:
        # Only new connections: replies to the box's own traffic from these addresses still pass.
        # Not from lo: the box's own connection to its address comes back in there, still new.
        prerouting.append(
            f'ct state new iifname != "lo" ip daddr @{n.MANAGED_ADDRESSES} {L4} {KEY} != @{n.EXTERNAL_PORTS} counter drop'
        )
    prerouting += [
        # Copy the mark to the packet only from the cluster side: original-direction packets
        # from clients must route normally. Replies to clients leave by their interface's
        # table; a pod's own connection (egress) carries EGRESS_MARK as well, so a specific
        # main-table route (an internal network) wins over that table. A reply that an
        # internal peer sends a pod is neither and routes normally.
        f"ct direction reply ct status dnat iifname != @{n.EXTERNAL_INTERFACES} ct mark & {mask} != 0 "
        f"meta mark set ct mark & {mask}",
        f"ct direction original iifname != @{n.EXTERNAL_INTERFACES} ct mark & {mask} != 0 "
        f"meta mark set ct mark & {mask} | 0x{EGRESS_MARK:08x}",
    ]
    mark_connection = (
        # From a client outside: its interface's mark routes the replies back out of it.
        f"ct mark set iifname map @{n.INTERFACE_MARKS}",
        # From the cluster side (a pod calling a Mapping of the box, its traffic routed through
        # here): a hairpin. No interface mark, so replies route by the main table, back inside.
        # Not from lo: the box's own connections were marked and translated on the output hook.
        f'iifname != @{n.EXTERNAL_INTERFACES} iifname != "lo" ct mark set 0x{HAIRPIN_MARK:08x}',
    )
    # The box's own connection to a Mapping (an operator's curl, a health check) is a hairpin
    # too: translated on the output hook and masqueraded, or it would reach the pod from the
    # external address, which the cluster may not route back to the box. Its socket picked that
    # address as the source (the route to it is local). The lookup comes first so the element
    # counters see its packets, as they see a pod's. No allow-list: it comes from the box itself.
    output = (f"{KEY} @{n.EXTERNAL_PORTS} ct state new ct mark set 0x{HAIRPIN_MARK:08x}",)
    translate = (f"{KEY} vmap @{n.DNAT_CHAINS}", f"dnat ip to {KEY} map @{n.DNAT_TARGETS}")
    # A hairpin is masqueraded whatever SETUP_MASQUERADE says: the target would otherwise answer
    # the pod directly (the cluster routes pod to pod), and the pod drops an answer that does not
    # come from the address it called. Postrouting has no input interface: the mark tells.
    postrouting = [f"ct mark & 0x{HAIRPIN_MARK:08x} == 0x{HAIRPIN_MARK:08x} masquerade"]
    if desired.masquerade:
        postrouting.append(f"ct status dnat ct mark & {mask} != 0 oifname != @{n.EXTERNAL_INTERFACES} masquerade")
    postrouting.append(f"oifname @{n.EXTERNAL_INTERFACES} snat ip to ip saddr map @{n.EGRESS_SOURCES}")

    return (
        # mangle (-150): after conntrack (-200) so ct state works, before DNAT (-100) so the
        # allow-list sees the original destination.
        NftChain(n.FILTER_PREROUTING, "type filter hook prerouting priority mangle; policy accept;", tuple(prerouting)),
        # dstnat - 10: ahead of kube-proxy's DNAT, so the external endpoint is translated by us.
        NftChain(n.NAT_PREROUTING, "type nat hook prerouting priority dstnat - 10; policy accept;", translate),
        # The same two hooks for the box's own packets: mangle, after conntrack and before the
        # DNAT below, which is ahead of kube-proxy's output DNAT (-100) as nat-prerouting is of
        # its prerouting one. -110 is dstnat - 10, a name nft 1.0.6 refuses on the output hook.
        NftChain(n.FILTER_OUTPUT, "type filter hook output priority mangle; policy accept;", output),
        NftChain(n.NAT_OUTPUT, "type nat hook output priority -110; policy accept;", translate),
        # srcnat - 10: ahead of kube-proxy's masquerade.
        NftChain(n.NAT_POSTROUTING, "type nat hook postrouting priority srcnat - 10; policy accept;", tuple(postrouting)),
        NftChain(n.MARK_CONNECTION, rules=mark_connection),
    ) + _spread_chains(SPREAD_MAX)


def render(desired: DesiredState) -> Ruleset:
    return Renderer().render(desired)


def _changed_span(old: tuple[Any, ...], new: tuple[Any, ...]) -> tuple[int, int, int]:
    """(start, old_end, new_end): old[:start] and new[:start] are the same objects, and so are
    old[old_end:] and new[new_end:]. Stops at the first difference from each end."""
    shortest = min(len(old), len(new))
    start = next(compress(count(), map(operator.is_not, old, new)), shortest)
    tail = next(compress(count(), map(operator.is_not, reversed(old), reversed(new))), shortest)
    tail = min(tail, shortest - start)
    return start, len(old) - tail, len(new) - tail


def _sorted(elements: Iterable[Element]) -> tuple[Element, ...]:
    unique = {e.key: e for e in elements}
    return tuple(unique[k] for k in sorted(unique))


class _Duplicate(Exception):
    """Two entries of one desired state want the same element key (the planner never does that)."""


class Renderer:
    """render() with memory, for a dataplane that renders every pass.

    `render(desired)` equals the module's render(desired), but re-renders only the Dnats and
    egress entries that are not the very objects it rendered last time (the incremental planner
    hands unchanged entries back unchanged), moves their elements in and out of per-set indexes
    kept sorted, and shares the elements and chains of everything else. It records which
    elements changed, so `diff()` from the previous ruleset lists those instead of comparing
    every set. Anything it cannot follow (duplicate keys) makes it render from scratch.
    """

    def __init__(self) -> None:
        self._desired: DesiredState | None = None  # what the state below reflects
        self._ruleset: Ruleset | None = None  # the last result
        self._previous: Ruleset | None = None  # the result before that: where `_steps` start
        self._previous_desired: DesiredState | None = None
        # Entries rendered, by id() of the entry; the entry is kept so its id stays its own.
        self._dnats: dict[int, tuple[Dnat, _Placed]] = {}
        self._egress: dict[int, tuple[EgressSnat, _Placed]] = {}
        self._elements: dict[str, dict[str, Element]] = {}
        self._keys: dict[str, list[str]] = {}  # element keys of each set, sorted
        self._items: dict[str, list[Element]] = {}  # its elements in that order
        self._chains: dict[str, list[Any]] = {}  # name -> [chain, references]
        self._chains_moved = True  # a chain name came or went since the last result
        self._sets: dict[str, NftSet] = {}
        self._base: tuple[NftChain, ...] = ()
        self._chain_tuple: tuple[NftChain, ...] = ()
        # The last render's changes: set -> key -> (element before, element after).
        self._steps: dict[str, dict[str, tuple[Element | None, Element | None]]] = {}
        # Dynamic chains whose name came or went in the last render: did it exist before?
        # None after a render from scratch.
        self._chain_steps: dict[str, bool] | None = None
        self._dnat_steps: tuple[tuple[Dnat, ...], tuple[Dnat, ...]] | None = None
        self._egress_steps: tuple[tuple[EgressSnat, ...], tuple[EgressSnat, ...]] | None = None
        self._after: Ruleset | None = None  # what the last diff() left, for the ruleset below
        self._after_of: Ruleset | None = None

    def render(self, desired: DesiredState) -> Ruleset:
        self._previous, self._previous_desired = self._ruleset, self._desired
        if self._desired is not None:
            try:
                return self._finish(desired, self._update(desired))
            except _Duplicate:
                pass
        return self._finish(desired, self._rebuild(desired))

    def dnat_changes(self, since: DesiredState | None) -> tuple[tuple[Dnat, ...], tuple[Dnat, ...]] | None:
        """The Dnats the last render removed and added, if it went from `since`; else None."""
        if since is None or since is not self._previous_desired or self._dnat_steps is None:
            return None
        return self._dnat_steps

    def egress_changes(
        self, since: DesiredState | None
    ) -> tuple[tuple[EgressSnat, ...], tuple[EgressSnat, ...]] | None:
        """The egress entries the last render removed and added, if it went from `since`; else None."""
        if since is None or since is not self._previous_desired or self._egress_steps is None:
            return None
        return self._egress_steps

    def diff(self, old: Ruleset, new: Ruleset) -> Diff | None:
        """diff(old, new), from the recorded changes when `old` is what the previous render left
        in the kernel (that render itself after a full pass, or what diff() made of it) and
        `new` is the last render; otherwise by comparing everything."""
        previous = self._previous
        if new is not self._ruleset or previous is None or old.sets is not previous.sets:
            return diff(old, new)
        steps = self._steps

        def changed(before: NftSet, after: NftSet) -> tuple[list[str], list[Element]]:
            step = steps.get(after.name, {})
            gone = sorted(k for k, (was, now) in step.items() if was is not None and was != now)
            return gone, [now for was, now in step.values() if now is not None and now != was]

        known = old is previous or (old is self._after and self._after_of is previous)
        if known and self._chain_steps is not None:
            result = self._fast_diff(old, new, changed)
        else:
            result = _diff(old, new, changed)
        self._after, self._after_of = (None, None) if result is None else (result.after, new)
        return result

    def _fast_diff(
        self, old: Ruleset, new: Ruleset, changed: Callable[[NftSet, NftSet], tuple[list[str], list[Element]]]
    ) -> Diff | None:
        """_diff() without a pass over every chain: old's chains are the previous render's plus
        the emptied ones it lists as stale, and the last render recorded which names moved."""
        assert self._previous is not None and self._chain_steps is not None
        previous, moved = self._previous, self._chain_steps
        bases = len(self._base)
        old_base, new_base = previous.chains[:bases], new.chains[:bases]
        if [(c.name, c.hook) for c in old_base] != [(c.name, c.hook) for c in new_base]:
            return None
        if [(s.name, s.kind, s.declaration) for s in old.sets] != [(s.name, s.kind, s.declaration) for s in new.sets]:
            return None
        stale_before = set(old.stale_chains)
        came = sorted(name for name, existed in moved.items() if not existed and name in self._chains)
        went = sorted(name for name, existed in moved.items() if existed and name not in self._chains)

        lines: list[str] = []
        ops = 0
        for name in came:
            if name not in stale_before:  # an emptied chain is still there: refilled below
                chain = self._chains[name][0]
                lines.append(_chain_decl(chain))
                lines += _rules(chain)
                ops += 1
        deletes: list[str] = []
        adds: list[str] = []
        old_sets = {s.name: s for s in old.sets}
        for s in new.sets:
            gone, new_elements = changed(old_sets[s.name], s)
            ops += len(gone) + len(new_elements)
            deletes += _delete_elements(s.name, gone)
            adds += _add_elements(s.name, sorted(new_elements))
        lines += deletes + adds
        refilled = [new_c for old_c, new_c in zip(old_base, new_base) if new_c.rules != old_c.rules]
        refilled += [self._chains[name][0] for name in came if name in stale_before]
        for c in refilled:
            lines.append(f"flush chain {_t()} {c.name}")
            lines += _rules(c)
            ops += 1
        for name in went:
            lines.append(f"flush chain {_t()} {name}")
            ops += 1
        for name in old.stale_chains:
            if name not in self._chains:
                lines.append(f"delete chain {_t()} {name}")
                ops += 1
        kept = tuple(new.chains) + tuple(NftChain(name) for name in went)
        after_rs = Ruleset(sets=new.sets, chains=kept, stale_chains=tuple(went))
        return Diff(text="\n".join(lines) + ("\n" if lines else ""), after=after_rs, operations=ops)

    # -- building

    def _reset(self) -> None:
        self._dnats, self._egress = {}, {}
        self._elements = {name: {} for name, _, _ in _DECLARATIONS}
        self._keys = {name: [] for name, _, _ in _DECLARATIONS}
        self._items = {name: [] for name, _, _ in _DECLARATIONS}
        self._chains = {}
        self._chains_moved = True
        self._sets = {}
        self._base = ()
        self._chain_tuple = ()

    def _rebuild(self, desired: DesiredState) -> set[str]:
        """From scratch, with render()'s rules for duplicates: the last element of a key wins,
        the first chain of a name."""
        self._reset()
        self._steps, self._dnat_steps, self._egress_steps, self._chain_steps = {}, None, None, None
        exact = True
        memo = _Memo()
        for d in desired.dnats:
            placed = _place_dnat(d, memo)
            exact &= self._put(id(d), d, placed, self._dnats, replace=True)
        for e in desired.egress:
            exact &= self._put(id(e), e, _place_egress(e), self._egress, replace=True)
        for name, elements in _host_elements(desired).items():
            self._elements[name] = {e.key: e for e in elements}
        for name, by_key in self._elements.items():
            self._keys[name] = sorted(by_key)
            self._items[name] = list(map(by_key.__getitem__, self._keys[name]))
        # With duplicates the indexes cannot say what removing one entry leaves: start over
        # next time as well.
        self._desired = desired if exact else None
        return {name for name, _, _ in _DECLARATIONS}

    def _update(self, desired: DesiredState) -> set[str]:
        """Move in the entries that are new and out those that are gone; returns touched sets."""
        previous = self._desired
        assert previous is not None
        self._desired = None  # until done: a failure midway means rebuild next time
        self._steps, self._chain_steps = {}, {}
        touched: set[str] = set()
        memo = _Memo()
        removed, added = self._swap(
            desired.dnats, previous.dnats, self._dnats, lambda d: _place_dnat(d, memo), touched
        )
        egress = self._swap(desired.egress, previous.egress, self._egress, _place_egress, touched)
        hosts = (desired.managed_addresses, desired.external_interfaces, desired.return_paths)
        if hosts != (previous.managed_addresses, previous.external_interfaces, previous.return_paths):
            for name, elements in _host_elements(desired).items():
                before = self._elements[name]
                after = {e.key: e for e in elements}
                for key in before.keys() | after.keys():
                    self._record(name, key, before.get(key), after.get(key))
                self._elements[name] = after
                self._keys[name] = sorted(after)
                self._items[name] = list(map(after.__getitem__, self._keys[name]))
                touched.add(name)
        self._dnat_steps, self._egress_steps = (removed, added), egress
        self._desired = desired
        return touched

    def _swap(
        self,
        entries: tuple[Any, ...],
        previous: tuple[Any, ...],
        rendered: dict[int, Any],
        place: Callable[[Any], _Placed],
        touched: set[str],
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """Render the entries not rendered before, drop those gone; returns (gone, new)."""
        if entries is previous:
            return (), ()
        # Both are sorted and mostly the very same objects: skip the common head and tail
        # (compared by identity, in C), then match what is left by id.
        start, old_end, new_end = _changed_span(previous, entries)
        current = {id(e): e for e in entries[start:new_end]}
        before = {id(e) for e in previous[start:old_end]}
        gone = [rendered.pop(i) for i in before - current.keys()]
        came = [current[i] for i in current.keys() - before]
        for _, placed in gone:
            self._take(placed, touched)
        for entry in came:
            if not self._put(id(entry), entry, place(entry), rendered, replace=False, touched=touched):
                raise _Duplicate
        return tuple(entry for entry, _ in gone), tuple(came)

    def _put(
        self,
        i: int,
        entry: Any,
        placed: _Placed,
        rendered: dict[int, Any],
        *,
        replace: bool,
        touched: set[str] | None = None,
    ) -> bool:
        """Add an entry's elements and chains; False when an element key was taken already."""
        rendered[i] = (entry, placed)
        exact = True
        for name, element in placed.elements:
            elements = self._elements[name]
            before = elements.get(element.key)
            if before is not None:
                exact = False
                if not replace:
                    return False
            elements[element.key] = element
            if touched is not None:
                self._record(name, element.key, before, element)
                keys = self._keys[name]
                at = bisect.bisect_left(keys, element.key)
                if before is None:
                    keys.insert(at, element.key)
                    self._items[name].insert(at, element)
                else:
                    self._items[name][at] = element
                touched.add(name)
        for chain in placed.chains:
            held = self._chains.get(chain.name)
            if held is None:
                self._chains[chain.name] = [chain, 1]
                self._chains_moved = True
                if self._chain_steps is not None:
                    self._chain_steps.setdefault(chain.name, False)
            else:
                held[1] += 1
        return exact

    def _take(self, placed: _Placed, touched: set[str]) -> None:
        for name, element in placed.elements:
            before = self._elements[name].pop(element.key)
            self._record(name, element.key, before, None)
            at = bisect.bisect_left(self._keys[name], element.key)
            del self._keys[name][at], self._items[name][at]
            touched.add(name)
        for chain in placed.chains:
            held = self._chains[chain.name]
            held[1] -= 1
            if held[1] == 0:
                del self._chains[chain.name]
                self._chains_moved = True
                if self._chain_steps is not None:
                    self._chain_steps.setdefault(chain.name, True)

    def _record(self, name: str, key: str, before: Element | None, after: Element | None) -> None:
        step = self._steps.setdefault(name, {})
        first = step.get(key)
        step[key] = (before if first is None else first[0], after)

    def _finish(self, desired: DesiredState, touched: set[str]) -> Ruleset:
        sets_changed = False
        for name, kind, declaration in _DECLARATIONS:
            if name in touched or name not in self._sets:
                self._sets[name] = NftSet(name, kind, declaration, tuple(self._items[name]))
                sets_changed = True
        base = _base_chains(desired)
        chains_changed = base != self._base or self._chains_moved
        if chains_changed:
            self._base = base
            self._chain_tuple = base + tuple(self._chains[name][0] for name in sorted(self._chains))
            self._chains_moved = False
        last = self._ruleset
        if last is None or sets_changed or chains_changed:
            last = self._ruleset = Ruleset(
                sets=tuple(self._sets[name] for name, _, _ in _DECLARATIONS), chains=self._chain_tuple
            )
        return last


def _add_elements(name: str, elements: Iterable[Element]) -> list[str]:
    items = [e.text for e in elements]
    return [
        f"add element {_t()} {name} {{ {', '.join(items[i : i + ELEMENTS_PER_COMMAND])} }}"
        for i in range(0, len(items), ELEMENTS_PER_COMMAND)
    ]


def _delete_elements(name: str, keys: Iterable[str]) -> list[str]:
    items = list(keys)
    return [
        f"delete element {_t()} {name} {{ {', '.join(items[i : i + ELEMENTS_PER_COMMAND])} }}"
        for i in range(0, len(items), ELEMENTS_PER_COMMAND)
    ]


def _chain_decl(c: NftChain) -> str:
    return f"add chain {_t()} {c.name}" + (f" {{ {c.hook} }}" if c.hook else "")


def _rules(c: NftChain) -> list[str]:
    return [f"add rule {_t()} {c.name} {r}" for r in c.rules]


def table_header() -> list[str]:
    return [f'add table {_t()} {{ comment "{n.TABLE_COMMENT}"; }}']


def full_text(rs: Ruleset) -> str:
    # "add, delete, add" replaces the table in one transaction whether or not it existed;
    # deleting is milliseconds where flushing populated sets costs seconds (KERNEL-NOTES).
    lines = table_header() + [f"delete table {_t()}"] + table_header()
    lines += [f"add {s.kind} {_t()} {s.name} {{ {s.declaration} }}" for s in rs.sets]
    lines += [_chain_decl(c) for c in rs.chains]
    for s in rs.sets:
        lines += _add_elements(s.name, s.elements)
    for c in rs.chains:
        lines += _rules(c)
    return "\n".join(lines) + "\n"


def cleanup_text() -> str:
    return "\n".join(table_header() + [f"delete table {_t()}"]) + "\n"


@dataclass(frozen=True)
class Diff:
    text: str  # "" when nothing changed
    after: Ruleset  # what the kernel holds once `text` is applied
    operations: int


def diff(old: Ruleset, new: Ruleset) -> Diff | None:
    """The incremental transaction from `old` (applied) to `new`; None when only a full pass can do it."""

    def changed(before: NftSet, after: NftSet) -> tuple[list[str], list[Element]]:
        was = {e.key: e for e in before.elements}
        now = {e.key: e for e in after.elements}
        gone = sorted(k for k, e in was.items() if now.get(k) != e)
        return gone, [e for k, e in now.items() if was.get(k) != e]

    return _diff(old, new, changed)


def _diff(
    old: Ruleset, new: Ruleset, changed: Callable[[NftSet, NftSet], tuple[list[str], list[Element]]]
) -> Diff | None:
    """diff() with the element changes of each set given by `changed(old set, new set)`:
    the keys to delete (sorted) and the elements to add."""
    old_sets = {s.name: s for s in old.sets}
    if [(s.name, s.kind, s.declaration) for s in old.sets] != [(s.name, s.kind, s.declaration) for s in new.sets]:
        return None
    old_chains = {c.name: c for c in old.chains}
    new_chains = {c.name: c for c in new.chains}
    for c in new.chains:
        if c.hook and (c.name not in old_chains or old_chains[c.name].hook != c.hook):
            return None
    if any(c.hook and c.name not in new_chains for c in old.chains):
        return None

    lines: list[str] = []
    ops = 0
    added_chains = [c for c in new.chains if c.name not in old_chains]
    for c in added_chains:
        lines.append(_chain_decl(c))
        lines += _rules(c)
    ops += len(added_chains)
    deletes: list[str] = []
    adds: list[str] = []
    for s in new.sets:
        gone, new_elements = changed(old_sets[s.name], s)
        ops += len(gone) + len(new_elements)
        deletes += _delete_elements(s.name, gone)
        adds += _add_elements(s.name, sorted(new_elements))
    lines += deletes + adds
    for c in new.chains:
        before_c = old_chains.get(c.name)
        if before_c is not None and before_c.rules != c.rules:
            lines.append(f"flush chain {_t()} {c.name}")
            lines += _rules(c)
            ops += 1
    stale: list[str] = []
    for c in old.chains:
        if c.name in new_chains:
            continue
        if c.name in old.stale_chains:
            lines.append(f"delete chain {_t()} {c.name}")
        else:
            lines.append(f"flush chain {_t()} {c.name}")
            stale.append(c.name)
        ops += 1
    kept = tuple(new.chains) + tuple(NftChain(name) for name in stale)
    after_rs = Ruleset(sets=new.sets, chains=kept, stale_chains=tuple(stale))
    return Diff(text="\n".join(lines) + ("\n" if lines else ""), after=after_rs, operations=ops)
