"""A small ctypes wrapper of the system library libnftables.so.1 (Debian package libnftables1).

Only what the runner needs: one context, buffered output and error, output flags for JSON
listings, dry run for check mode, and commands from a buffer or a file. Text commands only:
nft 1.0.6 mishandles JSON *commands* for concatenated maps (and can segfault, killing this
process); JSON *output* of listings is fine and is what `list set` counters use.

A context acts in the network namespace it was created in (nft_ctx_new opens its netlink
socket), so `Context(netns=...)` switches this thread into that namespace only while creating it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import netns as pyroute2_netns

from smartnatd.errors import NftError

LIBRARY_NAME = "libnftables.so.1"

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4  # from <nftables/libnftables.h>, nft 1.0.6

_NETLINK_NETFILTER = 12

T = TypeVar("T")

# pyroute2 keeps the saved namespaces on one process-wide stack; two threads switching at
# once would pop each other's entries, so every switch in this process goes through this lock.
_NETNS_SWITCH = threading.Lock()


class LibnftablesUnavailable(NftError):
    """libnftables.so.1 cannot be loaded or lacks a function this wrapper needs."""


@dataclass(frozen=True)
class Result:
    rc: int  # 0 on success, as returned by nft_run_cmd_from_*
    output: str  # what nft printed on its output (listings)
    error: str  # what nft printed on its error stream (errors, warnings)


def load_library(*, name: str = LIBRARY_NAME) -> ctypes.CDLL:
    """dlopen the library and declare the prototypes used here; LibnftablesUnavailable if not possible."""
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise LibnftablesUnavailable(
            f"cannot load {name} ({err}): install the Debian package libnftables1 "
            "or set SNCTRLR_NFT_BACKEND=process to run the nft command instead",
            errno_name="ELIBACC",
        ) from err
    ptr, c_int, c_uint, c_bool, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_bool, ctypes.c_char_p
    prototypes: dict[str, tuple[list[object], object]] = {
        "nft_ctx_new": ([ctypes.c_uint32], ptr),
        "nft_ctx_free": ([ptr], None),
        "nft_ctx_buffer_output": ([ptr], c_int),
        "nft_ctx_buffer_error": ([ptr], c_int),
        "nft_ctx_get_output_buffer": ([ptr], c_char_p),
        "nft_ctx_get_error_buffer": ([ptr], c_char_p),
        "nft_ctx_output_get_flags": ([ptr], c_uint),
        "nft_ctx_output_set_flags": ([ptr, c_uint], None),
        "nft_ctx_set_dry_run": ([ptr, c_bool], None),
        "nft_run_cmd_from_buffer": ([ptr, c_char_p], c_int),
        "nft_run_cmd_from_filename": ([ptr, c_char_p], c_int),
    }
    for symbol, (argtypes, restype) in prototypes.items():
        try:
            func = getattr(lib, symbol)
        except AttributeError as err:
            raise LibnftablesUnavailable(
                f"{name} has no function {symbol}: it is too old; set SNCTRLR_NFT_BACKEND=process",
                errno_name="ELIBACC",
            ) from err
        func.argtypes = argtypes
        func.restype = restype
    return lib


class Context:
    """One nft context bound to a network namespace. Not thread-safe: callers hold a lock."""

    def __init__(self, *, netns: str | None, library: ctypes.CDLL | None = None) -> None:
        self.netns = netns
        self._lib = library if library is not None else load_library()
        self._ctx: int | None = _in_netns(netns, self._new_context)
        try:
            # Buffered output/error: otherwise nft writes to this process's stdout/stderr.
            if self._lib.nft_ctx_buffer_output(self._ctx) != 0 or self._lib.nft_ctx_buffer_error(self._ctx) != 0:
                raise NftError("libnftables: cannot buffer output and error", errno_name="ENOMEM")
        except BaseException:
            self.close()
            raise

    def _new_context(self) -> int:
        # nft_ctx_new calls exit() when it cannot open its netlink socket; open one first so a
        # missing nfnetlink becomes an exception here instead of killing the daemon.
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER).close()
        except OSError as err:
            raise NftError(f"cannot open a netfilter netlink socket: {err}", errno_name=_errno_name(err)) from err
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("libnftables: nft_ctx_new failed", errno_name="ENOMEM")
        return int(ctx)

    def run_buffer(self, text: str, *, dry_run: bool = False, json_output: bool = False) -> Result:
        """Run commands given as a string. nft 1.0.6 quotes the buffer's first line in every
        error location, so use this for one-line commands (listings) and run_file for transactions."""
        ctx = self._live()
        command = text.encode()
        return self._call(
            lambda: self._lib.nft_run_cmd_from_buffer(ctx, command), dry_run=dry_run, json_output=json_output
        )

    def run_file(self, text: str, *, dry_run: bool = False) -> tuple[Result, str]:
        """Run a transaction read from an anonymous in-memory file, so nft's error locations
        carry the right line number and line. Returns the result and the path nft saw."""
        ctx = self._live()
        fd = os.memfd_create("smartnatd-nft", os.MFD_CLOEXEC)
        try:
            data = memoryview(text.encode())
            while data:  # os.write may write less than asked
                data = data[os.write(fd, data) :]
            path = f"/proc/self/fd/{fd}"
            return self._call(lambda: self._lib.nft_run_cmd_from_filename(ctx, path.encode()), dry_run=dry_run), path
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def _live(self) -> int:
        if self._ctx is None:
            raise RuntimeError("libnftables context used after close()")
        return self._ctx

    def _call(self, run: Callable[[], int], *, dry_run: bool, json_output: bool = False) -> Result:
        ctx = self._live()
        lib = self._lib
        self._drain()
        flags = lib.nft_ctx_output_get_flags(ctx)
        # JSON output also makes nft try to parse the *input* as JSON first; set it only for
        # listings and restore it at once, so transactions are always parsed as text.
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, flags | NFT_CTX_OUTPUT_JSON)
        if dry_run:
            lib.nft_ctx_set_dry_run(ctx, True)
        try:
            rc = run()
            output, error = self._drain()
        finally:
            if dry_run:
                lib.nft_ctx_set_dry_run(ctx, False)
            if json_output:
                lib.nft_ctx_output_set_flags(ctx, flags)
        return Result(rc=rc, output=output, error=error)

    def _drain(self) -> tuple[str, str]:
        # Reading a buffer rewinds it; draining before a command drops anything left over.
        ctx = self._live()
        out = self._lib.nft_ctx_get_output_buffer(ctx) or b""
        err = self._lib.nft_ctx_get_error_buffer(ctx) or b""
        return out.decode(errors="replace"), err.decode(errors="replace")


def _in_netns(netns: str | None, create: Callable[[], T]) -> T:
    """Call `create` with this thread inside `netns` (None: where it already is)."""
    if netns is None:
        return create()
    with _NETNS_SWITCH:
        pyroute2_netns.pushns()
        try:
            try:
                # flags=0: a missing namespace is an error; pyroute2's default would create it.
                pyroute2_netns.setns(netns, flags=0)
            except OSError as err:
                raise NftError(
                    f"network namespace {netns!r} cannot be entered ({err.strerror or err})",
                    errno_name=_errno_name(err),
                ) from err
            return create()
        finally:
            pyroute2_netns.popns()


def _errno_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, "")
