"""bench.serve_bench and bench.peer_bench: the peer comparison's report, the LitServe peer's answers, and
one tiny peer run.

Speed is the benchmark's business (docs/benchmarks.md), never these tests': they check that the numbers
are computed from what was measured and that the peer answers what sdb answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench import serve_bench
from bench.peer_bench import PeerRow, peer_report
from bench.serve_bench import Result, Scenario
from sdb.client import encode_npy


def _result(req_per_s: float, p50: float, p99: float, cpu_ms: float = 1.0) -> Result:
    scenario = Scenario("m", "predict c32", "/predict", 32, 1, 100, "plain")
    return Result(
        scenario, req_per_s, req_per_s, p50, p50, p99, 0, {"200": 100}, server_cpu_ms_per_req=cpu_ms
    )


def test_peer_report_takes_medians_over_rounds_and_checks_the_targets() -> None:
    rows = [
        PeerRow("m", "sdb", 1, _result(1000, 10, 25, cpu_ms=0.5)),
        PeerRow("m", "litserve", 1, _result(600, 40, 90, cpu_ms=2.0)),
        PeerRow("m", "litserve", 2, _result(500, 50, 100)),
        PeerRow("m", "sdb", 2, _result(1200, 12, 500)),  # one bad round: the median of two is the mean
        PeerRow("m", "sdb", 3, _result(1100, 11, 30)),
        PeerRow("m", "litserve", 3, _result(700, 45, 80)),
    ]
    text, ok, summary = peer_report(rows, "litserve", {"run": "test"})
    s = summary["m"]
    assert s["sdb"] == {"req_per_s": 1100, "p50_ms": 11, "p99_ms": 30, "cpu_ms_per_req": 1.0}
    assert s["litserve"] == {"req_per_s": 600, "p50_ms": 45, "p99_ms": 90, "cpu_ms_per_req": 1.0}
    assert s["req_per_s_ratio"] == pytest.approx(1100 / 600)
    assert s["p99_ratio"] == pytest.approx(30 / 90)
    assert s["sdb_p99_over_p50"] == pytest.approx(30 / 11)
    assert s["cpu_ratio"] == pytest.approx(1.0)
    assert ok
    assert "- [x] m: sdb req/s >= 1.5 x litserve (got 1.83x)" in text

    slow = [PeerRow("m", "sdb", 1, _result(800, 10, 95)), PeerRow("m", "litserve", 1, _result(600, 40, 90))]
    text, ok, _ = peer_report(slow, "litserve", {})
    assert not ok
    assert "- [ ] m: sdb req/s >= 1.5 x litserve (got 1.33x)" in text
    assert "- [ ] m: sdb p99 <= litserve p99 (got 95.0 vs 90.0 ms)" in text
    assert "- [ ] m: sdb p99 <= 3 x p50 (got 9.5x)" in text


def test_the_main_report_checks_the_tail_of_predict_c32() -> None:
    r = _result(1000, 10, 40)
    text, ok = serve_bench.report([r], {}, {})
    assert "- [ ] m: predict c32 p99 <= 3 x p50 (got 40.0 / 10.0 ms = 4.0x)" in text
    assert not ok


def test_the_litserve_peer_answers_what_sdb_predict_answers(client: TestClient, box_dir: Path) -> None:
    pytest.importorskip("litserve", reason="the bench extra is not installed: pip install -e '.[bench]'")
    from bench.litserve_peer import BoxAPI

    api = BoxAPI(box_dir / "alpha", threads=1, max_batch_size=256, batch_timeout_s=0.002)
    api.setup("cpu")
    rng = np.random.default_rng(3)
    requests = [rng.random((n, 1, 8, 8), dtype=np.float32) * 4 for n in (1, 3)]
    inputs = [api.decode_request({"model": "alpha", "inputs_b64": encode_npy(x)}) for x in requests]
    answers = [api.encode_response(p) for p in api.unbatch(api.predict(api.batch(inputs)))]
    for x, answer in zip(requests, answers, strict=True):
        body = {"model": "alpha", "inputs_b64": encode_npy(x)}
        expected = client.post("/predict", json=body).json()
        assert answer["model"] == expected["model"] and answer["version"] == expected["version"]
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in expected["predictions"]]
        np.testing.assert_allclose(
            [p["probabilities"] for p in answer["predictions"]],
            [p["probabilities"] for p in expected["predictions"]],
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.slow
@pytest.mark.e2e
def test_peer_litserve_runs_both_servers_in_alternating_rounds(tmp_path: Path) -> None:
    pytest.importorskip("litserve", reason="the bench extra is not installed: pip install -e '.[bench]'")
    out = tmp_path / "peer.json"
    # --workers 2: sdb through `sdb serve --workers 2`, the setting that meets the peer targets
    argv = [
        "--peer",
        "litserve",
        "--model",
        "digits-demo",
        "--rounds",
        "2",
        "--requests",
        "64",
        "--workers",
        "2",
    ]
    rc = serve_bench.main([*argv, "--threads", "1", "--json", str(out)])
    assert rc in (0, 1)  # 1: a speed target missed, which 64 requests on a busy machine cannot judge
    data = json.loads(out.read_text())
    assert [(r["server"], r["round"]) for r in data["rounds"]] == [
        ("sdb", 1),
        ("litserve", 1),
        ("litserve", 2),
        ("sdb", 2),
    ]
    for r in data["rounds"]:
        assert r["statuses"] == {"200": 64}
        assert r["server_cpu_ms_per_req"] > 0  # LitServe's CPU is summed over its processes
    s = data["summary"]["digits-demo"]
    assert s["req_per_s_ratio"] == pytest.approx(s["sdb"]["req_per_s"] / s["litserve"]["req_per_s"])
    assert data["meta"]["peer"] == "litserve 0.2.19"
    assert data["meta"]["sdb workers"] == 2
