"""`smartnatd run --source DIR` as a process in the appliance namespace: lifecycle, systemd,
HTTP endpoints, restarts that keep connections, and reactions to address and file changes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time

from tests.e2e.conftest import NotifyListener, http_get
from tests.kernel.harness import (
    expect_no_reply,
    in_netns,
    open_tcp,
    parse_echo_reply,
    sh,
    tcp_request,
    wait_until,
)


def reach(t, dst: str, port: int) -> str:
    return parse_echo_reply(tcp_request(t.client, dst=dst, port=port, src=t.allowed_client)).name


def test_notifies_ready_then_watchdog_and_serves_health_endpoints(topology, echo_servers, source_dir, start_daemon, tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = start_daemon(source=source_dir, notify=listener.path, env={"WATCHDOG_USEC": "600000"})
        wait_until(lambda: any("READY=1" in m for m in listener.drain()), timeout=20, message="READY=1")
        messages = listener.drain()
        ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
        assert "STATUS=ready; 3 endpoints served" in messages[ready_at]
        wait_until(lambda: any("WATCHDOG=1" in m for m in listener.drain()[ready_at + 1 :]), timeout=5, message="WATCHDOG=1 after READY")

        assert reach(topology, "192.0.2.10", 80) in ("pod1", "pod2")
        status, body = http_get(topology.appliance, "/healthz")
        assert status == 200 and body.startswith("ok:")
        assert http_get(topology.appliance, "/readyz")[0] == 200
        assert http_get(topology.appliance, "/healthcheck")[0] == 200  # SmartNat's path
        _, metrics = http_get(topology.appliance, "/metrics")
        assert 'smartnat_mappings{verdict="Configured"} 2.0' in metrics
        assert "smartnat_endpoints 3.0" in metrics
        assert re.search(r'smartnat_mapping_packets_total\{endpoint="192.0.2.10:80/tcp",mapping="demo/echo-direct"\} [1-9]', metrics)
        assert re.search(r"smartnat_sync_duration_seconds_count [1-9]", metrics)
        assert re.search(r"smartnat_last_sync_success_timestamp_seconds \d", metrics)
        # Both Mappings of the demo are fine, so no reason has a series; both links are up.
        assert "# TYPE smartnat_mapping_problems gauge" in metrics and "smartnat_mapping_problems{" not in metrics
        for iface in ("ext1", "ext2"):
            assert f'smartnat_external_interface_up{{interface="{iface}"}} 1.0' in metrics
            assert f'smartnat_external_interface_held{{interface="{iface}"}} 0.0' in metrics

        assert daemon.stop() == 0
        assert any("STOPPING=1" in m for m in listener.drain())
    finally:
        listener.close()


def test_restart_keeps_an_established_connection_and_the_new_process_takes_over(topology, echo_servers, source_dir, start_daemon):
    first = start_daemon(source=source_dir)
    first.wait_ready()
    conn = open_tcp(topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client)
    try:
        server = parse_echo_reply(conn.exchange(b"before")).name
        assert first.stop() == 0
        # Nothing serves the box now, yet the kernel keeps forwarding the live connection.
        assert parse_echo_reply(conn.exchange(b"between")).name == server
        second = start_daemon(source=source_dir)
        second.wait_ready()
        assert parse_echo_reply(conn.exchange(b"after")).name == server
        assert reach(topology, "198.51.100.10", 8080) in ("pod1", "pod2")
        assert "full=True" in second.logs()
    finally:
        conn.close()


def test_address_added_is_served_within_a_second_and_removed_stops(topology, echo_servers, source_dir, start_daemon):
    mapping = (source_dir / "mappings.yaml").read_text()
    (source_dir / "mappings.yaml").write_text(mapping.replace("- 198.51.100.10", "- 198.51.100.10\n  - 198.51.100.77"))
    daemon = start_daemon(source=source_dir)
    daemon.wait_ready()
    assert expect_no_reply(tcp_request, topology.client, dst="198.51.100.77", port=8080, src=topology.allowed_client, timeout=0.3)

    sh(topology.appliance, "ip", "addr", "add", "198.51.100.77/24", "dev", "ext2")
    added = time.monotonic()
    wait_until(
        lambda: not expect_no_reply(tcp_request, topology.client, dst="198.51.100.77", port=8080, src=topology.allowed_client, timeout=0.2),
        timeout=1.0,
        message="198.51.100.77:8080 served",
    )
    print(f"served {time.monotonic() - added:.3f}s after the address was added")

    sh(topology.appliance, "ip", "addr", "del", "198.51.100.77/24", "dev", "ext2")
    wait_until(
        lambda: "198.51.100.77" not in sh(topology.appliance, "nft", "list", "set", "ip", "smartnat", "external-ports").stdout,
        timeout=1.0,
        message="198.51.100.77 removed from external-ports",
    )
    assert reach(topology, "198.51.100.10", 8080) in ("pod1", "pod2")


def test_source_change_is_applied_incrementally(topology, echo_servers, source_dir, start_daemon):
    daemon = start_daemon(source=source_dir)
    daemon.wait_ready()
    extra = (source_dir / "mappings.yaml").read_text().split("---")[-1]
    extra = extra.replace("echo-ext2", "echo-extra").replace("8080", "9090")
    (source_dir / "more.yaml").write_text(extra)
    wait_until(
        lambda: not expect_no_reply(tcp_request, topology.client, dst="198.51.100.10", port=9090, src=topology.allowed_client, timeout=0.2),
        timeout=3.0,
        message="the new Mapping served",
    )
    wait_until(lambda: "demo/echo-extra Configured" in daemon.logs(), timeout=2, message="log line")
    assert "full=False" in daemon.logs()

    # A Mapping whose Service does not exist: a problem, counted by its Event reason.
    orphan = extra.replace("echo-extra", "orphan").replace("serviceName: echo", "serviceName: nowhere")
    (source_dir / "orphan.yaml").write_text(orphan.replace("9090", "9191"))
    wait_until(
        lambda: 'smartnat_mapping_problems{reason="ServiceNotFound"} 1.0' in http_get(topology.appliance, "/metrics")[1],
        timeout=3.0,
        message="the orphan counted in smartnat_mapping_problems",
    )


def test_bad_configuration_exits_78_with_every_problem(topology, source_dir, start_daemon):
    daemon = start_daemon(source=source_dir, env={"SNCTRLR_MONITOR_PORT": "80a", "SNCTRLR_SETUP_SNAT": "maybe"})
    assert daemon.proc.wait(timeout=20) == 78
    logs = daemon.logs()
    assert "SNCTRLR_MONITOR_PORT='80a'" in logs and "SNCTRLR_SETUP_SNAT='maybe'" in logs


def failing_nft(tmp_path) -> tuple[dict[str, str], object]:
    """An `nft` ahead of the real one on PATH that rejects every transaction while a flag file
    exists, as a kernel refusing a rule would; listings and checks go to the real nft."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    flag = tmp_path / "reject"
    real = shutil.which("nft")
    (bin_dir / "nft").write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-f" ] && [ -e "{flag}" ]; then
    cat >/dev/null
    echo "/dev/stdin:25:1-80: Error: Could not process rule: No such file or directory" >&2
    exit 1
  fi
done
exec {real} "$@"
""")
    (bin_dir / "nft").chmod(0o755)
    env = {"SNCTRLR_NFT_BACKEND": "process", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, flag


def answer(ns: str, path: str) -> tuple[int, str]:
    """http_get, or (0, why) while the daemon is not listening yet."""
    try:
        return http_get(ns, path)
    except OSError as err:
        return 0, str(err)


def statuses(listener: NotifyListener) -> list[str]:
    return [line for m in listener.drain() for line in m.splitlines() if line.startswith("STATUS=")]


def test_a_rejected_first_pass_is_reported_as_such_then_as_degraded_after_the_first_success(topology, source_dir, start_daemon, tmp_path):
    env, flag = failing_nft(tmp_path)
    flag.touch()
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = start_daemon(source=source_dir, notify=listener.path, env={**env, "WATCHDOG_USEC": "30000000"})
        status, body = wait_until(
            lambda: (r := answer(topology.appliance, "/readyz")) and "(2x)" in r[1] and r,
            timeout=10, message="a second failed first pass",
        )
        assert status == 503
        assert body.startswith("not ready: first pass failed (2x): nft rejected the transaction at line 25")
        status, body = http_get(topology.appliance, "/healthz")
        # Healthy for the documented 15 minutes while starting, and it says what is wrong.
        assert status == 200 and body.startswith("degraded: first pass failed (2x): nft rejected")
        sent = statuses(listener)
        assert any(s.startswith("STATUS=first pass failed (1x): nft rejected") and "2 Mappings not applied yet" in s for s in sent), sent
        assert not any("no mappings" in s.lower() for s in sent), sent

        flag.unlink()
        daemon.wait_ready(timeout=10)
        assert http_get(topology.appliance, "/healthz")[1].startswith("ok: ready; 3 endpoints served")

        flag.touch()
        extra = (source_dir / "mappings.yaml").read_text().split("---")[-1]
        (source_dir / "more.yaml").write_text(extra.replace("echo-ext2", "echo-extra").replace("8080", "9090"))
        status, body = wait_until(
            lambda: (r := http_get(topology.appliance, "/healthz")) and "degraded" in r[1] and r,
            timeout=10, message="degraded after a failed pass",
        )
        assert status == 200 and body.startswith("degraded: last 1 passes failed: nft rejected"), body
        assert "the kernel keeps the last applied state (3 endpoints served; 2 Configured)" in body
        status, body = http_get(topology.appliance, "/readyz")
        assert status == 200 and body.startswith("ready: degraded: last")
        logs = daemon.logs()
        # One warning per failure episode, not one per retry; the saved transactions stay bounded.
        assert logs.count("WARNING smartnatd.nft.runner: nft transaction failed") <= 3, logs
        assert len(list((tmp_path / "state0").glob("failed-*.nft"))) <= 5
    finally:
        listener.close()


def test_sighup_is_logged_and_runs_a_full_resync_without_stopping(topology, echo_servers, source_dir, start_daemon):
    daemon = start_daemon(source=source_dir)
    daemon.wait_ready()
    full_passes = lambda: re.search(r'smartnat_syncs_total\{type="full"\} (\d+)', http_get(topology.appliance, "/metrics")[1])
    assert full_passes().group(1) == "1"
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: full_passes().group(1) == "2", timeout=5, message="a second full pass")
    assert daemon.proc.poll() is None
    assert "SIGHUP: settings are read at start only; restart to apply (a full resync runs now)" in daemon.logs()
    assert reach(topology, "192.0.2.10", 80) in ("pod1", "pod2")
    assert daemon.stop() == 0


def test_waiting_for_sources_is_in_status_and_readyz_and_source_up(topology, source_dir, start_daemon, tmp_path):
    good = (source_dir / "mappings.yaml").read_text()
    (source_dir / "mappings.yaml").write_text("a: [unclosed\n")
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = start_daemon(source=source_dir, notify=listener.path)
        waiting = "waiting for endpointslices, mappings, services (directory: cannot read mappings.yaml)"
        wait_until(lambda: f"STATUS={waiting}" in statuses(listener), timeout=10, message="STATUS=waiting …")
        assert answer(topology.appliance, "/readyz") == (503, f"not ready: {waiting}\n")
        _, metrics = http_get(topology.appliance, "/metrics")
        assert 'smartnat_source_up{source="directory"} 0.0' in metrics
        assert 'smartnat_source_up{source="host"} 1.0' in metrics

        (source_dir / "mappings.yaml").write_text(good)
        daemon.wait_ready(timeout=10)
        _, metrics = http_get(topology.appliance, "/metrics")
        assert 'smartnat_source_up{source="directory"} 1.0' in metrics
        assert 'smartnat_syncs_total{type="incremental"} 0.0' in metrics  # present before the first one
    finally:
        listener.close()


def test_monitor_port_in_use_exits_78_with_one_line(topology, source_dir, start_daemon):
    with in_netns(topology.appliance):
        blocker = socket.socket()
    with blocker:
        blocker.bind(("127.0.0.1", 8080))
        blocker.listen()
        daemon = start_daemon(source=source_dir)
        assert daemon.proc.wait(timeout=20) == 78
    logs = daemon.logs()
    assert "CRITICAL" in logs and "SNCTRLR_MONITOR_IP:SNCTRLR_MONITOR_PORT=127.0.0.1:8080: Address already in use" in logs
    assert "Traceback" not in logs
