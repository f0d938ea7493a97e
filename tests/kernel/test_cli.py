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
    assert "not a directory" in out.stderr


def test_check_config_lists_every_problem_and_exits_78():
    out = smartnatd("check-config", env={"SNCTRLR_MONITOR_PORT": "80a", "SNCTRLR_GW_ADDRESS_OFFSET": "0"})
    assert out.returncode == 78
    assert "SNCTRLR_INTERFACES_PATTERN" in out.stderr
    assert "SNCTRLR_MONITOR_PORT='80a': not a port number (1-65535)" in out.stderr
    assert "SNCTRLR_GW_ADDRESS_OFFSET" in out.stderr
    ok = smartnatd("check-config")
    assert ok.returncode == 0 and "SNCTRLR_INTERFACES_PATTERN=^ext[0-9]+$" in ok.stdout
