"""`smartnatd run --source DIR` as a process in the appliance namespace: lifecycle, systemd,
HTTP endpoints, restarts that keep connections, and reactions to address and file changes."""

from __future__ import annotations

import re
import time

from tests.e2e.conftest import NotifyListener, http_get
from tests.kernel.harness import (
    expect_no_reply,
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


def test_bad_configuration_exits_78_with_every_problem(topology, source_dir, start_daemon):
    daemon = start_daemon(source=source_dir, env={"SNCTRLR_MONITOR_PORT": "80a", "SNCTRLR_SETUP_SNAT": "maybe"})
    assert daemon.proc.wait(timeout=20) == 78
    logs = daemon.logs()
    assert "SNCTRLR_MONITOR_PORT='80a'" in logs and "SNCTRLR_SETUP_SNAT='maybe'" in logs
