"""The benchmarks still run: each at a toy size, checking it finishes and writes its figures.

No figure is judged here (timings belong to bench/, not to tests); this only keeps the scripts
from rotting while the code they drive changes. Both build their own sn-bench-* namespaces and
remove them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


def test_sync_bench_runs_a_full_pass_and_single_changes(tmp_path: Path) -> None:
    figures = run_bench(
        "sync.py", "--sizes", "60", "--repeat", "1", "--change-repeat", "2", "--changes-from", "60",
        out=tmp_path / "sync.json",
    )
    size = figures["sizes"]["60"]
    assert size["full"]["counts"]["mappings"] == 60
    assert size["full"]["total"]["n"] == 1
    assert set(size) == {"full", "change"}, list(size)


def test_kube_latency_bench_runs_every_scenario(tmp_path: Path) -> None:
    figures = run_bench("kube_latency.py", "--mappings", "30", "--repeats", "2", out=tmp_path / "kube.json")
    text = json.dumps(figures)
    for scenario in ("create", "endpoints", "delete"):
        assert f'"{scenario}"' in text, figures
