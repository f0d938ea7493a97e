"""settle_heap(): the daemon's housekeeping after a full pass."""

from __future__ import annotations

import gc
import logging

import pytest

from smartnatd.daemon import settle_heap


def test_settle_heap_freezes_what_is_alive_without_walking_it_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kept = [[i] for i in range(10)]  # containers: tracked by the collector
    walks: list[int] = []
    real_count = gc.get_freeze_count
    # gc.get_freeze_count() walks every frozen object (~80 ms at 10k Mappings): only for a debug line.
    monkeypatch.setattr(gc, "get_freeze_count", lambda: walks.append(1) or real_count())
    caplog.set_level(logging.INFO, logger="smartnatd.daemon")
    try:
        settle_heap()
        assert walks == []
        assert not any(o is kept[0] for o in gc.get_objects()), "alive objects are moved out of collection"

        caplog.set_level(logging.DEBUG, logger="smartnatd.daemon")
        settle_heap()
        assert walks == [1]
        assert "heap settled objects_frozen=" in caplog.text
    finally:
        gc.unfreeze()
