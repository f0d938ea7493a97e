"""The local demo: no VMs, just network namespaces on this machine (run as root: `make demo`).

Builds client, appliance, router and two pod namespaces (the IP plan of
tests/kernel/conftest.py), runs `smartnatd run --source examples/demo` inside the appliance
namespace, shows a client reaching a pod through an external address, a refused client, and
/metrics, then stops the daemon and tears everything down.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.kernel.harness import (
    NetnsFactory,
    build_topology,
    expect_no_reply,
    in_netns,
    parse_echo_reply,
    start_pod_echo_servers,
    tcp_request,
    udp_request,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "demo"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def http_get(ns: str, path: str, port: int = 8080) -> tuple[int, str]:
    with in_netns(ns):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.connect()  # the socket is created inside the namespace
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def wait_ready(ns: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"smartnatd exited with {proc.returncode}")
        try:
            status, body = http_get(ns, "/readyz")
            if status == 200:
                return
            last = body
        except OSError as err:
            last = str(err)
        time.sleep(0.1)
    raise SystemExit(f"smartnatd did not become ready: {last}")


def main() -> int:
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root", file=sys.stderr)
        return 1
    smartnatd = Path(sys.executable).parent / "smartnatd"
    with NetnsFactory() as factory, tempfile.TemporaryDirectory() as state:
        say("building namespaces: client, appliance (ext1, ext2, eth0), router, pod1, pod2")
        t = build_topology(factory)
        servers = start_pod_echo_servers(t, port=8080)
        env = dict(
            os.environ,
            SNCTRLR_INTERFACES_PATTERN="^ext[0-9]+$",
            SNCTRLR_DEFAULT_GW_INTERFACE="eth0",
            SNCTRLR_STATE_DIR=state,
            SNCTRLR_INSTANCE_NAME="demo",
        )
        say(f"starting: ip netns exec {t.appliance} smartnatd run --source examples/demo")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", t.appliance, str(smartnatd), "run", "--source", str(SOURCE)], env=env
        )
        try:
            wait_ready(t.appliance, proc)
            say("client 203.0.113.10 -> 192.0.2.10:80/tcp (Mapping demo/echo-direct, mode direct)")
            for _ in range(4):
                r = parse_echo_reply(tcp_request(t.client, dst="192.0.2.10", port=80, src=t.allowed_client))
                print(f"    answered by {r.name}, which saw the connection come from {r.peer}")
            r = parse_echo_reply(udp_request(t.client, dst="192.0.2.10", port=5353, src=t.allowed_client))
            print(f"    udp 5353: answered by {r.name}")
            say("client 203.0.113.10 -> 198.51.100.10:8080/tcp (demo/echo-ext2, via the second interface)")
            r = parse_echo_reply(tcp_request(t.client, dst="198.51.100.10", port=8080, src=t.allowed_client))
            print(f"    answered by {r.name}; the reply came back on the link it came in on")
            say("refused client 203.0.113.20 -> 192.0.2.10:80 (not in allowedSources)")
            refused = expect_no_reply(
                tcp_request, t.client, dst="192.0.2.10", port=80, src=t.refused_client, timeout=1.0
            )
            print("    dropped, as it should be" if refused else "    UNEXPECTED: it got through")
            say("GET /metrics (excerpt)")
            _, metrics = http_get(t.appliance, "/metrics")
            for line in metrics.splitlines():
                if line.startswith(("smartnat_mappings", "smartnat_endpoints", "smartnat_mapping_packets_total", "smartnat_ready")):
                    print("    " + line)
            say("stopping smartnatd (SIGTERM): kernel state stays so connections survive restarts")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            servers.stop()
        say("tearing down the namespaces")
    print("demo done")
    return 0 if refused else 1


if __name__ == "__main__":
    raise SystemExit(main())
