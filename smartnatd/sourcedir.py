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


def load_source_dir(path: Path) -> SourceDir:
    """Load DIR; raises NotADirectoryError/FileNotFoundError only when DIR itself is unusable."""
    if not path.is_dir():
        # An unusable DIR must not read as "an empty cluster": apply would remove every mapping.
        code = errno.ENOTDIR if path.exists() else errno.ENOENT
        cls = NotADirectoryError if path.exists() else FileNotFoundError
        raise cls(code, "--source needs a directory of YAML/JSON files", str(path))
    problems: list[str] = []
    seen: dict[str, _Seen] = {"Mapping": {}, "Service": {}, "EndpointSlice": {}}
    files = sorted(
        p
        for p in path.iterdir()
        # Dotfiles are editor and tool leftovers (.#web.yaml, .web.yaml.swp), never input.
        if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    unreadable: list[str] = []
    if not files:
        # Unknown, not an empty cluster: a directory caught between a deploy's delete and its
        # write would otherwise remove every Mapping and cut its connections.
        problems.append(f"{path}: holds no *.yaml, *.yml or *.json file (to serve nothing, leave an empty one)")
        unreadable.append(str(path))
    for file in files:
        before = len(problems)
        documents = _documents(file, problems=problems)
        if not documents and len(problems) > before:
            unreadable.append(file.name)
        for where, document in documents:
            _take_document(document, where=where, seen=seen, problems=problems)
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


def _take_document(document: Any, *, where: str, seen: dict[str, _Seen], problems: list[str]) -> None:
    if isinstance(document, dict) and document.get("kind") == "List":
        items = document.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            problems.append(f"{where}: items is not a list")
            return
        for i, item in enumerate(items):
            _take_object(item, where=f"{where}: items[{i}]", seen=seen, problems=problems)
        return
    _take_object(document, where=where, seen=seen, problems=problems)


def _take_object(obj: Any, *, where: str, seen: dict[str, _Seen], problems: list[str]) -> None:
    parsed = parse_object(obj)
    if parsed is None:
        return  # a kind smartnatd does not use
    kind = obj.get("kind") if isinstance(obj, dict) else None
    key = object_key(obj)
    if not isinstance(kind, str) or not kind:
        problems.append(f"{where}: {parsed.reason if isinstance(parsed, Invalid) else 'kind is missing'}")
        return
    label = f"{kind} {key}" if key is not None else kind
    if isinstance(parsed, Invalid):
        problems.append(f"{where}: {label}: {parsed.reason}")
        return
    if key is None:
        # Only a Mapping gets here without a name (it always parses); a cluster has none such.
        # Its reason names metadata.name and anything else wrong with the object.
        reason = parsed.spec.reason if isinstance(parsed, Mapping) and isinstance(parsed.spec, Invalid) else ""
        problems.append(f"{where}: {label}: {reason or 'metadata.name is missing'}")
        return
    bucket = seen[type(parsed).__name__]
    if key in bucket:
        problems.append(f"{where}: {label}: replaces the one in {bucket[key][1]}")
    bucket[key] = (parsed, where)
