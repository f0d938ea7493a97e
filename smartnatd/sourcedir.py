"""A cluster snapshot on disk: the source of `smartnatd plan/apply --source DIR`.

Reads every *.yaml, *.yml and *.json file directly in DIR (sorted by name, not recursive), any
number of documents per file, `kind: List` included, and parses each object with kube/objects.py
just as the watches do. Whatever cannot be used becomes a problem sentence naming the file and
the document, so the caller can list them all and refuse to apply a partial view.

A Mapping whose spec is invalid is kept (the planner gives it its `Invalid` verdict, as in a
cluster); a Service or EndpointSlice that cannot be parsed is left out. Kinds smartnatd does not
use (Namespace, Deployment…) are skipped silently so `kubectl get -o yaml` output can be dropped in.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from smartnatd.kube.objects import object_key, parse_object
from smartnatd.model import EndpointSlice, Host, Invalid, Mapping, ObjectKey, Service, Snapshot

SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's parser with PyYAML's safe constructor: the same objects as yaml.safe_load, ~7x faster
# (a 10k-Mapping directory, 30,000 objects: 19.3 s -> 2.7 s here). PyPI's wheels bundle libyaml;
# a build without it falls back to the pure-Python loader.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Seconds after its last change in which a file may still change without stat showing it: file
# timestamps move once a jiffy on kernel 6.1 (once a second on some file systems), so a second
# write of the same size in that tick leaves size, mtime and ctime alike ("racy git").
RACY = 2.0


@dataclass(frozen=True)
class SourceDir:
    mappings: tuple[Mapping, ...] = ()
    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    problems: tuple[str, ...] = ()  # "file: document N: Kind ns/name: reason", in reading order
    # Files that could not be read or parsed at all: their objects are unknown, not absent, so a
    # watcher must keep its last good state rather than delete what those files held.
    unreadable: tuple[str, ...] = ()

    def snapshot(self, *, host: Host) -> Snapshot:
        return Snapshot(
            mappings=self.mappings,
            services=self.services,
            endpoint_slices=self.endpoint_slices,
            host=host,
        )


# Where each object was read, for problems: "web.yaml: document 2" (+ ": items[3]" in a List).
_Seen = dict[ObjectKey, tuple[Any, str]]


class SourceCache:
    """What each file held when last read, kept while its name, size, mtime, ctime and inode stay
    the same: `run --source` reads DIR again after every change, and parsing is nearly all of that
    (a 10k-Mapping directory: ~4 s), so only the files that changed are parsed again. A file
    read within RACY seconds of its change (`clock`, wall time) is not kept: it may change again
    unseen."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.files: dict[str, tuple[tuple[int, int, int, int], _FileTakes]] = {}
        self.clock = clock


def source_files(path: Path) -> list[Path]:
    """The files of DIR that are read, sorted by name: what load_source_dir reads and what a
    watcher of DIR must look at, no more."""
    return sorted(
        p
        for p in path.iterdir()
        # Dotfiles are editor and tool leftovers (.#web.yaml, .web.yaml.swp), never input.
        if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def load_source_dir(path: Path, *, cache: SourceCache | None = None) -> SourceDir:
    """Load DIR; raises NotADirectoryError/FileNotFoundError only when DIR itself is unusable."""
    if not path.is_dir():
        # An unusable DIR must not read as "an empty cluster": apply would remove every mapping.
        code = errno.ENOTDIR if path.exists() else errno.ENOENT
        cls = NotADirectoryError if path.exists() else FileNotFoundError
        raise cls(code, "--source needs a directory of YAML/JSON files", str(path))
    problems: list[str] = []
    seen: dict[str, _Seen] = {"Mapping": {}, "Service": {}, "EndpointSlice": {}}
    files = source_files(path)
    unreadable: list[str] = []
    if not files:
        # Unknown, not an empty cluster: a directory caught between a deploy's delete and its
        # write would otherwise remove every Mapping and cut its connections.
        problems.append(f"{path}: holds no *.yaml, *.yml or *.json file (to serve nothing, leave an empty one)")
        unreadable.append(str(path))
    kept: dict[str, tuple[tuple[int, int, int, int], _FileTakes]] = {}
    for file in files:
        takes = _read_file(file) if cache is None else _read_cached(file, cache, kept)
        if takes.unreadable:
            unreadable.append(file.name)
        for take in takes.takes:
            if isinstance(take, str):
                problems.append(take)
                continue
            bucket_name, key, parsed, where, label = take
            bucket = seen[bucket_name]
            if key in bucket:
                problems.append(f"{where}: {label}: replaces the one in {bucket[key][1]}")
            bucket[key] = (parsed, where)
    if cache is not None:
        cache.files = kept
    return SourceDir(
        mappings=_sorted(seen["Mapping"]),
        services=_sorted(seen["Service"]),
        endpoint_slices=_sorted(seen["EndpointSlice"]),
        problems=tuple(problems),
        unreadable=tuple(unreadable),
    )


def _sorted(seen: _Seen) -> tuple[Any, ...]:
    return tuple(value for _, (value, _) in sorted(seen.items(), key=lambda item: item[0]))


def _documents(file: Path, *, problems: list[str]) -> list[tuple[str, Any]]:
    """(where, document) for each non-empty document; a file with a syntax error yields none."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{file.name}: cannot be read ({getattr(err, 'strerror', None) or err})")
        return []
    try:
        if file.suffix == ".json":
            # json, not YAML, for JSON: PyYAML is YAML 1.1 and misreads some valid JSON (e.g. "\/").
            documents = [json.loads(text)] if text.strip() else []
        else:
            documents = list(yaml.load_all(text, Loader=_LOADER))
    except json.JSONDecodeError as err:
        problems.append(f"{file.name}: line {err.lineno}, column {err.colno}: {err.msg}")
        return []
    except yaml.MarkedYAMLError as err:
        problems.append(f"{file.name}: {_yaml_error(err)}")
        return []
    except (yaml.YAMLError, RecursionError) as err:
        problems.append(f"{file.name}: not valid YAML ({err})")
        return []
    return [(f"{file.name}: document {n}", doc) for n, doc in enumerate(documents, 1) if doc is not None]


def _yaml_error(err: yaml.MarkedYAMLError) -> str:
    """"line L, column C: problem", plus where the unclosed construct began (often the real typo)."""

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = err.problem_mark or err.context_mark
    text = f"{at(mark)}: " if mark is not None else ""
    text += err.problem or err.context or "not valid YAML"
    if err.problem and err.context and err.context_mark is not None and err.context_mark is not mark:
        text += f" ({err.context} started at {at(err.context_mark)})"
    return text


def _stamp(file: Path) -> tuple[int, int, int, int] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    # ctime too: size and mtime stay when a file is rewritten with a kept mtime (cp -p, tar x
    # of files with a fixed mtime), and a re-created file often gets the freed inode back.
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _read_cached(
    file: Path, cache: SourceCache, kept: dict[str, tuple[tuple[int, int, int, int], _FileTakes]]
) -> _FileTakes:
    # Stamped before reading: a write during the read leaves a stamp that no longer matches.
    stamp = _stamp(file)
    cached = cache.files.get(file.name)
    if stamp is not None and cached is not None and cached[0] == stamp:
        kept[file.name] = cached
        return cached[1]
    takes = _read_file(file)
    if stamp is not None and not takes.unreadable and cache.clock() - max(stamp[1], stamp[2]) / 1e9 >= RACY:
        kept[file.name] = (stamp, takes)
    return takes


# One object a file holds: (bucket, key, the parsed object, where, "Kind ns/name"); or a
# problem sentence. In reading order, so duplicates are told apart as without a cache.
_Take = tuple[str, ObjectKey, Any, str, str] | str


@dataclass(frozen=True)
class _FileTakes:
    takes: tuple[_Take, ...]
    unreadable: bool  # nothing could be read or parsed: its objects are unknown


def _read_file(file: Path) -> _FileTakes:
    problems: list[str] = []
    documents = _documents(file, problems=problems)
    takes: list[_Take] = list(problems)
    for where, document in documents:
        _take_document(document, where=where, takes=takes)
    return _FileTakes(tuple(takes), unreadable=not documents and bool(problems))


def _take_document(document: Any, *, where: str, takes: list[_Take]) -> None:
    if isinstance(document, dict) and document.get("kind") == "List":
        items = document.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            takes.append(f"{where}: items is not a list")
            return
        for i, item in enumerate(items):
            _take_object(item, where=f"{where}: items[{i}]", takes=takes)
        return
    _take_object(document, where=where, takes=takes)


def _take_object(obj: Any, *, where: str, takes: list[_Take]) -> None:
    parsed = parse_object(obj)
    if parsed is None:
        return  # a kind smartnatd does not use
    kind = obj.get("kind") if isinstance(obj, dict) else None
    key = object_key(obj)
    if not isinstance(kind, str) or not kind:
        takes.append(f"{where}: {parsed.reason if isinstance(parsed, Invalid) else 'kind is missing'}")
        return
    label = f"{kind} {key}" if key is not None else kind
    if isinstance(parsed, Invalid):
        takes.append(f"{where}: {label}: {parsed.reason}")
        return
    if key is None:
        # Only a Mapping gets here without a name (it always parses); a cluster has none such.
        # Its reason names metadata.name and anything else wrong with the object.
        reason = parsed.spec.reason if isinstance(parsed, Mapping) and isinstance(parsed.spec, Invalid) else ""
        takes.append(f"{where}: {label}: {reason or 'metadata.name is missing'}")
        return
    takes.append((type(parsed).__name__, key, parsed, where, label))
