"""`sdb trace` on a tiny box (1x8x8, digits), fast: the database's watermarked keys (a revoked one included)
are all tested; a perfect leaker behind a /predict-like URL is named and ranked first; an innocent student
directory matches no key at corrected p < 1e-3; a wrong watermark secret is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdb.cli import app
from sdb_core.artifact import load_box, make_test_box
from sdb_core.data import load_dataset
from sdb_core.training import save_model
from sdb_core.watermark import apply_watermark, retemper
from sdb_core.zoo import arch_kwargs_for, build_model
from service.crud import accounts, licensee_images, watermarks
from service.db.session import Database
from service.watermarks.issuer import Watermarker
from service.watermarks.secret import WatermarkSecret
from tests._support.db import run_migrations
from tests._support.suspects import memorising_student, predict_endpoint

SECRET = "trace-cli-secret-" + "9f3a61c0b2d4e8a7" * 3
runner = CliRunner()


@pytest.fixture
def world(tmp_path: Path) -> dict[str, object]:
    url = f"sqlite:///{tmp_path / 'sdb.db'}"
    run_migrations(url)
    box_dir = make_test_box(tmp_path, name="tiny", seed=3)
    marks = Watermarker(WatermarkSecret(SECRET.encode(), "setting"))
    db = Database(url)
    ids = []
    try:
        with db.write() as s:
            for i in range(3):
                user = accounts.create_user(s, f"licensee{i}", "user")
                key = accounts.create_api_key(
                    s, user, prefix=f"sdb_k{i}", digest=f"{i:064d}", scopes=["tiny"], sample_quota=None,
                    expires_at=None,
                )  # fmt: skip
                watermarks.set_key_watermark(
                    s, key, True, watermark_id=marks.watermark_id, bank_size=marks.bank_size
                )
                ids.append((key.id, key.prefix, key.watermark_slot))
            accounts.revoke_key(s, accounts.get_key(s, ids[1][0]))
    finally:
        db.dispose()
    return {"url": url, "box": box_dir, "marks": marks, "ids": ids}


def env(url: str, secret: str = SECRET) -> dict[str, str]:
    return {"SDB_DATABASE_URL": url, "SDB_WATERMARK_SECRET": secret}


def _url_trace_args(world: dict[str, object], url: str) -> list[str]:
    """`sdb trace` of the world's box against a suspect URL: 1,500 probes, 200 decoys."""
    return ["trace", "--box", str(world["box"]), "--suspect-url", url, "--probes", "1500", "--decoys", "200"]


def test_a_leak_behind_a_url_is_traced_to_its_revoked_key(world: dict[str, object]) -> None:
    box = load_box(world["box"])  # type: ignore[arg-type]
    key_id, prefix, slot = world["ids"][1]  # type: ignore[index]
    wm = world["marks"].watermark(key_id, prefix, slot, box)  # type: ignore[attr-defined]

    def leak(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        with torch.inference_mode():
            return retemper(apply_watermark(wm, t, torch.softmax(box.keyed_logits(t) / 4.0, 1)), 0.25).numpy()

    with predict_endpoint(leak) as url:
        args = _url_trace_args(world, url)
        r = runner.invoke(app, [*args, "--json"], env=env(str(world["url"])))
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        table = runner.invoke(app, args, env=env(str(world["url"])))
    top = report["keys"][0]
    assert report["watermarks_tested"] == 3
    # 1,500 probes of an untrained 8x8 box: a match at alpha (1e-3), not the protocol's 1e-6 at 10,000 probes
    assert top["key_id"] == key_id and top["key_state"] == "revoked" and top["verdict"] == "match"
    assert [m["key_id"] for m in report["matches"]] == [key_id]  # nobody else
    assert f"verdict: key {key_id} (licensee1) match" in table.output


def test_an_innocent_student_matches_nobody(world: dict[str, object], tmp_path: Path) -> None:
    ds = load_dataset("digits")
    torch.manual_seed(0)
    kwargs = arch_kwargs_for(ds.input_shape, ds.num_classes, width=4)
    save_model(tmp_path / "student", build_model("small_cnn", **kwargs), arch="small_cnn", arch_kwargs=kwargs,
               ds=ds, metrics={})  # fmt: skip
    args = ["trace", "--box", str(world["box"]), "--suspect", str(tmp_path / "student"), "--probes", "1500"]
    r = runner.invoke(app, [*args, "--decoys", "200", "--json"], env=env(str(world["url"])))
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["matches"] == [] and min(k["corrected_p"] for k in report["keys"]) >= 1e-3


def test_another_secret_is_refused(world: dict[str, object], tmp_path: Path) -> None:
    args = [
        "trace",
        "--box",
        str(world["box"]),
        "--suspect",
        str(world["box"]),
        "--probes",
        "200",
        "--decoys",
        "100",
    ]
    r = runner.invoke(app, args, env=env(str(world["url"]), secret="other-" + "0af1b2c3d4e5f6a7" * 3))
    assert r.exit_code != 0
    assert "another watermark secret" in str(r.exception) + r.output


def test_each_key_is_traced_on_the_images_it_sent(world: dict[str, object]) -> None:
    """A student that carries key 0's mark only on the images key 0 sent: found on them (`own_images`, kept
    by the service), not on the probe images alone (--no-own-images)."""
    box = load_box(world["box"])  # type: ignore[arg-type]
    ids = world["ids"]
    sent = [np.random.default_rng(40 + i).normal(size=(150, 1, 8, 8)).astype(np.float32) for i in range(3)]
    db = Database(str(world["url"]))
    try:
        with db.write() as s:
            for (key_id, _, _), x in zip(ids, sent, strict=True):  # type: ignore[call-overload]
                licensee_images.offer(s, key_id, box.name, x, np.arange(len(x), dtype=np.int64), 500)
    finally:
        db.dispose()
    key_id, prefix, slot = ids[0]  # type: ignore[index]
    wm = world["marks"].watermark(key_id, prefix, slot, box)  # type: ignore[attr-defined]
    student = memorising_student(wm, sent[0], lambda t: torch.softmax(box.keyed_logits(t), 1))

    with predict_endpoint(student) as url:
        args = _url_trace_args(world, url)
        own = json.loads(runner.invoke(app, [*args, "--json"], env=env(str(world["url"]))).output)
        fresh = json.loads(
            runner.invoke(app, [*args, "--json", "--no-own-images"], env=env(str(world["url"]))).output
        )
    assert [m["key_id"] for m in own["matches"]] == [key_id] and own["keys"][0]["key_id"] == key_id
    assert {k["own_images"] for k in own["keys"]} == {150} and own["probes"] == 450
    assert fresh["matches"] == [] and {k["own_images"] for k in fresh["keys"]} == {0}


def test_a_shadow_student_replaces_the_box_in_the_pattern_channel(
    world: dict[str, object], tmp_path: Path
) -> None:
    """`--shadow DIR`: on a box whose marks carry the class pattern, a suspect traced against itself as its
    shadow leaves the pattern channel nothing (every key's pattern z is 0), where against the box it does
    not; the top-1 channel is the same either way. A shadow that is no student directory is refused."""
    from dataclasses import asdict

    from sdb_core.watermark import CONFIG_KEY, WatermarkConfig

    box = make_test_box(tmp_path, name="patterned", seed=5, extra={CONFIG_KEY: asdict(WatermarkConfig())})
    ds = load_dataset("digits")
    torch.manual_seed(1)
    kwargs = arch_kwargs_for(ds.input_shape, ds.num_classes, width=4)
    save_model(tmp_path / "student", build_model("small_cnn", **kwargs), arch="small_cnn", arch_kwargs=kwargs,
               ds=ds, metrics={})  # fmt: skip
    args = ["trace", "--box", str(box), "--suspect", str(tmp_path / "student"), "--probes", "1000"]
    args += ["--decoys", "200", "--json"]
    reports = []
    for extra in ([], ["--shadow", str(tmp_path / "student")]):
        r = runner.invoke(app, [*args, *extra], env=env(str(world["url"])))
        assert r.exit_code == 0, r.output
        reports.append({k["key_id"]: k for k in json.loads(r.output)["keys"]})
    plain, shadowed = reports
    assert any(k["pattern_statistic"] != 0 for k in plain.values())
    assert all(k["pattern_statistic"] == 0 for k in shadowed.values())
    assert all(shadowed[i]["top1_statistic"] == plain[i]["top1_statistic"] for i in plain)
    r = runner.invoke(app, [*args, "--shadow", str(box)], env=env(str(world["url"])))
    assert r.exit_code != 0 and "not a student directory" in r.output
