"""DesiredState -> Ruleset (data) -> nft text.

The Ruleset is data first so that one object gives the golden file, the dry-run output, the
full transaction and the incremental difference against the last applied one. Text is sorted
and byte-for-byte stable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from smartnatd.desired import MARK_MASK, DesiredState, Dnat
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


def _mapping_owner(d: Dnat) -> str:
    return str(d.owner)


def _endpoint_key(d: Dnat) -> str:
    e = d.external
    return f"{e.address} . {e.protocol} . {e.port}"


def render(desired: DesiredState) -> Ruleset:
    external_ports: list[Element] = []
    dnat_targets: list[Element] = []
    dnat_chains: list[Element] = []
    source_filters: list[Element] = []
    chains: dict[str, NftChain] = {}

    for d in desired.dnats:
        key = _endpoint_key(d)
        owner = _mapping_owner(d)
        external_ports.append(Element.of(key, owner=owner))
        if len(d.targets) == 1:
            t = d.targets[0]
            dnat_targets.append(Element.of(key, owner=owner, data=f"{t.address} . {t.port}"))
        else:
            spread = ", ".join(f"{i} : {t.address} . {t.port}" for i, t in enumerate(d.targets))
            rule = f"{L4} dnat ip to numgen random mod {len(d.targets)} map {{ {spread} }}"
            name = n.backends_chain(rule)
            chains.setdefault(name, NftChain(name, rules=(rule,)))
            dnat_chains.append(Element.of(key, owner=owner, data=f"goto {name}"))
        if not d.allows_anyone:
            sources = ", ".join(str(s) for s in d.allowed_sources)
            accept = f"ip saddr {{ {sources} }} return"
            name = n.sources_chain(accept)
            chains.setdefault(name, NftChain(name, rules=(accept, "counter drop")))
            source_filters.append(Element.of(key, owner=owner, data=f"jump {name}"))

    ifaces = [n.ifname(i) for i in desired.external_interfaces]
    marks = [Element.of(n.ifname(p.interface), data=f"0x{p.mark:08x}") for p in desired.return_paths]
    egress_marks = [Element.of(str(e.source), owner=str(e.owner), data=f"0x{e.mark:08x}") for e in desired.egress]
    egress_sources = [Element.of(str(e.source), owner=str(e.owner), data=str(e.to)) for e in desired.egress]

    endpoint = "type ipv4_addr . inet_proto . inet_service;"
    sets = (
        NftSet(n.EXTERNAL_PORTS, "set", f"{endpoint} counter;", _sorted(external_ports)),
        NftSet(n.MANAGED_ADDRESSES, "set", "type ipv4_addr;", _sorted(Element.of(str(a)) for a in desired.managed_addresses)),
        NftSet(n.EXTERNAL_INTERFACES, "set", "type ifname;", _sorted(Element.of(i) for i in ifaces)),
        NftSet(n.INTERFACE_MARKS, "map", "type ifname : mark;", _sorted(marks)),
        NftSet(n.DNAT_TARGETS, "map", "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;", _sorted(dnat_targets)),
        NftSet(n.DNAT_CHAINS, "map", f"type ipv4_addr . inet_proto . inet_service : verdict;", _sorted(dnat_chains)),
        NftSet(n.SOURCE_FILTERS, "map", f"type ipv4_addr . inet_proto . inet_service : verdict;", _sorted(source_filters)),
        NftSet(n.EGRESS_MARKS, "map", "type ipv4_addr : mark;", _sorted(egress_marks)),
        NftSet(n.EGRESS_SOURCES, "map", "type ipv4_addr : ipv4_addr;", _sorted(egress_sources)),
    )

    mask = f"0x{MARK_MASK:08x}"
    prerouting = [
        # Allow-lists first: a refused client is dropped before any NAT or mark.
        f"{KEY} vmap @{n.SOURCE_FILTERS}",
        # Remember the ingress interface of every connection we serve, for its replies. The set
        # lookup comes first so its element counters see every client packet, not only the first.
        f"{KEY} @{n.EXTERNAL_PORTS} ct state new ct mark set iifname map @{n.INTERFACE_MARKS}",
    ]
    if desired.drop_unmapped:
        # Only new connections: replies to the box's own traffic from these addresses still pass.
        prerouting.append(
            f"ct state new ip daddr @{n.MANAGED_ADDRESSES} {L4} {KEY} != @{n.EXTERNAL_PORTS} counter drop"
        )
    prerouting += [
        f"ct state new iifname != @{n.EXTERNAL_INTERFACES} ct mark set ip saddr map @{n.EGRESS_MARKS}",
        # Copy the mark to the packet only from the cluster side: original-direction packets
        # from clients must route normally, replies and egress by the interface's own table.
        f"iifname != @{n.EXTERNAL_INTERFACES} ct mark & {mask} != 0 meta mark set ct mark & {mask}",
    ]
    postrouting = []
    if desired.masquerade:
        postrouting.append(f"ct status dnat ct mark & {mask} != 0 oifname != @{n.EXTERNAL_INTERFACES} masquerade")
    postrouting.append(f"oifname @{n.EXTERNAL_INTERFACES} snat ip to ip saddr map @{n.EGRESS_SOURCES}")

    base = (
        # mangle (-150): after conntrack (-200) so ct state works, before DNAT (-100) so the
        # allow-list sees the original destination.
        NftChain(n.FILTER_PREROUTING, "type filter hook prerouting priority mangle; policy accept;", tuple(prerouting)),
        # dstnat - 10: ahead of kube-proxy's DNAT, so the external endpoint is translated by us.
        NftChain(
            n.NAT_PREROUTING,
            "type nat hook prerouting priority dstnat - 10; policy accept;",
            (f"{KEY} vmap @{n.DNAT_CHAINS}", f"dnat ip to {KEY} map @{n.DNAT_TARGETS}"),
        ),
        # srcnat - 10: ahead of kube-proxy's masquerade.
        NftChain(n.NAT_POSTROUTING, "type nat hook postrouting priority srcnat - 10; policy accept;", tuple(postrouting)),
    )
    return Ruleset(sets=sets, chains=base + tuple(chains[k] for k in sorted(chains)))


def _sorted(elements: Iterable[Element]) -> tuple[Element, ...]:
    unique = {e.key: e for e in elements}
    return tuple(unique[k] for k in sorted(unique))


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
        before = {e.key: e for e in old_sets[s.name].elements}
        after = {e.key: e for e in s.elements}
        gone = sorted(k for k, e in before.items() if after.get(k) != e)
        new_elements = [e for k, e in after.items() if before.get(k) != e]
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
