"""`sdb train-teacher` and `sdb box` under a real `torchrun --nproc-per-node 2` (gloo, CPU): the same quality
as one process, artifacts written once (by rank 0) and loadable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sdb.cli import app
from sdb_core.artifact import load_box
from sdb_core.data import load_digits
from sdb_core.training import accuracy, load_model, model_fn

TEACHER = ["--epochs", "10", "--width", "8", "--seed", "0", "--device", "cpu"]
TOLERANCE = 2.0  # test top-1 points between 1 and 2 processes (497 digits test images: 1 point = 5 images)


def _torchrun(args: list[str], cwd: Path) -> tuple[dict[str, Any], str, float]:
    """(the JSON printed, stdout, wall seconds) of `torchrun --standalone --nproc-per-node 2 -m sdb ARGS`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "sdb",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout[r.stdout.index("{") :]), r.stdout, wall


@pytest.mark.slow
def test_train_teacher_and_box_on_two_processes(tmp_path: Path) -> None:
    one = tmp_path / "teacher-1"
    start = time.perf_counter()
    r = CliRunner().invoke(app, ["train-teacher", "--out", str(one), *TEACHER])
    one_wall = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    top1_one = json.loads(r.output[r.output.index("{") :])["test_top1"]

    two = tmp_path / "teacher-2"
    out, stdout, two_wall = _torchrun(["train-teacher", "--out", str(two), *TEACHER], tmp_path)
    print(f"teacher top-1: 1 process {top1_one} ({one_wall:.1f} s in-process), "
          f"2 processes {out['test_top1']} ({two_wall:.1f} s with torchrun start-up)")  # fmt: skip
    assert out["processes"] == 2
    assert stdout.count('"teacher"') == 1  # rank 0 alone reports (and writes)
    assert abs(out["test_top1"] - top1_one) <= TOLERANCE
    assert min(out["test_top1"], top1_one) >= 95.0
    assert sorted(p.name for p in two.iterdir()) == ["model.json", "model.safetensors"]  # no resume.pt left
    model, meta = load_model(two)  # the saved weights are the model rank 0 evaluated
    ds = load_digits()
    top1_saved = accuracy(model_fn(model, ds), ds.x_test, ds.y_test, torch.device("cpu"))
    assert top1_saved == pytest.approx(out["test_top1"], abs=0.01) == meta["metrics"]["top1"]

    box_dir = tmp_path / "models" / "mini"
    out, stdout, _ = _torchrun(
        ["box", "--teacher", str(two), "--out", str(box_dir), "--epochs", "2", "--device", "cpu"], tmp_path
    )
    assert out["processes"] == 2 and stdout.count('"box"') == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mini"]  # no .mini.resume.pt left
    boxed = load_box(box_dir)  # checksums and the key (drawn by rank 0, shared with rank 1) verified
    assert boxed.manifest["metrics"]["keyed_top1"] == pytest.approx(out["metrics"]["keyed_top1"])
    assert out["metrics"]["keyed_top1"] > 50.0  # two epochs from the teacher's weights: far above chance


def test_evaluate_refuses_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["evaluate", "--reduced"])
    assert r.exit_code != 0 and "one process" in r.output
