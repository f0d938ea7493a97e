"""load_configuration's start-up warnings about the kubeconfig: TLS verification off, and a
file others can read (it holds a token)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from smartnatd.kube.api import load_configuration

INSECURE = "TLS verification of the API server is off (insecure-skip-tls-verify in KUBECONFIG)"
READABLE = "kubeconfig is readable by group or others and holds a token"


def kubeconfig(path: Path, *, insecure: bool = False, mode: int = 0o600) -> Path:
    skip = ", insecure-skip-tls-verify: true" if insecure else ""
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://192.0.2.1:6443"{skip}}}}}]
users: [{{name: smartnat, user: {{token: not-a-secret}}}}]
contexts: [{{name: c, context: {{cluster: c, user: smartnat}}}}]
current-context: c
""")
    path.chmod(mode)
    return path


async def test_a_private_verifying_kubeconfig_loads_without_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = kubeconfig(tmp_path / "kubeconfig")
    config, where = await load_configuration(environ={"KUBECONFIG": str(path)})
    assert config.verify_ssl and where == f"kubeconfig {path}"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_insecure_skip_tls_verify_is_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = kubeconfig(tmp_path / "kubeconfig", insecure=True)
    config, _ = await load_configuration(environ={"KUBECONFIG": str(path)})
    assert not config.verify_ssl
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if INSECURE in w] == [f"{INSECURE} kubeconfig={path}"]
    assert "not-a-secret" not in caplog.text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
async def test_a_kubeconfig_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = kubeconfig(tmp_path / "kubeconfig", mode=mode)
    await load_configuration(environ={"KUBECONFIG": str(path)})
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(READABLE) and f"mode={mode:04o}" in warning
    assert "not-a-secret" not in caplog.text
