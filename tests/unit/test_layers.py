"""Imports point inward only (STYLE.md §1): the planner and renderer stay pure and testable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "smartnatd"

# module -> smartnatd modules it may import
ALLOWED = {
    "model": set(),
    "errors": set(),
    "desired": {"model"},
    "settings": {"errors"},
    "planner": {"model", "desired", "settings"},
    "nft.names": set(),
    "nft.render": {"desired", "model", "nft", "nft.names"},
    "kube.objects": {"model"},
    "sourcedir": {"model", "kube.objects"},
    "transitions": {"planner"},
}


def smartnatd_imports(module: str) -> set[str]:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smartnatd"):
            base = node.module.removeprefix("smartnatd").lstrip(".")
            if base:
                found.add(base)
            for alias in node.names:
                # "from smartnatd.nft import names" imports the module nft.names
                if (PACKAGE / (base.replace(".", "/")) / f"{alias.name}.py").exists():
                    found.add(f"{base}.{alias.name}" if base else alias.name)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("smartnatd.") for a in node.names if a.name.startswith("smartnatd.")}
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_inner_layers(module):
    extra = smartnatd_imports(module) - ALLOWED[module]
    assert not extra, f"smartnatd/{module} imports {sorted(extra)}; it may only import {sorted(ALLOWED[module])}"


def test_planner_does_no_io():
    text = (PACKAGE / "planner.py").read_text()
    for forbidden in ("import logging", "import os", "import time", "import socket", "open(", "subprocess"):
        assert forbidden not in text, forbidden
