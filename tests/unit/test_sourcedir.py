"""sourcedir.py: a directory of YAML/JSON files -> SourceDir, problems named by file and document."""

from __future__ import annotations

import json
import os
import textwrap
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from smartnatd.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Host,
    Invalid,
    MappingPort,
    MappingSpec,
    Mode,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
    Snapshot,
)
from smartnatd import sourcedir
from smartnatd.sourcedir import SourceCache, SourceDir, load_source_dir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"


def write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


def service_yaml(name: str, cluster_ip: str = "10.96.0.10", namespace: str = "default") -> str:
    return (
        "apiVersion: v1\n"
        "kind: Service\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n"
        f"  clusterIP: {cluster_ip}\n"
        "  ports: [{name: http, port: 80, targetPort: 8080}]\n"
    )


MAPPING = """\
apiVersion: smartnat.aureacentral.com/v1alpha1
kind: Mapping
metadata: {name: web, namespace: ns-a}
spec:
  addresses: [192.0.2.10]
  serviceName: web
  ports: [{port: 80}]
"""


def test_a_directory_without_files_is_unknown_not_an_empty_cluster(tmp_path: Path) -> None:
    # Between a deploy's delete and its write: applying it would remove every Mapping.
    (tmp_path / "notes.txt").write_text("not a source file")
    loaded = load_source_dir(tmp_path)
    assert loaded.unreadable == (str(tmp_path),)
    assert loaded.problems == (
        f"{tmp_path}: holds no *.yaml, *.yml or *.json file (to serve nothing, leave an empty one)",
    )


def test_an_empty_file_is_an_empty_cluster(tmp_path: Path) -> None:
    (tmp_path / "none.yaml").write_text("")
    assert load_source_dir(tmp_path) == SourceDir()


def test_missing_directory_raises_rather_than_reading_as_an_empty_cluster(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_source_dir(tmp_path / "nope")
    (tmp_path / "file.yaml").write_text("", encoding="utf-8")
    with pytest.raises(NotADirectoryError):
        load_source_dir(tmp_path / "file.yaml")


def test_several_documents_per_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "all.yaml",
        service_yaml("b") + "---\n" + service_yaml("a") + "---\n" + MAPPING + "---\n",
    )
    source = load_source_dir(tmp_path)
    assert source.problems == ()
    assert [s.key for s in source.services] == [ObjectKey("default", "a"), ObjectKey("default", "b")]
    assert [m.key for m in source.mappings] == [ObjectKey("ns-a", "web")]
    assert source.mappings[0].spec == MappingSpec(
        addresses=(IPv4Address("192.0.2.10"),),
        allowed_sources=(IPv4Network("0.0.0.0/0"),),
        service_name="web",
        mode=Mode.SERVICE,
        ports=(MappingPort(80, Protocol.TCP, 80),),
    )


def test_kind_list_items_are_read(tmp_path: Path) -> None:
    write(
        tmp_path,
        "list.yaml",
        """
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Service, metadata: {name: one}, spec: {clusterIP: 10.96.0.1}}
        - {apiVersion: v1, kind: Service, metadata: {name: two}, spec: {clusterIP: "abc"}}
        - {apiVersion: v1, kind: ConfigMap, metadata: {name: ignored}}
        """,
    )
    source = load_source_dir(tmp_path)
    assert source.services == (Service(ObjectKey("default", "one"), IPv4Address("10.96.0.1"), ()),)
    assert source.problems == (
        'list.yaml: document 1: items[1]: Service default/two: clusterIP "abc" is not an IPv4 address',
    )


def test_json_file_as_kubectl_get_writes_it(tmp_path: Path) -> None:
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": "s1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "echo"}},
                "addressType": "IPv4",
                "ports": [{"name": None, "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": None}}],
            }
        ],
    }
    (tmp_path / "slices.json").write_text(json.dumps(listing, indent=2), encoding="utf-8")
    source = load_source_dir(tmp_path)
    assert source.problems == ()
    assert source.endpoint_slices == (
        EndpointSlice(
            key=ObjectKey("demo", "s1"),
            service_name="echo",
            ports=(EndpointPort("", Protocol.TCP, 8080),),
            endpoints=(Endpoint((IPv4Address("10.244.1.2"),), ready=True),),
        ),
    )


def test_only_yaml_yml_json_files_directly_in_the_directory_are_read(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", service_yaml("a"))
    write(tmp_path, "b.yml", service_yaml("b"))
    (tmp_path / "c.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}}), encoding="utf-8"
    )
    write(tmp_path, "d.txt", service_yaml("d"))
    write(tmp_path, ".e.yaml", service_yaml("e"))  # an editor's leftover
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "f.yaml", service_yaml("f"))
    source = load_source_dir(tmp_path)
    assert [s.key.name for s in source.services] == ["a", "b", "c"]
    assert source.problems == ()


def test_the_later_file_wins_a_duplicate_and_it_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "1-first.yaml", service_yaml("web", cluster_ip="10.96.0.1"))
    write(tmp_path, "2-second.yaml", "---\n" + MAPPING + "---\n" + service_yaml("web", "10.96.0.2"))
    source = load_source_dir(tmp_path)
    assert [s.cluster_ip for s in source.services] == [IPv4Address("10.96.0.2")]
    assert source.problems == (
        "2-second.yaml: document 2: Service default/web: replaces the one in 1-first.yaml: document 1",
    )


def test_duplicates_are_per_kind(tmp_path: Path) -> None:
    # A Mapping and a Service may share namespace/name: that is the usual case, not a duplicate.
    write(tmp_path, "a.yaml", service_yaml("web", namespace="ns-a") + "---\n" + MAPPING)
    source = load_source_dir(tmp_path)
    assert (len(source.services), len(source.mappings), source.problems) == (1, 1, ())


def test_duplicate_within_one_file_later_document_wins(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", service_yaml("web", "10.96.0.1") + "---\n" + service_yaml("web", "10.96.0.2"))
    source = load_source_dir(tmp_path)
    assert [s.cluster_ip for s in source.services] == [IPv4Address("10.96.0.2")]
    assert source.problems == ("a.yaml: document 2: Service default/web: replaces the one in a.yaml: document 1",)


def test_yaml_syntax_error_names_file_and_line_and_skips_the_file(tmp_path: Path) -> None:
    write(tmp_path, "a-good.yaml", service_yaml("good"))
    write(
        tmp_path,
        "b-bad.yaml",
        service_yaml("before-the-error") + "---\napiVersion: v1\nkind: Service\nmetadata: {name: broken\n",
    )
    source = load_source_dir(tmp_path)
    assert [s.key.name for s in source.services] == ["good"]
    assert source.problems == (
        "b-bad.yaml: line 11, column 1: did not find expected ',' or '}'"
        " (while parsing a flow mapping started at line 10, column 11)",
    )


def test_yaml_indentation_error_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: Service\nmetadata:\n  name: a\n bad: indent\n", encoding="utf-8")
    assert load_source_dir(tmp_path).problems == (
        "bad.yaml: line 4, column 2: did not find expected key"
        " (while parsing a block mapping started at line 1, column 1)",
    )


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{\n  "kind": "Service",\n  "metadata": {\n}', encoding="utf-8")
    assert load_source_dir(tmp_path).problems == (
        "bad.json: line 4, column 2: Expecting ',' delimiter",
    )


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes("kind: Service # caf\xe9\n".encode("latin-1"))
    problems = load_source_dir(tmp_path).problems
    assert len(problems) == 1
    assert problems[0].startswith("latin1.yaml: cannot be read (")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("just a string\n", 'x.yaml: document 1: "just a string" is not an object'),
        ("- a\n- b\n", 'x.yaml: document 1: ["a", "b"] is not an object'),
        ("metadata: {name: a}\n", "x.yaml: document 1: kind is missing"),
        ("kind: Service\nmetadata: {name: a}\n", "x.yaml: document 1: Service default/a: apiVersion is missing"),
        ("apiVersion: v1\nkind: List\nitems: 3\n", "x.yaml: document 1: items is not a list"),
        (
            "apiVersion: v1\nkind: Service\nspec: {}\n",
            "x.yaml: document 1: Service: metadata.name is missing",
        ),
        (
            "apiVersion: smartnat.aureacentral.com/v1alpha1\nkind: Mapping\nspec: {}\n",
            "x.yaml: document 1: Mapping: metadata.name is missing; spec.addresses is missing;"
            " spec.ports is missing; spec.serviceName is missing",
        ),
        (
            "apiVersion: smartnat.aureacentral.com/v1alpha1\nkind: Mapping\nmetadata: x\n"
            "spec: {addresses: [192.0.2.10], serviceName: a, ports: [{port: 80}]}\n",
            'x.yaml: document 1: Mapping: metadata: "x" is not an object; metadata.name is missing',
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: n,"
            " labels: {kubernetes.io/service-name: x}}\naddressType: IPv5\n",
            "x.yaml: document 1: EndpointSlice n/s: addressType IPv5 is not supported",
        ),
        (
            "apiVersion: smartnat.aureacentral.com/v2\nkind: Mapping\nmetadata: {name: m}\n",
            "x.yaml: document 1: Mapping default/m: apiVersion smartnat.aureacentral.com/v2 is not supported"
            " (expected smartnat.aureacentral.com/v1alpha1)",
        ),
    ],
)
def test_problem_sentences(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "x.yaml").write_text(text, encoding="utf-8")
    assert load_source_dir(tmp_path).problems == (problem,)


def test_problem_names_the_document_number(tmp_path: Path) -> None:
    write(tmp_path, "web.yaml", service_yaml("ok") + "---\n" + service_yaml("x", cluster_ip="abc"))
    assert load_source_dir(tmp_path).problems == (
        'web.yaml: document 2: Service default/x: clusterIP "abc" is not an IPv4 address',
    )


def test_empty_documents_are_skipped_but_counted(tmp_path: Path) -> None:
    write(tmp_path, "web.yaml", "---\n# nothing here\n---\n" + service_yaml("x", cluster_ip="abc"))
    assert load_source_dir(tmp_path).problems == (
        'web.yaml: document 2: Service default/x: clusterIP "abc" is not an IPv4 address',
    )


def test_invalid_mapping_is_kept_for_its_verdict_not_reported_here(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", MAPPING.replace("[{port: 80}]", "[{port: 0}]"))
    source = load_source_dir(tmp_path)
    assert source.problems == ()
    assert [m.spec for m in source.mappings] == [Invalid("spec.ports[0].port: 0 is not a port number (1-65535)")]


def test_ignored_kinds_are_silent(tmp_path: Path) -> None:
    write(tmp_path, "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")
    assert load_source_dir(tmp_path) == SourceDir()


def test_snapshot_carries_everything_and_the_host(tmp_path: Path) -> None:
    source = load_source_dir(EXAMPLES)
    host = Host()
    assert source.snapshot(host=host) == Snapshot(
        mappings=source.mappings, services=source.services, endpoint_slices=source.endpoint_slices, host=host
    )


def test_the_demo_snapshot_loads_without_problems() -> None:
    source = load_source_dir(EXAMPLES)
    assert source.problems == ()
    demo = "demo"
    assert source.services == (
        Service(
            key=ObjectKey(demo, "echo"),
            cluster_ip=IPv4Address("10.96.0.10"),
            ports=(ServicePort("http", Protocol.TCP, 80, 8080), ServicePort("dns", Protocol.UDP, 5353, 8080)),
        ),
    )
    assert source.endpoint_slices == (
        EndpointSlice(
            key=ObjectKey(demo, "echo-abc12"),
            service_name="echo",
            ports=(EndpointPort("http", Protocol.TCP, 8080), EndpointPort("dns", Protocol.UDP, 8080)),
            endpoints=(
                Endpoint((IPv4Address("10.244.1.2"),), ready=True),
                Endpoint((IPv4Address("10.244.2.2"),), ready=True),
            ),
        ),
    )
    assert [(m.key, m.spec) for m in source.mappings] == [
        (
            ObjectKey(demo, "echo-direct"),
            MappingSpec(
                addresses=(IPv4Address("192.0.2.10"),),
                allowed_sources=(IPv4Network("203.0.113.10/32"),),
                service_name="echo",
                mode=Mode.DIRECT,
                ports=(MappingPort(80, Protocol.TCP, 80), MappingPort(5353, Protocol.UDP, 5353)),
            ),
        ),
        (
            ObjectKey(demo, "echo-ext2"),
            MappingSpec(
                addresses=(IPv4Address("198.51.100.10"),),
                allowed_sources=(IPv4Network("0.0.0.0/0"),),
                service_name="echo",
                mode=Mode.DIRECT,
                ports=(MappingPort(8080, Protocol.TCP, 80),),
            ),
        ),
    ]


def test_yaml_is_read_with_libyaml_and_builds_what_safe_load_builds(tmp_path: Path) -> None:
    # The pure-Python loader took 19 s for a 10k-Mapping directory (libyaml: 2.7 s); a PyYAML
    # without libyaml would still work, only slowly, so say it here rather than in a benchmark.
    assert sourcedir._LOADER is yaml.CSafeLoader
    # YAML 1.1 corners where a parser difference would change a Mapping.
    text = (
        "a: on\nb: 0755\nc: 1e3\nd: 2026-01-01T00:00:00Z\ne: '80'\nf: [tcp, UDP]\ng: ~\n"
        "h: &x {port: 80}\ni: *x\nj: 0x1F\nk: 1_000\nl: !!str 443\n"
    )
    (tmp_path / "corners.yaml").write_text(text, encoding="utf-8")
    assert list(yaml.load_all(text, Loader=sourcedir._LOADER)) == list(yaml.safe_load_all(text))


def settled_cache() -> SourceCache:
    """A cache whose clock says the files just written changed long enough ago to be kept."""
    return SourceCache(clock=lambda: time.time() + 2 * sourcedir.RACY)


def test_cache_parses_again_only_the_files_whose_stamp_changed(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", service_yaml("a", "10.96.0.1"))
    write(tmp_path, "b.yaml", service_yaml("b", "10.96.0.2"))
    cache = settled_cache()
    first = load_source_dir(tmp_path, cache=cache)
    assert first == load_source_dir(tmp_path)
    write(tmp_path, "b.yaml", service_yaml("b", "10.96.0.3"))
    second = load_source_dir(tmp_path, cache=cache)
    assert {s.key.name: str(s.cluster_ip) for s in second.services} == {"a": "10.96.0.1", "b": "10.96.0.3"}
    assert second.services[0] is first.services[0]  # a.yaml's object, not parsed again
    # A file that goes away takes its objects and its cache entry with it.
    (tmp_path / "b.yaml").unlink()
    assert [s.key.name for s in load_source_dir(tmp_path, cache=cache).services] == ["a"]
    assert set(cache.files) == {"a.yaml"}


def test_cache_keeps_reporting_duplicates_and_rereads_unreadable_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", service_yaml("same"))
    write(tmp_path, "b.yaml", service_yaml("same"))
    (tmp_path / "c.yaml").write_text("kind: [\n", encoding="utf-8")
    cache = settled_cache()
    for _ in range(2):  # the second time a.yaml and b.yaml come from the cache
        source = load_source_dir(tmp_path, cache=cache)
        assert source == load_source_dir(tmp_path)
        assert any("replaces the one in a.yaml: document 1" in p for p in source.problems)
        assert source.unreadable == ("c.yaml",)
    assert set(cache.files) == {"a.yaml", "b.yaml"}
    (tmp_path / "c.yaml").write_text(service_yaml("fixed"), encoding="utf-8")
    assert load_source_dir(tmp_path, cache=cache).unreadable == ()


@pytest.mark.parametrize("how", ["in place", "deleted and re-created"])
def test_cache_rereads_a_file_rewritten_with_the_same_size_and_mtime(tmp_path: Path, how: str) -> None:
    # cp -p, rsync -t, tar x of files with a fixed mtime (SOURCE_DATE_EPOCH): size and mtime
    # stay, and a re-created file may get the freed inode number back. The change time still moves (the daemon's change detection looks at it),
    # so the cache must not answer with the old objects.
    write(tmp_path, "a.yaml", service_yaml("a", "10.96.0.1"))
    cache = SourceCache()
    load_source_dir(tmp_path, cache=cache)
    a = tmp_path / "a.yaml"
    st = a.stat()
    text = a.read_text().replace("10.96.0.1", "10.96.0.9")
    if how == "in place":
        a.write_text(text, encoding="utf-8")
    else:
        a.unlink()
        a.write_text(text, encoding="utf-8")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = a.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    if how == "deleted and re-created" and now.st_ino != st.st_ino:
        pytest.skip("the file system gave the re-created file another inode number")
    assert [str(s.cluster_ip) for s in load_source_dir(tmp_path, cache=cache).services] == ["10.96.0.9"]


def test_cache_does_not_keep_a_file_read_within_a_timestamp_tick_of_its_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With coarse timestamps (Debian 12's kernel 6.1: a jiffy), a second write of the same size
    # in the tick of the first leaves size, mtime and ctime as the first left them: nothing in
    # stat tells. So a file read less than RACY seconds after its change is parsed again.
    a = tmp_path / "a.yaml"
    a.write_text(service_yaml("a", "10.96.0.1"), encoding="utf-8")
    frozen = sourcedir._stamp(a)
    assert frozen is not None
    monkeypatch.setattr(sourcedir, "_stamp", lambda file: frozen)  # the same tick: stat says nothing
    read_at = [frozen[2] / 1e9]  # the read happens in the tick of the change
    cache = SourceCache(clock=lambda: read_at[0])
    load_source_dir(tmp_path, cache=cache)
    a.write_text(service_yaml("a", "10.96.0.9"), encoding="utf-8")
    assert [str(s.cluster_ip) for s in load_source_dir(tmp_path, cache=cache).services] == ["10.96.0.9"]
    read_at[0] += sourcedir.RACY  # settled: kept from now on
    load_source_dir(tmp_path, cache=cache)
    assert set(cache.files) == {"a.yaml"}
