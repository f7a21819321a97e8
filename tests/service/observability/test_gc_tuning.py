"""The garbage-collector tuning of a serving process: start-up objects frozen, threshold set, both undone."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service.main import create_app
from service.observability.gc_tuning import observe_gc_pauses, release_gc, tune_gc


@pytest.fixture
def clean_gc() -> Iterator[None]:
    before = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("clean_gc")
def test_tune_gc_freezes_survivors_and_sets_the_threshold() -> None:
    before = gc.get_threshold()
    survivor = [object()]  # a container alive at the freeze: full collections stop walking it
    assert gc.is_tracked(survivor)
    assert tune_gc(True, 12_345) == before
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (12_345, before[1], before[2])
    assert not any(o is survivor for o in gc.get_objects())
    release_gc(before)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
    assert any(o is survivor for o in gc.get_objects())


@pytest.mark.usefixtures("clean_gc")
def test_tune_gc_can_leave_both_alone() -> None:
    before = gc.get_threshold()
    tune_gc(False, 0)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


@pytest.mark.usefixtures("clean_gc")
def test_the_app_tunes_the_collector_while_it_serves(make_settings: Callable[..., Any]) -> None:
    before = gc.get_threshold()
    app = create_app(make_settings(gc_freeze=True, gc_gen0_threshold=4_321))
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == 4_321
        assert client.post("/predict", json={"inputs": [[[[0.0] * 8] * 8]]}).status_code == 200
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_collections_are_timed_into_the_metrics() -> None:
    observe_gc_pauses()
    observe_gc_pauses()  # once per process, however many apps start
    assert sum(type(cb).__name__ == "_PauseTimer" for cb in gc.callbacks) == 1

    def sample(suffix: str) -> float:
        value = REGISTRY.get_sample_value(f"sdb_gc_pause_seconds_{suffix}", {"generation": "1"})
        return value or 0.0

    count, total = sample("count"), sample("sum")
    gc.collect(1)
    assert sample("count") == count + 1
    assert sample("sum") > total
