"""The command-line contract others script against: plan, apply, cleanup, check-config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.kernel.harness import expect_no_reply, parse_echo_reply, sh, tcp_request

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
SMARTNATD = str(Path(sys.executable).parent / "smartnatd")
ENV = {"SNCTRLR_INTERFACES_PATTERN": "^ext[0-9]+$", "SNCTRLR_DEFAULT_GW_INTERFACE": "eth0"}


def smartnatd(*args: str, env: dict[str, str] | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SNCTRLR_")}
    full.update(ENV if env is None else env)
    if tmp is not None:
        full["SNCTRLR_STATE_DIR"] = str(tmp)
    return subprocess.run([SMARTNATD, *args], capture_output=True, text=True, env=full, timeout=60)


def test_plan_prints_one_verdict_line_per_mapping_and_the_ruleset(topology):
    out = smartnatd("plan", "--source", str(DEMO), "--netns", topology.appliance)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "demo/echo-direct Configured: serving 192.0.2.10:80/tcp, 192.0.2.10:5353/udp"
    assert lines[1] == "demo/echo-ext2 Configured: serving 198.51.100.10:8080/tcp"
    assert "add table ip smartnat" in out.stdout
    # plan touches nothing
    assert "smartnat" not in sh(topology.appliance, "nft", "list", "ruleset").stdout


def test_plan_json_is_machine_readable(topology):
    out = smartnatd("plan", "--source", str(DEMO), "--netns", topology.appliance, "-o", "json")
    doc = json.loads(out.stdout)
    assert [v["mapping"] for v in doc["verdicts"]] == ["demo/echo-direct", "demo/echo-ext2"]
    assert doc["verdicts"][0]["verdict"] == "Configured"
    assert doc["verdicts"][0]["podIPs"] == ["10.244.1.2", "10.244.2.2"]
    assert doc["ruleset"].startswith("add table ip smartnat")


def test_apply_serves_invalid_mappings_do_not_fail_the_pass_and_cleanup_removes_it(topology, echo_servers, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(DEMO, source)
    (source / "bad.yaml").write_text(
        "apiVersion: smartnat.aureacentral.com/v1alpha1\nkind: Mapping\nmetadata: {name: bad, namespace: demo}\n"
        "spec: {addresses: [192.0.2.10], serviceName: echo, mode: service, ports: [{port: 0}]}\n"
    )
    out = smartnatd("apply", "--source", str(source), "--netns", topology.appliance, tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "demo/bad Invalid: spec.ports[0].port: 0 is not a port number (1-65535)" in out.stdout
    reply = parse_echo_reply(tcp_request(topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client))
    assert reply.name in ("pod1", "pod2")

    again = smartnatd("apply", "--source", str(source), "--netns", topology.appliance, tmp=tmp_path)
    assert again.returncode == 0
    assert sh(topology.appliance, "ip", "rule").stdout.count("lookup") == 3 + 2  # local, main, default + ours

    gone = smartnatd("cleanup", "--netns", topology.appliance, env={})
    assert gone.returncode == 0, gone.stderr
    assert "smartnat" not in sh(topology.appliance, "nft", "list", "ruleset").stdout
    assert expect_no_reply(tcp_request, topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client, timeout=0.5)


def test_apply_refuses_a_missing_source_directory(topology, tmp_path):
    out = smartnatd("apply", "--source", str(tmp_path / "nope"), "--netns", topology.appliance)
    assert out.returncode == 2
    assert out.stderr == f"smartnatd: --source {tmp_path / 'nope'}: does not exist\n"


def test_apply_refuses_a_partial_source_and_keeps_what_was_applied(topology, echo_servers, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(DEMO, source)
    assert smartnatd("apply", "--source", str(source), "--netns", topology.appliance, tmp=tmp_path).returncode == 0
    before = sh(topology.appliance, "nft", "list", "table", "ip", "smartnat").stdout
    # A half-written file: the Mappings in it are unknown, not gone.
    (source / "mappings.yaml").write_text("kind: Mapping\nmetadata: {name: [unclosed\n")
    out = smartnatd("apply", "--source", str(source), "--netns", topology.appliance, tmp=tmp_path)
    assert out.returncode == 65, out.stderr
    assert out.stdout == ""
    assert out.stderr.splitlines()[0].startswith("smartnatd: mappings.yaml: ")
    assert "nothing was applied" in out.stderr.splitlines()[-1]
    assert sh(topology.appliance, "nft", "list", "table", "ip", "smartnat").stdout == before
    reply = parse_echo_reply(tcp_request(topology.client, dst="192.0.2.10", port=80, src=topology.allowed_client))
    assert reply.name in ("pod1", "pod2")
    assert smartnatd("cleanup", "--netns", topology.appliance, env={}).returncode == 0


def test_apply_reports_what_it_applied_as_json_and_as_a_readable_line(topology, tmp_path):
    out = smartnatd("apply", "--source", str(DEMO), "--netns", topology.appliance, "-o", "json", tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    applied = json.loads(out.stdout)["applied"]
    assert applied["endpoints"] == 3
    assert applied["routing"]["added"] > 0 and applied["routing"]["deleted"] == 0
    assert applied["routing"]["changes"] == applied["routing"]["added"] + applied["routing"]["replaced"]
    assert isinstance(applied["flowsDeleted"], int) and applied["took"] >= 0
    again = smartnatd("apply", "--source", str(DEMO), "--netns", topology.appliance, tmp=tmp_path)
    last = again.stdout.splitlines()[-1]
    assert last.startswith("applied: 3 endpoints; routes and rules 0 added, 0 replaced, 0 deleted; 0 stale flows"), last
    assert "RoutingReport" not in again.stdout
    assert smartnatd("cleanup", "--netns", topology.appliance, env={}).returncode == 0


def test_apply_says_what_was_applied_when_routing_fails_after_nft(topology, tmp_path, monkeypatch, capsys):
    from smartnatd import cli

    real_discover = cli._discover

    async def discover_then_lose_ext2(settings, netns):
        host = await real_discover(settings, netns)
        sh(topology.appliance, "ip", "link", "del", "ext2")  # the route through it now fails
        return host

    monkeypatch.setattr(cli, "_discover", discover_then_lose_ext2)
    for var in [v for v in os.environ if v.startswith("SNCTRLR_")]:
        monkeypatch.delenv(var)
    for var, value in {**ENV, "SNCTRLR_STATE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(var, value)
    assert cli.main(["apply", "--source", str(DEMO), "--netns", topology.appliance]) == 1
    err = capsys.readouterr().err
    assert "the nftables rules were applied, but a later step failed" in err
    assert "nothing was changed" not in err
    assert "192.0.2.10" in sh(topology.appliance, "nft", "list", "table", "ip", "smartnat").stdout


def test_cleanup_is_not_blocked_by_a_setting_it_does_not_use(topology, tmp_path):
    assert smartnatd("apply", "--source", str(DEMO), "--netns", topology.appliance, tmp=tmp_path).returncode == 0
    out = smartnatd("cleanup", "--netns", topology.appliance, env={"SNCTRLR_MONITOR_PORT": "abc"})
    assert out.returncode == 0, out.stderr
    assert "warning: SNCTRLR_MONITOR_PORT='abc'" in out.stderr
    assert "smartnat" not in sh(topology.appliance, "nft", "list", "ruleset").stdout


def test_check_config_lists_every_problem_and_exits_78():
    out = smartnatd("check-config", env={"SNCTRLR_MONITOR_PORT": "80a", "SNCTRLR_GW_ADDRESS_OFFSET": "0"})
    assert out.returncode == 78
    assert "SNCTRLR_INTERFACES_PATTERN" in out.stderr
    assert "SNCTRLR_MONITOR_PORT='80a': not a port number (1-65535)" in out.stderr
    assert "SNCTRLR_GW_ADDRESS_OFFSET" in out.stderr
    ok = smartnatd("check-config")
    assert ok.returncode == 0 and "SNCTRLR_INTERFACES_PATTERN=^ext[0-9]+$" in ok.stdout
