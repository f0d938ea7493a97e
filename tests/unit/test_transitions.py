"""transitions.py: which verdict changes reach the log, and at what level."""

from __future__ import annotations

import dataclasses
import logging
from ipaddress import IPv4Address

import pytest

from smartnatd.model import Snapshot
from smartnatd.planner import plan
from smartnatd.transitions import log_transitions
from tests.builders import HOST, SETTINGS, endpoint_slice, mapping, service

LOG = logging.getLogger("tests.transitions")


def test_refusing_the_boxs_own_address_is_a_warning_though_the_verdict_is_not_local(
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = dataclasses.replace(HOST, local_addresses=frozenset({IPv4Address("10.10.0.2")}))
    cluster = dict(mappings=(mapping("a", mode="direct"),), services=(service(),))
    good = plan(Snapshot(host=box, endpoint_slices=(endpoint_slice(ready=("10.244.1.2",)),), **cluster), SETTINGS)  # type: ignore[arg-type]
    refused = plan(Snapshot(host=box, endpoint_slices=(endpoint_slice(ready=("10.10.0.2",)),), **cluster), SETTINGS)  # type: ignore[arg-type]
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    log_transitions(refused, good, log=LOG)
    log_transitions(good, refused, log=LOG)
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records] == [
        ("WARNING", "mapping default/a TargetRefused"),
        ("INFO", "mapping default/a problem cleared (TargetRefused); now Configured"),
    ]
