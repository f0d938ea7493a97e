"""The only module that runs nft: one atomic transaction per call, check mode, listings.

Two backends with one interface: LibraryRunner drives libnftables in-process (the fast path),
ProcessRunner pipes the text into `nft -f -` (works wherever the nft command does). Both take
the network namespace to act in when built; `None` means the daemon's own.

A failure is classified by the errno nft printed (as kubernetes-sigs/knftables error.go does:
only the first error line counts, so a quoted command cannot mislead it), the transaction is
saved under the state directory with the error appended as comments, and NftError is raised.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from smartnatd.errors import NftError
from smartnatd.nft.libnftables import Context, LibnftablesUnavailable, load_library

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "library", "process")
KEEP_FAILED = 5  # failed transactions kept in the state directory; older ones are deleted
PROCESS_TIMEOUT = 120.0  # seconds; a 50k-mapping transaction takes about 1 s

# strerror() text -> errno name, from the same C library nft uses. nft never calls
# setlocale(), so its messages are the C-locale (English) ones Python's os.strerror returns.
# Longest first, so "Operation not permitted" is not mistaken for a shorter message inside it.
_STRERRORS: tuple[tuple[str, str], ...] = tuple(
    sorted(
        (
            (os.strerror(code), name)
            for code, name in errno.errorcode.items()
            if not os.strerror(code).startswith("Unknown error")
        ),
        key=lambda pair: -len(pair[0]),
    )
)
# "<source>:<line>:<first>-<last>: Error: ..." as printed for input read from a file.
_LOCATION = re.compile(
    r"^(?P<source>.*?):(?P<line>\d+):(?P<first>\d+)-(?P<last>\d+): (?P<message>(?:Error|Warning): .*)$"
)


class NftRunner(Protocol):
    backend: str  # "library" or "process"
    netns: str | None  # the network namespace it acts in; None: the process's own

    def run(self, text: str) -> None:
        """Apply `text` as one atomic transaction; NftError on failure (nothing changed then)."""

    def check(self, text: str) -> None:
        """Validate `text` against the live ruleset like `nft -c -f -`; change nothing."""

    def list_table(self, family: str, name: str) -> str | None:
        """`nft list table` text, or None when the table does not exist."""

    def element_counters(self, family: str, table: str, set_name: str) -> dict[str, tuple[int, int, str]]:
        """Element key text -> (packets, bytes, comment) of a set declared with `counter;`."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Failure:
    """What nft said about a failed transaction, reduced to what NftError carries."""

    message: str  # one sentence naming the first error and where it is
    errno_name: str  # "ENOENT", "EEXIST", ...; "EINVAL" for text nft itself rejected
    details: str  # nft's whole error output, its input source renamed to "transaction"


def make_runner(*, netns: str | None, backend: str = "auto", state_dir: pathlib.Path | None = None) -> NftRunner:
    """Build the runner for `backend`: "library", "process", or "auto" (library if it loads)."""
    if backend not in BACKENDS:
        raise ValueError(f"nft backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    if backend == "process":
        return ProcessRunner(netns=netns, state_dir=state_dir)
    if backend == "library":
        return LibraryRunner(netns=netns, state_dir=state_dir)
    try:
        lib = load_library()
    except LibnftablesUnavailable as err:
        logger.info("nft backend selected backend=process reason=%r", str(err))
        return ProcessRunner(netns=netns, state_dir=state_dir)
    logger.info("nft backend selected backend=library")
    return LibraryRunner(netns=netns, state_dir=state_dir, library=lib)


class LibraryRunner:
    """libnftables in-process. Calls block (about 0.2 s for 10k map elements): callers run them
    in an executor; the lock keeps concurrent callers off the one context."""

    backend = "library"

    def __init__(
        self, *, netns: str | None, state_dir: pathlib.Path | None = None, library: ctypes.CDLL | None = None
    ) -> None:
        self.netns = netns
        self._outcomes = _Outcomes(backend=self.backend, state_dir=state_dir)
        self._lock = threading.Lock()
        self._context = Context(netns=netns, library=library)

    def run(self, text: str) -> None:
        self._transaction(text, dry_run=False)

    def check(self, text: str) -> None:
        self._transaction(text, dry_run=True)

    def list_table(self, family: str, name: str) -> str | None:
        command = f"list table {_word(family)} {_word(name)}"
        with self._lock:
            result = self._context.run_buffer(command)
        if result.rc == 0:
            return result.output
        failure = describe_failure(error=result.error, text=command, source="", subject=repr(command))
        if failure.errno_name == "ENOENT":
            return None
        raise NftError(failure.message, errno_name=failure.errno_name)

    def element_counters(self, family: str, table: str, set_name: str) -> dict[str, tuple[int, int, str]]:
        command = f"list set {_word(family)} {_word(table)} {_word(set_name)}"
        with self._lock:
            result = self._context.run_buffer(command, json_output=True)
        if result.rc != 0:
            failure = describe_failure(error=result.error, text=command, source="", subject=repr(command))
            raise NftError(failure.message, errno_name=failure.errno_name)
        return parse_element_counters(result.output)

    def close(self) -> None:
        with self._lock:
            self._context.close()

    def _transaction(self, text: str, *, dry_run: bool) -> None:
        with self._lock:
            started = time.monotonic()  # inside the lock: time nft, not the wait for it
            result, source = self._context.run_file(text, dry_run=dry_run)
            took = time.monotonic() - started
        if result.rc != 0:
            raise self._outcomes.failed(text=text, dry_run=dry_run, error=result.error, source=source)
        self._outcomes.succeeded(text=text, dry_run=dry_run, took=took, warnings=result.error)


class ProcessRunner:
    """`nft -f -` in a subprocess per call, prefixed by `ip netns exec NS` for a namespace."""

    backend = "process"

    def __init__(
        self,
        *,
        netns: str | None,
        state_dir: pathlib.Path | None = None,
        nft: str = "nft",
        timeout: float = PROCESS_TIMEOUT,
    ) -> None:
        self.netns = netns
        self.timeout = timeout
        self._outcomes = _Outcomes(backend=self.backend, state_dir=state_dir)
        binary = shutil.which(nft)
        if binary is None:
            raise NftError(f"{nft}: command not found: install the Debian package nftables", errno_name="ENOENT")
        prefix: list[str] = []
        if netns is not None:
            # Checked here so a missing namespace fails once, at start, not on every pass.
            if not (pathlib.Path("/run/netns") / netns).exists():
                raise NftError(f"network namespace {netns!r} does not exist", errno_name="ENOENT")
            ip = shutil.which("ip")
            if ip is None:
                raise NftError("ip: command not found: install the Debian package iproute2", errno_name="ENOENT")
            prefix = [ip, "netns", "exec", netns]
        self.command: tuple[str, ...] = (*prefix, binary)

    def run(self, text: str) -> None:
        self._transaction(text, dry_run=False)

    def check(self, text: str) -> None:
        self._transaction(text, dry_run=True)

    def list_table(self, family: str, name: str) -> str | None:
        args = ["list", "table", _word(family), _word(name)]
        completed = self._nft(args)
        if completed.returncode == 0:
            return completed.stdout
        failure = describe_failure(error=completed.stderr, text="", source="", subject=_quoted(args))
        if failure.errno_name == "ENOENT":
            return None
        raise NftError(failure.message, errno_name=failure.errno_name)

    def element_counters(self, family: str, table: str, set_name: str) -> dict[str, tuple[int, int, str]]:
        args = ["-j", "list", "set", _word(family), _word(table), _word(set_name)]
        completed = self._nft(args)
        if completed.returncode != 0:
            failure = describe_failure(error=completed.stderr, text="", source="", subject=_quoted(args))
            raise NftError(failure.message, errno_name=failure.errno_name)
        return parse_element_counters(completed.stdout)

    def close(self) -> None:
        pass  # nothing held between calls

    def _transaction(self, text: str, *, dry_run: bool) -> None:
        started = time.monotonic()
        completed = self._nft(["-c", "-f", "-"] if dry_run else ["-f", "-"], stdin=text)
        took = time.monotonic() - started
        if completed.returncode != 0:
            raise self._outcomes.failed(text=text, dry_run=dry_run, error=completed.stderr, source="/dev/stdin")
        self._outcomes.succeeded(text=text, dry_run=dry_run, took=took, warnings=completed.stderr)

    def _nft(self, args: Sequence[str], *, stdin: str = "") -> subprocess.CompletedProcess[str]:
        argv = [*self.command, *args]
        try:
            return subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            # The kernel commits a batch at its end or not at all: a killed nft changed nothing.
            raise NftError(f"{' '.join(argv)}: no answer within {self.timeout:g}s", errno_name="ETIMEDOUT") from err
        except OSError as err:
            errno_name = errno.errorcode.get(err.errno or 0, "")
            raise NftError(f"{' '.join(argv)}: cannot start ({err})", errno_name=errno_name) from err


def describe_failure(*, error: str, text: str, source: str, subject: str = "the transaction") -> Failure:
    """Classify nft's error output. `source` is the input name nft prints in locations
    ("/dev/stdin", the memfd path); it is renamed "transaction" so saved files read the same
    for both backends and line numbers refer to the saved text."""
    lines = error.splitlines()
    if source:
        lines = [_rename_source(line, source) for line in lines]
    details = "\n".join(lines)
    # Only a line that *is* an error counts: the quoted command below it may contain anything.
    first = next((line for line in lines if _is_error_line(line)), None)
    if first is None:
        summary = next((line.strip() for line in lines if line.strip()), "nft failed without a message")
        return Failure(message=summary, errno_name=_classify(summary) or "EINVAL", details=details)
    reason = first.split("Error:", 1)[1].strip()
    where = ""
    located = _LOCATION.match(first)
    if located is not None:
        number = int(located["line"])
        text_lines = text.splitlines()
        if 1 <= number <= len(text_lines):
            where = f" at line {number} ({_shorten(text_lines[number - 1].strip())})"
        else:
            where = f" at line {number}"
    # Text nft's own parser or evaluator rejected has no errno: it is invalid input.
    return Failure(
        message=f"nft rejected {subject}{where}: {reason}",
        errno_name=_classify(reason) or "EINVAL",
        details=details,
    )


def parse_element_counters(listing: str) -> dict[str, tuple[int, int, str]]:
    """Elements of a `nft -j list set` listing -> {key text: (packets, bytes, comment)}.

    Key text is what the text listing prints: "192.0.2.1 . tcp . 80". An element without a
    counter (a set declared without `counter;`) reports zeros."""
    try:
        document = json.loads(listing)
    except json.JSONDecodeError as err:
        raise NftError(f"nft printed a set listing that is not JSON ({err})", errno_name="EINVAL") from err
    counters: dict[str, tuple[int, int, str]] = {}
    for item in document.get("nftables", []):
        found = item.get("set") or item.get("map")
        if not found:
            continue
        for element in found.get("elem", []):
            if isinstance(element, list):  # a map element: [key, value]
                element = element[0]
            if isinstance(element, dict) and "elem" in element:
                body = element["elem"]
                counter = body.get("counter") or {}
                counters[_key_text(body.get("val"))] = (
                    int(counter.get("packets", 0)),
                    int(counter.get("bytes", 0)),
                    str(body.get("comment", "")),
                )
            else:  # no counter and no comment: nft prints the bare key
                counters[_key_text(element)] = (0, 0, "")
    return counters


def save_failed(
    *,
    state_dir: pathlib.Path,
    text: str,
    failure: Failure,
    backend: str,
    keep: int = KEEP_FAILED,
    now: datetime | None = None,
) -> pathlib.Path:
    """Write the failed transaction with nft's error appended as comments; keep the newest `keep`.

    The directory is created 0700 and the file 0600, never wider whatever the umask (a
    transaction names every address and backend); the file is created new and never through a symlink, so a
    link planted at the name cannot make the daemon (root) write elsewhere: that raises
    OSError, which the caller reports as a failure to save."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = now or datetime.now(UTC)
    path = state_dir / f"failed-{now.strftime('%Y%m%dT%H%M%S.%fZ')}.nft"
    body = text if text.endswith("\n") or not text else text + "\n"
    comments = [
        f"# nft failed at {now.isoformat(timespec='seconds')} backend={backend} errno={failure.errno_name}",
        f"# {failure.message}",
        *(f"# {line}" for line in failure.details.splitlines()),
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(body + "\n".join(comments) + "\n")
    # Timestamps sort by name; microseconds keep two failures in one second apart. unlink()
    # removes a link itself, never its target.
    for old in sorted(state_dir.glob("failed-*.nft"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


class _Outcomes:
    """What both runners do with a transaction's outcome. A failure is classified, saved (the
    newest KEEP_FAILED are kept) and logged: at warning when it starts or its message changes,
    at debug while the same one repeats, so a pass retried every few seconds logs it once. A
    success ends the episode and is logged at debug."""

    def __init__(self, *, backend: str, state_dir: pathlib.Path | None) -> None:
        self._backend = backend
        self._state_dir = state_dir
        self._failing = ""  # the message of the failure under way

    def failed(self, *, text: str, dry_run: bool, error: str, source: str) -> NftError:
        """The NftError to raise for nft's `error` output; `source` as describe_failure takes it."""
        failure = describe_failure(error=error, text=text, source=source)
        level = logging.DEBUG if failure.message == self._failing else logging.WARNING
        self._failing = failure.message
        saved = ""
        if self._state_dir is not None:
            try:
                saved = str(save_failed(state_dir=self._state_dir, text=text, failure=failure, backend=self._backend))
            except OSError as err:
                # Saving is a diagnostic aid: report the nft error, not this one.
                logger.log(level, "cannot save failed nft transaction state_dir=%s error=%r", self._state_dir, str(err))
        logger.log(
            level,
            "nft transaction %s backend=%s errno=%s saved=%s error=%r",
            "check failed" if dry_run else "failed",
            self._backend,
            failure.errno_name,
            saved or "-",
            failure.message,
        )
        return NftError(failure.message, errno_name=failure.errno_name, saved_path=saved)

    def succeeded(self, *, text: str, dry_run: bool, took: float, warnings: str) -> None:
        self._failing = ""
        if logger.isEnabledFor(logging.DEBUG):
            lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
            logger.debug(
                "nft transaction %s backend=%s lines=%d bytes=%d took=%.3fs",
                "checked" if dry_run else "applied",
                self._backend,
                lines,
                len(text.encode()),
                took,
            )
            if warnings.strip():
                logger.debug("nft printed on success backend=%s output=%r", self._backend, warnings.strip())


def _classify(reason: str) -> str:
    for message, name in _STRERRORS:
        if message in reason:
            return name
    return ""


def _is_error_line(line: str) -> bool:
    if line.startswith("Error:"):
        return True
    located = _LOCATION.match(line)
    return located is not None and located["message"].startswith("Error:")


def _rename_source(line: str, source: str) -> str:
    located = _LOCATION.match(line)
    if located is None or located["source"] != source:
        return line
    return f"transaction:{located['line']}:{located['first']}-{located['last']}: {located['message']}"


def _key_text(value: Any) -> str:
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_key_text(part) for part in value["concat"])
        if "prefix" in value:
            return f"{_key_text(value['prefix']['addr'])}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{_key_text(low)}-{_key_text(high)}"
        return json.dumps(value, sort_keys=True)
    return str(value)


def _quoted(args: Sequence[str]) -> str:
    return repr(" ".join(["nft", *args]))


def _shorten(line: str, limit: int = 160) -> str:
    return line if len(line) <= limit else line[: limit - 1] + "…"


_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")


def _word(value: str) -> str:
    # Family, table and set names go into a command line: refuse anything nft could parse as more.
    if not _WORD.fullmatch(value):
        raise ValueError(f"not an nft identifier: {value!r}")
    return value
