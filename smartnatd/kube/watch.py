"""List-then-watch of one resource, cluster-wide, into the store.

`Watcher.step()` is finite and is what tests drive: list if there is no resourceVersion to
resume from, then one watch request until the server ends it (timeoutSeconds) or sends 410.
`Watcher.run()` is the thin endless wrapper: it repeats `step()`, relists after 410 at once and
backs off (capped, jittered) after any other failure. Nothing here ever clears the store: while
the API server is unreachable the last good state keeps being served.

The backoff starts again only once the server has proven to work, as client-go's reflector
judges it: a successful list, or a watch that delivered events or stayed open a while. A watch
request that is answered and then fails at once (an ERROR event, a stream that ends with no
event within MIN_WATCH seconds) is a failure like any other: the delays keep growing and the
outage is logged once, when it starts, and once when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from smartnatd.errors import KubeApiError
from smartnatd.kube.api import call, open_stream
from smartnatd.kube.objects import object_key
from smartnatd.model import Invalid, ObjectKey
from smartnatd.store import Kind, Object, Store

logger = logging.getLogger(__name__)

WATCH_TIMEOUT = 300  # seconds the server keeps one watch open (randomised per request, +-10%)
PAGE_SIZE = 500  # list in pages: a 10k-object list is not one huge response
GONE = 410
MIN_WATCH = 1.0  # seconds; a watch ending sooner without any event counts as a failure


class RawSink(Protocol):
    """Receives the raw objects of one kind as they arrive (the write-back cache)."""

    def replace(self, objects: Iterable[dict[str, Any]]) -> None: ...
    def upsert(self, obj: dict[str, Any]) -> None: ...
    def delete(self, key: ObjectKey) -> None: ...


@dataclass(frozen=True)
class Resource:
    """One watched kind: its store kind, its cluster-wide list method and its parser."""

    kind: Kind
    list_method: Callable[..., Awaitable[Any]]  # a bound generated method, e.g. list_service_for_all_namespaces
    parse: Callable[[Any], Object | Invalid]
    list_args: tuple[Any, ...] = ()  # group, version, plural for custom objects
    label_selector: str | None = None


@dataclass
class Backoff:
    """Capped exponential delays with full jitter in [delay/2, delay]."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.failures)
        self.failures = min(self.failures + 1, 30)
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


def api_server(api: Any) -> str:
    """The API server URL a generated API object (or a method bound to one) talks to, or ""."""
    api = getattr(api, "__self__", api)
    config = getattr(getattr(api, "api_client", None), "configuration", None)
    return str(getattr(config, "host", "") or "")


def describe(err: BaseException, *, server: str = "") -> str:
    """One readable phrase for a failed request: no reprs of aiohttp's connection keys."""
    cause = err.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError):
        reason = cause.os_error.strerror or str(cause.os_error) or type(cause.os_error).__name__
        where = server or f"{cause.host}:{cause.port}"
        return f"API server {where} unreachable: {reason[:1].lower()}{reason[1:]}"
    if isinstance(cause, asyncio.TimeoutError):
        return f"API server {server} did not answer in time".replace("  ", " ")
    if isinstance(cause, (aiohttp.ClientError, OSError)):
        text = str(cause) or type(cause).__name__
        return f"connection to the API server {server} failed: {text}".replace("  ", " ")
    return str(err)


class Expired(Exception):
    """The resourceVersion we resume from is too old (410 Gone): list again."""


class Watcher:
    def __init__(
        self,
        *,
        resource: Resource,
        store: Store,
        sink: RawSink | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        watch_timeout: int = WATCH_TIMEOUT,
        page_size: int = PAGE_SIZE,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resource = resource
        self._store = store
        self._sink = sink
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._rng = rng or random.Random()
        self._clock = clock
        self.resource_version: str | None = None  # None: the next step lists first
        self._failing = False
        self.problem = ""  # why the last request failed, while it keeps failing; "" when fine
        self.listed = False  # a list has succeeded once: there is a state to serve
        self.expired_in_a_row = 0  # 410s right after a list: the server's history is too short
        self._invalid: dict[ObjectKey, str] = {}  # objects dropped as invalid, logged once each

    @property
    def name(self) -> str:
        return str(self.resource.kind)

    # --- the finite part -------------------------------------------------------------------

    async def step(self) -> None:
        """List if needed, then watch until the server ends the stream. Raises on failure."""
        if self.resource_version is None:
            await self.relist()
        try:
            applied = await self.watch()
        except Expired:
            logger.info("watch %s: resourceVersion %s expired (410); listing again", self.name, self.resource_version)
            self.resource_version = None
            self.expired_in_a_row += 1
            return
        if applied:
            self.expired_in_a_row = 0

    async def relist(self) -> None:
        items: list[dict[str, Any]] = []
        token: str | None = None
        version = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self._page_size}
            if token:
                kwargs["_continue"] = token
            if self.resource.label_selector:
                kwargs["label_selector"] = self.resource.label_selector
            try:
                page = await call(self.resource.list_method, *self.resource.list_args, **kwargs)
            except KubeApiError as err:
                if err.status == GONE and token:  # the continue token outlived the history
                    items, token = [], None
                    continue
                raise
            items.extend(page.get("items") or [])
            metadata = page.get("metadata") or {}
            if not token:
                version = str(metadata.get("resourceVersion") or "")
            token = metadata.get("continue") or None
            if not token:
                break
        parsed: list[Object] = []
        for obj in items:
            model = self._parse(obj)
            if model is not None:
                parsed.append(model)
        if self._sink is not None:
            self._sink.replace(items)
        self._store.replace(self.resource.kind, parsed)
        self.resource_version = version or None
        self.listed = True
        if not self.expired_in_a_row:
            # Right after a 410 the list proves little: a watch must work too (410 loops back off).
            self._ok()
        logger.info("listed %s count=%d resourceVersion=%s", self.name, len(parsed), version)

    async def watch(self) -> int:
        """One watch request from `resource_version`; returns the number of events applied.

        Raises Expired on 410 (an HTTP status or an ERROR event), KubeApiError on other
        failures, including a stream that ends within MIN_WATCH seconds without any event.
        """
        timeout = int(self._watch_timeout * self._rng.uniform(0.9, 1.1))
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout,
        }
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        if self.resource.label_selector:
            kwargs["label_selector"] = self.resource.label_selector
        # The server ends the stream after `timeout`; a silent connection longer than that is dead.
        client_timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=timeout + 30)
        started = self._clock()
        try:
            response = await open_stream(self.resource.list_method, *self.resource.list_args, timeout=client_timeout, **kwargs)
        except KubeApiError as err:
            if err.status == GONE:  # the server checks the resourceVersion before it starts streaming
                raise Expired(str(err)) from err
            raise
        applied = 0
        try:
            async for line in response.content:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as err:
                    raise KubeApiError(f"not a JSON event: {line[:100]!r}") from err
                self._apply(event)
                if not applied:
                    self._ok()  # events flow: the server works
                applied += 1
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            raise KubeApiError(f"the stream broke off: {err!r}") from err
        finally:
            response.release()
        if not applied:
            lasted = self._clock() - started
            if lasted < MIN_WATCH:
                raise KubeApiError(f"the server ended the watch after {lasted:.1f}s without any event")
            self._ok()  # a quiet watch the server ended at its timeout
        return applied

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == GONE:
                raise Expired(obj.get("message", ""))
            raise KubeApiError(f"ERROR event {code}: {obj.get('message', obj)}", status=code)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            model = self._parse(obj)
            if self._sink is not None:
                self._sink.upsert(obj)
            if model is not None:
                self._store.upsert(self.resource.kind, model)
            elif (key := object_key(obj)) is not None:
                self._store.delete(self.resource.kind, key)  # its last good version no longer holds
        elif kind == "DELETED":
            key = object_key(obj)
            if key is not None:
                self._invalid.pop(key, None)
                if self._sink is not None:
                    self._sink.delete(key)
                self._store.delete(self.resource.kind, key)
        elif kind != "BOOKMARK":
            logger.debug("watch %s: ignoring event type %r", self.name, kind)
        if version:
            self.resource_version = str(version)

    def _parse(self, obj: dict[str, Any]) -> Object | None:
        model = self.resource.parse(obj)
        key = object_key(obj)
        if isinstance(model, Invalid):
            # Services and EndpointSlices are written by Kubernetes; a bad one is left out.
            if key is not None and self._invalid.get(key) != model.reason:
                logger.warning("%s %s ignored: %s", self.name, key, model.reason)
                self._invalid[key] = model.reason
            return None
        if key is None or not key.name:
            return None
        if key in self._invalid:
            del self._invalid[key]
            logger.info("%s %s usable again", self.name, key)
        return model

    # --- the endless wrapper ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except KubeApiError as err:
                await self._failed(err, transient=err.transient)
                continue
            except Exception as err:  # a bug or a surprise from the client: log it, back off, go on
                logger.exception("watch %s failed unexpectedly", self.name)
                await self._failed(err, transient=False)
                continue
            if self.expired_in_a_row > 1:
                await self._failed(KubeApiError("410 right after listing", status=GONE), transient=True)
                continue

    def _ok(self) -> None:
        """A list succeeded or a watch worked (events, or open a while): the trouble is over."""
        if self._failing:
            logger.info("watch %s recovered", self.name)
            self._failing = False
        self.problem = ""
        self._backoff.reset()

    @property
    def up(self) -> bool:
        """Listed once and not failing now (smartnat_source_up)."""
        return self.listed and not self._failing

    async def _failed(self, err: Exception, *, transient: bool) -> None:
        delay = self._backoff.next()
        problem = describe(err, server=api_server(self.resource.list_method))
        # The same trouble, told apart from a new one without its changing figures (seconds,
        # the text of a bad line), so that it is logged once however often it repeats.
        if not self._failing or _kind_of(problem) != _kind_of(self.problem):
            # Logged when the trouble starts (or changes) and when it ends, not at every retry.
            hint = "" if transient else " (check the CRD is installed and etc/rbac.yaml is applied)"
            state = "serving the last known state" if self.listed else "no state yet"
            logger.warning("watch %s: %s; %s; retrying in %.1fs%s", self.name, problem, state, delay, hint)
            self._failing = True
        else:
            logger.debug("watch %s still failing: %s; retry in %.1fs", self.name, problem, delay)
        self.problem = problem
        await self._sleep(delay)


_FIGURES = re.compile(r"[0-9]+(\.[0-9]+)?s\b|'[^']*'|\"[^\"]*\"")


def _kind_of(problem: str) -> str:
    """A problem's text without what changes from one occurrence to the next."""
    return _FIGURES.sub("…", problem)
