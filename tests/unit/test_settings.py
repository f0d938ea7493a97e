"""SNCTRLR_* environment -> Settings: SmartNat's names and defaults, every problem at once."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smartnatd.errors import SettingsError
from smartnatd.settings import PARSERS, PREFIX, Settings, describe, env_name, load, load_subset

PATTERN = {"SNCTRLR_INTERFACES_PATTERN": "^eth[1-9][0-9]*$"}
SETTING_NAMES = [f.name for f in fields(Settings) if f.name in PARSERS]
ENV_NAMES = [env_name(name) for name in SETTING_NAMES]


def load_with(**variables: str):
    """load() with the required pattern plus SNCTRLR_<KEY>=value for each keyword."""
    return load({**PATTERN, **{PREFIX + key: value for key, value in variables.items()}})


def problems_of(environ: dict[str, str], *, require: bool = True) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load(environ, require=require)
    return info.value.problems


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_smartnats_and_the_documented_new_ones():
    settings, notices = load(PATTERN)
    assert notices == []
    assert settings.interfaces_pattern == "^eth[1-9][0-9]*$"
    # SmartNat's pkg/config/config.go
    assert settings.default_gw_interface == ""
    assert settings.gw_address_offset == 1
    assert settings.monitor_port == 8080
    assert settings.monitor_ip == "127.0.0.1"
    assert settings.setup_masquerade is True
    assert settings.setup_snat is False
    assert settings.iptables_timeout_sec == 10
    assert settings.debug_enabled is False
    assert settings.autorefresh_period_sec == 120
    assert settings.max_finalize_wait_minutes == 60
    assert settings.max_ports_per_mapping == 50
    # new in smartnatd
    assert settings.drop_unmapped is True
    assert settings.route_table_base == 20000
    assert settings.rule_priority == 1000
    assert settings.state_dir == "/var/lib/smartnat"
    assert settings.nft_backend == "auto"
    assert settings.full_resync_period_sec == 300
    assert settings.sync_debounce_ms == 10
    assert settings.lease_namespace == "smartnat-system"
    assert settings.lease_duration_sec == 30
    assert settings.link_down_hold_sec == 5


def test_instance_name_defaults_to_a_dns_label_from_the_hostname():
    settings, _ = load(PATTERN)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", settings.instance_name)


def test_every_setting_has_a_parser_and_env_name_adds_the_prefix():
    assert set(PARSERS) == set(SETTING_NAMES)
    assert env_name("monitor_port") == "SNCTRLR_MONITOR_PORT"


# --- good values --------------------------------------------------------------------------------

GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


@pytest.mark.parametrize("raw", GO_TRUE + ["yes", "Yes", "on", "ON", "y", " true "])
@pytest.mark.parametrize("key", ["SETUP_MASQUERADE", "SETUP_SNAT", "DEBUG_ENABLED", "DROP_UNMAPPED"])
def test_booleans_accept_what_go_parsebool_accepts_as_true(key, raw):
    settings, _ = load_with(**{key: raw})
    assert getattr(settings, key.lower()) is True


@pytest.mark.parametrize("raw", GO_FALSE + ["no", "No", "off", "OFF", "n"])
@pytest.mark.parametrize("key", ["SETUP_MASQUERADE", "SETUP_SNAT", "DEBUG_ENABLED", "DROP_UNMAPPED"])
def test_booleans_accept_what_go_parsebool_accepts_as_false(key, raw):
    settings, _ = load_with(**{key: raw})
    assert getattr(settings, key.lower()) is False


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("INTERFACES_PATTERN", "eth[1-9][0-9]*", "eth[1-9][0-9]*"),
        ("INTERFACES_PATTERN", "^(ens|enp)[0-9]+$", "^(ens|enp)[0-9]+$"),
        ("DEFAULT_GW_INTERFACE", "eth0", "eth0"),
        ("DEFAULT_GW_INTERFACE", "enp0s31f6.100", "enp0s31f6.100"),
        ("DEFAULT_GW_INTERFACE", "abcdefghijklmno", "abcdefghijklmno"),  # 15 characters
        ("GW_ADDRESS_OFFSET", "1", 1),
        ("GW_ADDRESS_OFFSET", "-1", -1),
        ("GW_ADDRESS_OFFSET", "+2", 2),
        ("GW_ADDRESS_OFFSET", "-2147483648", -(2**31)),
        ("MONITOR_PORT", "1", 1),
        ("MONITOR_PORT", "65535", 65535),
        ("MONITOR_PORT", " 9100 ", 9100),
        ("MONITOR_IP", "0.0.0.0", "0.0.0.0"),
        ("MONITOR_IP", "192.0.2.7", "192.0.2.7"),
        ("MONITOR_IP", "::1", "::1"),
        ("MONITOR_IP", "", ""),  # SmartNat: empty = every address
        ("IPTABLES_TIMEOUT_SEC", "30", 30),
        ("AUTOREFRESH_PERIOD_SEC", "60", 60),
        ("AUTOREFRESH_PERIOD_SEC", "010", 10),  # base 10, as Go's ParseInt(s, 10, 64)
        ("MAX_FINALIZE_WAIT_MINUTES", "1", 1),
        ("MAX_PORTS_PER_MAPPING", "100000", 100000),  # SmartNat had no upper bound
        ("INSTANCE_NAME", "nat-a", "nat-a"),
        ("INSTANCE_NAME", "a" * 63, "a" * 63),
        ("ROUTE_TABLE_BASE", "256", 256),
        ("ROUTE_TABLE_BASE", "2147479551", 2**31 - 4097),
        ("RULE_PRIORITY", "1", 1),
        ("RULE_PRIORITY", "32000", 32000),
        ("STATE_DIR", "/run/smartnat", "/run/smartnat"),
        ("NFT_BACKEND", "library", "library"),
        ("NFT_BACKEND", "process", "process"),
        ("FULL_RESYNC_PERIOD_SEC", "10", 10),
        ("SYNC_DEBOUNCE_MS", "0", 0),
        ("SYNC_DEBOUNCE_MS", "60000", 60000),
        ("LEASE_NAMESPACE", "smartnat", "smartnat"),
        ("LEASE_DURATION_SEC", "5", 5),
        ("LEASE_DURATION_SEC", "3600", 3600),
        ("LINK_DOWN_HOLD_SEC", "0", 0),  # no hold: today's behaviour
        ("LINK_DOWN_HOLD_SEC", "300", 300),
    ],
)
def test_good_value_is_parsed(key, raw, expected):
    settings, _ = load_with(**{key: raw})
    assert getattr(settings, key.lower()) == expected


@pytest.mark.parametrize("key", [n.upper() for n in SETTING_NAMES if n not in ("monitor_ip", "interfaces_pattern")])
@pytest.mark.parametrize("raw", ["", "   "])
def test_empty_value_means_the_default(key, raw):
    settings, _ = load_with(**{key: raw})
    if key == "INSTANCE_NAME":
        assert settings.instance_name == load(PATTERN)[0].instance_name
    else:
        assert getattr(settings, key.lower()) == getattr(Settings(), key.lower())


# --- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, raw, sentence",
    [
        ("INTERFACES_PATTERN", "eth[0-9", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "eth(", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "a{4294967296}", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "(" * 5000 + ")" * 5000, "not a valid regular expression"),
        # Go refuses these, and Python's re would take them: RE2 refuses them as Go does.
        ("INTERFACES_PATTERN", "(?=a)", "not a valid regular expression"),
        ("INTERFACES_PATTERN", r"(a)\1", "not a valid regular expression"),
        ("INTERFACES_PATTERN", r"eth1\Z", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "eth1++", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "(?x)eth 1", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "a{1001}", "not a valid regular expression"),
        ("INTERFACES_PATTERN", "eth\udc80", "not a valid regular expression"),  # not UTF-8
        ("INTERFACES_PATTERN", "[[:nosuch:]]", "not a valid regular expression"),
        ("DEFAULT_GW_INTERFACE", "abcdefghijklmnop", "not an interface name"),  # 16 characters
        ("DEFAULT_GW_INTERFACE", "eth0/1", "not an interface name"),
        ("DEFAULT_GW_INTERFACE", "eth0:1", "not an interface name"),
        ("DEFAULT_GW_INTERFACE", "eth 0", "not an interface name"),
        ("DEFAULT_GW_INTERFACE", "..", "not an interface name"),
        ("GW_ADDRESS_OFFSET", "0", "must not be 0"),
        ("GW_ADDRESS_OFFSET", "one", "not a whole number"),
        ("GW_ADDRESS_OFFSET", "2147483648", "must be between -2147483648 and 2147483647"),
        ("MONITOR_PORT", "80a", "not a port number (1-65535)"),
        ("MONITOR_PORT", "0", "not a port number (1-65535)"),
        ("MONITOR_PORT", "65536", "not a port number (1-65535)"),
        ("MONITOR_IP", "localhost", "not an IP address"),
        ("MONITOR_IP", "192.0.2.256", "not an IP address"),
        ("SETUP_MASQUERADE", "maybe", "not a boolean (true or false)"),
        ("SETUP_SNAT", "2", "not a boolean (true or false)"),
        ("DEBUG_ENABLED", "enabled", "not a boolean (true or false)"),
        ("DROP_UNMAPPED", "-1", "not a boolean (true or false)"),
        ("AUTOREFRESH_PERIOD_SEC", "0", "must be between 1 and"),
        ("AUTOREFRESH_PERIOD_SEC", "1.5", "not a whole number"),
        ("AUTOREFRESH_PERIOD_SEC", "1_000", "not a whole number"),  # Python's int() would take it
        ("AUTOREFRESH_PERIOD_SEC", "\u0665", "not a whole number"),  # a non-ASCII digit
        ("AUTOREFRESH_PERIOD_SEC", "9" * 5000, "must be between 1 and"),
        ("MAX_FINALIZE_WAIT_MINUTES", "-5", "must be between 1 and"),
        ("MAX_PORTS_PER_MAPPING", "0", "must be between 1 and"),
        ("INSTANCE_NAME", "Nat_A", "must be a DNS label"),
        ("INSTANCE_NAME", "nat..a", "must be a DNS label"),
        ("INSTANCE_NAME", "-nat", "must be a DNS label"),
        # Lease smartnat-<name>, Event reportingInstance (at most 128): one label, not a host name.
        ("INSTANCE_NAME", "nat-a.example.com", "must be a DNS label"),
        ("INSTANCE_NAME", "a" * 64, "is 64 characters long; at most 63"),
        ("ROUTE_TABLE_BASE", "255", "must be between 256 and 2147479551"),
        ("ROUTE_TABLE_BASE", "2147479552", "must be between 256 and 2147479551"),
        ("RULE_PRIORITY", "0", "must be between 1 and 32000"),
        ("RULE_PRIORITY", "32766", "must be between 1 and 32000"),
        ("STATE_DIR", "var/lib/smartnat", "must be an absolute path"),
        ("NFT_BACKEND", "iptables", "must be one of auto, library, process"),
        ("FULL_RESYNC_PERIOD_SEC", "9", "must be between 10 and"),
        ("SYNC_DEBOUNCE_MS", "-1", "must be between 0 and 60000"),
        ("SYNC_DEBOUNCE_MS", "60001", "must be between 0 and 60000"),
        ("LEASE_NAMESPACE", "kube.node.lease", "not a namespace name"),
        ("LEASE_NAMESPACE", "a" * 64, "not a namespace name"),
        ("LEASE_DURATION_SEC", "4", "must be between 5 and 3600"),
        ("LEASE_DURATION_SEC", "3601", "must be between 5 and 3600"),
        ("LINK_DOWN_HOLD_SEC", "-1", "must be between 0 and 300 seconds"),
        ("LINK_DOWN_HOLD_SEC", "301", "must be between 0 and 300 seconds"),
        ("LINK_DOWN_HOLD_SEC", "1.5", "not a whole number"),
    ],
)
def test_bad_value_is_one_sentence_naming_variable_and_value(key, raw, sentence):
    problems = problems_of({**PATTERN, PREFIX + key: raw})
    assert len(problems) == 1
    assert problems[0].startswith(f"{PREFIX}{key}={raw!r}: ")
    assert sentence in problems[0]


def test_bad_port_message_reads_as_the_style_guide_example():
    assert problems_of({**PATTERN, "SNCTRLR_MONITOR_PORT": "80a"}) == [
        "SNCTRLR_MONITOR_PORT='80a': not a port number (1-65535)"
    ]


# --- every problem at once --------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_exit_code_78():
    environ = {
        "SNCTRLR_MONITOR_PORT": "80a",
        "SNCTRLR_SETUP_SNAT": "maybe",
        "SNCTRLR_GW_ADDRESS_OFFSET": "0",
        "SNCTRLR_MONITOR_IP": "localhost",
        "SNCTRLR_NFT_BACKEND": "iptables",
    }
    with pytest.raises(SettingsError) as info:
        load(environ)
    err = info.value
    assert err.exit_code == 78
    assert len(err.problems) == 6
    assert err.problems[0].startswith("SNCTRLR_INTERFACES_PATTERN is not set: it is required;")
    for name in environ:
        assert sum(p.startswith(name + "=") for p in err.problems) == 1
    assert str(err) == "; ".join(err.problems)


def test_missing_pattern_says_what_it_is_for_and_gives_an_example():
    assert problems_of({}) == [
        "SNCTRLR_INTERFACES_PATTERN is not set: it is required; it selects the external (client-facing) "
        "interfaces, e.g. SNCTRLR_INTERFACES_PATTERN='^eth[1-9][0-9]*$'"
    ]


def test_empty_pattern_is_reported_as_empty():
    (problem,) = problems_of({"SNCTRLR_INTERFACES_PATTERN": ""})
    assert problem.startswith("SNCTRLR_INTERFACES_PATTERN is empty: it is required;")


def test_require_false_allows_a_missing_pattern_that_matches_no_interface():
    settings, notices = load({}, require=False)
    assert settings.interfaces_pattern == ""
    assert notices == []
    assert settings.interfaces_regex.search("eth0") is None
    assert settings.interfaces_regex.search("") is None


def test_require_false_still_reports_bad_values():
    assert problems_of({"SNCTRLR_MONITOR_PORT": "0"}, require=False) == [
        "SNCTRLR_MONITOR_PORT='0': not a port number (1-65535)"
    ]


def test_a_subset_load_reports_only_its_own_bad_values_and_warns_about_the_others():
    env = {"SNCTRLR_MONITOR_PORT": "abc", "SNCTRLR_RULE_PRIORITY": "2000"}
    settings, notices, warnings = load_subset(env, {"rule_priority", "route_table_base"})
    assert settings.rule_priority == 2000
    assert settings.monitor_port == Settings().monitor_port
    assert notices == []
    assert warnings == ["SNCTRLR_MONITOR_PORT='abc': not a port number (1-65535) (not used by this command; ignored)"]
    with pytest.raises(SettingsError) as info:
        load_subset({**env, "SNCTRLR_ROUTE_TABLE_BASE": "1"}, {"rule_priority", "route_table_base"})
    assert info.value.problems == ["SNCTRLR_ROUTE_TABLE_BASE='1': must be between 256 and 2147479551"]
    assert info.value.notices == [warnings[0]]


# --- notices ------------------------------------------------------------------------------------


def test_notices_travel_with_the_error_so_a_typo_hint_is_not_lost():
    with pytest.raises(SettingsError) as info:
        load({"SNCTRLR_INTERFACE_PATTERN": "eth1", "SNCTRLR_IPTABLES_TIMEOUT_SEC": "5"})
    assert info.value.problems[0].startswith("SNCTRLR_INTERFACES_PATTERN is not set")
    assert info.value.notices == [
        "SNCTRLR_IPTABLES_TIMEOUT_SEC is accepted and ignored: "
        "smartnatd drives nftables in one transaction; no iptables timeout applies",
        "SNCTRLR_INTERFACE_PATTERN is not a smartnatd setting; ignored (did you mean SNCTRLR_INTERFACES_PATTERN?)",
    ]



def test_unknown_snctrlr_variable_is_a_notice_naming_the_closest_setting():
    settings, notices = load({**PATTERN, "SNCTRLR_INTERFACE_PATTERN": "eth1", "OTHER_VAR": "x"})
    assert notices == [
        "SNCTRLR_INTERFACE_PATTERN is not a smartnatd setting; ignored (did you mean SNCTRLR_INTERFACES_PATTERN?)"
    ]
    assert settings.interfaces_pattern == "^eth[1-9][0-9]*$"


def test_unknown_snctrlr_variable_without_a_close_match_asks_about_a_typo():
    _, notices = load({**PATTERN, "SNCTRLR_ZZZ": "1"})
    assert notices == ["SNCTRLR_ZZZ is not a smartnatd setting; ignored (typo?)"]


@pytest.mark.parametrize("raw", ["10", "30", "0", "abc", ""])
def test_iptables_timeout_is_accepted_and_ignored_with_a_notice(raw):
    settings, notices = load_with(IPTABLES_TIMEOUT_SEC=raw)
    assert notices == [
        "SNCTRLR_IPTABLES_TIMEOUT_SEC is accepted and ignored: "
        "smartnatd drives nftables in one transaction; no iptables timeout applies"
    ]
    assert isinstance(settings.iptables_timeout_sec, int)


def test_default_gw_interface_matching_the_pattern_is_a_notice():
    _, notices = load({"SNCTRLR_INTERFACES_PATTERN": "eth", "SNCTRLR_DEFAULT_GW_INTERFACE": "eth0"})
    assert notices == [
        "SNCTRLR_DEFAULT_GW_INTERFACE='eth0' matches SNCTRLR_INTERFACES_PATTERN; "
        "it is excluded from the external interfaces"
    ]
    _, notices = load({**PATTERN, "SNCTRLR_DEFAULT_GW_INTERFACE": "eth0"})
    assert notices == []


# --- the interfaces pattern keeps Go's meaning ------------------------------------------------


@pytest.mark.parametrize(
    "pattern, matches, misses",
    [
        ("eth[1-9][0-9]*", ["eth1", "eth10", "veth1", "eth1x"], ["eth0", "eth"]),  # unanchored search
        ("^eth[1-9][0-9]*$", ["eth1", "eth10"], ["veth1", "eth1x", "eth0"]),
        ("^eth[[:digit:]]+$", ["eth0", "eth12"], ["ethx", "eth"]),  # POSIX class
        ("^eth[^[:digit:]]$", ["ethx"], ["eth1"]),
        ("^[[:alpha:]]+[[:^digit:]]$", ["ethx"], ["eth1"]),
        (r"^eth1\z", ["eth1"], ["eth1\n", "eth10"]),
        (r"^\Qeth1.5\E$", ["eth1.5"], ["eth1x5"]),
        ("^(?<kind>eth|ens)[0-9]$", ["eth1", "ens3"], ["enp1"]),  # Go 1.22 named group
        (r"^eth\d$", ["eth1"], ["eth\u0665"]),  # \d is ASCII in Go
        ("^[]a]+$", ["]a", "a"], ["b"]),
        ("^e[[x]$", ["e[", "ex"], ["e]"]),
        # Go takes these, and Python's re would not:
        (r"^\x{65}th1$", ["eth1"], ["xth1"]),
        # Braces that are literal text are no repeat counts, however large their number:
        (r"^eth\{2000}$", ["eth{2000}"], ["eth"]),
        (r"^eth[{2000}]$", ["eth{", "eth2"], ["eth"]),
        (r"^\Qeth{2000}\E$", ["eth{2000}"], ["eth"]),
        (r"^(?U)eth1$", ["eth1"], ["eth2"]),
        (r"^\pLth1$", ["eth1"], ["1th1"]),
    ],
)
def test_interfaces_pattern_is_searched_with_go_regexp_semantics(pattern, matches, misses):
    settings, _ = load({"SNCTRLR_INTERFACES_PATTERN": pattern})
    assert settings.interfaces_pattern == pattern  # kept as written; only the compiled form differs
    assert [n for n in matches if not settings.interfaces_regex.search(n)] == []
    assert [n for n in misses if settings.interfaces_regex.search(n)] == []


# --- describe -----------------------------------------------------------------------------------


def test_describe_lists_every_setting_with_its_value_and_source():
    settings, _ = load(
        {**PATTERN, "SNCTRLR_MONITOR_PORT": "9100", "SNCTRLR_SETUP_SNAT": "T", "SNCTRLR_MONITOR_IP": ""}
    )
    rows = describe(settings)
    assert [name for name, _, _ in rows] == ENV_NAMES
    table = {name: (value, source) for name, value, source in rows}
    assert table["SNCTRLR_INTERFACES_PATTERN"] == ("^eth[1-9][0-9]*$", "env")
    assert table["SNCTRLR_MONITOR_PORT"] == ("9100", "env")
    assert table["SNCTRLR_SETUP_SNAT"] == ("true", "env")
    assert table["SNCTRLR_MONITOR_IP"] == ("", "env")
    assert table["SNCTRLR_SETUP_MASQUERADE"] == ("true", "default")
    assert table["SNCTRLR_GW_ADDRESS_OFFSET"] == ("1", "default")
    assert table["SNCTRLR_INSTANCE_NAME"] == (settings.instance_name, "default")
    assert all(isinstance(value, str) for value, _ in table.values())


def test_describe_calls_an_empty_value_a_default():
    settings, _ = load({**PATTERN, "SNCTRLR_DEBUG_ENABLED": ""})
    assert ("SNCTRLR_DEBUG_ENABLED", "false", "default") in describe(settings)


def test_describe_takes_the_source_from_environ_for_settings_built_by_hand():
    rows = describe(Settings(monitor_port=9100), {"SNCTRLR_MONITOR_PORT": "9100"})
    assert ("SNCTRLR_MONITOR_PORT", "9100", "env") in rows
    assert ("SNCTRLR_MONITOR_IP", "127.0.0.1", "default") in rows


def test_describe_prefers_what_load_recorded_over_environ():
    environ = {**PATTERN, "SNCTRLR_MONITOR_PORT": "9100"}
    settings, _ = load(environ)
    assert describe(settings, environ) == describe(settings)


def test_recorded_sources_do_not_change_equality():
    assert load_with(MONITOR_PORT="8080")[0] == load(PATTERN)[0]


# --- totality -----------------------------------------------------------------------------------

env_values = st.one_of(
    st.text(),
    st.sampled_from(["", " ", "0", "1", "-1", "true", "false", "65536", "^eth[0-9]+$", "(", "[[:digit:]]"]),
    st.from_regex(r"[+-]?[0-9]{1,12}", fullmatch=True),
)


@given(
    environ=st.dictionaries(
        keys=st.sampled_from(ENV_NAMES + ["SNCTRLR_UNKNOWN", "PATH"]),
        values=env_values,
    ),
    require=st.booleans(),
)
@example(environ={"SNCTRLR_INTERFACES_PATTERN": "a{4294967296}"}, require=True)
@example(environ={"SNCTRLR_INTERFACES_PATTERN": "(" * 5000}, require=True)
@example(environ={"SNCTRLR_MONITOR_PORT": "1_0"}, require=False)
def test_load_returns_settings_or_raises_settings_error_only(environ, require):
    try:
        settings, notices = load(environ, require=require)
    except SettingsError as err:
        assert err.problems
        assert all(isinstance(p, str) and p.startswith(PREFIX) for p in err.problems)
        assert err.exit_code == 78
        return
    assert isinstance(settings, Settings)
    assert all(isinstance(n, str) for n in notices)
    settings.interfaces_regex.search("eth0")
    assert len(describe(settings)) == len(ENV_NAMES)


# --- the shipped env file and the documentation stay in step with the code --------------------

ROOT = Path(__file__).resolve().parents[2]
ENV_LINE = re.compile(r"^(#?)(SNCTRLR_[A-Z0-9_]+)=(.*)$")


def shipped_env_file() -> list[tuple[bool, str, str]]:
    """(active, name, value) of each assignment in etc/smartnat.env, commented-out ones too."""
    rows = []
    for line in (ROOT / "etc" / "smartnat.env").read_text().splitlines():
        match = ENV_LINE.match(line)
        if match:
            value = match[3]
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            rows.append((match[1] == "", match[2], value))
    return rows


def test_shipped_env_file_lists_every_setting_once_with_its_default():
    rows = shipped_env_file()
    assert sorted(name for _, name, _ in rows) == sorted(ENV_NAMES)
    defaults = {name: value for name, value, _ in describe(Settings())}
    for active, name, value in rows:
        if not active and name != "SNCTRLR_INSTANCE_NAME":  # its default is the host name
            assert value == defaults[name], name


def test_shipped_env_file_leaves_the_two_first_settings_to_fill_in():
    rows = shipped_env_file()
    active = {name: value for is_active, name, value in rows if is_active}
    assert active == {"SNCTRLR_INTERFACES_PATTERN": "", "SNCTRLR_DEFAULT_GW_INTERFACE": ""}
    assert [name for _, name, _ in rows[:2]] == list(active)
    # Installed as it is, the daemon refuses to start and says what to set (check-config: 78).
    with pytest.raises(SettingsError, match="SNCTRLR_INTERFACES_PATTERN"):
        load(active)
    # Filled in with the file's own example, it loads cleanly.
    settings, notices = load({**active, "SNCTRLR_INTERFACES_PATTERN": "^eth[1-9][0-9]*$",
                              "SNCTRLR_DEFAULT_GW_INTERFACE": "eth0"})
    assert notices == []
    assert settings.interfaces_regex.search("eth1") and not settings.interfaces_regex.search("eth0")


def test_configuration_doc_names_every_setting():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert [name for name in ENV_NAMES if f"| `{name}` |" not in text] == []
