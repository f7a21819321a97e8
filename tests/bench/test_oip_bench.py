"""bench.serve_bench --oip: its request bodies are valid protocol requests with /predict's answers, and its
report takes medians over rounds and checks the target from what was measured."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.oip_bench import HEADER_LENGTH, kinds, oip_report
from service.core.config import Settings
from service.main import create_app
from tests._support.oip import outputs_of


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def test_the_bench_bodies_get_predicts_answer(client: TestClient, box_dir: Path) -> None:
    predict, as_json, binary = kinds("alpha", (1, 8, 8))
    for i in (0, 5):
        want = client.post(
            predict.path, content=predict.bodies[i], headers={"content-type": "application/json"}
        )
        assert want.status_code == 200, want.text
        probs = np.array([p["probabilities"] for p in want.json()["predictions"]], np.float32)
        for kind in (as_json, binary):
            headers = {"content-type": kind.content_type, **dict(h.split(": ", 1) for h in kind.headers)}
            r = client.post(kind.path, content=kind.bodies[i], headers=headers)
            assert r.status_code == 200, r.text
            assert (HEADER_LENGTH in r.headers) == (kind is binary)
            np.testing.assert_array_equal(outputs_of(r.content, r.headers)["probabilities"], probs)


def test_the_report_takes_medians_and_checks_binary_against_predict() -> None:
    def row(kind: str, rnd: int, rps: float) -> dict[str, float | str | int]:
        return {"model": "m", "kind": kind, "round": rnd, "req_per_s": rps, "p50_ms": 1.0, "p99_ms": 2.0,
                "cpu_ms_per_req": 1.0, "failed": 0.0}  # fmt: skip

    rows = [row("predict", r, v) for r, v in ((1, 100), (2, 1000), (3, 120))]
    rows += [row("infer json", r, 50) for r in (1, 2, 3)]
    rows += [row("infer binary", r, v) for r, v in ((1, 10), (2, 115), (3, 110))]
    table, ok, summary = oip_report(rows, ["m"])
    assert summary["m"]["predict"]["req_per_s"] == 120 and summary["m"]["infer binary"]["req_per_s"] == 110
    assert ok and "(got 0.92)" in table
    rows[-1]["req_per_s"] = 100
    assert not oip_report(rows, ["m"])[1]
