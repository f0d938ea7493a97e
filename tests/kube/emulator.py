"""
An emulated Kubernetes API server for tests of smartnatd's Kubernetes edge.

It is kmock's ``KubernetesEmulator`` (request parsing, recording, discovery, the
``kmock[...] << ...`` reaction DSL, the ``objects`` store) with the semantics a real
kubernetes_asyncio client depends on implemented on top, in a subclass:

* kmock 0.8 blockers: ``watch=True``/``1``/``true``; create answers 201; PUT with a
  resourceVersion precondition; namespaced URLs set ``metadata.namespace``;
  ``generateName``; stopping the server ends open watches at once.
* resourceVersion from one global counter, uid, creationTimestamp, generation (bumped
  on changes outside metadata, and outside status if the status subresource exists);
  lists carry the list resourceVersion; watches resume from a resourceVersion and answer
  410 (an ERROR event) when it is older than the retained history.
* label and field selectors, ``timeoutSeconds``, ``limit``/``continue``, bookmarks.
* status subresource rules, merge patch / JSON patch content types, finalizers and
  deletionTimestamp as the real apiserver (``k8s.io/apiserver`` generic registry) does.
* failure injection (API down, the next N matching requests fail), stop/start on the
  same port, a record of every request with its content type and body.

Writes change state only in this module's handlers, which run after kmock's reaction
DSL: a scripted ``kube_api[...] << 503`` answers without changing any object, as a
failed request on a real server would. Each write runs without awaiting, so it is
atomic with respect to watches and other requests.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import copy
import dataclasses
import datetime
import json
import random
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Final

import aiohttp
import aiohttp.web
import attrs
import kmock

MERGE_PATCH: Final = 'application/merge-patch+json'
JSON_PATCH: Final = 'application/json-patch+json'
STRATEGIC_MERGE_PATCH: Final = 'application/strategic-merge-patch+json'
APPLY_PATCH: Final = 'application/apply-patch+yaml'
JSON: Final = 'application/json'

# Requests made by the emulator's own helpers ("another client") carry this header: they
# bypass failure injection and are left out of `recorded()` unless asked for.
HELPER_HEADER: Final = 'X-Kube-Emulator-Helper'

# The alphabet and length the apiserver uses for generateName suffixes
# (k8s.io/apiserver/pkg/storage/names/generate.go).
_NAME_SUFFIX_ALPHABET: Final = 'bcdfghjklmnpqrstvwxz2456789'
_NAME_SUFFIX_LENGTH: Final = 5
_DNS1123_SUBDOMAIN: Final = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')
_BOOLS: Final = {'1': True, 't': True, 'T': True, 'true': True, 'TRUE': True, 'True': True,
                 '0': False, 'f': False, 'F': False, 'false': False, 'FALSE': False, 'False': False}
_FIRST_RESOURCE_VERSION: Final = 1000  # not 0: "0" means "any version" in list/watch requests

# The record of the request being served: aiohttp serves each request in its own task, so
# this is per request. It lets a watch note its 200 before the client hangs up (a cancel).
_serving: contextvars.ContextVar[RecordedRequest] = contextvars.ContextVar('serving')


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """What the emulator knows about one resource; the rules follow the real registries."""
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    builtin: bool = False  # built-in types: lists omit items' kind, strategic merge accepted
    generation: bool = True  # whether metadata.generation is maintained
    allow_create_on_update: bool = False  # PUT of a missing object creates it (Leases)
    allow_unconditional_update: bool = False  # PUT without resourceVersion (built-ins; not CRs)

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return self.group, self.version, self.plural

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def qualified(self) -> str:
        """`mappings.smartnat.aureacentral.com`, as the apiserver names it in messages."""
        return f'{self.plural}.{self.group}' if self.group else self.plural

    def path(self, *, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        parts = ['/apis', self.group, self.version] if self.group else ['/api', self.version]
        if namespace is not None:
            parts += ['namespaces', namespace]
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return '/'.join(parts)


# Our CRD declares the status subresource; SmartNat's old CRD does not.
MAPPINGS: Final = ResourceSpec('smartnat.aureacentral.com', 'v1alpha1', 'mappings', 'Mapping',
                               status_subresource=True)
MAPPINGS_WITHOUT_STATUS: Final = dataclasses.replace(MAPPINGS, status_subresource=False)
SERVICES: Final = ResourceSpec('', 'v1', 'services', 'Service', status_subresource=True,
                               builtin=True, generation=False, allow_unconditional_update=True)
ENDPOINTSLICES: Final = ResourceSpec('discovery.k8s.io', 'v1', 'endpointslices', 'EndpointSlice',
                                     builtin=True, allow_unconditional_update=True)
EVENTS: Final = ResourceSpec('', 'v1', 'events', 'Event',
                             builtin=True, generation=False, allow_unconditional_update=True)
LEASES: Final = ResourceSpec('coordination.k8s.io', 'v1', 'leases', 'Lease',
                             builtin=True, generation=False, allow_create_on_update=True,
                             allow_unconditional_update=True)

_REASONS: Final = {
    400: 'BadRequest', 401: 'Unauthorized', 403: 'Forbidden', 404: 'NotFound',
    405: 'MethodNotAllowed', 409: 'Conflict', 410: 'Expired', 415: 'UnsupportedMediaType',
    422: 'Invalid', 429: 'TooManyRequests', 500: 'InternalError', 503: 'ServiceUnavailable',
    504: 'Timeout',
}


def status_body(code: int, message: str, *, reason: str | None = None,
                details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A `Status` object as the apiserver sends it with an error."""
    return {
        'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
        'message': message, 'reason': reason or _REASONS.get(code, 'Unknown'),
        'details': dict(details or {}), 'code': code,
    }


class ApiError(Exception):
    """An API answer with an error status, raised inside the handlers."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_body(code, message, reason=reason, details=details)


class KubeApiCallError(Exception):
    """A helper call ("another client") was answered with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f'{status}: {body.get("message") if isinstance(body, dict) else body}')
        self.status = status
        self.body = body


@dataclasses.dataclass
class RecordedRequest:
    """What a client sent, for assertions; `status` is filled in when the answer is done."""
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any  # parsed JSON, the text if it is not JSON, None if empty
    verb: str | None  # list, watch, get, create, update, patch, delete, deletecollection
    resource: ResourceSpec | None
    namespace: str | None
    name: str | None
    subresource: str | None
    helper: bool
    status: int | None = None


class _Any:
    def __repr__(self) -> str:
        return 'ANY'


ANY: Final = _Any()  # a filter value that matches anything, including None


@dataclasses.dataclass
class FailureRule:
    """The next `remaining` requests matching the criteria get `status` (see `fail_next`)."""
    status: int
    remaining: int
    verb: str | None = None
    method: str | None = None
    resource: ResourceSpec | None = None
    namespace: Any = ANY
    name: Any = ANY
    subresource: Any = ANY
    predicate: Callable[[RecordedRequest], bool] | None = None
    message: str | None = None
    in_stream: bool | None = None  # watches: an ERROR event (None: only for 410) or an HTTP status
    stall: float = 0.0  # seconds to wait before answering (a slow API server)
    hits: list[RecordedRequest] = dataclasses.field(default_factory=list)

    def matches(self, rec: RecordedRequest) -> bool:
        return bool(
            self.remaining > 0
            and (self.verb is None or rec.verb == self.verb)
            and (self.method is None or rec.method == self.method.upper())
            and (self.resource is None or (rec.resource is not None
                                           and rec.resource.key == self.resource.key))
            and (self.namespace is ANY or rec.namespace == self.namespace)
            and (self.name is ANY or rec.name == self.name)
            and (self.subresource is ANY or rec.subresource == self.subresource)
            and (self.predicate is None or self.predicate(rec))
        )


# --- selectors -------------------------------------------------------------------------

_LABEL_KEY = r'[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?'
_LABEL_VALUE = r'([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?'
_RE_EXISTS = re.compile(rf'(?P<neg>!?)\s*(?P<key>{_LABEL_KEY})')
_RE_SET = re.compile(rf'(?P<key>{_LABEL_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)')
_RE_EQ = re.compile(rf'(?P<key>{_LABEL_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_LABEL_VALUE})')
_RE_CMP = re.compile(rf'(?P<key>{_LABEL_KEY})\s*(?P<op>[<>])\s*(?P<value>-?[0-9]+)')
_FIELDS: Final = {'metadata.name': ('name',), 'metadata.namespace': ('namespace',)}


def _split_top_level(text: str) -> list[str]:
    # Commas separate requirements, but not inside `in (a,b)` value sets.
    parts, depth, current = [], 0, ''
    for char in text:
        depth += char == '('
        depth -= char == ')'
        if char == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def parse_label_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """Parse a labelSelector string into a predicate on labels; ValueError if malformed."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for part in _split_top_level(text):
        if m := _RE_SET.fullmatch(part):
            values = {v.strip() for v in m['values'].split(',') if v.strip()}
            key, negate = m['key'], m['op'] == 'notin'
            checks.append(lambda ls, k=key, vs=values, n=negate: (ls.get(k) in vs) != n)
        elif m := _RE_EQ.fullmatch(part):
            key, value, negate = m['key'], m['value'], m['op'] == '!='
            checks.append(lambda ls, k=key, v=value, n=negate: (ls.get(k) == v) != n)
        elif m := _RE_CMP.fullmatch(part):
            key, value, greater = m['key'], int(m['value']), m['op'] == '>'
            checks.append(lambda ls, k=key, v=value, g=greater: _compare_label(ls.get(k), v, g))
        elif m := _RE_EXISTS.fullmatch(part):
            key, negate = m['key'], bool(m['neg'])
            checks.append(lambda ls, k=key, n=negate: (k in ls) != n)
        else:
            raise ValueError(f'unable to parse requirement: {part!r}')
    return lambda labels: all(check(labels) for check in checks)


def _compare_label(value: str | None, bound: int, greater: bool) -> bool:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return False
    return number is not None and (number > bound if greater else number < bound)


def parse_field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """Parse a fieldSelector (metadata.name, metadata.namespace) into a predicate on objects."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for part in _split_top_level(text):
        m = re.fullmatch(r'(?P<field>[A-Za-z0-9_.]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)', part)
        if not m:
            raise ValueError(f'invalid selector: {part!r}; can\'t understand {part!r}')
        if m['field'] not in _FIELDS:
            raise ValueError(f'field label not supported: {m["field"]}')
        (attr,), value, negate = _FIELDS[m['field']], m['value'].strip(), m['op'] == '!='
        checks.append(lambda obj, a=attr, v=value, n=negate:
                      ((obj.get('metadata', {}).get(a) or '') == v) != n)
    return lambda obj: all(check(obj) for check in checks)


@dataclasses.dataclass(frozen=True)
class _Selection:
    """Which objects a list or watch request sees."""
    namespace: str | None
    name: str | None
    labels: Callable[[Mapping[str, str]], bool]
    fields: Callable[[Mapping[str, Any]], bool]

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get('metadata', {})
        return bool(
            (self.namespace is None or meta.get('namespace') == self.namespace)
            and (self.name is None or meta.get('name') == self.name)
            and self.labels(meta.get('labels') or {})
            and self.fields(obj)
        )


# --- patches ---------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class _PatchFailed(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == '':
        return []
    if not path.startswith('/'):
        raise _PatchFailed(f'invalid JSON pointer: {path!r}')
    return [token.replace('~1', '/').replace('~0', '~') for token in path[1:].split('/')]


def _parent(doc: Any, tokens: list[str]) -> Any:
    for token in tokens[:-1]:
        doc = _child(doc, token)
    return doc


def _child(doc: Any, token: str) -> Any:
    if isinstance(doc, dict) and token in doc:
        return doc[token]
    if isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
        return doc[int(token)]
    raise _PatchFailed(f'path element {token!r} not found')


def json_patch(doc: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or 'op' not in op or 'path' not in op:
            raise _PatchFailed(f'invalid operation: {op!r}')
        tokens = _pointer(op['path'])
        match op['op']:
            case 'add':
                doc = _add(doc, tokens, copy.deepcopy(op.get('value')))
            case 'remove':
                _remove(doc, tokens)
            case 'replace':
                _remove(doc, tokens)
                doc = _add(doc, tokens, copy.deepcopy(op.get('value')))
            case 'move':
                source = _pointer(op.get('from', ''))
                value = _child(_parent(doc, source), source[-1]) if source else doc
                _remove(doc, source)
                doc = _add(doc, tokens, value)
            case 'copy':
                source = _pointer(op.get('from', ''))
                value = _child(_parent(doc, source), source[-1]) if source else doc
                doc = _add(doc, tokens, copy.deepcopy(value))
            case 'test':
                actual = _child(_parent(doc, tokens), tokens[-1]) if tokens else doc
                if actual != op.get('value'):
                    raise _PatchFailed(f'testing value {op["path"]} failed')
            case other:
                raise _PatchFailed(f'unexpected kind of operation: {other!r}')
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens)
    token = tokens[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list) and token == '-':
        parent.append(value)
    elif isinstance(parent, list) and token.isdigit() and int(token) <= len(parent):
        parent.insert(int(token), value)
    else:
        raise _PatchFailed(f'add operation does not apply: doc is missing path: {"/".join(tokens)}')
    return doc


def _remove(doc: Any, tokens: list[str]) -> None:
    if not tokens:
        raise _PatchFailed('cannot remove the whole document')
    parent = _parent(doc, tokens)
    token = tokens[-1]
    if isinstance(parent, dict) and token in parent:
        del parent[token]
    elif isinstance(parent, list) and token.isdigit() and int(token) < len(parent):
        del parent[int(token)]
    else:
        raise _PatchFailed(f'unable to remove nonexistent key: {token}')


# --- watch machinery -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Change:
    rv: int
    resource: tuple[str, str, str]
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


_CLOSE: Final = object()  # ends a watch stream cleanly (EOF)
_EXPIRE: Final = object()  # ends a watch stream with a 410 ERROR event
_BOOKMARK: Final = object()


@dataclasses.dataclass(eq=False)
class _Watcher:
    spec: ResourceSpec
    selection: _Selection
    bookmarks: bool
    queue: asyncio.Queue[Any] = dataclasses.field(default_factory=asyncio.Queue)

    def translate(self, change: _Change) -> dict[str, Any] | None:
        # A change moving an object in or out of the selection is an ADDED or DELETED for
        # this watch, as the apiserver's watch cache does (cacher.go, `watchCacheEvent`).
        now, before = self.selection.matches(change.obj), self.selection.matches(change.old)
        if change.type == 'MODIFIED':
            kind = 'MODIFIED' if now and before else 'ADDED' if now else 'DELETED' if before else None
        else:
            kind = change.type if now else None
        return None if kind is None else {'type': kind, 'object': change.obj}


def _line(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event).encode() + b'\n'


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _timestamp(when: datetime.datetime | str) -> str:
    if isinstance(when, str):
        return when
    return when.astimezone(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _header(request: kmock.Request, name: str) -> str | None:
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _media_type(request: kmock.Request) -> str | None:
    value = _header(request, 'Content-Type')
    return value.split(';', 1)[0].strip().lower() if value else None


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors='replace')


def _without_rv(obj: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(obj)
    result['metadata'] = {k: v for k, v in obj.get('metadata', {}).items() if k != 'resourceVersion'}
    return result


def _content(obj: Mapping[str, Any], *, spec: ResourceSpec) -> dict[str, Any]:
    # What metadata.generation tracks: all but metadata (and status if it is a subresource).
    skipped = {'metadata', 'apiVersion', 'kind'} | ({'status'} if spec.status_subresource else set())
    return {k: v for k, v in obj.items() if k not in skipped}


# --- the emulator ----------------------------------------------------------------------

@attrs.define(kw_only=True, eq=False)
class KubeEmulator(kmock.KubernetesEmulator):
    """
    kmock's KubernetesEmulator with real API semantics; see the module docstring.

    Use as ``async with KubeEmulator() as api:`` (starts the HTTP server on 127.0.0.1),
    then ``Configuration.host = api.url``.
    """

    mapping_status_subresource: bool = True  # False: SmartNat's old CRD (no /status)
    history_limit: int = 10_000  # changes retained for watch resumption; older -> 410
    host: str = '127.0.0.1'
    port: int | None = None  # None: a free port, kept across stop()/start()
    clock: Callable[[], datetime.datetime] = _utcnow  # creation/deletion timestamps
    # kmock matches each request against its reactions by scanning every request it has kept,
    # so a long run (a benchmark's tens of thousands of writes) slows down quadratically.
    # None keeps all of them, as kmock does; a number keeps about that many of the newest
    # (kmock's own request views then see only those, so sliced reactions such as
    # `api['patch'][:1] << 503` count from the oldest kept request; `recorded()` keeps everything).
    kmock_history: int | None = None

    _specs: dict[tuple[str, str, str], ResourceSpec] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=_FIRST_RESOURCE_VERSION, init=False)
    _compacted_rv: int = attrs.field(default=_FIRST_RESOURCE_VERSION, init=False)
    _changes: collections.deque[_Change] = attrs.field(factory=collections.deque, init=False)
    _watchers: set[_Watcher] = attrs.field(factory=set, init=False)
    _watchers_changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _down_status: int | None = attrs.field(default=None, init=False)
    _failures: list[FailureRule] = attrs.field(factory=list, init=False)
    _recorded: list[RecordedRequest] = attrs.field(factory=list, init=False)
    _creation_overrides: dict[tuple[Any, ...], str] = attrs.field(factory=dict, init=False)
    _runner: aiohttp.web.BaseRunner | None = attrs.field(default=None, init=False)
    _session: aiohttp.ClientSession | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        # kmock registers its fallbacks (discovery, and the per-action `_serve_*` handlers,
        # overridden below); requests it classifies as no action (PUT, POST on a name...)
        # reach `_dispatch` through one more fallback.
        super().__attrs_post_init__()
        self.fallback[self._is_resource_request] << self._dispatch
        # kubernetes_asyncio's discovery calls end with a slash; kmock routes none of them.
        self.fallback['get /apis/'] << self._serve_apis
        self.fallback['get /api/'] << self._serve_api
        self.fallback['get', re.compile(r'/apis/[^/]+/[^/]+/')] << self._serve_version
        self.fallback['get', re.compile(r'/apis/[^/]+/')] << self._serve_group
        self.fallback['get', re.compile(r'/api/[^/]+/')] << self._serve_version
        self.declare_mappings(status_subresource=self.mapping_status_subresource)
        for spec in (SERVICES, ENDPOINTSLICES, EVENTS, LEASES):
            self.declare(spec)

    async def _serve_api(self, request: kmock.Request) -> dict[str, Any]:
        # kubernetes_asyncio's V1APIVersions requires serverAddressByClientCIDRs.
        return {'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': [
            {'clientCIDR': '0.0.0.0/0', 'serverAddress': f'{self.host}:{self.port}'}]}

    # --- declarations ------------------------------------------------------------------

    def declare(self, spec: ResourceSpec) -> None:
        """Serve a resource (replacing a declaration of the same group/version/plural)."""
        self._specs[spec.key] = spec
        self.resources[spec.resource] = kmock.ResourceInfo(
            kind=spec.kind, namespaced=spec.namespaced,
            subresources={'status'} if spec.status_subresource else set(),
            verbs={'create', 'delete', 'get', 'list', 'patch', 'update', 'watch'},
        )

    def declare_mappings(self, *, status_subresource: bool) -> None:
        """Mappings as our CRD (with /status) or as SmartNat's old CRD (without)."""
        self.mapping_status_subresource = status_subresource
        self.declare(MAPPINGS if status_subresource else MAPPINGS_WITHOUT_STATUS)

    def spec(self, resource: ResourceSpec | str) -> ResourceSpec:
        """The declared spec for a spec, a plural ('mappings') or 'group/version/plural'."""
        if isinstance(resource, ResourceSpec):
            return self._specs[resource.key]
        for spec in self._specs.values():
            if resource in (spec.plural, f'{spec.api_version}/{spec.plural}'):
                return spec
        raise KeyError(f'resource {resource!r} is not declared')

    # --- server lifecycle --------------------------------------------------------------

    @property  # type: ignore[override]  # kmock's is a yarl.URL of its own servers
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError('the emulated API server was never started')
        return f'http://{self.host}:{self.port}'

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def __aenter__(self) -> KubeEmulator:
        await super().__aenter__()
        if self._entered == 1:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._entered == 1:
            await self.stop()
        await super().__aexit__(*exc_info)

    async def start(self) -> None:
        """Listen on `host`:`port` (the same port again after a stop)."""
        if self._runner is not None:
            return
        # Our own aiohttp runner rather than kmock.Server: no global resolver patching to
        # unwind in order, and a short shutdown timeout as a safety net.
        server = aiohttp.web.Server(self, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind while in TIME_WAIT
        try:
            sock.bind((self.host, self.port or 0))
            await aiohttp.web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        self._runner = runner
        self._session = aiohttp.ClientSession(base_url=self.url, headers={HELPER_HEADER: '1'})

    async def stop(self) -> None:
        """Stop listening; open watches end at once (EOF); objects and history are kept."""
        if self._runner is None:
            return
        self._stopping = True
        try:
            # Stop listening first: a client that reconnects on EOF is refused rather than
            # served a new watch while we shut down.
            for site in list(self._runner.sites):
                await site.stop()
            self.close_watches()
            if self._session is not None:
                await self._session.close()
                self._session = None
            await self._runner.cleanup()
            self._runner = None
        finally:
            self._stopping = False

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    # --- failure injection and test hooks ----------------------------------------------

    def api_down(self, *, status: int = 503, drop_watches: bool = True) -> None:
        """Answer every request with `status` until `api_up()`; end open watches."""
        self._down_status = status
        if drop_watches:
            self.close_watches()

    def api_up(self) -> None:
        self._down_status = None

    def fail_next(
        self, count: int = 1, *, status: int = 500,
        verb: str | None = None, method: str | None = None,
        resource: ResourceSpec | str | None = None,
        namespace: Any = ANY, name: Any = ANY, subresource: Any = ANY,
        predicate: Callable[[RecordedRequest], bool] | None = None,
        message: str | None = None,
        in_stream: bool | None = None,
        stall: float = 0.0,
    ) -> FailureRule:
        """
        The next `count` requests matching all given criteria fail with `status`; state is
        not changed. A watch failing with 410 gets it as an ERROR event (as the apiserver
        sends it); other statuses are HTTP statuses. `in_stream=True` sends any status as an
        ERROR event in a 200 watch stream, `in_stream=False` even a 410 as an HTTP status (as
        an apiserver does when the watch request itself names a too old resourceVersion).
        `stall` waits that many seconds first; with `status=0` the request is then served
        normally (a slow API server). `subresource=None` means the main object.
        """
        rule = FailureRule(
            status=status, remaining=count, verb=verb, method=method,
            resource=None if resource is None else self.spec(resource),
            namespace=namespace, name=name, subresource=subresource,
            predicate=predicate, message=message, in_stream=in_stream, stall=stall,
        )
        self._failures.append(rule)
        return rule

    def compact(self) -> None:
        """Forget the change history: watches from any older resourceVersion get 410."""
        self._changes.clear()
        self._compacted_rv = self._rv

    def expire_watches(self, resource: ResourceSpec | str | None = None) -> None:
        """Send 410 ERROR to open watches and end them, and compact (a lagging watch cache)."""
        self.compact()
        for watcher in self._open_watchers(resource):
            watcher.queue.put_nowait(_EXPIRE)

    def close_watches(self, resource: ResourceSpec | str | None = None) -> None:
        """End open watch streams cleanly, as a server-side watch timeout does."""
        for watcher in self._open_watchers(resource):
            watcher.queue.put_nowait(_CLOSE)

    def send_bookmarks(self, resource: ResourceSpec | str | None = None) -> None:
        """Send a BOOKMARK with the current resourceVersion to watches that allow them."""
        for watcher in self._open_watchers(resource):
            watcher.queue.put_nowait(_BOOKMARK)

    def watch_count(self, resource: ResourceSpec | str | None = None) -> int:
        return len(self._open_watchers(resource))

    async def wait_for_watches(self, resource: ResourceSpec | str | None = None, *,
                               count: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least `count` watches of the resource are open."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._watchers_changed
                    if self.watch_count(resource) >= count:
                        return
                    await changed.wait()
        except TimeoutError:
            what = 'any resource' if resource is None else self.spec(resource).qualified
            raise AssertionError(f'expected {count} open watch(es) of {what} within {timeout}s;'
                                 f' open: {self.watch_count(resource)}') from None

    def set_creation_timestamp(self, resource: ResourceSpec | str, name: str,
                               when: datetime.datetime | str, *, namespace: str | None = None) -> None:
        """The next create of this object gets `when` as creationTimestamp (tests control 'oldest')."""
        spec = self.spec(resource)
        self._creation_overrides[spec.key, namespace, name] = _timestamp(when)

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion handed out."""
        return str(self._rv)

    def current(self, resource: ResourceSpec | str, name: str, *,
                namespace: str | None = None) -> dict[str, Any] | None:
        """The stored object (a copy) or None; no request is made."""
        obj = self._get(self.spec(resource), namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def recorded(
        self, *, verb: str | None = None, method: str | None = None,
        resource: ResourceSpec | str | None = None,
        namespace: Any = ANY, name: Any = ANY, subresource: Any = ANY,
        include_helpers: bool = False,
    ) -> list[RecordedRequest]:
        """Requests received, oldest first, filtered by the given criteria."""
        key = None if resource is None else self.spec(resource).key
        return [
            rec for rec in self._recorded
            if (include_helpers or not rec.helper)
            and (verb is None or rec.verb == verb)
            and (method is None or rec.method == method.upper())
            and (key is None or (rec.resource is not None and rec.resource.key == key))
            and (namespace is ANY or rec.namespace == namespace)
            and (name is ANY or rec.name == name)
            and (subresource is ANY or rec.subresource == subresource)
        ]

    def clear_recorded(self) -> None:
        self._recorded.clear()

    def preload(self, resource: ResourceSpec | str, bodies: Iterable[Mapping[str, Any]]) -> int:
        """Create many objects at once without HTTP (benchmark set-up before clients connect).

        Each gets the server-side fields and the change record `create_object` would give it;
        the namespace comes from the body. Returns how many were created.
        """
        spec = self.spec(resource)
        created = 0
        for body in bodies:
            namespace = (body.get('metadata') or {}).get('namespace') if spec.namespaced else None
            self._create(spec, namespace, dict(body))
            created += 1
        return created

    # --- "another client": helpers over HTTP, so watches see their changes -------------

    async def create_object(self, resource: ResourceSpec | str, body: Mapping[str, Any], *,
                            namespace: str | None = None,
                            creation_timestamp: datetime.datetime | str | None = None
                            ) -> dict[str, Any]:
        """POST; the namespace comes from the argument or the body's metadata."""
        spec = self.spec(resource)
        meta = body.get('metadata', {})
        namespace = namespace or meta.get('namespace')
        if creation_timestamp is not None:
            self.set_creation_timestamp(spec, meta['name'], creation_timestamp, namespace=namespace)
        path = spec.path(namespace=self._namespace_for(spec, namespace))
        return await self._call('POST', path, body=body)

    async def get_object(self, resource: ResourceSpec | str, name: str, *,
                         namespace: str | None = None) -> dict[str, Any] | None:
        """GET; None if there is no such object."""
        spec = self.spec(resource)
        path = spec.path(namespace=self._namespace_for(spec, namespace), name=name)
        return await self._call('GET', path, missing_ok=True)

    async def list_objects(self, resource: ResourceSpec | str, *, namespace: str | None = None,
                           label_selector: str | None = None,
                           field_selector: str | None = None) -> dict[str, Any]:
        """GET the list (all namespaces if `namespace` is None)."""
        spec = self.spec(resource)
        params = {k: v for k, v in {'labelSelector': label_selector,
                                    'fieldSelector': field_selector}.items() if v is not None}
        return await self._call('GET', spec.path(namespace=namespace), params=params)

    async def patch_object(self, resource: ResourceSpec | str, name: str, patch: Any, *,
                           namespace: str | None = None, subresource: str | None = None,
                           content_type: str = MERGE_PATCH) -> dict[str, Any]:
        """PATCH, a merge patch unless `content_type` says otherwise."""
        spec = self.spec(resource)
        path = spec.path(namespace=self._namespace_for(spec, namespace), name=name,
                         subresource=subresource)
        return await self._call('PATCH', path, body=patch, content_type=content_type)

    async def replace_object(self, resource: ResourceSpec | str, name: str,
                             body: Mapping[str, Any], *, namespace: str | None = None,
                             subresource: str | None = None) -> dict[str, Any]:
        """PUT (give metadata.resourceVersion for custom resources)."""
        spec = self.spec(resource)
        path = spec.path(namespace=self._namespace_for(spec, namespace), name=name,
                         subresource=subresource)
        return await self._call('PUT', path, body=body)

    async def delete_object(self, resource: ResourceSpec | str, name: str, *,
                            namespace: str | None = None) -> dict[str, Any] | None:
        """DELETE; the object as answered (with deletionTimestamp if finalizers remain),
        None if there was no such object."""
        spec = self.spec(resource)
        path = spec.path(namespace=self._namespace_for(spec, namespace), name=name)
        return await self._call('DELETE', path, missing_ok=True)

    async def remove_finalizers(self, resource: ResourceSpec | str, name: str, *,
                                namespace: str | None = None) -> dict[str, Any]:
        """Merge-patch the finalizers away (the object goes if its deletion is pending)."""
        return await self.patch_object(resource, name, {'metadata': {'finalizers': None}},
                                       namespace=namespace)

    @staticmethod
    def _namespace_for(spec: ResourceSpec, namespace: str | None) -> str | None:
        if spec.namespaced and namespace is None:
            raise ValueError(f'{spec.qualified} is namespaced: give a namespace')
        return namespace if spec.namespaced else None

    async def _call(self, method: str, path: str, *, body: Any = None,
                    params: Mapping[str, str] | None = None, content_type: str = JSON,
                    missing_ok: bool = False) -> Any:
        if self._session is None:
            raise RuntimeError('the emulated API server is stopped; start() it first')
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {'Content-Type': content_type}
        async with self._session.request(method, path, params=params, data=data,
                                         headers=headers) as response:
            payload = await response.json(content_type=None)
            if response.status == 404 and missing_ok:
                return None
            if response.status >= 400:
                raise KubeApiCallError(response.status, payload)
            return payload

    # --- request entry -----------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.kmock_history is not None and len(self._requests) > 2 * self.kmock_history:
            del self._requests[:-self.kmock_history]
        rec = self._record(request)
        _serving.set(rec)
        try:
            response = await self._intercept(request, rec)
            if response is None:
                # kmock's reaction DSL: test-scripted reactions first, our handlers as fallbacks.
                response = await super(kmock.KubernetesEmulator, self)._handle(request)
            rec.status = response.status
            return response
        except Exception:
            rec.status = rec.status or 500
            raise

    def _record(self, request: kmock.Request) -> RecordedRequest:
        if request.resource is not None and not request.resource.plural:
            # `/apis/g/v/` is discovery, not a LIST of a resource named '' (kmock's parse of
            # the slash); frozen attrs, hence object.__setattr__.
            bare = kmock.resource(group=request.resource.group, version=request.resource.version or None)
            object.__setattr__(request, 'resource', bare)
            object.__setattr__(request, 'action', None)
        method = request.method.value
        query = dict(request.params)
        spec = self._spec_of(request)
        verb = None
        if self._is_resource_request(request):
            if method == 'GET':
                # kubernetes_asyncio sends watch=True; kmock 0.8 only knows "true".
                watching = _BOOLS.get(query.get('watch', 'false'), False)
                verb = 'watch' if watching else 'list' if request.name is None else 'get'
                if watching and request.action != kmock.action.WATCH:
                    object.__setattr__(request, 'action', kmock.action.WATCH)  # frozen attrs
            else:
                verb = {('POST', False): 'create', ('PUT', True): 'update',
                        ('PATCH', True): 'patch', ('DELETE', True): 'delete',
                        ('DELETE', False): 'deletecollection'}.get((method, request.name is not None))
        rec = RecordedRequest(
            method=method, path=request.url.path, query=query,
            content_type=_header(request, 'Content-Type'), body=_parse_body(request.body),
            verb=verb, resource=spec, namespace=request.namespace, name=request.name,
            subresource=request.subresource, helper=_header(request, HELPER_HEADER) == '1',
        )
        self._recorded.append(rec)
        return rec

    async def _intercept(self, request: kmock.Request,
                         rec: RecordedRequest) -> aiohttp.web.StreamResponse | None:
        if rec.helper:
            return None
        if self._down_status is not None:
            return aiohttp.web.json_response(
                status_body(self._down_status, 'the API server is unavailable (emulated outage)'),
                status=self._down_status)
        for rule in self._failures:
            if rule.matches(rec):
                rule.remaining -= 1
                rule.hits.append(rec)
                if rule.stall:
                    await asyncio.sleep(rule.stall)
                if not rule.status:
                    return None
                body = status_body(rule.status, rule.message or f'injected failure {rule.status}')
                in_stream = rule.status == 410 if rule.in_stream is None else rule.in_stream
                if rec.verb == 'watch' and in_stream:
                    response = aiohttp.web.StreamResponse(headers={'Content-Type': JSON})
                    assert request._raw_request is not None
                    await response.prepare(request._raw_request)
                    await response.write(_line({'type': 'ERROR', 'object': body}))
                    await response.write_eof()
                    return response
                return aiohttp.web.json_response(body, status=rule.status)
        return None

    def _spec_of(self, request: kmock.Request) -> ResourceSpec | None:
        res = request.resource
        if res is None or not res.plural:
            return None
        return self._specs.get((res.group or '', res.version or '', res.plural))

    def _is_resource_request(self, request: kmock.Request) -> bool:
        return request.resource is not None and bool(request.resource.plural)

    # --- dispatch ----------------------------------------------------------------------

    async def _dispatch(self, request: kmock.Request) -> kmock.Response:
        # Always a Response with an explicit status: kmock copies a returned Response's
        # status onto the reaction's own Response, so a bare dict would inherit a stale one.
        try:
            return self._serve(request)
        except ApiError as err:
            return kmock.Response(status=err.code, payload=err.body, headers={'Content-Type': JSON})

    # kmock's per-action fallbacks (registered by KubernetesEmulator) all come here.
    _serve_list = _serve_watch = _serve_fetch = _dispatch
    _serve_create = _serve_update = _serve_delete = _dispatch

    def _serve(self, request: kmock.Request) -> kmock.Response:
        spec = self._spec_of(request)
        if spec is None:
            raise ApiError(404, 'the server could not find the requested resource')
        method = request.method.value
        namespace = request.namespace
        if spec.namespaced and namespace is None and request.name is not None:
            raise ApiError(404, 'the server could not find the requested resource')
        if not spec.namespaced and namespace is not None:
            raise ApiError(404, 'the server could not find the requested resource')
        if request.subresource not in (None, 'status') or (
                request.subresource == 'status' and not spec.status_subresource):
            raise ApiError(404, 'the server could not find the requested resource')
        if request.subresource is not None and method not in ('GET', 'PUT', 'PATCH'):
            raise ApiError(405, f'{method} is not supported on the status subresource')

        if method == 'GET' and request.name is None:
            watch = request.params.get('watch')
            if watch is not None and watch not in _BOOLS:
                raise ApiError(400, f'invalid boolean value for watch: {watch!r}')
            if _BOOLS.get(watch or 'false'):
                return self._serve_watch_request(request, spec)
            return self._ok(self._list(request, spec))
        if method == 'GET':
            if _BOOLS.get(request.params.get('watch') or 'false'):
                return self._serve_watch_request(request, spec)
            return self._ok(self._fetch(spec, namespace, request.name))
        if method == 'POST' and request.name is None:
            if spec.namespaced and namespace is None:
                raise ApiError(405, f'POST on all namespaces of {spec.qualified} is not allowed')
            obj = self._create(spec, namespace, self._json_body(request, object_required=True),
                               dry_run='dryRun' in request.params)
            return self._ok(obj, status=201)
        if method == 'PUT' and request.name is not None:
            obj, status = self._replace(request, spec)
            return self._ok(obj, status=status)
        if method == 'PATCH' and request.name is not None:
            return self._ok(self._patch(request, spec))
        if method == 'DELETE' and request.name is not None:
            return self._ok(self._delete(request, spec))
        raise ApiError(405, f'{method} is not supported on {request.url.path}')

    @staticmethod
    def _ok(payload: Any, *, status: int = 200) -> kmock.Response:
        return kmock.Response(status=status, payload=payload, headers={'Content-Type': JSON})

    def _json_body(self, request: kmock.Request, *, object_required: bool) -> Any:
        media = _media_type(request)
        if media not in (JSON, None) and request.body:
            raise ApiError(415, f'the body of the request was in an unknown format ({media})'
                                f' - accepted media types include: {JSON}')
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError as err:
            raise ApiError(400, f'the request body is not JSON: {err}') from None
        if object_required and not isinstance(body, dict):
            raise ApiError(400, 'the request body must be a JSON object')
        return body

    # --- storage (kmock's objects array: one history per object) -----------------------

    def _get(self, spec: ResourceSpec, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (spec.resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].last.raw

    def _all(self, spec: ResourceSpec) -> list[dict[str, Any]]:
        objs = [obj.last.raw for (res, _, _), obj in self.objects.items()
                if res == spec.resource and not obj.deleted]
        return sorted(objs, key=lambda o: (o['metadata'].get('namespace') or '', o['metadata']['name']))

    def _commit(self, spec: ResourceSpec, change_type: str, obj: dict[str, Any],
                old: dict[str, Any] | None) -> dict[str, Any]:
        # The one place where state changes: a new resourceVersion, the store, the history,
        # the open watches — all without awaiting, so nothing can interleave.
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault('metadata', {})['resourceVersion'] = str(self._rv)
        meta = obj['metadata']
        key = (spec.resource, meta.get('namespace'), meta['name'])
        if change_type == 'DELETED':
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].create(obj)  # appends a version to the object's history
        else:
            self.objects[key] = obj
        change = _Change(rv=self._rv, resource=spec.key, type=change_type, obj=obj, old=old)
        self._changes.append(change)
        while len(self._changes) > self.history_limit:
            self._compacted_rv = self._changes.popleft().rv
        for watcher in self._watchers:
            if watcher.spec.key == spec.key:
                watcher.queue.put_nowait(change)
        return obj

    def _not_found(self, spec: ResourceSpec, name: str) -> ApiError:
        return ApiError(404, f'{spec.qualified} "{name}" not found',
                        details={'name': name, 'group': spec.group, 'kind': spec.plural})

    def _conflict(self, spec: ResourceSpec, name: str) -> ApiError:
        return ApiError(409, f'Operation cannot be fulfilled on {spec.qualified} "{name}": the object'
                             ' has been modified; please apply your changes to the latest version'
                             ' and try again',
                        details={'name': name, 'group': spec.group, 'kind': spec.plural})

    def _invalid(self, spec: ResourceSpec, name: str, cause: str) -> ApiError:
        return ApiError(422, f'{spec.kind} "{name}" is invalid: {cause}',
                        details={'name': name, 'group': spec.group, 'kind': spec.kind})

    # --- reads -------------------------------------------------------------------------

    def _selection(self, request: kmock.Request, spec: ResourceSpec) -> _Selection:
        try:
            labels = parse_label_selector(request.params.get('labelSelector', ''))
            fields = parse_field_selector(request.params.get('fieldSelector', ''))
        except ValueError as err:
            raise ApiError(400, f'unable to parse selector: {err}') from None
        return _Selection(namespace=request.namespace if spec.namespaced else None,
                          name=request.name, labels=labels, fields=fields)

    def _list(self, request: kmock.Request, spec: ResourceSpec) -> dict[str, Any]:
        selection = self._selection(request, spec)
        items = [obj for obj in self._all(spec) if selection.matches(obj)]
        list_rv = self._rv
        if token := request.params.get('continue'):
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                list_rv, start = int(state['rv']), tuple(state['start'])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, 'continue key is not valid') from None
            if list_rv < self._compacted_rv:
                raise ApiError(410, 'The provided continue parameter is too old to display a'
                                    ' consistent list result. You can start a new list without'
                                    ' the continue parameter.')
            items = [o for o in items
                     if (o['metadata'].get('namespace') or '', o['metadata']['name']) > start]
        metadata: dict[str, Any] = {'resourceVersion': str(list_rv)}
        limit = int(request.params.get('limit') or 0)
        if 0 < limit < len(items):
            last = items[limit - 1]['metadata']
            start = [last.get('namespace') or '', last['name']]
            metadata['continue'] = base64.urlsafe_b64encode(
                json.dumps({'rv': list_rv, 'start': start}).encode()).decode()
            metadata['remainingItemCount'] = len(items) - limit
            items = items[:limit]
        if spec.builtin:
            # Typed lists of the real apiserver omit each item's kind/apiVersion.
            items = [{k: v for k, v in obj.items() if k not in ('kind', 'apiVersion')} for obj in items]
        return {'apiVersion': spec.api_version, 'kind': f'{spec.kind}List',
                'metadata': metadata, 'items': items}

    def _fetch(self, spec: ResourceSpec, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._get(spec, namespace, name)
        if obj is None:
            raise self._not_found(spec, name)
        return obj

    def _serve_watch_request(self, request: kmock.Request, spec: ResourceSpec) -> kmock.Response:
        selection = self._selection(request, spec)
        since: int | None = None
        raw_rv = request.params.get('resourceVersion') or '0'
        try:
            since = int(raw_rv) if raw_rv != '0' else None
        except ValueError:
            raise ApiError(400, f'invalid resource version: {raw_rv!r}') from None
        timeout: float | None = None
        if raw_timeout := request.params.get('timeoutSeconds'):
            try:
                timeout = float(int(raw_timeout))
            except ValueError:
                raise ApiError(400, f'invalid timeoutSeconds: {raw_timeout!r}') from None
        bookmarks = _BOOLS.get(request.params.get('allowWatchBookmarks') or 'false', False)
        watcher = _Watcher(spec=spec, selection=selection, bookmarks=bookmarks)
        if (rec := _serving.get(None)) is not None:
            rec.status = 200  # a watch usually ends by the client hanging up: a cancellation
        stream = self._watch_stream(watcher, since=since, timeout=timeout)
        return kmock.Response(status=200, payload=stream, headers={'Content-Type': JSON})

    async def _watch_stream(self, watcher: _Watcher, *, since: int | None,
                            timeout: float | None) -> AsyncIterator[bytes]:
        # The first (empty) chunk makes kmock send the headers, so the client's request
        # returns even when nothing happens; an empty stream would be taken as "no match".
        yield b''
        if self._stopping or (since is not None and since < self._compacted_rv):
            if not self._stopping:
                yield self._expired_line(since)
            return

        # The initial events and the registration happen together, with no await between,
        # so no change is lost or repeated.
        spec = watcher.spec
        if since is None:
            initial = [{'type': 'ADDED', 'object': obj} for obj in self._all(spec)
                       if watcher.selection.matches(obj)]
        else:
            initial = [event for change in self._changes
                       if change.rv > since and change.resource == spec.key
                       for event in [watcher.translate(change)] if event is not None]
        self._watchers.add(watcher)
        self._notify_watchers_changed()
        try:
            for event in initial:
                yield _line(event)
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
            while True:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    return  # timeoutSeconds: the server ends the stream
                if item is _CLOSE:
                    return
                if item is _EXPIRE:
                    yield self._expired_line(since)
                    return
                if item is _BOOKMARK:
                    if watcher.bookmarks:
                        yield _line({'type': 'BOOKMARK', 'object': {
                            'kind': spec.kind, 'apiVersion': spec.api_version,
                            'metadata': {'resourceVersion': str(self._rv)}}})
                    continue
                if (event := watcher.translate(item)) is not None:
                    yield _line(event)
        finally:
            self._watchers.discard(watcher)
            self._notify_watchers_changed()

    def _expired_line(self, since: int | None) -> bytes:
        message = f'too old resource version: {since} ({self._compacted_rv})'
        return _line({'type': 'ERROR', 'object': status_body(410, message, reason='Expired')})

    def _open_watchers(self, resource: ResourceSpec | str | None) -> list[_Watcher]:
        key = None if resource is None else self.spec(resource).key
        return [w for w in self._watchers if key is None or w.spec.key == key]

    def _notify_watchers_changed(self) -> None:
        self._watchers_changed.set()
        self._watchers_changed = asyncio.Event()

    # --- writes ------------------------------------------------------------------------

    def _create(self, spec: ResourceSpec, namespace: str | None, body: dict[str, Any], *,
                dry_run: bool = False) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        self._check_type(spec, obj)
        meta = obj.setdefault('metadata', {})
        if spec.namespaced:
            if meta.get('namespace') not in (None, '', namespace):
                raise ApiError(400, 'the namespace of the provided object does not match the'
                                    ' namespace sent on the request')
            meta['namespace'] = namespace
        else:
            meta.pop('namespace', None)
        if not meta.get('name'):
            if not meta.get('generateName'):
                raise self._invalid(spec, '', 'metadata.name: Required value: name or generateName'
                                              ' is required')
            meta['name'] = self._generate_name(spec, namespace, meta['generateName'])
        name = meta['name']
        if not _DNS1123_SUBDOMAIN.fullmatch(name) or len(name) > 253:
            raise self._invalid(spec, name, f'metadata.name: Invalid value: "{name}": a lowercase'
                                            ' RFC 1123 subdomain must consist of lower case'
                                            ' alphanumeric characters, \'-\' or \'.\'')
        if self._get(spec, namespace, name) is not None:
            raise ApiError(409, f'{spec.qualified} "{name}" already exists', reason='AlreadyExists',
                           details={'name': name, 'group': spec.group, 'kind': spec.plural})
        # Server-managed fields: whatever the client sent is replaced.
        for field in ('uid', 'resourceVersion', 'creationTimestamp', 'deletionTimestamp',
                      'deletionGracePeriodSeconds', 'generation', 'selfLink', 'managedFields'):
            meta.pop(field, None)
        meta['uid'] = str(uuid.uuid4())
        override = self._creation_overrides.pop((spec.key, namespace, name), None)
        meta['creationTimestamp'] = override or _timestamp(self.clock())
        if spec.generation:
            meta['generation'] = 1
        if spec.status_subresource:
            obj.pop('status', None)  # status is written through /status only
        if not meta.get('finalizers'):
            meta.pop('finalizers', None)  # the apiserver omits an empty list
        if dry_run:
            return obj
        return self._commit(spec, 'ADDED', obj, None)

    def _generate_name(self, spec: ResourceSpec, namespace: str | None, prefix: str) -> str:
        prefix = prefix[:63 - _NAME_SUFFIX_LENGTH]
        while True:
            name = prefix + ''.join(random.choices(_NAME_SUFFIX_ALPHABET, k=_NAME_SUFFIX_LENGTH))
            if self._get(spec, namespace, name) is None:
                return name

    @staticmethod
    def _check_type(spec: ResourceSpec, obj: dict[str, Any]) -> None:
        if obj.get('kind') not in (None, spec.kind) or obj.get('apiVersion') not in (None, spec.api_version):
            raise ApiError(400, f'the object is a {obj.get("apiVersion")}/{obj.get("kind")},'
                                f' expected {spec.api_version}/{spec.kind}')
        obj['apiVersion'] = spec.api_version
        obj['kind'] = spec.kind

    def _patch(self, request: kmock.Request, spec: ResourceSpec) -> dict[str, Any]:
        name = request.name
        assert name is not None
        media = _media_type(request)
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError as err:
            raise ApiError(400, f'the patch is not JSON: {err}') from None
        accepted = [JSON_PATCH, MERGE_PATCH] + ([STRATEGIC_MERGE_PATCH] if spec.builtin else [])
        if media not in accepted:
            raise ApiError(415, f'the body of the request was in an unknown format ({media}) -'
                                f' accepted media types include: {", ".join(accepted)}')
        current = self._get(spec, request.namespace, name)
        if current is None:
            raise self._not_found(spec, name)
        if media == JSON_PATCH:
            if not isinstance(body, list):
                raise ApiError(400, 'json: cannot unmarshal object into Go value of type'
                                    ' jsonpatch.Patch')
            try:
                candidate = json_patch(current, body)
            except _PatchFailed as err:
                raise ApiError(422, str(err)) from None
        else:
            # Strategic merge (built-ins only) is approximated by a JSON merge patch.
            if not isinstance(body, dict):
                raise ApiError(400, 'a merge patch must be a JSON object')
            candidate = merge_patch(current, body)
        if not isinstance(candidate, dict):
            raise ApiError(422, 'the patched object is not a JSON object')
        return self._update(spec, current, candidate, subresource=request.subresource, put=False,
                            dry_run='dryRun' in request.params)

    def _replace(self, request: kmock.Request, spec: ResourceSpec) -> tuple[dict[str, Any], int]:
        name = request.name
        assert name is not None
        body = self._json_body(request, object_required=True)
        self._check_type(spec, body)
        meta = body.setdefault('metadata', {})
        if meta.get('name') != name:
            raise ApiError(400, f'the name of the object ({meta.get("name")}) does not match the'
                                f' name on the URL ({name})')
        if spec.namespaced and meta.get('namespace') not in (None, '', request.namespace):
            raise ApiError(400, 'the namespace of the provided object does not match the namespace'
                                ' sent on the request')
        current = self._get(spec, request.namespace, name)
        if current is None:
            if spec.allow_create_on_update and request.subresource is None and not meta.get('resourceVersion'):
                return self._create(spec, request.namespace, body), 201
            raise self._not_found(spec, name)
        return self._update(spec, current, body, subresource=request.subresource, put=True,
                            dry_run='dryRun' in request.params), 200

    def _update(self, spec: ResourceSpec, current: dict[str, Any], candidate: dict[str, Any], *,
                subresource: str | None, put: bool, dry_run: bool) -> dict[str, Any]:
        name = current['metadata']['name']
        meta = candidate.setdefault('metadata', {})
        if not isinstance(meta, dict):
            raise self._invalid(spec, name, 'metadata: must be an object')

        # resourceVersion in the body (PUT) or in the patch is a precondition.
        wanted_rv = meta.get('resourceVersion')
        if wanted_rv in (None, ''):
            if put and not spec.allow_unconditional_update:
                raise self._invalid(spec, name, 'metadata.resourceVersion: Invalid value: 0x0:'
                                                ' must be specified for an update')
        elif str(wanted_rv) != current['metadata']['resourceVersion']:
            raise self._conflict(spec, name)
        for field in ('name', 'namespace'):
            if meta.get(field) not in (None, current['metadata'].get(field)):
                raise self._invalid(spec, name, f'metadata.{field}: Invalid value: field is immutable')

        if subresource == 'status':
            # /status takes nothing but .status (the status strategies of CRDs and built-ins).
            new = copy.deepcopy(current)
            if 'status' in candidate:
                new['status'] = copy.deepcopy(candidate['status'])
            else:
                new.pop('status', None)
        else:
            new = copy.deepcopy(candidate)
            new['apiVersion'], new['kind'] = spec.api_version, spec.kind
            new_meta = new['metadata']
            old_meta = current['metadata']
            for field in ('name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp',
                          'deletionGracePeriodSeconds', 'generation', 'resourceVersion'):
                new_meta.pop(field, None)
                if field in old_meta:
                    new_meta[field] = old_meta[field]
            if spec.status_subresource:  # the main resource ignores .status
                new.pop('status', None)
                if 'status' in current:
                    new['status'] = copy.deepcopy(current['status'])
            if old_meta.get('deletionTimestamp'):
                added = [f for f in new_meta.get('finalizers') or []
                         if f not in (old_meta.get('finalizers') or [])]
                if added:
                    raise self._invalid(spec, name, 'metadata.finalizers: Forbidden: no new'
                                                    ' finalizers can be added if the object is being'
                                                    f' deleted, found new finalizers {added}')
            if not new_meta.get('finalizers'):
                new_meta.pop('finalizers', None)

        if _without_rv(new) == _without_rv(current):
            return current  # a no-op write: no new resourceVersion, no event
        if spec.generation and _content(new, spec=spec) != _content(current, spec=spec):
            new['metadata']['generation'] = current['metadata'].get('generation', 0) + 1
        if dry_run:
            return new
        if new['metadata'].get('deletionTimestamp') and not new['metadata'].get('finalizers'):
            # The last finalizer is gone: the update deletes (genericregistry.Store.Update,
            # `shouldDeleteDuringUpdate`); watches see only the DELETED.
            return self._commit(spec, 'DELETED', new, current)
        return self._commit(spec, 'MODIFIED', new, current)

    def _delete(self, request: kmock.Request, spec: ResourceSpec) -> dict[str, Any]:
        name = request.name
        assert name is not None
        current = self._get(spec, request.namespace, name)
        if current is None:
            raise self._not_found(spec, name)
        options = _parse_body(request.body)
        preconditions = options.get('preconditions') if isinstance(options, dict) else None
        for field, actual in (('uid', current['metadata']['uid']),
                              ('resourceVersion', current['metadata']['resourceVersion'])):
            wanted = (preconditions or {}).get(field)
            if wanted is not None and wanted != actual:
                raise ApiError(409, f'Precondition failed: {field} in precondition: {wanted},'
                                    f' {field} in object meta: {actual}',
                               details={'name': name, 'group': spec.group, 'kind': spec.plural})
        if 'dryRun' in request.params:
            return current
        if current['metadata'].get('finalizers'):
            if current['metadata'].get('deletionTimestamp'):
                return current  # deletion already pending
            new = copy.deepcopy(current)
            new['metadata']['deletionTimestamp'] = _timestamp(self.clock())
            new['metadata']['deletionGracePeriodSeconds'] = 0
            if spec.generation:  # rest.BeforeDelete bumps the generation of graceful deletions
                new['metadata']['generation'] = current['metadata'].get('generation', 0) + 1
            return self._commit(spec, 'MODIFIED', new, current)
        return self._commit(spec, 'DELETED', current, current)


__all__ = [
    'ANY', 'APPLY_PATCH', 'ENDPOINTSLICES', 'EVENTS', 'JSON', 'JSON_PATCH', 'LEASES', 'MAPPINGS',
    'MAPPINGS_WITHOUT_STATUS', 'MERGE_PATCH', 'SERVICES', 'STRATEGIC_MERGE_PATCH', 'ApiError',
    'FailureRule', 'KubeApiCallError', 'KubeEmulator', 'RecordedRequest', 'ResourceSpec',
    'json_patch', 'merge_patch', 'parse_field_selector', 'parse_label_selector', 'status_body',
]
