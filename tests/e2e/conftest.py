"""The whole daemon in the appliance namespace: a real `smartnatd run` process per test."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.conftest import echo_servers, netns_factory, topology  # noqa: F401  (fixtures)
from tests.kernel.harness import Topology, in_netns

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
SMARTNATD = Path(sys.executable).parent / "smartnatd"
MONITOR_PORT = 8080


def http_get(ns: str, path: str, *, port: int = MONITOR_PORT) -> tuple[int, str]:
    with in_netns(ns):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.connect()  # the socket belongs to the namespace it was created in
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


class NotifyListener:
    """Plays systemd's side of sd_notify: a datagram socket collecting the daemon's messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """One `smartnatd run` process inside the appliance namespace."""

    def __init__(self, *, topology: Topology, source: Path, state: Path, notify: Path | None, env: dict[str, str]) -> None:
        self.topology = topology
        full_env = dict(
            os.environ,
            SNCTRLR_INTERFACES_PATTERN="^ext[0-9]+$",
            SNCTRLR_DEFAULT_GW_INTERFACE="eth0",
            SNCTRLR_STATE_DIR=str(state),
            SNCTRLR_INSTANCE_NAME="e2e",
            SNCTRLR_SYNC_DEBOUNCE_MS="5",
            **env,
        )
        if notify is not None:
            full_env["NOTIFY_SOCKET"] = str(notify)
        self.log = state / "daemon.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topology.appliance, str(SMARTNATD), "run", "--source", str(source)],
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"smartnatd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                status, body = http_get(self.topology.appliance, "/readyz")
                if status == 200:
                    return
                last = body
            except OSError as err:
                last = str(err)
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout}s: {last}\n{self.logs()}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    d = tmp_path / "source"
    shutil.copytree(DEMO, d)
    return d


@pytest.fixture
def start_daemon(topology: Topology, tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def start(*, source: Path, notify: Path | None = None, env: dict[str, str] | None = None) -> Daemon:
        state = tmp_path / f"state{len(started)}"
        state.mkdir()
        d = Daemon(topology=topology, source=source, state=state, notify=notify, env=env or {})
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
