"""End to end: train students through the HTTP API of a real server and compare with local distillation.

A real `uvicorn` server (SQLite) on a free loopback port; an admin bootstrapped from
SDB_BOOTSTRAP_ADMIN_TOKEN creates a user and issues an API key; students are distilled on the bundled digits
data from (a) /distill-batch with the authorized client and (b) anonymous /predict outputs, and compared with
the same students distilled locally from the box's keyed path (authorized KD) and plain path (unauthorized
KD), with identical seeds. Threshold: |remote - local| <= 1.0 point of test accuracy, seed 0, 4 epochs.
Model: the shipped demo box under models/ when present, else a box made by `make_test_box`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from sdb.client import SdbClient, remote_teacher
from sdb_core.artifact import load_box, make_test_box, read_manifest
from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig, distill, query_teacher
from sdb_core.training import TrainConfig, accuracy, model_fn
from tests._support.admin import create_user_and_key
from tests._support.db import run_migrations
from tests._support.server import REPO, Server, base_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEEDS = (0,)
EPOCHS = 4
TOLERANCE_PT = 1.0


def demo_box_dir() -> Path | None:
    for manifest in sorted((REPO / "models").glob("*/manifest.json")):
        info = read_manifest(manifest.parent)
        if tuple(info["input_shape"]) == (1, 8, 8):
            return manifest.parent
    return None


@pytest.fixture(scope="module")
def box_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = demo_box_dir()
    if found is not None:
        return found
    return make_test_box(tmp_path_factory.mktemp("e2e-models"), name="e2e-box", seed=5)


@pytest.fixture(scope="module")
def server(box_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("e2e-server")
    models = work / "models"
    models.mkdir()
    (models / box_dir.name).symlink_to(box_dir, target_is_directory=True)
    db_url = f"sqlite:///{work / 'sdb.db'}"
    run_migrations(db_url)
    env = base_env(models, db_url, predict_rate_per_minute=0, distill_rate_per_minute=0)
    srv = Server(env, work / "server.log", ready_path="/readyz")
    try:
        yield srv.start(wait_s=60).url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api_key(server: str, box_dir: Path) -> str:
    # Without a watermark: these tests compare the remote keyed path with the local one exactly.
    model = read_manifest(box_dir)["name"]
    return create_user_and_key(server, scopes=[model], name="e2e-student", watermark=False).api_key


def student_accuracy(teacher: object, seed: int) -> float:
    ds = load_dataset("digits")
    cfg = DistillConfig(train=TrainConfig(epochs=EPOCHS, seed=seed, device="cpu", progress=False))
    student = distill(ds, "small_cnn", teacher, cfg)  # type: ignore[arg-type]
    return accuracy(model_fn(student, ds), ds.x_test, ds.y_test, torch.device("cpu"))


def test_remote_teachers_return_the_boxs_outputs(server: str, api_key: str, box_dir: Path) -> None:
    box = load_box(box_dir)
    x = load_dataset("digits").x_test[:300]
    keyed = query_teacher(remote_teacher(server, api_key, box.name, "keyed"), x)
    torch.testing.assert_close(keyed, box.keyed_logits(torch.from_numpy(x)), rtol=1e-4, atol=1e-4)
    plain = query_teacher(remote_teacher(server, None, box.name, "plain"), x)
    local = box.plain_logits(torch.from_numpy(x))
    for t in (1.0, box.temperature):
        torch.testing.assert_close(
            torch.softmax(plain / t, 1), torch.softmax(local / t, 1), rtol=1e-3, atol=1e-5
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_authorized_students_match_local_authorized_kd(
    server: str, api_key: str, box_dir: Path, seed: int
) -> None:
    box = load_box(box_dir)
    with SdbClient(server, api_key) as client:
        remote = student_accuracy(remote_teacher(server, api_key, box.name, "keyed", client=client), seed)
    local = student_accuracy(box.keyed_logits, seed)
    assert abs(remote - local) <= TOLERANCE_PT, (remote, local)


@pytest.mark.parametrize("seed", SEEDS)
def test_students_from_predict_match_local_unauthorized_kd(server: str, box_dir: Path, seed: int) -> None:
    box = load_box(box_dir)
    remote = student_accuracy(remote_teacher(server, None, box.name, "plain"), seed)
    local = student_accuracy(box.plain_logits, seed)
    assert abs(remote - local) <= TOLERANCE_PT, (remote, local)


def test_distill_calls_were_audited_and_counted(server: str) -> None:
    text = httpx.get(server + "/metrics").text
    distilled = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("sdb_samples_distilled_total{")
    ]
    assert sum(distilled) >= 300 + 1300 * len(SEEDS)
    assert np.isfinite(sum(distilled))


def _attack(*target: str) -> dict[str, object]:
    import json
    import subprocess

    from tests._support.ops import sdb_executable

    args = ["--data", "digits", "--transfer", "300", "--arch", "mlp:hidden=32", "--epochs", "3"]
    args += ["--attacks", "label_only,retemper:4,average:noise", "--device", "cpu"]
    cmd = [sdb_executable(), "attack", *target, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(json.loads(r.stdout))


def test_attack_command_against_the_service_matches_the_local_box(server: str, box_dir: Path) -> None:
    """`sdb attack --remote` queries /predict anonymously and trains the same students as the same attack on
    the local box (the answers are the same; threshold 1 point, seed 0)."""
    name = read_manifest(box_dir)["name"]
    remote = _attack("--remote", server, "--model", name)
    local = _attack("--box", str(box_dir))
    assert remote["target"] == f"remote:{server}:{name}"
    remote_top1, local_top1 = remote["top1"], local["top1"]
    assert isinstance(remote_top1, dict) and isinstance(local_top1, dict)
    assert set(remote_top1) == {"label_only", "retemper:4", "average:noise"}
    for attack, top1 in remote_top1.items():
        assert abs(top1 - local_top1[attack]) <= TOLERANCE_PT, attack
