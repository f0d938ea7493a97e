"""The command line without root: usage checks, exit codes, settings messages, output errors.

Nothing here changes the host's network: commands that would (apply, cleanup, run) are only
run where they stop before touching the kernel, and `run_daemon` fails the test if reached.
`plan` without --netns reads this host's interfaces, read-only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smartnatd import cli

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
PATTERN = {"SNCTRLR_INTERFACES_PATTERN": "^ext[0-9]+$"}
MISSING_NETNS = "sn-no-such-namespace"


@pytest.fixture(autouse=True)
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Only the SNCTRLR_* variables a test sets; none from the caller's shell."""
    for var in list(os.environ):
        if var.startswith("SNCTRLR_"):
            monkeypatch.delenv(var)
    for var, value in PATTERN.items():
        monkeypatch.setenv(var, value)
    return PATTERN


@pytest.fixture(autouse=True)
def _no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kw: object) -> int:
        raise AssertionError(f"run_daemon reached with {kw}")

    monkeypatch.setattr("smartnatd.daemon.run_daemon", refuse)


def broken_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for file in DEMO.iterdir():
        (source / file.name).write_text(file.read_text())
    (source / "broken.yaml").write_text("kind: Mapping\nmetadata: {name: [unclosed\n")
    return source


# --- --source and --netns -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "apply", "run"])
def test_empty_source_is_refused_not_taken_for_the_current_directory(command, capsys):
    assert cli.main([command, "--source", ""]) == cli.EXIT_USAGE
    assert "--source: must name a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan", "apply", "run"])
def test_missing_source_and_a_file_are_told_apart(command, tmp_path, capsys):
    assert cli.main([command, "--source", str(tmp_path / "nope")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"smartnatd: --source {tmp_path / 'nope'}: does not exist\n"
    (tmp_path / "file.yaml").write_text("")
    assert cli.main([command, "--source", str(tmp_path / "file.yaml")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"smartnatd: --source {tmp_path / 'file.yaml'}: not a directory\n"


@pytest.mark.parametrize("command", ["plan", "apply", "run"])
def test_unreadable_source_is_one_line_not_a_traceback(command, tmp_path, capsys, monkeypatch):
    # chmod 000 does not stop root, who runs these tests in CI; refuse the listing instead.
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert cli.main([command, "--source", str(tmp_path)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"smartnatd: --source {tmp_path}: cannot be read (Permission denied)\n"


@pytest.mark.parametrize(
    "argv", [["plan", "--source", str(DEMO)], ["apply", "--source", str(DEMO)], ["cleanup"], ["run"]]
)
def test_a_missing_network_namespace_is_one_line_and_exit_2(argv, capsys):
    assert cli.main([*argv, "--netns", MISSING_NETNS]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"smartnatd: --netns {MISSING_NETNS}: no such network namespace")
    assert "Traceback" not in err and err.count("\n") == 1


def test_empty_netns_is_refused_not_taken_for_the_host(capsys):
    assert cli.main(["cleanup", "--netns", ""]) == cli.EXIT_USAGE
    assert "--netns: must name a network namespace" in capsys.readouterr().err


def test_apply_source_has_help_text(capsys):
    assert cli.main(["apply", "--help"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "--source SOURCE directory of Mapping/Service/EndpointSlice" in " ".join(out.split())


# --- a source that could not be read completely ----------------------------------------------


def test_apply_refuses_a_partial_source_before_touching_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_discover", None)  # reaching the kernel would fail the test
    source = broken_source(tmp_path)
    assert cli.main(["apply", "--source", str(source)]) == cli.EXIT_DATAERR == 65
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith("smartnatd: broken.yaml: ")
    assert lines[-1] == (
        f"smartnatd: nothing was applied: --source {source} could not be read completely (1 problem(s) above)"
    )


def test_plan_of_a_partial_source_prints_it_lists_the_problems_and_exits_65(tmp_path, capsys):
    source = broken_source(tmp_path)
    assert cli.main(["plan", "--source", str(source), "-o", "json"]) == cli.EXIT_DATAERR
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [v["mapping"] for v in doc["verdicts"]] == ["demo/echo-direct", "demo/echo-ext2"]
    assert len(doc["sourceProblems"]) == 1 and doc["sourceProblems"][0].startswith("broken.yaml: ")
    assert "this plan is from a partial view" in captured.err


def test_plan_of_a_complete_source_has_no_source_problems(capsys):
    assert cli.main(["plan", "--source", str(DEMO), "-o", "json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["sourceProblems"] == []


# --- settings -------------------------------------------------------------------------------


def test_check_config_shows_the_typo_hint_beside_the_error_it_explains(monkeypatch, capsys):
    monkeypatch.delenv("SNCTRLR_INTERFACES_PATTERN")
    monkeypatch.setenv("SNCTRLR_INTERFACES_PATERN", "^eth1$")
    monkeypatch.setenv("SNCTRLR_IPTABLES_TIMEOUT_SEC", "5")
    assert cli.main(["check-config"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: SNCTRLR_INTERFACES_PATTERN is not set")
    assert "notice: SNCTRLR_INTERFACES_PATERN is not a smartnatd setting; ignored " \
           "(did you mean SNCTRLR_INTERFACES_PATTERN?)" in err
    assert any(line.startswith("notice: SNCTRLR_IPTABLES_TIMEOUT_SEC is accepted and ignored") for line in err)
    assert err[-1] == "1 problem(s) found"


def test_run_with_bad_settings_prints_the_notices_too(monkeypatch, capsys):
    monkeypatch.setenv("SNCTRLR_MONITOR_PORT", "80a")
    monkeypatch.setenv("SNCTRLR_MONITR_IP", "0.0.0.0")
    assert cli.main(["run"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "smartnatd: SNCTRLR_MONITOR_PORT='80a': not a port number (1-65535)" in err
    assert "smartnatd: notice: SNCTRLR_MONITR_IP is not a smartnatd setting" in err


def test_cleanup_refuses_bad_values_of_the_settings_it_uses(monkeypatch, capsys):
    monkeypatch.setenv("SNCTRLR_RULE_PRIORITY", "0")
    monkeypatch.setenv("SNCTRLR_MONITOR_PORT", "abc")
    assert cli.main(["cleanup", "--netns", MISSING_NETNS]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "smartnatd: SNCTRLR_RULE_PRIORITY='0': must be between 1 and 32000" in err
    assert "SNCTRLR_MONITOR_PORT='abc'" in err  # named as well, as ignored


def test_cleanup_only_warns_about_settings_it_does_not_use(monkeypatch, capsys):
    monkeypatch.setenv("SNCTRLR_MONITOR_PORT", "abc")
    # Past the settings it stops at the missing namespace, so it reaches no kernel.
    assert cli.main(["cleanup", "--netns", MISSING_NETNS]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "smartnatd: warning: SNCTRLR_MONITOR_PORT='abc': not a port number (1-65535) "
        "(not used by this command; ignored)"
    )


# --- output errors (a real process: the file descriptors matter) ------------------------------


def smartnatd(*args: str, stdout: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNCTRLR_")} | PATTERN
    return subprocess.run(
        [sys.executable, "-m", "smartnatd", *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
        env=env, timeout=60, cwd=ROOT,
    )


def test_a_closed_pipe_ends_quietly_with_141():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as after `| head -c 10`
    try:
        out = smartnatd("check-config", stdout=write_end)
    finally:
        os.close(write_end)
    assert out.returncode == cli.EXIT_BROKEN_PIPE == 141
    assert out.stderr == ""


def test_a_write_error_is_one_line_and_exit_74():
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        out = smartnatd("check-config", stdout=fd)
    finally:
        os.close(fd)
    assert out.returncode == cli.EXIT_IOERR == 74
    assert out.stderr == "smartnatd: cannot write the output: No space left on device\n"
