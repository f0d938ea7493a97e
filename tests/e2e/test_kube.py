"""`smartnatd run` against the emulated API server, with real packets through the test topology.

The emulator listens on the host's 127.0.0.1, so the daemon runs in the host namespace with
`--netns <appliance ns>`: every kernel edge (nft, routes, conntrack, interface discovery) acts
in the appliance namespace, and its HTTP port is on the host's loopback. The test changes
objects over HTTP as another client would and checks traffic from the client namespace.

Blocking helpers (sockets, processes) run in threads: the emulator serves the daemon from
this test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smartnatd.kube.objects import FINALIZER
from tests.kernel.harness import NoReply, Topology, async_wait_until, parse_echo_reply, run, tcp_request
from tests.kube.conftest import kube_api, mapping_body, service_body, slice_body  # noqa: F401  (fixture)
from tests.kube.emulator import ENDPOINTSLICES, LEASES, MAPPINGS, SERVICES, KubeEmulator

SMARTNATD = Path(sys.executable).parent / "smartnatd"
NS = "demo"
ADDRESS = "192.0.2.10"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emulator, cluster: {{server: "{url}"}}}}]
users: [{{name: smartnat, user: {{token: not-a-secret}}}}]
contexts: [{{name: emulator, context: {{cluster: emulator, user: smartnat}}}}]
current-context: emulator
""")
    return path


class KubeDaemon:
    """One `smartnatd run --netns NETNS` process in the host namespace, talking to the emulator,
    as appliance `instance` (tests/e2e/test_failover.py runs two)."""

    def __init__(self, *, netns: str, kubeconfig: Path, state: Path, instance: str = "e2e") -> None:
        state.mkdir(exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SNCTRLR_", "KUBERNETES_"))}
        env.update(
            KUBECONFIG=str(kubeconfig),
            SNCTRLR_INTERFACES_PATTERN="^ext[0-9]+$",
            SNCTRLR_DEFAULT_GW_INTERFACE="eth0",
            SNCTRLR_STATE_DIR=str(state),
            SNCTRLR_INSTANCE_NAME=instance,
            SNCTRLR_SYNC_DEBOUNCE_MS="5",
            SNCTRLR_MONITOR_PORT=str(self.port),
        )
        self.log = state / "daemon.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(SMARTNATD), "run", "--netns", netns],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{self.port}{path}", timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status, await response.text()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"smartnatd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return (await self.get("/readyz"))[0] == 200
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                return False

        try:
            await async_wait_until(ready, timeout=timeout, interval=0.05, message="/readyz")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture
async def start_daemon(topology: Topology, kube_api: KubeEmulator, tmp_path: Path) -> Any:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    started: list[KubeDaemon] = []

    def start() -> KubeDaemon:
        daemon = KubeDaemon(netns=topology.appliance, kubeconfig=kubeconfig, state=tmp_path / f"state{len(started)}")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()


def _reach(t: Topology) -> str | None:
    try:
        return parse_echo_reply(tcp_request(t.client, dst=ADDRESS, port=80, src=t.allowed_client, timeout=0.5)).name
    except NoReply:
        return None


async def reach(t: Topology) -> str | None:
    """Which pod answered a new connection to 192.0.2.10:80 from the client, or None."""
    return await asyncio.to_thread(_reach, t)


async def answers(t: Topology, pod: str) -> bool:
    return await reach(t) == pod


async def host_tables() -> str:
    return (await asyncio.to_thread(run, ["nft", "list", "tables"])).stdout


async def create_echo(kube_api: KubeEmulator) -> None:
    await kube_api.create_object(SERVICES, service_body())
    await kube_api.create_object(ENDPOINTSLICES, slice_body(pods=("10.244.1.2",)))
    await kube_api.create_object(MAPPINGS, mapping_body("echo", addresses=(ADDRESS,)))


def mapping_status(kube_api: KubeEmulator) -> dict[str, Any]:
    obj = kube_api.current(MAPPINGS, "echo", namespace=NS)
    return (obj or {}).get("status") or {}


async def test_mapping_service_and_endpoints_from_the_api_drive_the_kernel(
        topology: Topology, echo_servers: Any, kube_api: KubeEmulator, start_daemon: Any) -> None:
    tables_before = await host_tables()
    await create_echo(kube_api)
    daemon = start_daemon()
    await daemon.wait_ready()

    # Created by another client: served, with status, finalizer and Lease written back.
    assert await async_wait_until(lambda: reach(topology), timeout=5, message="pod1 answers") == "pod1"
    await async_wait_until(lambda: "e2e" in mapping_status(kube_api).get("appliances", {}), timeout=5,
                           message="status written")
    status = mapping_status(kube_api)
    assert status["configuredAddresses"] == {ADDRESS: {"podIPs": ["10.244.1.2"]}}
    assert status["appliances"]["e2e"]["configured"] == [f"{ADDRESS}:80/tcp"]
    assert kube_api.current(MAPPINGS, "echo", namespace=NS)["metadata"]["finalizers"] == [FINALIZER]
    assert kube_api.current(LEASES, "smartnat-e2e", namespace="smartnat-system")["spec"]["holderIdentity"] == "e2e"

    # Scaled: pod2 joins the EndpointSlice, new connections reach it. The first status patch
    # for it meets a conflict: write-back retries on a later pass that changes nothing else.
    conflict = kube_api.fail_next(status=409, verb="patch", resource=MAPPINGS, subresource="status")
    await kube_api.patch_object(ENDPOINTSLICES, "echo-1", {"endpoints": [
        {"addresses": ["10.244.1.2"], "conditions": {"ready": True}},
        {"addresses": ["10.244.2.2"], "conditions": {"ready": True}}]}, namespace=NS)
    await async_wait_until(lambda: answers(topology, "pod2"), timeout=5, message="pod2 answers")
    await async_wait_until(
        lambda: mapping_status(kube_api)["configuredAddresses"][ADDRESS]["podIPs"] == ["10.244.1.2", "10.244.2.2"],
        timeout=5, message="podIPs updated")
    assert conflict.remaining == 0, "the status patch never met the injected conflict"

    # The API server goes away: the kernel keeps serving what it had.
    kube_api.api_down()
    assert await reach(topology) in ("pod1", "pod2")
    assert (await daemon.get("/healthz"))[0] == 200
    kube_api.api_up()

    # Deleted: traffic stops, the appliance confirms and the finalizer goes with the object.
    await kube_api.delete_object(MAPPINGS, "echo", namespace=NS)
    await async_wait_until(lambda: kube_api.current(MAPPINGS, "echo", namespace=NS) is None, timeout=10,
                           message="the Mapping finalized and gone")
    assert await reach(topology) is None
    assert daemon.proc.poll() is None

    # Everything happened in the appliance namespace; the host's ruleset never saw smartnat.
    assert "smartnat" not in await host_tables() and await host_tables() == tables_before
    ap_tables = (await asyncio.to_thread(run, ["ip", "netns", "exec", topology.appliance, "nft", "list", "tables"])).stdout
    assert "table ip smartnat" in ap_tables
    assert await daemon.stop() == 0


async def test_a_restart_after_a_deletion_while_down_removes_the_leftover_state(
        topology: Topology, echo_servers: Any, kube_api: KubeEmulator, start_daemon: Any) -> None:
    await create_echo(kube_api)
    first = start_daemon()
    await first.wait_ready()
    await async_wait_until(lambda: reach(topology), timeout=5, message="served")
    await async_wait_until(lambda: "e2e" in mapping_status(kube_api).get("appliances", {}), timeout=5,
                           message="status written")
    assert await first.stop() == 0
    assert await reach(topology) == "pod1"  # stopping leaves the kernel state in place

    # Deleted while no appliance runs: the finalizer holds the object, its entry still says e2e.
    await kube_api.delete_object(MAPPINGS, "echo", namespace=NS)
    assert kube_api.current(MAPPINGS, "echo", namespace=NS)["metadata"]["deletionTimestamp"]

    second = start_daemon()
    await second.wait_ready()
    # The first (full) pass no longer serves it, then releases it: the object goes.
    assert await reach(topology) is None
    await async_wait_until(lambda: kube_api.current(MAPPINGS, "echo", namespace=NS) is None, timeout=10,
                           message="the Mapping finalized and gone")
    assert await second.stop() == 0
