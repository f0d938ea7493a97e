"""SNCTRLR_* environment -> frozen Settings; every bad variable is reported at once.

Compatibility with SmartNat (DevFactory/smartnat, pkg/config/config.go):
- same names, meanings and defaults; booleans accept everything Go's strconv.ParseBool does
  (1 t T TRUE true True 0 f F FALSE false False), in any case, plus yes/no/y/n/on/off;
- SNCTRLR_INTERFACES_PATTERN has Go regexp semantics: it is compiled with RE2 (google-re2), the
  engine whose syntax Go's regexp implements, and searched unanchored, so every pattern Go
  accepted means the same here and every one it refused is refused;
- an empty (or blank) value means the default, as SmartNat did for booleans; the exception is
  SNCTRLR_MONITOR_IP, where empty means "listen on every address";
- where SmartNat silently replaced a bad value by a default (or by 0), smartnatd refuses to start
  and names every bad variable at once (SettingsError, exit 78).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, cast

import re2  # google-re2

from smartnatd.errors import SettingsError

PREFIX = "SNCTRLR_"
# Settings SmartNat had that mean nothing with nftables; accepted so old env files keep working.
IGNORED = {"IPTABLES_TIMEOUT_SEC": "smartnatd drives nftables in one transaction; no iptables timeout applies"}
INT32_MAX = 2**31 - 1
# Longest link-down hold: beyond five minutes a dead uplink is a failure, not a flap.
LINK_DOWN_HOLD_MAX = 300


@dataclass(frozen=True)
class Settings:
    # --- SmartNat's settings, same names, meanings and defaults ---
    interfaces_pattern: str = ""  # regex searched in interface names (Go regexp.MatchString semantics)
    default_gw_interface: str = ""  # "" = none; SmartNat required it, smartnatd only excludes it
    gw_address_offset: int = 1
    monitor_port: int = 8080
    monitor_ip: str = "127.0.0.1"  # "" binds every address, as in SmartNat
    setup_masquerade: bool = True
    setup_snat: bool = False
    iptables_timeout_sec: int = 10
    debug_enabled: bool = False
    autorefresh_period_sec: int = 120
    max_finalize_wait_minutes: int = 60
    max_ports_per_mapping: int = 50
    # --- new in smartnatd ---
    instance_name: str = ""  # this appliance's key in status and its Lease name; default hostname
    drop_unmapped: bool = True  # drop new connections to a managed address on a port no Mapping serves
    route_table_base: int = 20000  # owned routing tables: base + ifindex of the external interface
    rule_priority: int = 1000  # priority of the owned fwmark rules
    state_dir: str = "/var/lib/smartnat"
    nft_backend: str = "auto"  # auto | library | process
    full_resync_period_sec: int = 300
    sync_debounce_ms: int = 10
    lease_namespace: str = "smartnat-system"
    lease_duration_sec: int = 30
    link_down_hold_sec: int = 5  # an external link down this long is reported down; 0: at once
    # Not a setting: names of the fields whose value came from the environment (for describe()).
    from_env: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def interfaces_regex(self) -> InterfacePattern:
        """The pattern compiled with Go's meaning; no pattern (require=False) matches no interface."""
        if not self.interfaces_pattern:
            return _MatchesNothing()
        return _compile_go_regex(self.interfaces_pattern)


# --- Go regexp (RE2 syntax) ------------------------------------------------------------------


class InterfacePattern(Protocol):
    """A compiled SNCTRLR_INTERFACES_PATTERN: searched in interface names."""

    def search(self, text: str) -> object | None: ...


# Go's regexp/syntax limits that RE2 in C++ does not share: C++ RE2 reads a repeat count too
# large to parse as the literal text "{...}", and takes any nesting depth.
_GO_MAX_REPEAT = 1000
_GO_MAX_NESTING = 1000
_REPEAT = re.compile(r"\{([0-9]+)(?:,([0-9]*))?\}")


def _check_go_limits(go_pattern: str) -> None:
    """Go's limits on the operators of the pattern: repeat counts and group nesting. Escaped
    characters, \\Q...\\E text and character classes are literal and skipped. The nesting
    count is of parentheses, an upper bound of the tree height Go measures."""
    depth = deepest = 0
    i, n = 0, len(go_pattern)
    while i < n:
        c = go_pattern[i]
        if c == "\\":
            if go_pattern.startswith("\\Q", i):
                end = go_pattern.find("\\E", i + 2)
                i = n if end < 0 else end + 2
            else:
                i += 2
            continue
        if c == "[":
            # A class: up to the first ']' that is not its first member, escapes skipped.
            i += 2 if go_pattern.startswith("[^", i) else 1
            i += 1 if go_pattern[i : i + 1] == "]" else 0
            while i < n and go_pattern[i] != "]":
                i += 2 if go_pattern[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "{" and (match := _REPEAT.match(go_pattern, i)):
            if any(count and int(count) > _GO_MAX_REPEAT for count in match.groups()):
                raise ValueError(f"invalid repeat count: {match[0]} (at most {_GO_MAX_REPEAT})")
        i += 1
    if deepest > _GO_MAX_NESTING:
        raise ValueError("expression nests too deeply")


class _MatchesNothing:
    def search(self, text: str) -> None:
        return None


def _compile_go_regex(go_pattern: str) -> InterfacePattern:
    r"""SmartNat searched its pattern with Go's regexp, whose syntax and meaning are RE2's: compile
    it with RE2 itself, so every pattern Go took means the same here and every one it refused is
    refused (Python's re differs both ways: lookarounds, backreferences, \Z, \x{41}, (?U)...)."""
    _check_go_limits(go_pattern)
    options = re2.Options()
    options.log_errors = False  # the reason comes back in the exception, not on stderr as well
    try:
        return cast(InterfacePattern, re2.compile(go_pattern, options))
    except re2.error as err:
        reason = err.args[0] if err.args else ""
        raise ValueError(reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)) from None


# --- parsers: str -> value, or ValueError with the sentence after "NAME='raw': " ----------------

_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})
_INT = re.compile(r"[+-]?[0-9]+")  # Go's strconv.ParseInt base 10: ASCII digits, no '_'


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("not a boolean (true or false)")


def _int(raw: str) -> int:
    value = raw.strip()
    if not _INT.fullmatch(value):
        raise ValueError("not a whole number")
    if len(value.lstrip("+-").lstrip("0")) > 30:  # far out of every range; spare int() the digits
        return -(10**30) if value.startswith("-") else 10**30
    return int(value, 10)


def _ranged(low: int, high: int | None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _int(raw)
        if high is None and value < low:
            raise ValueError(f"must be at least {low}")
        if high is not None and not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _port(raw: str) -> int:
    try:
        return _ranged(1, 65535)(raw)
    except ValueError:
        raise ValueError("not a port number (1-65535)") from None


def _offset(raw: str) -> int:
    value = _int(raw)
    if value == 0:
        raise ValueError("must not be 0: 1 means the subnet's first host address, -1 its last")
    if not -INT32_MAX - 1 <= value <= INT32_MAX:
        raise ValueError(f"must be between {-INT32_MAX - 1} and {INT32_MAX}")
    return value


def _regex(raw: str) -> str:
    try:
        _compile_go_regex(raw)
    except ValueError as err:  # UnicodeError too: an environment value need not be UTF-8
        raise ValueError(f"not a valid regular expression ({err})") from None
    except (OverflowError, RecursionError):
        raise ValueError("not a valid regular expression (too large or too deeply nested)") from None
    return raw


def _ip_or_empty(raw: str) -> str:
    value = raw.strip()
    if value == "":
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IP address (leave it empty to listen on every address)") from None


def _ifname(raw: str) -> str:
    # The kernel's dev_valid_name(): at most 15 bytes, not "." or "..", no '/', ':' or whitespace.
    value = raw.strip()
    if (
        len(value.encode("utf-8", "surrogatepass")) > 15
        or value in (".", "..")
        or any(c in "/:\0" or c.isspace() for c in value)
    ):
        raise ValueError("not an interface name (at most 15 characters, no '/', ':' or spaces)")
    return value


def _hold_seconds(raw: str) -> int:
    value = _int(raw)
    if not 0 <= value <= LINK_DOWN_HOLD_MAX:
        raise ValueError(
            f"must be between 0 and {LINK_DOWN_HOLD_MAX} seconds "
            "(0 drops a link that goes down at once; longer holds keep a dead uplink's addresses served)"
        )
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _absolute_path(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/") or "\0" in value:
        raise ValueError("must be an absolute path, e.g. /var/lib/smartnat")
    return value


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"


def _instance_name(raw: str) -> str:
    # A DNS label: the Lease is smartnat-<name> and Events carry it as reportingInstance (at most
    # 128 characters); 63 keeps both, and the status key, short and valid.
    value = raw.strip()
    if len(value) > 63:
        raise ValueError(
            f"is {len(value)} characters long; at most 63 (a DNS label): it names this appliance's Lease "
            "(smartnat-<name>) and its Events"
        )
    if not re.fullmatch(_DNS_LABEL, value):
        raise ValueError(
            "must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or "
            "digit, at most 63; it names this appliance's Lease (smartnat-<name>) and its Events"
        )
    return value


def _dns_label(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(_DNS_LABEL, value):
        raise ValueError("not a namespace name (lower-case letters, digits and '-', at most 63)")
    return value


PARSERS: dict[str, Callable[[str], Any]] = {
    "interfaces_pattern": _regex,
    "default_gw_interface": _ifname,
    "gw_address_offset": _offset,
    "monitor_port": _port,
    "monitor_ip": _ip_or_empty,
    "setup_masquerade": _bool,
    "setup_snat": _bool,
    "iptables_timeout_sec": _ranged(1, INT32_MAX),
    "debug_enabled": _bool,
    "autorefresh_period_sec": _ranged(1, INT32_MAX),
    "max_finalize_wait_minutes": _ranged(1, INT32_MAX),
    "max_ports_per_mapping": _ranged(1, INT32_MAX),
    "instance_name": _instance_name,
    "drop_unmapped": _bool,
    # Table ids 253-255 are the kernel's; base + the largest markable ifindex (0x0FFF) must fit.
    "route_table_base": _ranged(256, 2**31 - 4097),
    # Below the main table's rule (32766).
    "rule_priority": _ranged(1, 32000),
    "state_dir": _absolute_path,
    "nft_backend": _choice("auto", "library", "process"),
    "full_resync_period_sec": _ranged(10, INT32_MAX),
    "sync_debounce_ms": _ranged(0, 60000),
    "lease_namespace": _dns_label,
    "lease_duration_sec": _ranged(5, 3600),
    "link_down_hold_sec": _hold_seconds,
}

# Settings a running daemon cannot do without, and why, for the "is not set" sentence.
REQUIRED = {
    "interfaces_pattern": (
        "it is required; it selects the external (client-facing) interfaces, "
        "e.g. SNCTRLR_INTERFACES_PATTERN='^eth[1-9][0-9]*$'"
    ),
}
# Settings where an empty value is a value, not "use the default".
EMPTY_IS_A_VALUE = frozenset({"monitor_ip"})


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _setting_fields() -> list[str]:
    return [f.name for f in fields(Settings) if f.name in PARSERS]


def _is_set(field_name: str, environ: Mapping[str, str]) -> bool:
    raw = environ.get(env_name(field_name))
    if raw is None:
        return False
    return field_name in EMPTY_IS_A_VALUE or raw.strip() != ""


def load(environ: Mapping[str, str], *, require: bool = True) -> tuple[Settings, list[str]]:
    """Parse the environment. Returns settings and notices; raises SettingsError listing every problem
    (and carrying the notices, so a typo's "did you mean" hint is shown beside the error it caused).

    `require=False` accepts a missing pattern, which then selects no interface (load_subset()
    uses it for cleanup, which reads only the settings it needs).
    """
    settings, notices, _ = _load(environ, require=require, used=None)
    return settings, notices


def load_subset(environ: Mapping[str, str], names: Collection[str]) -> tuple[Settings, list[str], list[str]]:
    """Settings for a command that uses only the fields `names` (cleanup: tables, priority, backend).

    Returns settings, notices and warnings. A bad value among `names` raises SettingsError as in
    load(); a bad value of any other setting is a warning, and that setting keeps its default, so
    an unrelated typo cannot block the command. Nothing is required.
    """
    return _load(environ, require=False, used=frozenset(names))


def _load(
    environ: Mapping[str, str], *, require: bool, used: frozenset[str] | None
) -> tuple[Settings, list[str], list[str]]:
    values: dict[str, Any] = {}
    problems: list[str] = []
    unused_problems: list[str] = []  # bad values of settings outside `used`
    notices: list[str] = []
    names = _setting_fields()
    for name in names:
        var = env_name(name)
        if not _is_set(name, environ):
            if require and name in REQUIRED:
                state = "is empty" if var in environ else "is not set"
                problems.append(f"{var} {state}: {REQUIRED[name]}")
            continue
        raw = environ[var]
        try:
            values[name] = PARSERS[name](raw)
        except ValueError as err:
            if name.upper() in IGNORED:  # a bad value of a setting without effect stops nothing
                continue
            if used is None or name in used:
                problems.append(f"{var}={raw!r}: {err}")
            else:
                unused_problems.append(f"{var}={raw!r}: {err} (not used by this command; ignored)")
    for suffix, why in IGNORED.items():
        if PREFIX + suffix in environ:
            notices.append(f"{PREFIX}{suffix} is accepted and ignored: {why}")
    known = {env_name(name) for name in names}
    for var in sorted(environ):
        if var.startswith(PREFIX) and var not in known:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "typo?"
            notices.append(f"{var} is not a smartnatd setting; ignored ({hint})")
    if problems:
        raise SettingsError(problems, notices=notices + unused_problems)
    gw = values.get("default_gw_interface", "")
    pattern = values.get("interfaces_pattern", "")
    if gw and pattern and _compile_go_regex(pattern).search(gw):
        notices.append(
            f"SNCTRLR_DEFAULT_GW_INTERFACE={gw!r} matches SNCTRLR_INTERFACES_PATTERN; "
            "it is excluded from the external interfaces"
        )
    from_env = frozenset(values)
    if not values.get("instance_name"):
        values["instance_name"] = _default_instance_name()
    return Settings(**values, from_env=from_env), notices, unused_problems


def describe(settings: Settings, environ: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(variable, effective value as written in an env file, "env" or "default") for every setting.

    The source is what load() recorded in `settings`; `environ` is consulted only for settings
    not made by load() (nothing recorded). An empty value (SNCTRLR_MONITOR_IP) prints as nothing
    after the '=', as in an env file.
    """
    rows: list[tuple[str, str, str]] = []
    for name in _setting_fields():
        value = getattr(settings, name)
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if settings.from_env or environ is None:
            explicit = name in settings.from_env
        else:
            explicit = _is_set(name, environ)
        rows.append((env_name(name), text, "env" if explicit else "default"))
    return rows


def _default_instance_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]", "-", name)[:63].strip("-") or "smartnat"
