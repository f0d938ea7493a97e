"""Every nftables name smartnatd uses, and the rules for the dynamic ones, in one place."""

from __future__ import annotations

import base64
import hashlib
import re

FAMILY = "ip"
TABLE = "smartnat"
TABLE_COMMENT = "managed by smartnatd; do not edit"

# Sets and maps: kebab-case plural nouns for what they hold.
EXTERNAL_PORTS = "external-ports"  # address . proto . port served here (with per-element counters)
MANAGED_ADDRESSES = "managed-addresses"  # every address of an external interface
EXTERNAL_INTERFACES = "external-interfaces"
INTERFACE_MARKS = "interface-marks"  # ingress interface -> conntrack mark
DNAT_TARGETS = "dnat-targets"  # endpoint -> the one target (service mode, or one endpoint)
DNAT_CHAINS = "dnat-chains"  # endpoint -> goto the spread chain for its number of targets
DNAT_SPREAD = "dnat-spread"  # endpoint . i -> the i-th of its targets (several targets)
SOURCE_FILTERS = "source-filters"  # endpoint -> jump to its allow-list chain
EGRESS_MARKS = "egress-marks"  # backend address -> mark of the interface its egress leaves by
EGRESS_SOURCES = "egress-sources"  # backend address -> external address it leaves with

# Base chains are <type>-<hook>. ("dnat"/"snat" alone are nft keywords.)
FILTER_PREROUTING = "filter-prerouting"
NAT_PREROUTING = "nat-prerouting"
NAT_POSTROUTING = "nat-postrouting"
FILTER_OUTPUT = "filter-output"
NAT_OUTPUT = "nat-output"

# Marks a new connection to an external endpoint by the interface it came in on.
MARK_CONNECTION = "mark-connection"

# Spread chains are static, one per number of targets: "spread-<k>".
SPREAD_PREFIX = "spread-"

# Dynamic chains are shared by every Mapping with the same content, so they are named by a
# hash of that content: "<kind>-<HASH8>". The prefix tells garbage collection they are ours and
# dynamic; 8 base32 characters (40 bits) make a collision between live chains negligible, and
# the name stays far below nft's 256-byte limit.
SOURCES_PREFIX = "sources-"
BACKENDS_PREFIX = "backends-"  # more targets than a spread chain takes
DYNAMIC_PREFIXES = (SOURCES_PREFIX, BACKENDS_PREFIX)

COMMENT_MAX = 128  # nft keeps at most 128 bytes of an element comment
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")


def hash8(identity: str) -> str:
    digest = hashlib.sha256(identity.encode()).digest()
    return base64.b32encode(digest).decode()[:8]


def sources_chain(identity: str) -> str:
    return SOURCES_PREFIX + hash8(identity)


def backends_chain(identity: str) -> str:
    return BACKENDS_PREFIX + hash8(identity)


def spread_chain(targets: int) -> str:
    return f"{SPREAD_PREFIX}{targets}"


def is_dynamic(chain: str) -> bool:
    return chain.startswith(DYNAMIC_PREFIXES)


def comment(text: str) -> str:
    """A quoted element comment. Owners are namespace/name, DNS characters only, but be safe."""
    clean = re.sub(r'[^A-Za-z0-9_./:-]', "_", text)[:COMMENT_MAX]
    return f'"{clean}"'


def ifname(name: str) -> str:
    if not _IFNAME.fullmatch(name):
        raise ValueError(f"interface name {name!r} cannot be used in an nft rule")
    return f'"{name}"'
