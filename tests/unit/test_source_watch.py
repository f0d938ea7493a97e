"""watch_source_dir: the daemon's --source directory watcher, with a real directory."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from smartnatd import daemon, sourcedir
from smartnatd.daemon import SourceDirState, watch_source_dir
from smartnatd.model import ObjectKey
from smartnatd.sourcedir import load_source_dir
from smartnatd.store import Kind, Store


def service_yaml(name: str, cluster_ip: str) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
        f"spec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]}}\n"
    )


def cluster_ip(store: Store, name: str) -> str | None:
    service = store.get(Kind.SERVICES, ObjectKey("default", name))
    return None if service is None else str(service.cluster_ip)  # type: ignore[union-attr]


async def until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_changed_file_is_read_again_and_the_others_stay(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service_yaml("a", "10.96.0.1"))
    (tmp_path / "b.yaml").write_text(service_yaml("b", "10.96.0.2"))
    store, state = Store(), SourceDirState()
    task = asyncio.create_task(watch_source_dir(tmp_path, store=store, poll=0.01, state=state))
    try:
        await until(lambda: state.up and cluster_ip(store, "b") == "10.96.0.2")
        (tmp_path / "b.yaml").write_text(service_yaml("b", "10.96.0.3"))
        await until(lambda: cluster_ip(store, "b") == "10.96.0.3")
        assert cluster_ip(store, "a") == "10.96.0.1"
    finally:
        task.cancel()


async def test_a_failed_read_is_tried_again_without_waiting_for_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The directory can go away between the listing and the read (a deploy replacing it);
    # the next poll must read it again even though no file changed since.
    (tmp_path / "a.yaml").write_text(service_yaml("a", "10.96.0.1"))
    failures = [OSError(2, "No such file or directory")] * 3

    def flaky_load(path: Path, **options: object) -> object:
        if failures:
            raise failures.pop()
        return load_source_dir(path, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon, "load_source_dir", flaky_load)
    store, state = Store(), SourceDirState()
    task = asyncio.create_task(watch_source_dir(tmp_path, store=store, poll=0.01, state=state))
    try:
        await until(lambda: state.up)
        assert cluster_ip(store, "a") == "10.96.0.1"
    finally:
        task.cancel()
    # One warning for the outage, not one per failed poll.
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


async def test_a_file_rewritten_with_its_old_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    # cp -p or tar x of a file with a fixed mtime: only the change time moves. The watcher
    # notices (ctime is in its signature); the parsed-file cache must not answer with the old objects.
    a = tmp_path / "a.yaml"
    a.write_text(service_yaml("a", "10.96.0.1"))
    store, state = Store(), SourceDirState()
    task = asyncio.create_task(watch_source_dir(tmp_path, store=store, poll=0.01, state=state))
    try:
        await until(lambda: state.up and cluster_ip(store, "a") == "10.96.0.1")
        st = a.stat()
        a.write_text(service_yaml("a", "10.96.0.9"))
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
        await until(lambda: cluster_ip(store, "a") == "10.96.0.9")
    finally:
        task.cancel()


async def test_a_second_write_in_the_tick_of_the_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kernel 6.1's timestamps move once a jiffy: a write of the same size right after a read
    # changes nothing the watcher's signature or the cache's stamp sees. A directory read
    # within RACY of its newest change is read once more after that, the changed file parsed again.
    a = tmp_path / "a.yaml"
    a.write_text(service_yaml("a", "10.96.0.1"))
    frozen_stamp, frozen_signature = sourcedir._stamp(a), daemon._signature(tmp_path)
    monkeypatch.setattr(sourcedir, "_stamp", lambda file: frozen_stamp)
    monkeypatch.setattr(daemon, "_signature", lambda path: frozen_signature)
    monkeypatch.setattr(sourcedir, "RACY", 0.2)
    monkeypatch.setattr(daemon, "RACY", 0.2)
    store, state = Store(), SourceDirState()
    task = asyncio.create_task(watch_source_dir(tmp_path, store=store, poll=0.01, state=state))
    try:
        await until(lambda: state.up and cluster_ip(store, "a") == "10.96.0.1")
        a.write_text(service_yaml("a", "10.96.0.9"))
        await until(lambda: cluster_ip(store, "a") == "10.96.0.9")
    finally:
        task.cancel()
