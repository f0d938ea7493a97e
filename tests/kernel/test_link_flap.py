"""A short link flap keeps connections: the link-down hold (SNCTRLR_LINK_DOWN_HOLD_SEC), with
the whole daemon (`smartnatd run --source DIR`) in the appliance namespace of the topology in
conftest.py.

Mappings (namespace `demo`, the echo Service of examples/demo, direct mode, both pods):

    web      192.0.2.10:80/tcp (ext1's primary)    -> pods :8080
    second   192.0.2.11:81/tcp (ext1's secondary)  -> pods :8080

The client connects from 203.0.113.10 through c1 <-> ext1. Its strict rp_filter drops a reply
that comes back on another link, and the appliance's main default route leads to the router:
a reply echoes only if it left by ext1, through ext1's own table (SNCTRLR_ROUTE_TABLE_BASE +
ifindex), whose routes `ip link set ext1 down` deletes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import http_get
from tests.kernel.harness import Topology, open_tcp, parse_echo_reply, sh, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

ROOT = Path(__file__).resolve().parents[2]
SMARTNATD = Path(sys.executable).parent / "smartnatd"
TABLE_BASE = 20000

MAPPINGS = """\
apiVersion: smartnat.aureacentral.com/v1alpha1
kind: Mapping
metadata: {name: web, namespace: demo}
spec:
  addresses: [192.0.2.10]
  serviceName: echo
  mode: direct
  ports: [{port: 80, protocol: tcp, servicePort: 80}]
---
apiVersion: smartnat.aureacentral.com/v1alpha1
kind: Mapping
metadata: {name: second, namespace: demo}
spec:
  addresses: [192.0.2.11]
  serviceName: echo
  mode: direct
  ports: [{port: 81, protocol: tcp, servicePort: 80}]
"""


class Daemon:
    """`smartnatd run --source DIR` inside the appliance namespace, logging to a file."""

    def __init__(self, topology: Topology, tmp: Path, *, hold: int) -> None:
        source = tmp / "source"
        shutil.copytree(ROOT / "examples" / "demo", source)
        (source / "mappings.yaml").write_text(MAPPINGS)
        env = dict(
            os.environ,
            SNCTRLR_INTERFACES_PATTERN="^ext[0-9]+$",
            SNCTRLR_DEFAULT_GW_INTERFACE="eth0",
            SNCTRLR_STATE_DIR=str(tmp / "state"),
            SNCTRLR_INSTANCE_NAME="flap",
            SNCTRLR_SYNC_DEBOUNCE_MS="5",
            SNCTRLR_ROUTE_TABLE_BASE=str(TABLE_BASE),
            SNCTRLR_LINK_DOWN_HOLD_SEC=str(hold),
        )
        self.log = tmp / "daemon.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topology.appliance, str(SMARTNATD), "run", "--source", str(source)],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            if self.proc.poll() is not None:
                raise AssertionError(f"smartnatd exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout}s:\n{self.logs()}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture
def start(topology: Topology, echo_servers, tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def start(*, hold: int) -> Daemon:
        daemon = Daemon(topology, tmp_path, hold=hold)
        started.append(daemon)
        daemon.wait_for_log("mappings at start:")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def connect(t: Topology, *, dst: str = "192.0.2.10", port: int = 80):
    conn = open_tcp(t.client, dst=dst, port=port, src=t.allowed_client)
    assert parse_echo_reply(conn.exchange(b"before")).name in ("pod1", "pod2")
    return conn


def flow_ids(t: Topology, conn) -> list[str]:
    """Conntrack ids of the appliance's entry for this client connection (one, or none)."""
    _, sport = conn.local
    lines = sh(t.appliance, "conntrack", "-L", "-p", "tcp", "-s", str(t.allowed_client), "--sport", str(sport),
               "-o", "id", check=False).stdout.splitlines()
    return [word for line in lines for word in line.split() if word.startswith("id=")]


def ext1_table(t: Topology) -> str:
    index = int(sh(t.appliance, "ip", "-o", "link", "show", "dev", "ext1").stdout.split(":")[0])
    return str(TABLE_BASE + index)


def default_route(t: Topology) -> str:
    return sh(t.appliance, "ip", "route", "show", "table", ext1_table(t), "default").stdout.strip()


def link(t: Topology, state: str) -> None:
    sh(t.appliance, "ip", "link", "set", "ext1", state)


def ext1_metrics(t: Topology) -> tuple[str, str]:
    """smartnat_external_interface_up and _held of ext1, as /metrics (127.0.0.1:8080) says."""
    _, body = http_get(t.appliance, "/metrics")
    values = {
        name: line.rsplit(" ", 1)[1]
        for line in body.splitlines()
        for name in ("up", "held")
        if line.startswith(f'smartnat_external_interface_{name}{{interface="ext1"}} ')
    }
    return values.get("up", "-"), values.get("held", "-")


def test_a_one_second_flap_keeps_an_established_connection(topology, start) -> None:
    t = topology
    daemon = start(hold=5)  # the default
    conn = connect(t)
    before = flow_ids(t, conn)
    assert len(before) == 1 and default_route(t)
    rules = sh(t.appliance, "ip", "rule").stdout
    assert ext1_metrics(t) == ("1.0", "0.0")

    link(t, "down")
    daemon.wait_for_log("ext1 down; holding its state for 5s")
    assert default_route(t) == ""  # the kernel deleted it with the link
    assert ext1_metrics(t) == ("1.0", "1.0")  # served as up, and held
    time.sleep(1)  # the flap itself
    link(t, "up")
    daemon.wait_for_log("ext1 up again after")

    # The pass after the flap puts the table's default route back: replies leave by ext1 again.
    wait_until(lambda: default_route(t), timeout=5, message="ext1's default route back in its table")
    assert sh(t.appliance, "ip", "rule").stdout == rules
    assert parse_echo_reply(conn.exchange(b"after", timeout=5)).name in ("pod1", "pod2")
    assert flow_ids(t, conn) == before  # the same conntrack entry
    assert ext1_metrics(t) == ("1.0", "0.0")
    assert "still down" not in daemon.logs() and "sync failed" not in daemon.logs()
    conn.close()


def test_without_a_hold_a_flap_deletes_the_connection(topology, start) -> None:
    t = topology
    daemon = start(hold=0)
    conn = connect(t)
    assert len(flow_ids(t, conn)) == 1

    link(t, "down")
    wait_until(lambda: flow_ids(t, conn) == [], timeout=5, message="the flow deleted with the link down")
    link(t, "up")

    assert "holding" not in daemon.logs()
    conn.close()


def test_a_link_down_longer_than_the_hold_is_dropped_when_it_ends(topology, start) -> None:
    t = topology
    daemon = start(hold=1)
    conn = connect(t)
    before = flow_ids(t, conn)

    link(t, "down")
    daemon.wait_for_log("ext1 down; holding its state for 1s")
    assert flow_ids(t, conn) == before  # held: nothing re-planned yet
    daemon.wait_for_log("ext1 still down after 1s; reporting it down")
    wait_until(lambda: flow_ids(t, conn) == [], timeout=5, message="the flow deleted after the hold")
    assert ext1_metrics(t) == ("0.0", "0.0")  # down, and no longer held
    link(t, "up")
    conn.close()


@pytest.mark.parametrize("link_down", [False, True], ids=["link-up", "during-a-hold"])
def test_an_address_removed_from_ext1_is_dropped_at_once(topology, start, link_down: bool) -> None:
    t = topology
    daemon = start(hold=30)
    kept, dropped = connect(t), connect(t, dst="192.0.2.11", port=81)
    kept_ids = flow_ids(t, kept)
    assert len(kept_ids) == 1 and len(flow_ids(t, dropped)) == 1

    if link_down:
        link(t, "down")
        daemon.wait_for_log("ext1 down; holding its state for 30s")
    sh(t.appliance, "ip", "addr", "del", "192.0.2.11/24", "dev", "ext1")
    # Well within the hold: an address moving away (a keepalived failover) is never held.
    wait_until(lambda: flow_ids(t, dropped) == [], timeout=5, message="the removed address's flow deleted")
    assert flow_ids(t, kept) == kept_ids

    if link_down:
        link(t, "up")
        daemon.wait_for_log("ext1 up again after")
        wait_until(lambda: default_route(t), timeout=5, message="ext1's default route back in its table")
    assert parse_echo_reply(kept.exchange(b"after", timeout=5)).name in ("pod1", "pod2")
    assert flow_ids(t, kept) == kept_ids
    kept.close()
    dropped.close()


def test_a_full_pass_during_a_hold_does_not_fail(topology, start) -> None:
    # The kernel refuses a route through a down link: a full pass (SIGHUP, the periodic resync)
    # while ext1 is held leaves its table alone instead of failing, and the pass after the
    # flap restores it.
    t = topology
    daemon = start(hold=30)
    conn = connect(t)
    before = flow_ids(t, conn)

    link(t, "down")
    daemon.wait_for_log("ext1 down; holding its state for 30s")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("routes of ext1 left out: the link is down")
    link(t, "up")
    daemon.wait_for_log("ext1 up again after")

    wait_until(lambda: default_route(t), timeout=5, message="ext1's default route back in its table")
    assert parse_echo_reply(conn.exchange(b"after", timeout=5)).name in ("pod1", "pod2")
    assert flow_ids(t, conn) == before
    assert "sync failed" not in daemon.logs()
    conn.close()
