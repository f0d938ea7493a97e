"""Deployment artefacts: systemd units, sysctl, CRD, RBAC, shell scripts, packer and Vagrant.

The units are checked with systemd's own verifier against a throwaway root that
packer/provision.sh filled in. By hand, that is:

    ROOT=$(mktemp -d)
    SMARTNAT_ROOT=$ROOT SKIP_DOWNLOADS=1 SKIP_VENV=1 packer/provision.sh
    mkdir -p $ROOT/usr/lib/systemd && cp -a /usr/lib/systemd/system $ROOT/usr/lib/systemd/
    printf '#!/bin/sh\\n' >$ROOT/opt/smartnat/bin/smartnatd && chmod 755 $ROOT/opt/smartnat/bin/smartnatd
    systemd-analyze verify --man=no --root=$ROOT smartnat.service kube-proxy.service

(the copy of /usr/lib/systemd/system provides sysinit.target and the other units ours refer to;
the stand-in smartnatd is there because verify checks that ExecStart= is executable).
systemd-analyze exits 0 even for unknown keys or bad values, so any output fails the test too.

Packer: Debian 12 ships packer 1.6.6, which knows neither `required_plugins` (1.7) nor some
settings of today's amazon and qemu plugins, and HashiCorp's packages cannot be reached from
here; so `packer validate` does not run. With packer installed, `packer fmt -check` does (HCL
syntax and layout). packer/provision.sh, what the template runs, is tested below in a temporary
root without network, apt or systemctl.

Tools that are missing (systemd-analyze, shellcheck, ruby, packer, the cel-python package) skip
their tests with a message saying what to install.
"""

from __future__ import annotations

import ast
import base64
import copy
import inspect
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smartnatd.kube.objects import parse_mapping
from smartnatd.model import Invalid
from smartnatd.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "packer" / "provision.sh"
SMARTNAT_UNIT = REPO / "packaging" / "systemd" / "smartnat.service"
KUBE_PROXY_UNIT = REPO / "packaging" / "systemd" / "kube-proxy.service"
KUBE_PROXY_SH = REPO / "packaging" / "kube-proxy" / "kube-proxy.sh"
KUBECONFIG_SH = REPO / "etc" / "kubeconfig-from-serviceaccount.sh"
CRD = REPO / "etc" / "crd" / "mappings.yaml"
RBAC = REPO / "etc" / "rbac.yaml"
SYSCTL = REPO / "etc" / "sysctl.d" / "90-smartnat.conf"
PACKER_TEMPLATE = REPO / "packer" / "smartnat.pkr.hcl"
VAGRANT = REPO / "vagrant"
SHELL_SCRIPTS = sorted(
    [PROVISION, KUBE_PROXY_SH, KUBECONFIG_SH, *VAGRANT.glob("*.sh")],
)
UNIT_DIR = "usr/local/lib/systemd/system"


def run(args: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found: apt-get install {package}")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---- packer/provision.sh into a throwaway root ------------------------------------------------


def provision(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": os.environ["PATH"],
        "SMARTNAT_ROOT": str(root),
        "SKIP_DOWNLOADS": "1",
        "SKIP_VENV": "1",
        **env,
    }
    return run(["bash", PROVISION], env=environ)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    result = provision(root)
    assert result.returncode == 0, result.stderr
    return root


def test_provision_places_files_with_their_modes(installed: Path) -> None:
    expected = {
        f"{UNIT_DIR}/smartnat.service": (0o644, SMARTNAT_UNIT),
        f"{UNIT_DIR}/kube-proxy.service": (0o644, KUBE_PROXY_UNIT),
        "usr/local/libexec/smartnat/kube-proxy.sh": (0o755, KUBE_PROXY_SH),
        "etc/sysctl.d/90-smartnat.conf": (0o644, SYSCTL),
        "etc/modules-load.d/smartnat.conf": (0o644, REPO / "packaging/modules-load.d/smartnat.conf"),
        "etc/smartnat/kube-proxy.env": (0o644, REPO / "packaging/kube-proxy/kube-proxy.env"),
        "usr/local/share/smartnat/crd/mappings.yaml": (0o644, CRD),
        "usr/local/share/smartnat/rbac.yaml": (0o644, RBAC),
        "usr/local/share/smartnat/kubeconfig-from-serviceaccount.sh": (0o755, KUBECONFIG_SH),
    }
    if (REPO / "etc/smartnat.env").exists():
        expected["etc/smartnat/smartnat.env"] = (0o644, REPO / "etc/smartnat.env")
        expected["usr/local/share/smartnat/smartnat.env.example"] = (0o644, REPO / "etc/smartnat.env")
    for relative, (want_mode, source) in expected.items():
        path = installed / relative
        assert path.is_file(), f"{relative} not installed"
        assert mode(path) == want_mode, f"{relative}: mode {mode(path):o}, want {want_mode:o}"
        assert path.read_bytes() == source.read_bytes(), f"{relative} differs from {source}"
    assert mode(installed / "etc/smartnat") == 0o755


def test_provision_enables_units_and_links_the_cli(installed: Path) -> None:
    wants = installed / "etc/systemd/system/multi-user.target.wants"
    for unit in ("smartnat.service", "kube-proxy.service"):
        assert os.readlink(wants / unit) == f"/{UNIT_DIR}/{unit}"
    assert os.readlink(installed / "usr/local/bin/smartnatd") == "/opt/smartnat/bin/smartnatd"
    assert not (installed / "opt/smartnat").exists(), "SKIP_VENV=1 must not create the venv"
    assert not (installed / "usr/local/bin/kube-proxy").exists(), "SKIP_DOWNLOADS=1 must not download"


def test_provision_enables_units_as_systemctl_would(installed: Path) -> None:
    systemctl = need("systemctl", "systemd")
    for unit in ("smartnat.service", "kube-proxy.service"):
        result = run([systemctl, f"--root={installed}", "is-enabled", unit])
        assert result.stdout.strip() == "enabled", result.stdout + result.stderr


def test_provision_keeps_operator_configuration_and_can_skip_kube_proxy(tmp_path: Path) -> None:
    env_file = tmp_path / "etc/smartnat/smartnat.env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("SNCTRLR_INTERFACES_PATTERN='^ens5$'\n")
    result = provision(tmp_path, ENABLE_KUBE_PROXY="0")
    assert result.returncode == 0, result.stderr
    assert env_file.read_text() == "SNCTRLR_INTERFACES_PATTERN='^ens5$'\n"
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["smartnat.service"]
    # Running it again changes nothing and succeeds.
    assert provision(tmp_path, ENABLE_KUBE_PROXY="0").returncode == 0


def test_provision_without_kube_proxy_disables_an_earlier_enabled_one(tmp_path: Path) -> None:
    assert provision(tmp_path).returncode == 0
    result = provision(tmp_path, ENABLE_KUBE_PROXY="0")
    assert result.returncode == 0, result.stderr
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["smartnat.service"]


def test_provision_installs_from_a_tarball_like_packer_uploads(tmp_path: Path) -> None:
    # The shape of `git archive --prefix=smartnat/ HEAD`: everything below one top directory.
    tarball = tmp_path / "smartnat-src.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in ("pyproject.toml", "packaging", "etc"):
            tar.add(REPO / name, arcname=f"smartnat/{name}")
    root = tmp_path / "root"
    root.mkdir()
    result = provision(root, SMARTNAT_SRC_TARBALL=str(tarball))
    assert result.returncode == 0, result.stderr
    assert (root / UNIT_DIR / "smartnat.service").read_bytes() == SMARTNAT_UNIT.read_bytes()


def test_provision_rejects_a_malformed_kube_version(tmp_path: Path) -> None:
    result = provision(tmp_path, KUBE_VERSION="v1.33")
    assert result.returncode != 0
    assert "KUBE_VERSION" in result.stderr


# ---- systemd units ----------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """[section] -> key -> every value given (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def words(values: list[str]) -> set[str]:
    return {word for value in values for word in value.split()}


@pytest.fixture(scope="module")
def verify_root(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The provisioned root plus what systemd-analyze verify needs to resolve our units."""
    system_units = Path("/usr/lib/systemd/system")
    if not (system_units / "sysinit.target").exists():
        pytest.skip("no /usr/lib/systemd/system/sysinit.target: apt-get install systemd")
    root = tmp_path_factory.mktemp("verify")
    shutil.copytree(installed, root, symlinks=True, dirs_exist_ok=True)
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    daemon = root / "opt/smartnat/bin/smartnatd"
    daemon.parent.mkdir(parents=True)
    daemon.write_text("#!/bin/sh\nexit 0\n")
    daemon.chmod(0o755)
    return root


def test_units_pass_systemd_analyze_verify(verify_root: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    result = run([analyze, "verify", "--man=no", f"--root={verify_root}", "smartnat.service", "kube-proxy.service"])
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", "systemd-analyze verify complained:\n" + result.stderr


def test_smartnat_unit_lifecycle() -> None:
    unit = unit_settings(SMARTNAT_UNIT)
    u, s = unit["Unit"], unit["Service"]
    assert words(u["After"]) >= {"network-online.target", "kube-proxy.service"}
    assert words(u["Wants"]) >= {"network-online.target"}
    # Ordering only: Wants= would start kube-proxy even where it is disabled ("mode: direct").
    pulls = ("Wants", "Requires", "BindsTo", "Requisite", "Upholds")
    assert "kube-proxy.service" not in words([v for key in pulls for v in u.get(key, [])])
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["ExecStart"] == ["/opt/smartnat/bin/smartnatd run"]
    assert s["Environment"] == ["KUBECONFIG=/etc/smartnat/kubeconfig"]
    assert s["EnvironmentFile"] == ["-/etc/smartnat/smartnat.env"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["TimeoutStopSec"] == ["30s"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_smartnat_unit_leaves_kernel_state_in_place_on_stop() -> None:
    service = unit_settings(SMARTNAT_UNIT)["Service"]
    for key in ("ExecStop", "ExecStopPost"):
        assert not any("cleanup" in value for value in service.get(key, [])), f"{key} must not run cleanup"


def test_smartnat_unit_sandbox() -> None:
    s = unit_settings(SMARTNAT_UNIT)["Service"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert s["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert words(s["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert s["StateDirectory"] == ["smartnat"]
    assert s["ConfigurationDirectory"] == ["smartnat"]
    assert s["ProtectSystem"] == ["strict"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelModules",
        "ProtectKernelTunables",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert s[key] == ["yes"], key
    # The daemon's only writable place is its state directory.
    assert "ReadWritePaths" not in s


def test_systemd_security_exposure_of_smartnat_unit_is_low(verify_root: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    result = run([analyze, "security", "--offline=yes", f"--root={verify_root}", "smartnat.service"])
    found = re.search(r"Overall exposure level for smartnat\.service: ([0-9.]+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 3.0, result.stdout


def test_kube_proxy_unit() -> None:
    unit = unit_settings(KUBE_PROXY_UNIT)
    s = unit["Service"]
    assert s["ExecStart"] == ["/usr/local/libexec/smartnat/kube-proxy.sh"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert words(unit["Unit"]["After"]) >= {"network-online.target"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# ---- kube-proxy wrapper -----------------------------------------------------------------------


@pytest.fixture
def fake_kube_proxy(tmp_path: Path) -> dict[str, Path]:
    """A kube-proxy and a modprobe that only record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("kube-proxy", "modprobe"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "$*" >>"{tmp_path}/{name}.log"\n')
        tool.chmod(0o755)
    kubeconfig = tmp_path / "kube-proxy.kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    env_file = tmp_path / "kube-proxy.env"
    env_file.write_text(
        f"KUBE_PROXY_BIN={bin_dir}/kube-proxy\n"
        f"KUBE_PROXY_KUBECONFIG={kubeconfig}\n"
        'KUBE_PROXY_MODULES="sn_test_absent_module"\n'
        'KUBE_PROXY_ARGS="--v=2 --ipvs-scheduler=wrr"\n'
    )
    return {"dir": tmp_path, "bin": bin_dir, "env": env_file, "kubeconfig": kubeconfig}


def run_wrapper(fake: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{fake['bin']}:{os.environ['PATH']}", "KUBE_PROXY_ENV": str(fake["env"])}
    return run(["bash", KUBE_PROXY_SH, "--extra"], env=env)


def test_kube_proxy_wrapper_loads_modules_and_runs_ipvs_mode(fake_kube_proxy: dict[str, Path]) -> None:
    result = run_wrapper(fake_kube_proxy)
    assert result.returncode == 0, result.stderr
    assert (fake_kube_proxy["dir"] / "modprobe.log").read_text().split() == ["sn_test_absent_module"]
    args = (fake_kube_proxy["dir"] / "kube-proxy.log").read_text().split()
    assert args[:3] == ["--proxy-mode=ipvs", "--masquerade-all", f"--kubeconfig={fake_kube_proxy['kubeconfig']}"]
    assert "--nodeport-addresses=127.0.0.1/32" in args  # no NodePorts on the box's addresses
    assert args[-3:] == ["--v=2", "--ipvs-scheduler=wrr", "--extra"]


def test_kube_proxy_wrapper_exits_78_without_kubeconfig(fake_kube_proxy: dict[str, Path]) -> None:
    fake_kube_proxy["kubeconfig"].unlink()
    result = run_wrapper(fake_kube_proxy)
    assert result.returncode == 78
    assert "kubeconfig" in result.stderr
    assert not (fake_kube_proxy["dir"] / "kube-proxy.log").exists()


def test_default_kube_proxy_env_names_ipvs_modules() -> None:
    text = (REPO / "packaging/kube-proxy/kube-proxy.env").read_text()
    modules = re.search(r'^KUBE_PROXY_MODULES="([^"]*)"', text, re.M)
    assert modules and set(modules.group(1).split()) >= {"ip_vs", "ip_vs_rr", "nf_conntrack"}


# ---- modules-load.d ---------------------------------------------------------------------------


def test_modules_load_lists_the_modules_the_ruleset_needs() -> None:
    listed = {
        line.strip()
        for line in (REPO / "packaging/modules-load.d/smartnat.conf").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", ";"))
    }
    ruleset = (REPO / "tests/golden/full.nft").read_text()
    # What the golden ruleset uses -> the Debian 12 (6.1) module providing it; counters, sets,
    # lookups and payload/meta matches are part of nf_tables.ko itself.
    providers = {
        "type nat hook": "nft_chain_nat",
        "ct state": "nft_ct",
        "ct mark": "nft_ct",
        "dnat ip to": "nft_nat",
        "snat ip to": "nft_nat",
        "masquerade": "nft_masq",
        "numgen": "nft_numgen",
    }
    needed = {"nf_tables", "nf_conntrack", "nf_conntrack_netlink", "nf_nat"}
    needed |= {module for keyword, module in providers.items() if keyword in ruleset}
    assert needed <= listed, f"missing from modules-load.d: {sorted(needed - listed)}"


# ---- sysctl -----------------------------------------------------------------------------------


def test_sysctl_forwards_and_uses_loose_reverse_path_filtering() -> None:
    settings = {}
    for line in SYSCTL.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": "2",
        "net.ipv4.conf.default.rp_filter": "2",
    }
    assert "# net.netfilter.nf_conntrack_max" in SYSCTL.read_text()


# ---- CRD --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "boolean": bool,
}
CelEvaluator = Callable[[str, Any], bool]


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: missing fields with a default get it."""
    if isinstance(value, dict):
        out = dict(value)
        props = node.get("properties", {})
        for name, child in props.items():
            if name not in out and "default" in child:
                out[name] = copy.deepcopy(child["default"])
        extra = node.get("additionalProperties")
        for name in out:
            if name in props:
                out[name] = apply_defaults(props[name], out[name])
            elif isinstance(extra, dict):
                out[name] = apply_defaults(extra, out[name])
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(node["items"], item) for item in value]
    return value


def pruned_fields(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields the API server would silently drop: unknown to the structural schema."""
    out: list[str] = []
    if isinstance(value, dict) and node.get("type") == "object":
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
        for name, child in value.items():
            if name in props:
                out += pruned_fields(props[name], child, f"{path}.{name}")
            elif isinstance(extra, dict):
                out += pruned_fields(extra, child, f"{path}.{name}")
            elif not node.get("x-kubernetes-preserve-unknown-fields") and path != ".metadata":
                out.append(f"{path}.{name}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += pruned_fields(node["items"], item, f"{path}[{i}]")
    return out


def schema_errors(node: dict[str, Any], value: Any, path: str = "", cel: CelEvaluator | None = None) -> list[str]:
    """OpenAPI checks of the subset this CRD uses, list types, and CEL rules when `cel` is given."""
    kind = node["type"]
    if isinstance(value, bool) and kind != "boolean" or not isinstance(value, PYTHON_TYPES[kind]):
        return [f"{path}: {value!r} is not of type {kind}"]
    out: list[str] = []
    if "enum" in node and value not in node["enum"]:
        out.append(f"{path}: {value!r} not in {node['enum']}")
    if kind == "string":
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            out.append(f"{path}: length of {value!r} out of range")
        if "pattern" in node and not re.search(node["pattern"], value):
            out.append(f"{path}: {value!r} does not match {node['pattern']}")
    if kind == "integer" and not node.get("minimum", value) <= value <= node.get("maximum", value):
        out.append(f"{path}: {value} out of range")
    if kind == "array":
        if not node.get("minItems", 0) <= len(value) <= node.get("maxItems", len(value)):
            out.append(f"{path}: {len(value)} items out of range")
        list_type = node.get("x-kubernetes-list-type", "atomic")
        if list_type == "set":
            keys = [repr(item) for item in value]
        elif list_type == "map":
            keys = [repr(tuple(item.get(k) for k in node["x-kubernetes-list-map-keys"])) for item in value]
        else:
            keys = []
        if len(keys) != len(set(keys)):
            out.append(f"{path}: duplicate entries in a list of type {list_type}")
        for i, item in enumerate(value):
            out += schema_errors(node["items"], item, f"{path}[{i}]", cel)
    if kind == "object":
        out += [f"{path}.{name}: required" for name in node.get("required", []) if name not in value]
        extra = node.get("additionalProperties")
        for name, child in value.items():
            if name in node.get("properties", {}):
                out += schema_errors(node["properties"][name], child, f"{path}.{name}", cel)
            elif isinstance(extra, dict):
                out += schema_errors(extra, child, f"{path}.{name}", cel)
    if cel is not None and not out:
        out += [f"{path}: {r['message']}" for r in node.get("x-kubernetes-validations", []) if not cel(r["rule"], value)]
    return out


def admit(schema: dict[str, Any], obj: dict[str, Any], cel: CelEvaluator | None = None) -> tuple[dict[str, Any], list[str]]:
    """What the API server would store for `obj`, and its validation errors."""
    assert pruned_fields(schema, obj) == [], "fields would be pruned"
    stored = apply_defaults(schema, obj)
    return stored, schema_errors(schema, stored, cel=cel)


def mapping(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "smartnat.aureacentral.com/v1alpha1",
        "kind": "Mapping",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": spec,
        **extra,
    }


# Mappings shaped like those SmartNat's user guide and demo told users to write.
SMARTNAT_MAPPINGS = [
    mapping(
        {
            "addresses": ["192.0.2.10", "198.51.100.1"],
            "allowedSources": ["10.0.0.0/16", "192.168.1.0/24"],
            "serviceName": "echo-test-service",
            "mode": "service",
            "ports": [
                {"port": 8080},
                {"port": 8081, "servicePort": 8080},
                {"port": 8081, "servicePort": 8080, "protocol": "udp"},
            ],
        }
    ),
    mapping(
        {
            "addresses": ["203.0.113.5"],
            "allowedSources": ["0.0.0.0/0", "192.0.2.7"],
            "serviceName": "s",
            "mode": "service",
            "ports": [{"port": 8080, "protocol": "tcp", "servicePort": 8080}],
        },
        status={
            "invalid": "no",
            "serviceVIP": "10.43.0.10",
            "configuredAddresses": {"203.0.113.5": {"podIPs": ["10.42.0.5", "10.42.0.6"]}},
        },
    ),
    mapping(
        {
            "addresses": ["203.0.113.6"],
            "allowedSources": [],
            "serviceName": "x" * 62,
            "mode": "service",
            "ports": [{"port": 1}, {"port": 65535, "protocol": "udp", "servicePort": 65535}],
        }
    ),
]

NEW_MAPPINGS = [
    mapping({"addresses": ["192.0.2.1"], "serviceName": "s", "ports": [{"port": 53, "protocol": "sctp"}]}),
    mapping(
        {"addresses": ["192.0.2.1"], "serviceName": "s", "mode": "direct", "ports": [{"port": 80}]},
        status={
            "observedGeneration": 3,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "observedGeneration": 3,
                    "lastTransitionTime": "2024-01-01T00:00:00Z",
                    "reason": "Configured",
                    "message": "configured on 2 of 2 appliances",
                }
            ],
            "appliances": {
                "nat-a": {
                    "lastSync": "2024-01-01T00:00:00Z",
                    "message": "serving 192.0.2.1:80/tcp",
                    "configured": ["192.0.2.1:80/tcp"],
                    "futureField": "kept",
                }
            },
        },
    ),
]


def with_spec(**changes: Any) -> dict[str, Any]:
    spec = {"addresses": ["192.0.2.1"], "serviceName": "s", "ports": [{"port": 80}]}
    spec.update(changes)
    return mapping({k: v for k, v in spec.items() if v is not None})


# Mistakes the schema itself rejects (no CEL needed).
REJECTED = {
    "no addresses": with_spec(addresses=[]),
    "missing ports": with_spec(ports=None),
    "port 0": with_spec(ports=[{"port": 0}]),
    "port 65536": with_spec(ports=[{"port": 65536}]),
    "port as text": with_spec(ports=[{"port": "80"}]),
    "servicePort 0": with_spec(ports=[{"port": 80, "servicePort": 0}]),
    "unknown protocol": with_spec(ports=[{"port": 80, "protocol": "icmp"}]),
    "unknown mode": with_spec(mode="nat"),
    "empty serviceName": with_spec(serviceName=""),
    "serviceName of 63": with_spec(serviceName="x" * 63),
    "serviceName not a DNS-1035 label": with_spec(serviceName="Bad_Name"),
    "serviceName starting with a digit": with_spec(serviceName="1web"),
    "same port twice (tcp by default)": with_spec(ports=[{"port": 80}, {"port": 80, "protocol": "tcp"}]),
    "same address twice": with_spec(addresses=["192.0.2.1", "192.0.2.1"]),
    "port without number": with_spec(ports=[{"protocol": "tcp", "servicePort": 80}]),
}

# Mistakes only the CEL rules catch.
REJECTED_BY_CEL = {
    "octet over 255": with_spec(addresses=["192.0.2.300"]),
    "IPv6 address": with_spec(addresses=["2001:db8::1"]),
    "leading zeros": with_spec(addresses=["192.0.02.1"]),
    "host name": with_spec(addresses=["example.com"]),
    "source prefix 33": with_spec(allowedSources=["10.0.0.0/33"]),
    "IPv6 source": with_spec(allowedSources=["2001:db8::/32"]),
    "source garbage": with_spec(allowedSources=["10.0.0.0/8,"]),
}


def test_crd_names_and_version(crd: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "mappings.smartnat.aureacentral.com"
    spec = crd["spec"]
    assert spec["group"] == "smartnat.aureacentral.com"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "Mapping"
    assert spec["names"]["plural"] == "mappings"
    assert spec["names"]["shortNames"] == ["snm"]
    assert spec["names"]["categories"] == ["smartnat"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_crd_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Addresses": ("string", ".spec.addresses"),
        "Ports": ("string", ".spec.ports[*].port"),
        "Service": ("string", ".spec.serviceName"),
        "Mode": ("string", ".spec.mode"),
        "Ready": ("string", '.status.conditions[?(@.type=="Ready")].status'),
        "Age": ("date", ".metadata.creationTimestamp"),
    }


def test_crd_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in schema_nodes(schema):
        assert "type" in node, f"{path or 'root'} has no type"
        assert node["type"] in PYTHON_TYPES, f"{path}: type {node['type']}"
        for key in ("oneOf", "anyOf", "allOf", "not", "$ref", "nullable"):
            assert key not in node, f"{path}: {key} makes the schema non-structural here"
        if "default" in node:
            assert schema_errors(node, node["default"]) == [], f"{path}: default does not validate"
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in items.get("required", []) or "default" in items["properties"][key], (
                    f"{path}: map key {key} must be required or defaulted"
                )
    assert set(schema["properties"]["metadata"]) == {"type"}


def test_crd_defaults_and_rules_are_in_the_schema(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["mode"]["enum"] == ["service", "direct"] and spec["mode"]["default"] == "service"
    assert spec["allowedSources"]["default"] == []
    port = spec["ports"]["items"]["properties"]
    assert port["protocol"]["enum"] == ["tcp", "udp", "sctp"] and port["protocol"]["default"] == "tcp"
    assert spec["ports"]["items"]["required"] == ["port"]
    assert spec["ports"]["x-kubernetes-list-map-keys"] == ["port", "protocol"]
    assert spec["addresses"]["x-kubernetes-list-type"] == "set"
    rules = {path: [r["rule"] for r in node.get("x-kubernetes-validations", [])] for path, node in schema_nodes(schema)}
    assert any("isIP(self)" in r for r in rules[".spec.addresses[]"])
    assert any("isCIDR(self)" in r for r in rules[".spec.allowedSources[]"])
    status = schema["properties"]["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert set(status["appliances"]["additionalProperties"]["properties"]) == {"lastSync", "message", "configured"}
    assert status["configuredAddresses"]["additionalProperties"]["properties"]["podIPs"]["type"] == "array"


@pytest.mark.parametrize("obj", SMARTNAT_MAPPINGS + NEW_MAPPINGS, ids=lambda o: "/".join(o["spec"]["addresses"]))
def test_crd_accepts_valid_mappings_unchanged(schema: dict[str, Any], obj: dict[str, Any]) -> None:
    stored, errors = admit(schema, obj)
    assert errors == []
    # Nothing the user wrote is changed or dropped; only missing defaults are added.
    for key, value in obj["spec"].items():
        assert stored["spec"][key] == value or key == "ports"
    for original, port in zip(obj["spec"]["ports"], stored["spec"]["ports"], strict=True):
        assert {**port, **original} == port and port["protocol"] in ("tcp", "udp", "sctp")
    assert stored["spec"]["mode"] in ("service", "direct")
    assert stored.get("status") == obj.get("status")


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_crd_rejects_broken_mappings(schema: dict[str, Any], case: str) -> None:
    _, errors = admit(schema, REJECTED[case])
    assert errors, f"{case} was accepted"


@pytest.mark.parametrize(
    "spec", [{"allowedSource": ["10.0.0.0/8"]}, {"ports": [{"port": 80, "servicPort": 8080}]}], ids=str
)
def test_crd_keeps_a_misspelt_field_for_smartnatd_to_refuse(schema: dict[str, Any], spec: dict[str, Any]) -> None:
    # Pruned, a misspelt allowedSources would serve the Mapping to everyone without a word.
    stored, errors = admit(schema, with_spec(**spec))
    assert errors == []
    reason = parse_mapping(stored).spec
    assert isinstance(reason, Invalid) and "unknown field; did you mean" in reason.reason


def test_crd_accepts_the_demo_mappings(schema: dict[str, Any]) -> None:
    docs = [d for d in yaml.safe_load_all((VAGRANT / "manifest.yaml").read_text()) if d and d["kind"] == "Mapping"]
    assert len(docs) == 2
    for doc in docs:
        assert admit(schema, doc)[1] == []


# CEL: evaluated with cel-python, the Kubernetes IP/CIDR functions written out in Python the way
# k8s.io/apiserver/pkg/cel/library implements them (net/netip: no leading zeros, no IPv4-mapped
# IPv6; CIDRs may have host bits set). This checks syntax and meaning, not the API server's cost
# estimate; the schema keeps every CEL-checked string short (maxLength) for that.


def _k8s_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and (address.ipv4_mapped or address.scope_id):
        raise ValueError(text)
    return address


def _k8s_cidr(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in text or not re.fullmatch(r".*/(0|[1-9][0-9]*)", text):
        raise ValueError(text)
    _k8s_ip(text.split("/")[0])
    return ipaddress.ip_interface(text)


@pytest.fixture(scope="module")
def cel() -> CelEvaluator:
    celpy = pytest.importorskip("celpy", reason="CEL rules not evaluated: pip install cel-python")
    from celpy import celtypes

    def succeeds(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
        def check(text: Any) -> Any:
            try:
                parse(str(text))
            except ValueError:
                return celtypes.BoolType(False)
            return celtypes.BoolType(True)

        return check

    def ip(value: Any) -> Any:  # ip(string), and cidr.ip()
        if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
            return value.ip
        return _k8s_ip(str(value))

    functions = {
        "isIP": succeeds(_k8s_ip),
        "isCIDR": succeeds(_k8s_cidr),
        "ip": ip,
        "cidr": lambda value: _k8s_cidr(str(value)),
        "family": lambda value: celtypes.IntType(value.version),
    }
    env = celpy.Environment()
    programs: dict[str, Any] = {}

    def evaluate(rule: str, value: Any) -> bool:
        if rule not in programs:
            programs[rule] = env.program(env.compile(rule), functions=functions)
        return bool(programs[rule].evaluate({"self": celpy.json_to_cel(value)}))

    return evaluate


@pytest.mark.parametrize("obj", SMARTNAT_MAPPINGS + NEW_MAPPINGS, ids=lambda o: "/".join(o["spec"]["addresses"]))
def test_crd_cel_rules_accept_valid_mappings(schema: dict[str, Any], cel: CelEvaluator, obj: dict[str, Any]) -> None:
    assert admit(schema, obj, cel)[1] == []


@pytest.mark.parametrize("case", sorted(REJECTED_BY_CEL))
def test_crd_cel_rules_reject_bad_addresses(schema: dict[str, Any], cel: CelEvaluator, case: str) -> None:
    obj = REJECTED_BY_CEL[case]
    assert admit(schema, obj)[1] == [], "the schema alone should let this through"
    assert admit(schema, obj, cel)[1], f"{case} was accepted"


# ---- RBAC -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rbac() -> dict[tuple[str, str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs}


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def expand(group: str, resources: str, verbs: str) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources.split() for v in verbs.split()}


# Every Kubernetes API method smartnatd calls: its API class and the (group, resource, verbs)
# RBAC must grant for it. The list methods are also the watches (kube/watch.py calls them with
# watch=True). A call added to the code fails the test below until it is entered here, and then
# until etc/rbac.yaml grants it.
MAPPINGS_GROUP = "smartnat.aureacentral.com"
API_CALLS: dict[str, tuple[str, str, str, str]] = {
    "list_cluster_custom_object": ("CustomObjectsApi", MAPPINGS_GROUP, "mappings", "list watch"),
    "get_namespaced_custom_object": ("CustomObjectsApi", MAPPINGS_GROUP, "mappings", "get"),
    "patch_namespaced_custom_object": ("CustomObjectsApi", MAPPINGS_GROUP, "mappings", "patch"),
    "patch_namespaced_custom_object_status": ("CustomObjectsApi", MAPPINGS_GROUP, "mappings/status", "patch"),
    "list_service_for_all_namespaces": ("CoreV1Api", "", "services", "list watch"),
    "list_endpoint_slice_for_all_namespaces": ("DiscoveryV1Api", "discovery.k8s.io", "endpointslices", "list watch"),
    "create_namespaced_event": ("CoreV1Api", "", "events", "create"),
    "patch_namespaced_event": ("CoreV1Api", "", "events", "patch"),
    "create_namespaced_lease": ("CoordinationV1Api", "coordination.k8s.io", "leases", "create"),
    "patch_namespaced_lease": ("CoordinationV1Api", "coordination.k8s.io", "leases", "patch"),
    "read_namespaced_lease": ("CoordinationV1Api", "coordination.k8s.io", "leases", "get"),
}


def api_usage() -> tuple[set[str], set[str]]:
    """The kubernetes_asyncio API classes and API methods named anywhere in smartnatd."""
    client = pytest.importorskip("kubernetes_asyncio.client")
    classes = {
        name: cls for name, cls in vars(client).items()
        if inspect.isclass(cls) and name.endswith("Api") and name != "ApiClient"
    }
    methods = {m for cls in classes.values() for m in vars(cls) if not m.startswith("_")}
    used_classes: set[str] = set()
    used_methods: set[str] = set()
    for path in (REPO / "smartnatd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Name) and node.id in classes:
                used_classes.add(node.id)
            elif isinstance(node, ast.Attribute) and node.attr in methods:
                used_methods.add(node.attr)
    return used_classes, used_methods


def needed_grants(*, leases: bool) -> set[tuple[str, str, str]]:
    return set().union(*(
        expand(group, resource, verbs)
        for _, group, resource, verbs in API_CALLS.values()
        if (resource == "leases") == leases
    ))


def test_the_api_calls_table_lists_every_call_smartnatd_makes() -> None:
    client = pytest.importorskip("kubernetes_asyncio.client")
    used_classes, used_methods = api_usage()
    assert used_methods == set(API_CALLS)
    # A method name alone does not say its group (EventsV1Api has create_namespaced_event too):
    # only the classes of the table are used, and each has its method.
    assert used_classes == {cls for cls, *_ in API_CALLS.values()}
    for method, (cls, *_) in API_CALLS.items():
        assert hasattr(getattr(client, cls), method), (cls, method)
    assert '"watch": True' in (REPO / "smartnatd" / "kube" / "watch.py").read_text(), "the list methods watch"


def test_cluster_role_grants_exactly_what_smartnatd_uses(rbac: dict[tuple[str, str, str], Any]) -> None:
    assert grants(rbac[("ClusterRole", "", "smartnat")]) == needed_grants(leases=False)


def test_leases_only_in_the_default_lease_namespace(rbac: dict[tuple[str, str, str], Any]) -> None:
    # Not kube-node-lease: the grant there would reach every node's heartbeat Lease.
    assert Settings().lease_namespace == "smartnat-system"
    role = rbac[("Role", "smartnat-system", "smartnat-leases")]
    assert grants(role) == needed_grants(leases=True)
    binding = rbac[("RoleBinding", "smartnat-system", "smartnat-leases")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "smartnat-leases"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "smartnat", "namespace": "smartnat-system"}]
    assert not any(kind == "ClusterRole" and "leases" in str(doc) for (kind, _, _), doc in rbac.items())


def test_service_account_binding_and_token(rbac: dict[tuple[str, str, str], Any]) -> None:
    assert ("Namespace", "", "smartnat-system") in rbac
    assert ("ServiceAccount", "smartnat-system", "smartnat") in rbac
    binding = rbac[("ClusterRoleBinding", "", "smartnat")]
    assert binding["roleRef"]["name"] == "smartnat"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "smartnat", "namespace": "smartnat-system"}]
    secret = rbac[("Secret", "smartnat-system", "smartnat-token")]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "smartnat"}


def test_kube_proxy_identity_uses_the_builtin_node_proxier_role(rbac: dict[tuple[str, str, str], Any]) -> None:
    binding = rbac[("ClusterRoleBinding", "", "smartnat-kube-proxy")]
    assert binding["roleRef"]["name"] == "system:node-proxier"
    assert binding["subjects"][0]["name"] == "smartnat-kube-proxy"
    secret = rbac[("Secret", "smartnat-system", "smartnat-kube-proxy-token")]
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "smartnat-kube-proxy"}


def test_no_role_grants_wildcards_or_secrets(rbac: dict[tuple[str, str, str], Any]) -> None:
    for (kind, _, name), doc in rbac.items():
        if kind in ("Role", "ClusterRole"):
            for group, resource, verb in grants(doc):
                assert "*" not in (group, resource, verb), name
                assert resource != "secrets", name


# ---- kubeconfig-from-serviceaccount.sh ----------------------------------------------------------

CA_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl"


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> dict[str, Any]:
    """A kubectl that answers jsonpath queries for one Secret and logs its arguments."""
    log = tmp_path / "kubectl.log"
    tool = tmp_path / "kubectl"
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >>"{log}"\n'
        'case "$*" in\n'
        '  *"{.data.token}"*) printf %s "$FAKE_TOKEN" ;;\n'
        '  *"{.data.ca\\.crt}"*) printf %s "$FAKE_CA" ;;\n'
        "esac\n"
    )
    tool.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "KUBECTL": str(tool),
        "FAKE_TOKEN": base64.b64encode(TOKEN.encode()).decode(),
        "FAKE_CA": base64.b64encode(CA_PEM).decode(),
    }
    return {"env": env, "log": log, "dir": tmp_path}


def test_kubeconfig_is_written_from_the_secret_with_mode_0600(fake_kubectl: dict[str, Any]) -> None:
    output = fake_kubectl["dir"] / "etc/smartnat/kubeconfig"
    result = run(["bash", KUBECONFIG_SH, "https://192.0.2.10:6443", output], env=fake_kubectl["env"])
    assert result.returncode == 0, result.stderr
    assert mode(output) == 0o600
    config = yaml.safe_load(output.read_text())
    assert config["current-context"] == "smartnat"
    (cluster,) = config["clusters"]
    assert cluster["cluster"]["server"] == "https://192.0.2.10:6443"
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == CA_PEM
    (user,) = config["users"]
    assert user["user"] == {"token": TOKEN}
    assert config["contexts"][0]["context"]["namespace"] == "smartnat-system"
    assert "--namespace smartnat-system get secret smartnat-token" in fake_kubectl["log"].read_text()
    assert [p.name for p in output.parent.iterdir()] == ["kubeconfig"], "temporary file left behind"


def test_kubeconfig_for_another_secret(fake_kubectl: dict[str, Any]) -> None:
    output = fake_kubectl["dir"] / "kube-proxy.kubeconfig"
    args = ["-s", "smartnat-kube-proxy-token", "https://api.example:6443", output]
    result = run(["bash", KUBECONFIG_SH, *args], env=fake_kubectl["env"])
    assert result.returncode == 0, result.stderr
    assert "get secret smartnat-kube-proxy-token" in fake_kubectl["log"].read_text()
    assert yaml.safe_load(output.read_text())["users"][0]["name"] == "smartnat-kube-proxy-token"


def test_kubeconfig_refuses_plain_http_and_a_secret_without_token(fake_kubectl: dict[str, Any]) -> None:
    output = fake_kubectl["dir"] / "kubeconfig"
    env = fake_kubectl["env"]
    result = run(["bash", KUBECONFIG_SH, "http://192.0.2.10:6443", output], env=env)
    assert result.returncode == 2 and "https://" in result.stderr
    result = run(["bash", KUBECONFIG_SH, "-w", "0", "https://192.0.2.10:6443", output], env={**env, "FAKE_TOKEN": ""})
    assert result.returncode == 1 and "no token" in result.stderr
    assert not output.exists()


# ---- shell scripts, packer, Vagrant -------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_is_shellcheck_clean(script: Path) -> None:
    shellcheck = need("shellcheck", "shellcheck")
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    assert mode(script) & 0o111, f"{script} is not executable"
    result = run([shellcheck, "--external-sources", script])
    assert result.returncode == 0, result.stdout


def test_packer_template_is_formatted_hcl() -> None:
    packer = need("packer", "packer")
    result = run([packer, "fmt", "-check", "-diff", PACKER_TEMPLATE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_packer_template_builds_debian_12_and_runs_provision_sh() -> None:
    text = PACKER_TEMPLATE.read_text()
    assert re.search(r'required_version\s*=\s*">= 1\.10', text)
    assert 'source  = "github.com/hashicorp/amazon"' in text
    assert 'source  = "github.com/hashicorp/qemu"' in text
    assert 'source "amazon-ebs" "debian12"' in text and 'source "qemu" "debian12"' in text
    assert 'owners      = ["136693071363"]' in text
    assert 'name                = "debian-12-amd64-*"' in text
    assert "debian-12-genericcloud-amd64.qcow2" in text
    assert 'iso_checksum   = "file:${var.debian_cloud_image_checksum_url}"' in text
    assert 'cd_label = "cidata"' in text
    assert 'script = "${path.root}/provision.sh"' in text
    # The tarball the file provisioner uploads is the one provision.sh is told to install.
    assert 'destination = local.tarball' in text
    assert '"SMARTNAT_SRC_TARBALL=${local.tarball}"' in text
    assert '"KUBE_VERSION=${var.kube_version}"' in text
    assert '"ENABLE_KUBE_PROXY=${var.enable_kube_proxy ? 1 : 0}"' in text


def test_kube_version_is_pinned_in_one_file() -> None:
    version = (REPO / "packaging/kube-version").read_text()
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+\n", version), repr(version)
    # Everything else reads the file; a second copy of the number would go stale.
    for path in (PROVISION, PACKER_TEMPLATE, VAGRANT / "Vagrantfile", REPO / "docs/operator-guide.md"):
        assert version.strip() not in path.read_text(), f"{path.relative_to(REPO)} repeats {version.strip()}"
        assert "packaging/kube-version" in path.read_text(), path


def test_vagrantfile_is_valid_ruby() -> None:
    ruby = need("ruby", "ruby")
    result = run([ruby, "-c", VAGRANT / "Vagrantfile"])
    assert result.returncode == 0, result.stderr


def test_vagrantfile_uses_current_boxes_and_existing_scripts() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    for script in re.findall(r'path: "([^"]+)"', text):
        assert (VAGRANT / script).is_file(), script
    assert 'config.vm.define "k8s"' in text and 'config.vm.define "smartnat"' in text
    assert len(re.findall(r'"private_network", ip: ip\b', text)) == 1  # one per external address
    assert re.search(r"EXTERNAL_IPS = \[\"[0-9.]+\", \"[0-9.]+\"\]", text)


def test_crd_accepts_the_status_the_daemon_writes(schema: dict[str, Any]) -> None:
    """The write-back's own output (kube/status.compute) must pass the CRD's schema, or a real
    API server answers 422 to every status patch."""
    from ipaddress import IPv4Address

    from smartnatd.desired import ExternalEndpoint
    from smartnatd.kube.status import compute
    from smartnatd.model import ObjectKey, Protocol
    from smartnatd.planner import Verdict, VerdictKind

    verdict = Verdict(
        key=ObjectKey("default", "m"),
        kind=VerdictKind.CONFIGURED,
        reason="serving 192.0.2.1:80/tcp",
        event_reason="Configured",
        served=(ExternalEndpoint(IPv4Address("192.0.2.1"), Protocol.TCP, 80),),
        addresses=(IPv4Address("192.0.2.1"),),
        service_vip=IPv4Address("10.96.0.10"),
        pod_ips=(IPv4Address("10.244.1.2"),),
    )
    change = compute(verdict=verdict, current={}, instance="nat-a", now="2026-01-01T00:00:00Z", generation=1)
    assert change.patch is not None
    obj = mapping({"addresses": ["192.0.2.1"], "serviceName": "s", "ports": [{"port": 80}]}, status=change.patch)
    stored, errors = admit(schema, obj)
    assert errors == []
    assert stored["status"]["appliances"]["nat-a"]["configured"] == ["192.0.2.1:80/tcp"]
