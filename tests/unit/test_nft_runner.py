"""nft runner: both backends against a real kernel, each test in its own network namespace.

The pure helpers (error classification, counter parsing, saved-file rotation) are tested
without root; everything touching nftables needs root and runs inside `sn-<id>` namespaces,
and every kernel test also proves the host's own ruleset did not change.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from smartnatd.errors import NftError
from smartnatd.metrics import nft_counter_reader
from smartnatd.nft.libnftables import LibnftablesUnavailable, load_library
from smartnatd.nft.runner import (
    Failure,
    NftRunner,
    ProcessRunner,
    describe_failure,
    make_runner,
    parse_element_counters,
    save_failed,
)

BACKENDS = ("library", "process")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="needs root, nft and ip to create network namespaces",
)

# The address the packet test sends to; it lives on lo inside the test namespace only.
LOCAL = "192.0.2.1"

TABLE = """\
add table ip smartnat { comment "managed by smartnatd; do not edit"; }
add set ip smartnat external-ports { type ipv4_addr . inet_proto . inet_service; counter; }
add map ip smartnat dnat-targets { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }
add chain ip smartnat filter-input { type filter hook input priority filter; }
add chain ip smartnat nat-prerouting { type nat hook prerouting priority dstnat; }
add rule ip smartnat filter-input ip daddr . meta l4proto . th dport @external-ports counter
add rule ip smartnat nat-prerouting dnat ip to ip daddr . meta l4proto . th dport map @dnat-targets
add element ip smartnat external-ports { 192.0.2.1 . udp . 5353 comment "ns-a/dns" }
add element ip smartnat external-ports { 192.0.2.1 . tcp . 80 comment "ns-b/web" }
add element ip smartnat dnat-targets { 192.0.2.1 . tcp . 80 comment "ns-b/web" : 10.0.0.1 . 8080 }
"""


# --- namespaces -------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _delete_netns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _host_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def host_untouched() -> Iterator[None]:
    """Every kernel test ends by proving the host namespace's ruleset is byte-for-byte the same."""
    before = _host_ruleset()
    yield
    assert _host_ruleset() == before, "the host's nftables ruleset changed"


@pytest.fixture
def netns(host_untouched: None) -> Iterator[str]:
    name = f"sn-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{LOCAL}/32", "dev", "lo")
        yield name
    finally:
        _delete_netns(name)


@pytest.fixture(params=BACKENDS)
def runner(request: pytest.FixtureRequest, netns: str, tmp_path: pathlib.Path) -> Iterator[NftRunner]:
    made = make_runner(netns=netns, backend=request.param, state_dir=tmp_path / "state")
    try:
        yield made
    finally:
        made.close()


def _in_ns(netns: str, *args: str) -> str:
    """nft run independently of the runner under test, to see what the kernel really holds."""
    argv = ["ip", "netns", "exec", netns, "nft", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _send_udp(netns: str, *, address: str, port: int, payload: bytes) -> None:
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f"s.sendto({payload!r}, ({address!r}, {port}))"
    )
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True, timeout=10)


# --- kernel tests -----------------------------------------------------------------------------


@needs_root
@pytest.mark.kernel
def test_run_creates_table_and_list_table_shows_it(runner: NftRunner, netns: str) -> None:
    assert runner.list_table("ip", "smartnat") is None
    runner.run(TABLE)
    listing = runner.list_table("ip", "smartnat")
    assert listing is not None
    assert 'comment "managed by smartnatd; do not edit"' in listing
    assert "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service" in listing
    assert '192.0.2.1 . udp . 5353 counter packets 0 bytes 0 comment "ns-a/dns"' in listing
    assert '192.0.2.1 . tcp . 80 comment "ns-b/web" : 10.0.0.1 . 8080' in listing
    assert "dnat ip to ip daddr . meta l4proto . th dport map @dnat-targets" in listing
    # The kernel holds what the runner reports, in the namespace and nowhere else.
    assert _in_ns(netns, "list", "table", "ip", "smartnat") == listing


@needs_root
@pytest.mark.kernel
def test_failed_transaction_changes_nothing_and_is_saved(runner: NftRunner, tmp_path: pathlib.Path) -> None:
    runner.run(TABLE)
    before = runner.list_table("ip", "smartnat")
    # Valid changes first, then an element for a set that does not exist: all or nothing.
    bad = (
        'add element ip smartnat external-ports { 192.0.2.1 . tcp . 443 comment "ns-c/tls" }\n'
        "delete element ip smartnat dnat-targets { 192.0.2.1 . tcp . 80 }\n"
        "add element ip smartnat missing-set { 192.0.2.9 . tcp . 22 }\n"
    )
    with pytest.raises(NftError) as caught:
        runner.run(bad)
    err = caught.value
    assert err.errno_name == "ENOENT"
    assert "line 3" in str(err) and "missing-set" in str(err)
    saved = pathlib.Path(err.saved_path)
    assert saved.parent == tmp_path / "state" and saved.name.startswith("failed-") and saved.suffix == ".nft"
    content = saved.read_text()
    assert content.startswith(bad)
    assert "# transaction:3:" in content and "No such file or directory" in content
    assert runner.list_table("ip", "smartnat") == before


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize(
    ("text", "errno_name"),
    [
        ("create table ip smartnat\n", "EEXIST"),
        ("add chain ip smartnat filter-input {\n  nonsense }\n", "EINVAL"),
        ("delete chain ip smartnat no-such-chain\n", "ENOENT"),
        ("delete set ip smartnat external-ports\n", "EBUSY"),  # a rule still looks it up
    ],
)
def test_errors_are_classified(runner: NftRunner, text: str, errno_name: str) -> None:
    runner.run(TABLE)
    before = runner.list_table("ip", "smartnat")
    with pytest.raises(NftError) as caught:
        runner.run(text)
    assert caught.value.errno_name == errno_name
    assert runner.list_table("ip", "smartnat") == before


@needs_root
@pytest.mark.kernel
def test_check_validates_against_the_live_ruleset_and_changes_nothing(runner: NftRunner) -> None:
    runner.run(TABLE)
    before = runner.list_table("ip", "smartnat")
    # Only the live ruleset can tell this is wrong: the chain exists, the set does not.
    with pytest.raises(NftError) as caught:
        runner.check("add element ip smartnat missing-set { 192.0.2.9 . tcp . 22 }\n")
    assert caught.value.errno_name == "ENOENT"
    assert runner.list_table("ip", "smartnat") == before
    good = 'add element ip smartnat external-ports { 192.0.2.1 . tcp . 443 comment "ns-c/tls" }\n'
    runner.check(good)
    assert runner.list_table("ip", "smartnat") == before
    runner.run(good)
    after = runner.list_table("ip", "smartnat") or ""
    assert '192.0.2.1 . tcp . 443 counter packets 0 bytes 0 comment "ns-c/tls"' in after


@needs_root
@pytest.mark.kernel
def test_element_counters_count_a_packet(runner: NftRunner, netns: str) -> None:
    runner.run(TABLE)
    assert runner.element_counters("ip", "smartnat", "external-ports") == {
        "192.0.2.1 . udp . 5353": (0, 0, "ns-a/dns"),
        "192.0.2.1 . tcp . 80": (0, 0, "ns-b/web"),
    }
    payload = b"smartnat-probe"
    _send_udp(netns, address=LOCAL, port=5353, payload=payload)
    counters = runner.element_counters("ip", "smartnat", "external-ports")
    # Bytes count the IP packet: 20 bytes of IPv4 header and 8 of UDP header.
    assert counters["192.0.2.1 . udp . 5353"] == (1, 20 + 8 + len(payload), "ns-a/dns")
    assert counters["192.0.2.1 . tcp . 80"] == (0, 0, "ns-b/web")


@needs_root
@pytest.mark.kernel
def test_metrics_reads_counters_without_waiting_for_a_transaction(netns: str) -> None:
    """/metrics reads counters with an nft process of its own, so a scrape never waits for the
    library context a pass is using (nor makes a pass wait ~0.2 s at 10k Mappings)."""
    runner = make_runner(netns=netns, backend="library")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        runner.run(TABLE)
        read = nft_counter_reader(runner)
        runner._lock.acquire()  # a transaction in progress on the library context
        try:
            counters = pool.submit(read).result(timeout=10)
        finally:
            runner._lock.release()
        assert counters["192.0.2.1 . tcp . 80"] == (0, 0, "ns-b/web")
    finally:
        pool.shutdown()
        runner.close()


def test_metrics_counter_reading_gives_up_after_its_own_short_timeout(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stuck nft holds a scrape for the counter timeout, not the transaction's 120 s."""
    fake = tmp_path / "nft"
    fake.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    transactions = ProcessRunner(netns=None)
    read = nft_counter_reader(transactions, timeout=0.2)
    with pytest.raises(NftError, match="no answer within 0.2s") as caught:
        read()
    assert caught.value.errno_name == "ETIMEDOUT"
    assert transactions.timeout == 120.0  # a pass keeps its own


@needs_root
@pytest.mark.kernel
def test_element_counters_of_a_missing_set_raise(runner: NftRunner) -> None:
    runner.run(TABLE)
    with pytest.raises(NftError) as caught:
        runner.element_counters("ip", "smartnat", "no-such-set")
    assert caught.value.errno_name == "ENOENT"


@needs_root
@pytest.mark.kernel
def test_library_context_stays_in_its_namespace_from_any_thread(netns: str) -> None:
    """The context acts where it was created, whichever thread (an executor's) calls it."""
    runner = make_runner(netns=netns, backend="library")
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(runner.run, ["add table ip first\n", "add table ip second\n"]))
    finally:
        runner.close()
    tables = _in_ns(netns, "list", "tables")
    assert "table ip first" in tables and "table ip second" in tables


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_namespace_is_an_error_not_created(backend: str, host_untouched: None) -> None:
    name = f"sn-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(NftError) as caught:
            make_runner(netns=name, backend=backend)
        assert caught.value.errno_name == "ENOENT"
        assert not (pathlib.Path("/run/netns") / name).exists()
    finally:
        if (pathlib.Path("/run/netns") / name).exists():
            _delete_netns(name)


@needs_root
@pytest.mark.kernel
def test_auto_prefers_the_library(netns: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="smartnatd.nft.runner")
    runner = make_runner(netns=netns, backend="auto")
    try:
        assert runner.backend == "library"
    finally:
        runner.close()
    assert "nft backend selected backend=library" in caplog.text


@needs_root
@pytest.mark.kernel
def test_time_of_10k_map_elements(runner: NftRunner, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not asserted: one full transaction with 10,000 map elements, then one change."""
    lines = [line for line in TABLE.splitlines() if not line.startswith("add element")]
    for i in range(10_000):
        address = f"198.51.100.{i // 250 + 1}"
        port = 1024 + i % 250
        lines.append(
            f'add element ip smartnat dnat-targets {{ {address} . tcp . {port} comment "ns-{i % 97}/m{i}" : '
            f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1} . 8080 }}"
        )
    full = "\n".join(lines) + "\n"
    started = time.perf_counter()
    runner.run(full)
    took_full = time.perf_counter() - started
    one = 'add element ip smartnat dnat-targets { 203.0.113.7 . udp . 53 comment "ns-x/one" : 10.9.9.9 . 53 }\n'
    started = time.perf_counter()
    runner.run(one)
    took_one = time.perf_counter() - started
    assert (runner.list_table("ip", "smartnat") or "").count('comment "ns-') == 10_001
    with capsys.disabled():
        print(
            f"\n[nft timing] backend={runner.backend} full transaction 10000 map elements "
            f"({len(full.encode())} bytes): {took_full:.3f}s; one-element transaction at 10k: {took_one * 1000:.1f}ms"
        )


# --- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "errno_name"),
    [
        ("Error: No such file or directory\ndelete element ip nosuchtable set {10.0.0.1}\n", "ENOENT"),
        ("Error: No such file or directory; did you mean table ‘foo’ in family ip?\nblah\n", "ENOENT"),
        ("Error: Could not process rule: File exists\ncreate table foo\n             ^^^\n", "EEXIST"),
        ("/dev/stdin:4:1-30: Error: Could not process rule: Device or resource busy\ndelete chain ip t c\n", "EBUSY"),
        ("Error: Could not process rule: Operation not permitted\nadd table ip t\n", "EPERM"),
        ("Error: Could not process rule: Invalid argument\nadd rule ip t c x\n", "EINVAL"),
        ("Error: syntax error, unexpected string, expecting '{' or '$'\n", "EINVAL"),
        # The quoted command below the error line must not decide the class.
        ('Error: syntax error, unexpected comment\nadd rule t c comment "No such file or directory" drop\n', "EINVAL"),
        ('Error: No such file or directory\nadd rule foo c comment "File exists" drop\n', "ENOENT"),
    ],
)
def test_describe_failure_classifies_the_first_error_line(stderr: str, errno_name: str) -> None:
    assert describe_failure(error=stderr, text="", source="/dev/stdin").errno_name == errno_name


def test_describe_failure_names_the_line_and_renames_the_source() -> None:
    text = "add table ip t\nadd chain ip t c\ndelete chain ip t d\n"
    stderr = (
        "/proc/self/fd/9:3:19-19: Error: Could not process rule: No such file or directory\n"
        "delete chain ip t d\n"
        "                  ^\n"
    )
    failure = describe_failure(error=stderr, text=text, source="/proc/self/fd/9")
    assert failure.message == (
        "nft rejected the transaction at line 3 (delete chain ip t d): "
        "Could not process rule: No such file or directory"
    )
    assert failure.details.startswith("transaction:3:19-19: Error:")


def test_a_repeated_failure_is_a_warning_once_per_episode_and_every_transaction_is_saved(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At warning when a failure starts, when nft's message changes and after a success; at
    debug while the same one repeats (the retries of a pass would log it every few seconds)."""
    error = tmp_path / "error"
    fake = tmp_path / "nft"  # fails with the text in `error` while that file exists
    fake.write_text(f"#!/bin/sh\ncat >/dev/null\n[ -f {error} ] || exit 0\ncat {error} >&2\nexit 1\n")
    fake.chmod(0o755)
    runner = ProcessRunner(netns=None, nft=str(fake), state_dir=tmp_path / "state")
    caplog.set_level(logging.DEBUG, logger="smartnatd.nft.runner")
    enoent = "Error: Could not process rule: No such file or directory\n"
    eexist = "Error: Could not process rule: File exists\n"
    for stderr in (enoent, enoent, eexist, "", eexist):
        if stderr:
            error.write_text(stderr)
            with pytest.raises(NftError):
                runner.run("add table ip t\n")
        else:
            error.unlink()
            runner.run("add table ip t\n")
    logged = [
        (r.levelname, match[1], "saved=-" not in r.getMessage())
        for r in caplog.records
        if (match := re.search(r"nft transaction failed .*errno=(\w+)", r.getMessage()))
    ]
    assert logged == [
        ("WARNING", "ENOENT", True), ("DEBUG", "ENOENT", True), ("WARNING", "EEXIST", True), ("WARNING", "EEXIST", True)
    ]
    assert len(list((tmp_path / "state").glob("failed-*.nft"))) == 4


def test_parse_element_counters_reads_sets_and_maps() -> None:
    """The shapes nft 1.0.6 prints for `-j list set/map` (taken from real listings)."""
    udp53 = {"concat": ["192.0.2.1", "udp", 53]}
    tcp80 = {"concat": ["192.0.2.1", "tcp", 80]}
    listing = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6"}},
                {
                    "set": {
                        "name": "s",
                        "elem": [
                            {"elem": {"val": udp53, "comment": "a/b", "counter": {"packets": 3, "bytes": 120}}},
                            {"concat": ["192.0.2.2", "tcp", 80]},
                            {"elem": {"val": {"prefix": {"addr": "10.0.0.0", "len": 8}}, "counter": {"packets": 1, "bytes": 2}}},
                        ],
                    }
                },
                {"map": {"name": "m", "elem": [[{"elem": {"val": tcp80, "comment": "c/d"}}, {"concat": ["10.0.0.1", 8080]}]]}},
            ]
        }
    )
    assert parse_element_counters(listing) == {
        "192.0.2.1 . udp . 53": (3, 120, "a/b"),
        "192.0.2.2 . tcp . 80": (0, 0, ""),
        "10.0.0.0/8": (1, 2, ""),
        "192.0.2.1 . tcp . 80": (0, 0, "c/d"),
    }


def test_save_failed_keeps_the_last_five(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state" / "nested"
    failure = Failure(message="nft rejected the transaction: boom", errno_name="EINVAL", details="transaction:1:1-1: Error: boom")
    paths = [
        save_failed(state_dir=state, text=f"add table ip t{i}", failure=failure, backend="process") for i in range(7)
    ]
    kept = sorted(state.glob("failed-*.nft"))
    assert kept == sorted(paths[-5:])
    content = paths[-1].read_text()
    assert content.startswith("add table ip t6\n# nft failed at ")
    assert "# transaction:1:1-1: Error: boom" in content


FAILURE = Failure(message="nft rejected the transaction: boom", errno_name="EINVAL", details="")


def test_save_failed_makes_a_private_directory_and_file_whatever_the_umask(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    previous = os.umask(0)
    try:
        path = save_failed(state_dir=state, text="add table ip t", failure=FAILURE, backend="process")
    finally:
        os.umask(previous)
    assert state.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


def test_save_failed_does_not_follow_a_symlink_planted_at_its_name(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    planted = state / "failed-20260102T030405.678901Z.nft"
    planted.symlink_to(victim)
    with pytest.raises(OSError):
        save_failed(state_dir=state, text="add table ip t", failure=FAILURE, backend="process", now=now)
    assert victim.read_text() == "untouched\n"
    assert planted.is_symlink()
    # Rotation removes an old link itself, not what it points to.
    for i in range(6):
        save_failed(state_dir=state, text="add table ip t", failure=FAILURE, backend="process",
                    now=now.replace(second=6 + i))
    assert not planted.is_symlink() and victim.read_text() == "untouched\n"


def test_missing_library_is_a_clear_error() -> None:
    with pytest.raises(LibnftablesUnavailable, match="libnftables-does-not-exist.so.9.*libnftables1"):
        load_library(name="libnftables-does-not-exist.so.9")


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, library, process"):
        make_runner(netns=None, backend="iptables")
