"""Test-wide fixtures: the `kernel` mark and its skip, and the namespace leak check."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.harness import delete_netns, list_netns, new_netns_prefix

TESTS_DIR = Path(__file__).parent
# Everything under these folders needs root and network namespaces.
KERNEL_FOLDERS = ("kernel", "e2e")
KERNEL_TOOLS = ("ip", "nft", "sysctl")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/* from the current output instead of comparing (review the diff!)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = item.path.relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        if folder in KERNEL_FOLDERS:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def kernel_unavailable() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces, nft); run them as root"
    missing = [tool for tool in KERNEL_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"kernel tests need {', '.join(missing)} on PATH (iproute2, nftables, procps)"
    if not os.path.exists("/proc/self/ns/net"):
        return "kernel tests need network namespace support (/proc/self/ns/net missing)"
    return None


@pytest.fixture(autouse=True)
def _skip_kernel_tests_when_unsupported(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is None:
        return
    reason = request.getfixturevalue("kernel_unavailable")
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def netns_prefix() -> str:
    """This session's namespace prefix (`sn-` + 4 hex): every namespace the tests create
    starts with it, so the leak check ignores other runs sharing the host."""
    return new_netns_prefix()


@pytest.fixture(autouse=True)
def _no_netns_left_behind(netns_prefix: str) -> Iterator[None]:
    """Fail a test that leaves behind namespaces it created (and delete them)."""
    before = list_netns(netns_prefix)
    yield
    leaked = sorted(list_netns(netns_prefix) - before)
    if leaked:
        notes = []
        for name in leaked:
            try:
                delete_netns(name)
                notes.append(f"{name} (deleted now)")
            except Exception as err:  # still report the leak, with this as detail
                notes.append(f"{name} (delete failed: {err})")
        pytest.fail(f"test left network namespaces behind: {', '.join(notes)}")
