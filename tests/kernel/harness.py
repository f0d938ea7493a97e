"""Kernel test harness: network namespaces, the appliance topology, echo servers, clients, SCTP.

Everything here runs inside network namespaces the harness created (`sn-` names); the host
namespace never gets an interface, address, route, rule or sysctl. The IP plan is written at
the top of tests/kernel/conftest.py; `Topology` holds it as data.

Plain functions and classes, importable from any test folder; pytest fixtures in
tests/kernel/conftest.py wrap them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import inspect
import ipaddress
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Self, TypeVar

T = TypeVar("T")

IPv4Like = ipaddress.IPv4Address | str
Protocol = Literal["tcp", "udp", "sctp"]

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "sn-"
# Names stay within an interface name's length (IFNAMSIZ - 1) so they can double as one.
NAME_MAX = 15
_CLONE_NEWNET = 0x40000000
IPPROTO_SCTP = 132


# --------------------------------------------------------------------------------------------
# Commands and namespaces
# --------------------------------------------------------------------------------------------


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message carries argv and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {stderr.strip()}")


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command in the caller's namespace, text output captured."""
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stderr)
    return result


def sh(ns: str, *argv: str, check: bool = True, input: str | None = None,
       timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run argv inside namespace ns (`ip netns exec NS ...`)."""
    return run(["ip", "netns", "exec", ns, *argv], check=check, input=input, timeout=timeout)


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Run several `ip` commands in ns with one process (`ip -n NS -batch -`)."""
    run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def sysctl(ns: str, key: str, value: str | int) -> None:
    """Set one sysctl inside ns; the kernel resolves net.* keys in that namespace."""
    sysctls(ns, {key: value})


def sysctls(ns: str, settings: Mapping[str, str | int]) -> None:
    """Set several sysctls inside ns with one process."""
    if settings:
        sh(ns, "sysctl", "-q", "-w", *(f"{key}={value}" for key, value in settings.items()))


def read_sysctl(ns: str, key: str) -> str:
    return sh(ns, "sysctl", "-n", key).stdout.strip()


def list_netns(prefix: str = NETNS_PREFIX) -> frozenset[str]:
    """Named namespaces starting with prefix (reads /run/netns: no process, cheap enough for
    an autouse fixture)."""
    try:
        return frozenset(name for name in os.listdir(NETNS_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return frozenset()


def netns_pids(ns: str) -> tuple[int, ...]:
    result = run(["ip", "netns", "pids", ns], check=False)
    return tuple(int(word) for word in result.stdout.split())


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # A zombie no longer holds its namespace; its parent reaps it.
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def delete_netns(ns: str, *, timeout: float = 5.0) -> None:
    """Kill the processes living in ns, then delete it. A namespace already gone is fine."""
    if ns not in list_netns(prefix=ns):
        return
    pids = [pid for pid in netns_pids(ns) if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all(_process_gone(pid) for pid in pids), timeout=timeout,
               message=f"processes {pids} in {ns} to exit")
    result = run(["ip", "netns", "del", ns], check=False)
    if result.returncode != 0 and ns in list_netns(prefix=ns):
        raise CommandFailed(["ip", "netns", "del", ns], result.returncode, result.stderr)


def new_netns_prefix() -> str:
    """`sn-` plus 4 random hex digits: one per test session, so a session can tell its own
    namespaces from those of other runs on the same host."""
    return NETNS_PREFIX + secrets.token_hex(2)


class NetnsFactory:
    """Creates namespaces `<prefix><2 hex>[-label]` (e.g. `sn-4f2a91-pod1`) with `lo` up and
    deletes every one of them in `cleanup()`, whatever failed before."""

    def __init__(self, *, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else new_netns_prefix()
        if not self.prefix.startswith(NETNS_PREFIX) or len(self.prefix) + 2 > NAME_MAX:
            raise ValueError(f"netns prefix {self.prefix!r}: must start with {NETNS_PREFIX!r} "
                             f"and leave room for 2 more characters within {NAME_MAX}")
        self._created: list[str] = []

    @property
    def created(self) -> tuple[str, ...]:
        return tuple(self._created)

    def create(self, label: str = "") -> str:
        suffix = f"-{label}" if label else ""
        if len(self.prefix) + 2 + len(suffix) > NAME_MAX:
            raise ValueError(f"netns label {label!r} too long: names stay within {NAME_MAX} chars")
        for _ in range(64):
            name = f"{self.prefix}{secrets.token_hex(1)}{suffix}"
            result = run(["ip", "netns", "add", name], check=False)
            if result.returncode == 0:
                break
            if name not in list_netns(prefix=name):
                raise CommandFailed(["ip", "netns", "add", name], result.returncode, result.stderr)
            # Name taken (by this session or a colliding one): draw another.
        else:
            raise RuntimeError(f"no free namespace name under {self.prefix!r}")
        self._created.append(name)  # before anything else can fail, so cleanup() sees it
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def cleanup(self) -> None:
        errors: list[str] = []
        for name in reversed(self._created):
            try:
                delete_netns(name)
            except Exception as err:  # keep deleting the others; report all at the end
                errors.append(f"{name}: {err}")
        self._created.clear()
        if errors:
            raise RuntimeError("namespace cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block with the calling thread inside ns; sockets created there keep ns.

    Not pyroute2's pushns/popns: those keep one process-wide stack, save /proc/self (the main
    thread's namespace, not the caller's) and create a missing namespace. setns() moves only
    the calling thread, so this is safe in asyncio.to_thread workers, and a mistyped name
    raises FileNotFoundError.
    """
    target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                try:
                    _setns(saved)
                except OSError as err:
                    # Loud: carrying on would run this thread's later code inside ns.
                    raise RuntimeError(f"thread stuck in netns {ns}: {err}") from err
        finally:
            os.close(saved)
    finally:
        os.close(target)


def netstat_counters(ns: str) -> dict[str, int]:
    """Counters of /proc/net/netstat and /proc/net/snmp inside ns, keyed `Group.Name`
    (e.g. `TcpExt.IPReversePathFilter`, `Udp.InDatagrams`)."""
    text = sh(ns, "cat", "/proc/net/netstat", "/proc/net/snmp").stdout
    counters: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2]):
        group, *names = header.split()
        _, *numbers = values.split()
        for name, number in zip(names, numbers):
            counters[f"{group.rstrip(':')}.{name}"] = int(number)
    return counters


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------

_A = ipaddress.IPv4Address
_N = ipaddress.IPv4Network


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Namespace names and the IP plan of tests/kernel/conftest.py (defaults are the plan)."""

    client: str
    appliance: str
    router: str
    pods: tuple[str, str]

    # Interfaces: (namespace) name <-> (namespace) name
    client_ext1_iface: str = "c1"          # cl  <-> ap ext1
    client_ext2_iface: str = "c2"          # cl  <-> ap ext2
    client_internet_iface: str = "inet0"   # cl dummy holding the client addresses
    ext1_iface: str = "ext1"
    ext2_iface: str = "ext2"
    cluster_iface: str = "eth0"            # ap  <-> rt rt0
    router_cluster_iface: str = "rt0"
    router_pod_ifaces: tuple[str, str] = ("p1", "p2")   # rt <-> pod eth0
    pod_iface: str = "eth0"

    # External link 1: the client side is the appliance's gateway there.
    ext1_network: ipaddress.IPv4Network = _N("192.0.2.0/24")
    ext1_gateway: ipaddress.IPv4Address = _A("192.0.2.1")
    ext1_addresses: tuple[ipaddress.IPv4Address, ...] = (_A("192.0.2.10"), _A("192.0.2.11"))
    # External link 2.
    ext2_network: ipaddress.IPv4Network = _N("198.51.100.0/24")
    ext2_gateway: ipaddress.IPv4Address = _A("198.51.100.1")
    ext2_address: ipaddress.IPv4Address = _A("198.51.100.10")
    # The client's "internet" addresses (/32 on inet0 in cl).
    allowed_client: ipaddress.IPv4Address = _A("203.0.113.10")
    refused_client: ipaddress.IPv4Address = _A("203.0.113.20")
    # Appliance <-> router ("cluster network").
    cluster_link_network: ipaddress.IPv4Network = _N("10.10.0.0/24")
    appliance_cluster_address: ipaddress.IPv4Address = _A("10.10.0.2")
    router_address: ipaddress.IPv4Address = _A("10.10.0.1")
    # Pods behind the router.
    pod_networks: tuple[ipaddress.IPv4Network, ...] = (_N("10.244.1.0/24"), _N("10.244.2.0/24"))
    pod_gateways: tuple[ipaddress.IPv4Address, ...] = (_A("10.244.1.1"), _A("10.244.2.1"))
    pod_addresses: tuple[ipaddress.IPv4Address, ...] = (_A("10.244.1.2"), _A("10.244.2.2"))
    # ClusterIPs, reached from the appliance through its default route to the router.
    service_network: ipaddress.IPv4Network = _N("10.96.0.0/12")

    @property
    def ext1_address(self) -> ipaddress.IPv4Address:
        """The primary address of ext1 (192.0.2.11 is its secondary)."""
        return self.ext1_addresses[0]

    @property
    def external_addresses(self) -> tuple[ipaddress.IPv4Address, ...]:
        return (*self.ext1_addresses, self.ext2_address)

    @property
    def client_addresses(self) -> tuple[ipaddress.IPv4Address, ...]:
        return (self.allowed_client, self.refused_client)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client, self.appliance, self.router, *self.pods)

    def pod_address(self, pod_ns: str) -> ipaddress.IPv4Address:
        return self.pod_addresses[self.pods.index(pod_ns)]


def _add_address_holder(ns: str, name: str) -> None:
    """A dummy interface; a port-less bridge where the kernel has no dummy driver (this test
    kernel has no modules). Both just hold local addresses, which work without carrier."""
    try:
        run(["ip", "-n", ns, "link", "add", name, "type", "dummy"])
    except CommandFailed as err:
        if "Unknown device type" not in err.stderr:
            raise
        run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])


def build_topology(factory: NetnsFactory) -> Topology:
    """Create cl, ap, rt, pod1, pod2 and wire them as the IP plan says."""
    t = Topology(
        client=factory.create("cl"),
        appliance=factory.create("ap"),
        router=factory.create("rt"),
        pods=(factory.create("pod1"), factory.create("pod2")),
    )
    p1 = t.ext1_network.prefixlen
    p2 = t.ext2_network.prefixlen
    pc = t.cluster_link_network.prefixlen

    _add_address_holder(t.client, t.client_internet_iface)
    # Veths are created from one namespace straight into the other: the host never sees them.
    ip_batch(t.client, [
        f"link add {t.client_ext1_iface} type veth peer name {t.ext1_iface} netns {t.appliance}",
        f"link add {t.client_ext2_iface} type veth peer name {t.ext2_iface} netns {t.appliance}",
        f"addr add {t.ext1_gateway}/{p1} dev {t.client_ext1_iface}",
        f"addr add {t.ext2_gateway}/{p2} dev {t.client_ext2_iface}",
        *(f"addr add {a}/32 dev {t.client_internet_iface}" for a in t.client_addresses),
        f"link set {t.client_ext1_iface} up",
        f"link set {t.client_ext2_iface} up",
        f"link set {t.client_internet_iface} up",
    ])
    ip_batch(t.appliance, [
        f"link add {t.cluster_iface} type veth peer name {t.router_cluster_iface} netns {t.router}",
        # The first address added is the primary, the next ones secondaries.
        *(f"addr add {a}/{p1} dev {t.ext1_iface}" for a in t.ext1_addresses),
        f"addr add {t.ext2_address}/{p2} dev {t.ext2_iface}",
        f"addr add {t.appliance_cluster_address}/{pc} dev {t.cluster_iface}",
        f"link set {t.ext1_iface} up",
        f"link set {t.ext2_iface} up",
        f"link set {t.cluster_iface} up",
        # Without policy routing, replies to client addresses follow this and are lost.
        f"route add default via {t.router_address} dev {t.cluster_iface}",
    ])
    ip_batch(t.router, [
        *(f"link add {iface} type veth peer name {t.pod_iface} netns {pod}"
          for iface, pod in zip(t.router_pod_ifaces, t.pods)),
        f"addr add {t.router_address}/{pc} dev {t.router_cluster_iface}",
        *(f"addr add {gw}/{net.prefixlen} dev {iface}"
          for gw, net, iface in zip(t.pod_gateways, t.pod_networks, t.router_pod_ifaces)),
        f"link set {t.router_cluster_iface} up",
        *(f"link set {iface} up" for iface in t.router_pod_ifaces),
        # Pod replies and pod egress go back through the appliance.
        f"route add default via {t.appliance_cluster_address} dev {t.router_cluster_iface}",
    ])
    for pod, address, gateway, net in zip(t.pods, t.pod_addresses, t.pod_gateways,
                                          t.pod_networks):
        ip_batch(pod, [
            f"addr add {address}/{net.prefixlen} dev {t.pod_iface}",
            f"link set {t.pod_iface} up",
            f"route add default via {gateway} dev {t.pod_iface}",
        ])

    # Strict rp_filter in the client is the oracle for return paths: a reply on the wrong
    # link is dropped (TcpExt.IPReversePathFilter) and the request times out.
    sysctls(t.client, {f"net.ipv4.conf.{i}.rp_filter": 1
                       for i in ("all", "default", t.client_ext1_iface, t.client_ext2_iface)})
    # The appliance and router forward; rp_filter off (strict would drop ingress on ext2).
    sysctls(t.appliance, {
        "net.ipv4.ip_forward": 1,
        **{f"net.ipv4.conf.{i}.rp_filter": 0
           for i in ("all", "default", "lo", t.ext1_iface, t.ext2_iface, t.cluster_iface)},
    })
    sysctls(t.router, {
        "net.ipv4.ip_forward": 1,
        **{f"net.ipv4.conf.{i}.rp_filter": 0
           for i in ("all", "default", "lo", t.router_cluster_iface, *t.router_pod_ifaces)},
    })
    return t


# --------------------------------------------------------------------------------------------
# ClusterIPs (what kube-proxy does), in the router namespace
# --------------------------------------------------------------------------------------------

KUBE_TABLE = "kube"


def _protocol(protocol: str) -> Protocol:
    value = protocol.lower()
    if value not in ("tcp", "udp", "sctp"):
        raise ValueError(f"protocol {protocol!r}: expected tcp, udp or sctp")
    return value  # type: ignore[return-value]


def _port(port: int) -> int:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r}: expected 1-65535")
    return port


def _service_chain(cluster_ip: ipaddress.IPv4Address, port: int, protocol: Protocol) -> str:
    return f"svc-{protocol}-{port}-{str(cluster_ip).replace('.', '-')}"


def install_cluster_ip(topology: Topology, *, cluster_ip: IPv4Like, port: int,
                       protocol: str, backends: Sequence[tuple[IPv4Like, int]]) -> None:
    """DNAT cluster_ip:port/protocol to backends (random spread) in the router namespace.

    Idempotent per (cluster_ip, port, protocol): calling again replaces the backends. Every
    command is built from validated values. Existing conntrack entries keep their backend.
    """
    ip = ipaddress.IPv4Address(cluster_ip)
    proto = _protocol(protocol)
    _port(port)
    if not backends:
        raise ValueError("backends: at least one (address, port) is needed")
    targets = [(ipaddress.IPv4Address(addr), _port(bport)) for addr, bport in backends]
    chain = _service_chain(ip, port, proto)
    table = f"ip {KUBE_TABLE}"
    key = "ip daddr . meta l4proto . th dport"
    elements = ", ".join(f"{i} : {addr} . {bport}" for i, (addr, bport) in enumerate(targets))
    script = "\n".join([
        f"add table {table}",
        f"add map {table} services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add chain {table} prerouting"
        " { type nat hook prerouting priority dstnat ; policy accept ; }",
        # dstnat (-100) is not accepted by name for the output hook by nft 1.0.6.
        f"add chain {table} output"
        " { type nat hook output priority -100 ; policy accept ; }",
        # Flush and re-add the static rules so repeated calls never duplicate them.
        f"flush chain {table} prerouting",
        f"add rule {table} prerouting {key} vmap @services",
        f"flush chain {table} output",
        f"add rule {table} output {key} vmap @services",
        f"add chain {table} {chain}",
        f"flush chain {table} {chain}",
        f"add rule {table} {chain} meta l4proto {proto} "
        f"dnat ip to numgen random mod {len(targets)} map {{ {elements} }}",
        f"add element {table} services {{ {ip} . {proto} . {port} : jump {chain} }}",
    ]) + "\n"
    sh(topology.router, "nft", "-f", "-", input=script)


def remove_cluster_ip(topology: Topology, *, cluster_ip: IPv4Like, port: int,
                      protocol: str) -> None:
    ip = ipaddress.IPv4Address(cluster_ip)
    proto = _protocol(protocol)
    chain = _service_chain(ip, _port(port), proto)
    table = f"ip {KUBE_TABLE}"
    sh(topology.router, "nft", "-f", "-", input="\n".join([
        f"delete element {table} services {{ {ip} . {proto} . {port} }}",
        f"delete chain {table} {chain}",
    ]) + "\n")


# --------------------------------------------------------------------------------------------
# Echo servers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EchoReply:
    """A parsed echo reply: which server answered and the source address it saw."""

    name: str
    peer: ipaddress.IPv4Address
    peer_port: int
    data: bytes


def parse_echo_reply(reply: bytes) -> EchoReply:
    """Parse `b"<name> <peer_ip>:<peer_port> " + data`."""
    try:
        name, peer, data = reply.split(b" ", 2)
        host, _, port = peer.decode().rpartition(":")
        return EchoReply(name=name.decode(), peer=ipaddress.IPv4Address(host),
                         peer_port=int(port), data=data)
    except ValueError as err:
        raise ValueError(f"not an echo reply: {reply!r}") from err


def _echo_prefix(name: str, peer: tuple[str, int]) -> bytes:
    return f"{name} {peer[0]}:{peer[1]} ".encode()


def _echo_complete(buffer: bytes, sent: int) -> bool:
    parts = buffer.split(b" ", 2)
    return len(parts) == 3 and len(parts[2]) >= sent


class EchoServer:
    """A TCP or UDP echo server on address:port in ns, served by one thread of the test
    process. Each message gets `b"<name> <peer_ip>:<peer_port> " + data` back."""

    def __init__(self, *, ns: str, protocol: Literal["tcp", "udp"], address: IPv4Like,
                 port: int, name: str) -> None:
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"echo protocol {protocol!r}: expected tcp or udp")
        if " " in name:
            raise ValueError(f"echo name {name!r}: no spaces (they delimit the reply)")
        self.ns = ns
        self.protocol = protocol
        self.address = ipaddress.IPv4Address(address)
        self.port = _port(port)
        self.name = name
        self.failure: BaseException | None = None
        self._peers: list[tuple[ipaddress.IPv4Address, int]] = []
        self._lock = threading.Lock()
        # The stop signal is a socketpair watched by the selector: no polling of a flag.
        self._wake_r, self._wake_w = socket.socketpair()
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        with in_netns(ns):
            self._sock = socket.socket(socket.AF_INET, kind)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bound to the one address: a UDP reply then leaves from it (KERNEL-NOTES).
            self._sock.bind((str(self.address), self.port))
            if protocol == "tcp":
                self._sock.listen(128)
            self._sock.setblocking(False)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"echo-{name}-{protocol}-{port}")
        self._thread.start()

    @property
    def peers(self) -> tuple[tuple[ipaddress.IPv4Address, int], ...]:
        """(source address, source port) of every message received, in order."""
        with self._lock:
            return tuple(self._peers)

    def _record(self, peer: tuple[str, int]) -> None:
        with self._lock:
            self._peers.append((ipaddress.IPv4Address(peer[0]), peer[1]))

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        conns: set[socket.socket] = set()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            sel.register(self._sock, selectors.EVENT_READ, None)
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        return
                    if sock is self._sock and self.protocol == "tcp":
                        with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                            conn, peer = self._sock.accept()
                            conn.setblocking(False)
                            conns.add(conn)
                            sel.register(conn, selectors.EVENT_READ, peer)
                    elif sock is self._sock:
                        self._serve_datagram()
                    else:
                        assert isinstance(sock, socket.socket)
                        if not self._serve_stream(sock, key.data):
                            sel.unregister(sock)
                            conns.discard(sock)
                            sock.close()
        except BaseException as err:  # kept for stop(), which re-raises it in the test
            self.failure = err
        finally:
            for conn in conns:
                conn.close()
            sel.close()

    def _serve_datagram(self) -> None:
        try:
            data, peer = self._sock.recvfrom(65535)
        except (BlockingIOError, ConnectionRefusedError):
            return  # spurious wake-up, or an ICMP error from an earlier reply
        self._record(peer)
        with contextlib.suppress(OSError):  # an unroutable peer must not stop the server
            self._sock.sendto(_echo_prefix(self.name, peer) + data, peer)

    def _serve_stream(self, conn: socket.socket, peer: tuple[str, int]) -> bool:
        try:
            data = conn.recv(65535)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self._record(peer)
        try:
            conn.sendall(_echo_prefix(self.name, peer) + data)
        except OSError:
            return False
        return True

    def _close_sockets(self) -> None:
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop the thread, close every socket; re-raise a failure of the serving thread."""
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"echo server {self.name} ({self.protocol}) did not stop")
        self._close_sockets()
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise RuntimeError(f"echo server {self.name} ({self.protocol}) failed") from failure

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def echo_server(ns: str, protocol: Literal["tcp", "udp"], address: IPv4Like, port: int,
                name: str) -> EchoServer:
    """Start an echo server in ns; call `.stop()` (or use it as a context manager)."""
    return EchoServer(ns=ns, protocol=protocol, address=address, port=port, name=name)


@dataclass(frozen=True, kw_only=True)
class EchoServers:
    """The pods' echo servers, by (pod name, protocol): `servers["pod1", "tcp"]`."""

    port: int
    by_key: Mapping[tuple[str, str], EchoServer]

    def __getitem__(self, key: tuple[str, str]) -> EchoServer:
        return self.by_key[key]

    def stop(self) -> None:
        errors: list[BaseException] = []
        for server in self.by_key.values():
            try:
                server.stop()
            except Exception as err:
                errors.append(err)
        if errors:
            raise RuntimeError(f"{len(errors)} echo server(s) failed: {errors}") from errors[0]


def start_pod_echo_servers(topology: Topology, *, port: int = 8080) -> EchoServers:
    """TCP and UDP echo on port in each pod, bound to the pod address, named pod1, pod2."""
    started: dict[tuple[str, str], EchoServer] = {}
    try:
        for index, (pod, address) in enumerate(zip(topology.pods, topology.pod_addresses)):
            name = f"pod{index + 1}"
            for protocol in ("tcp", "udp"):
                started[name, protocol] = echo_server(pod, protocol, address, port, name)
    except BaseException:
        EchoServers(port=port, by_key=started).stop()
        raise
    return EchoServers(port=port, by_key=started)


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


class NoReply(Exception):
    """A request got no answer: reason is "timeout", "refused", "reset", "unreachable" or
    "closed"."""

    def __init__(self, reason: str, description: str) -> None:
        self.reason = reason
        super().__init__(f"no reply ({reason}): {description}")


_NO_REPLY_ERRNOS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
}


@contextlib.contextmanager
def _as_no_reply(description: str) -> Iterator[None]:
    try:
        yield
    except (TimeoutError, socket.timeout) as err:
        raise NoReply("timeout", description) from err
    except OSError as err:
        if err.errno in _NO_REPLY_ERRNOS:
            raise NoReply(_NO_REPLY_ERRNOS[err.errno], description) from err
        raise


def _describe(protocol: str, ns: str, src: IPv4Like | None, sport: int | None,
              dst: IPv4Like, port: int, timeout: float) -> str:
    source = f"{src or '*'}:{sport or '*'}"
    return f"{protocol} {source} -> {dst}:{port} in ns {ns} (timeout {timeout}s)"


def _socket(ns: str, kind: int) -> socket.socket:
    with in_netns(ns):
        return socket.socket(socket.AF_INET, kind)


class TcpConnection:
    """An open TCP connection from a namespace; keeps its source port across exchanges."""

    def __init__(self, *, ns: str, dst: IPv4Like, port: int, src: IPv4Like | None,
                 timeout: float) -> None:
        self.ns = ns
        self.dst = ipaddress.IPv4Address(dst)
        self.port = _port(port)
        self.timeout = timeout
        self._sock = _socket(ns, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            if src is not None:
                self._sock.bind((str(ipaddress.IPv4Address(src)), 0))
            with _as_no_reply(self._describe("connect")):
                self._sock.connect((str(self.dst), self.port))
        except BaseException:
            self._sock.close()
            raise

    @property
    def local(self) -> tuple[ipaddress.IPv4Address, int]:
        host, port = self._sock.getsockname()
        return ipaddress.IPv4Address(host), port

    def _describe(self, what: str) -> str:
        src = self._sock.getsockname()
        return (f"{what}: " + _describe("tcp", self.ns, src[0], src[1], self.dst, self.port,
                                        self.timeout))

    def exchange(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send data; return the echo reply (`name ip:port data`)."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        buffer = b""
        with _as_no_reply(self._describe("exchange")):
            self._sock.sendall(data)
            while not _echo_complete(buffer, len(data)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"partial reply {buffer!r}")
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65535)
                if not chunk:
                    raise NoReply("closed", self._describe(f"peer closed after {buffer!r}"))
                buffer += chunk
        return buffer

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tcp(ns: str, *, dst: IPv4Like, port: int, src: IPv4Like | None = None,
             timeout: float = 2.0) -> TcpConnection:
    """Connect from ns (raises NoReply on refusal/timeout); the connection stays open."""
    return TcpConnection(ns=ns, dst=dst, port=port, src=src, timeout=timeout)


def tcp_request(ns: str, *, dst: IPv4Like, port: int, payload: bytes = b"ping",
                src: IPv4Like | None = None, timeout: float = 2.0) -> bytes:
    """One connection, one exchange; the reply or NoReply."""
    with open_tcp(ns, dst=dst, port=port, src=src, timeout=timeout) as conn:
        return conn.exchange(payload, timeout=timeout)


class UdpFlow:
    """A connected UDP socket from a fixed source address and port: the same conntrack entry
    for every exchange, as a long-lived UDP flow."""

    def __init__(self, ns: str, *, src: IPv4Like | None, sport: int | None, dst: IPv4Like,
                 dport: int) -> None:
        self.ns = ns
        self.dst = ipaddress.IPv4Address(dst)
        self.dport = _port(dport)
        self._sock = _socket(ns, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            host = "0.0.0.0" if src is None else str(ipaddress.IPv4Address(src))
            self._sock.bind((host, sport or 0))
            # Connected: only the peer's datagrams arrive and ICMP errors surface as errno.
            self._sock.connect((str(self.dst), self.dport))
        except BaseException:
            self._sock.close()
            raise

    @property
    def local(self) -> tuple[ipaddress.IPv4Address, int]:
        host, port = self._sock.getsockname()
        return ipaddress.IPv4Address(host), port

    def exchange(self, data: bytes, timeout: float = 1.0) -> bytes:
        src, sport = self._sock.getsockname()
        description = _describe("udp", self.ns, src, sport, self.dst, self.dport, timeout)
        self._drain()
        with _as_no_reply(description):
            self._sock.settimeout(timeout)
            self._sock.send(data)
            return self._sock.recv(65535)

    def _drain(self) -> None:
        # A late answer to an earlier, timed-out exchange must not pass for this one's.
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(65535)
        except (BlockingIOError, ConnectionRefusedError):
            pass

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def udp_request(ns: str, *, dst: IPv4Like, port: int, payload: bytes = b"ping",
                src: IPv4Like | None = None, sport: int | None = None,
                timeout: float = 1.0) -> bytes:
    """One datagram, one reply; NoReply on timeout or ICMP port unreachable."""
    with UdpFlow(ns, src=src, sport=sport, dst=dst, dport=port) as flow:
        return flow.exchange(payload, timeout)


def expect_no_reply(fn: Callable[..., object], /, *args: object, **kwargs: object) -> bool:
    """True when fn(*args, **kwargs) raises NoReply (timeout, refusal, ...), False when it
    got an answer. Other errors propagate."""
    try:
        fn(*args, **kwargs)
    except NoReply:
        return True
    return False


# --------------------------------------------------------------------------------------------
# SCTP as raw packets (the test kernel has no SCTP sockets)
# --------------------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (RFC 3309 / RFC 4960 appendix B), as an integer."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def sctp_checksum_ok(segment: bytes) -> bool:
    """The checksum field (bytes 8-11, little-endian per RFC 4960 appendix B) matches."""
    if len(segment) < 12:
        return False
    (stored,) = struct.unpack_from("<I", segment, 8)
    return stored == crc32c(segment[:8] + b"\0\0\0\0" + segment[12:])


def sctp_init_segment(*, sport: int, dport: int, initiate_tag: int = 0x5EED5EED,
                      a_rwnd: int = 65535, streams: int = 10, initial_tsn: int = 1) -> bytes:
    """SCTP common header (verification tag 0, as INIT requires) + one INIT chunk."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, initiate_tag, a_rwnd, streams, streams,
                        initial_tsn)
    header = struct.pack("!HHII", _port(sport), _port(dport), 0, 0)
    checksum = crc32c(header + chunk)
    return header[:8] + struct.pack("<I", checksum) + chunk


def _ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(*, src: IPv4Like, dst: IPv4Like, protocol: int, payload: bytes,
                ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, ttl,
                         protocol, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", _ipv4_checksum(header)) + header[12:]
    return header + payload


def send_sctp_init(ns: str, *, src: IPv4Like, dst: IPv4Like, sport: int, dport: int,
                   initiate_tag: int = 0x5EED5EED) -> None:
    """Send one SCTP INIT from ns as a raw IPv4 packet with the given source address."""
    packet = ipv4_packet(src=src, dst=dst, protocol=IPPROTO_SCTP,
                         payload=sctp_init_segment(sport=sport, dport=dport,
                                                   initiate_tag=initiate_tag))
    send_raw_ipv4(ns, packet)


def send_raw_ipv4(ns: str, packet: bytes) -> None:
    """Send a complete IPv4 packet from ns, routed by its destination address."""
    # IPPROTO_RAW implies IP_HDRINCL: our header, our source address.
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with sock:
        sock.sendto(packet, (str(ipaddress.IPv4Address(packet[16:20])), 0))


@dataclass(frozen=True, kw_only=True)
class SctpPacket:
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    sport: int
    dport: int
    verification_tag: int
    chunk_type: int | None
    checksum_ok: bool

    @property
    def tuple(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int, int]:
        return self.src, self.dst, self.sport, self.dport


def parse_sctp_packet(packet: bytes) -> SctpPacket | None:
    """An IPv4 packet as a raw socket returns it (with IP header); None if not SCTP."""
    if len(packet) < 20 or packet[9] != IPPROTO_SCTP:
        return None
    header_len = (packet[0] & 0x0F) * 4
    segment = packet[header_len:]
    if len(segment) < 12:
        return None
    sport, dport, vtag = struct.unpack_from("!HHI", segment)
    return SctpPacket(
        src=ipaddress.IPv4Address(packet[12:16]), dst=ipaddress.IPv4Address(packet[16:20]),
        sport=sport, dport=dport, verification_tag=vtag,
        chunk_type=segment[12] if len(segment) > 12 else None,
        checksum_ok=sctp_checksum_ok(segment),
    )


class SctpSniffer:
    """Collects SCTP packets delivered to ns (a raw IPPROTO_SCTP socket). Packets queue in the
    socket until `wait_for` or `collect` reads them: no thread."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        with in_netns(ns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
        self._packets: list[SctpPacket] = []

    @property
    def packets(self) -> tuple[SctpPacket, ...]:
        return tuple(self._packets)

    def _read(self, timeout: float) -> bool:
        if timeout > 0:
            self._sock.settimeout(timeout)
        else:
            self._sock.setblocking(False)
        try:
            raw = self._sock.recv(65535)
        except (TimeoutError, BlockingIOError):
            return False
        packet = parse_sctp_packet(raw)
        if packet is not None:
            self._packets.append(packet)
        return True

    def collect(self) -> tuple[SctpPacket, ...]:
        """Read what has arrived so far, without waiting."""
        while self._read(0.0):
            pass
        return self.packets

    def wait_for(self, predicate: Callable[[SctpPacket], bool], timeout: float = 2.0
                 ) -> SctpPacket:
        """The first packet (seen before or arriving within timeout) matching predicate."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for packet in self._packets[checked:]:
                if predicate(packet):
                    return packet
            checked = len(self._packets)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching SCTP packet in {self.ns} within {timeout}s;"
                                     f" seen: {self._packets}")
            self._read(remaining)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Waiting
# --------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll predicate until it returns a truthy value (returned) or raise AssertionError with
    the last value after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; "
                                 f"last value: {value!r}")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], T | Awaitable[T]], *, timeout: float,
                           interval: float = 0.02, message: str = "condition") -> T:
    """wait_until for coroutines; predicate may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; "
                                 f"last value: {value!r}")
        await asyncio.sleep(interval)
