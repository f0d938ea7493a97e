"""SNCTRLR_* environment -> frozen Settings; every bad variable is reported at once."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from smartnatd.errors import SettingsError

PREFIX = "SNCTRLR_"
# Settings SmartNat had that mean nothing with nftables; accepted so old env files keep working.
IGNORED = {"IPTABLES_TIMEOUT_SEC": "smartnatd drives nftables in one transaction; no iptables timeout applies"}


@dataclass(frozen=True)
class Settings:
    # --- SmartNat's settings, same names, meanings and defaults ---
    interfaces_pattern: str = ""  # regex searched in interface names (Go regexp.MatchString semantics)
    default_gw_interface: str = ""
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
    lease_namespace: str = "kube-node-lease"
    lease_duration_sec: int = 30

    @property
    def interfaces_regex(self) -> re.Pattern[str]:
        return re.compile(self.interfaces_pattern)


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "t", "true", "yes", "y", "on"):
        return True
    if value in ("0", "f", "false", "no", "n", "off"):
        return False
    raise ValueError("not a boolean (true/false)")


def _int(raw: str) -> int:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise ValueError("not a whole number") from None


def _ranged(low: int, high: int | None, what: str = "") -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _int(raw)
        if value < low or (high is not None and value > high):
            bound = f"{low}-{high}" if high is not None else f">= {low}"
            raise ValueError(f"{what or 'must be'} {bound}".strip())
        return value

    return parse


def _port(raw: str) -> int:
    try:
        return _ranged(1, 65535)(raw)
    except ValueError:
        raise ValueError("not a port number (1-65535)") from None


def _nonzero(raw: str) -> int:
    value = _int(raw)
    if value == 0:
        raise ValueError("must not be 0 (positive counts from the network address, negative from broadcast)")
    return value


def _regex(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty: it selects the external interfaces, e.g. '^eth[1-9][0-9]*$'")
    try:
        re.compile(raw)
    except re.error as err:
        raise ValueError(f"not a valid regular expression ({err})") from None
    return raw


def _ip_or_empty(raw: str) -> str:
    if raw == "":
        return raw
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError("not an IP address (leave empty to listen on every address)") from None


def _ifname(raw: str) -> str:
    if len(raw) > 15 or any(c in raw for c in " /\t"):
        raise ValueError("not an interface name")
    return raw


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return raw

    return parse


def _text(raw: str) -> str:
    return raw


def _dns_label(raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", raw):
        raise ValueError("must be a lower-case DNS name (it names this appliance's Lease)")
    return raw


PARSERS: dict[str, Callable[[str], Any]] = {
    "interfaces_pattern": _regex,
    "default_gw_interface": _ifname,
    "gw_address_offset": _nonzero,
    "monitor_port": _port,
    "monitor_ip": _ip_or_empty,
    "setup_masquerade": _bool,
    "setup_snat": _bool,
    "iptables_timeout_sec": _ranged(1, None),
    "debug_enabled": _bool,
    "autorefresh_period_sec": _ranged(1, None),
    "max_finalize_wait_minutes": _ranged(1, None),
    "max_ports_per_mapping": _ranged(1, 65535),
    "instance_name": _dns_label,
    "drop_unmapped": _bool,
    "route_table_base": _ranged(256, 2**31 - 4097),
    "rule_priority": _ranged(1, 32000),
    "state_dir": _text,
    "nft_backend": _choice("auto", "library", "process"),
    "full_resync_period_sec": _ranged(10, None),
    "sync_debounce_ms": _ranged(0, 60000),
    "lease_namespace": _dns_label,
    "lease_duration_sec": _ranged(5, 3600),
}

REQUIRED = ("interfaces_pattern",)


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def load(environ: Mapping[str, str], *, require: bool = True) -> tuple[Settings, list[str]]:
    """Parse the environment. Returns settings and notices; raises SettingsError listing every problem.

    `require=False` lets commands that touch nothing (plan, check of one file) run without the
    settings a running daemon must have.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    notices: list[str] = []
    for f in fields(Settings):
        name = env_name(f.name)
        if name not in environ:
            if require and f.name in REQUIRED:
                problems.append(f"{name} is not set: {PARSERS[f.name].__doc__ or 'it is required'}")
            continue
        raw = environ[name]
        try:
            values[f.name] = PARSERS[f.name](raw)
        except ValueError as err:
            problems.append(f"{name}={raw!r}: {err}")
    for suffix, why in IGNORED.items():
        if PREFIX + suffix in environ:
            notices.append(f"{PREFIX}{suffix} is accepted and ignored: {why}")
    known = {env_name(f.name) for f in fields(Settings)}
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in known:
            notices.append(f"{name} is not a smartnatd setting; ignored (typo?)")
    if problems:
        raise SettingsError(problems)
    if not values.get("instance_name"):
        values["instance_name"] = _default_instance_name()
    return Settings(**values), notices


def _default_instance_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]", "-", name).strip("-") or "smartnat"


_regex.__doc__ = "it selects the external interfaces, e.g. SNCTRLR_INTERFACES_PATTERN='^eth[1-9][0-9]*$'"
