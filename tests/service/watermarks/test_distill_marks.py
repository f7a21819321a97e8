"""The per-API-key watermark of /distill-batch, in process, on SQLite and PostgreSQL: a watermarked key's soft
labels differ from the keyed path's and keep every sample's top-1; logits agree with them; the audit row names
the mark; keys without a mark and models with marks turned off answer the exact keyed path; /predict is
untouched; the admin API shows only the flag and the public id; revoked keys stay among the issued marks;
the service refuses to start on a watermark secret that does not give the stored ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from sdb_core.artifact import load_box
from service.crud import watermarks as crud_watermarks
from service.db.models import ApiKey
from service.db.session import Database
from service.watermarks.secret import WatermarkSecretError
from tests._support.api import ApiHelper
from tests._support.db import audit_rows

X = np.random.default_rng(7).normal(size=(64, 1, 8, 8)).astype(np.float32)


def keyed(box_dir: Path, model: str = "alpha") -> np.ndarray:
    with torch.inference_mode():
        return load_box(box_dir / model).keyed_logits(torch.from_numpy(X)).numpy()


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    return torch.softmax(torch.from_numpy(z).double() / t, dim=1).numpy()


def distill(client: TestClient, headers: dict[str, str], model: str = "alpha", **body: Any) -> dict[str, Any]:
    r = client.post("/distill-batch", json={"model": model, "inputs": X.tolist(), **body}, headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_watermarked_key_gets_marked_labels_with_the_keyed_top1(
    api: ApiHelper, client: TestClient, box_dir: Path, database_url: str
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"])
    assert key["watermarked"] is True and key["watermark_id"].startswith("wm-")
    z = keyed(box_dir)
    for t in (4.0, 1.0, 10.0):
        body = distill(client, headers, temperature=t)
        soft = np.asarray(body["soft_labels"], dtype=np.float64)
        clean = softmax(z, t)
        np.testing.assert_array_equal(soft.argmax(1), clean.argmax(1))  # every sample's top-1
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
        assert np.abs(soft - clean).max() > 1e-3, "the mark changed nothing"
        # The logits returned agree with the marked labels (never the unmarked keyed logits).
        np.testing.assert_allclose(softmax(np.asarray(body["logits"]), t), soft, atol=1e-4)
        assert not np.allclose(np.asarray(body["logits"]), z, atol=1e-3)
    rows = audit_rows(database_url, "endpoint = '/distill-batch' AND status = 200")
    assert [r.watermark_id for r in rows] == [key["watermark_id"]] * 3


def test_two_keys_carry_different_marks_and_each_is_deterministic(api: ApiHelper, client: TestClient) -> None:
    _, a, ha = api.user_with_key(scopes=["alpha"])
    _, b, hb = api.user_with_key(scopes=["alpha"])
    assert a["watermark_id"] != b["watermark_id"]
    first = np.asarray(distill(client, ha)["soft_labels"])
    np.testing.assert_array_equal(first, np.asarray(distill(client, ha)["soft_labels"]))
    assert np.abs(first - np.asarray(distill(client, hb)["soft_labels"])).max() > 1e-3


def test_unmarked_keys_and_disabled_models_get_the_exact_keyed_path(
    make_settings: Any, box_dir: Path, database_url: str
) -> None:
    from service.main import create_app

    with TestClient(create_app(make_settings(watermark_disabled_models=["beta"]))) as client:
        api = ApiHelper(client)
        _, plain_key, plain_headers = api.user_with_key(scopes=["alpha"], watermark=False)
        assert plain_key["watermarked"] is False and plain_key["watermark_id"] is None
        _, _, marked_headers = api.user_with_key(scopes=["beta"])
        for headers, model in ((plain_headers, "alpha"), (marked_headers, "beta")):
            body = distill(client, headers, model=model)
            np.testing.assert_allclose(body["soft_labels"], softmax(keyed(box_dir, model), 4.0), atol=1e-5)
            np.testing.assert_allclose(body["logits"], keyed(box_dir, model), atol=1e-4)
        # /predict is untouched by any mark: the plain path's probabilities.
        r = client.post("/predict", json={"model": "alpha", "inputs": X[:4].tolist()})
        with torch.inference_mode():
            plain = load_box(box_dir / "alpha").plain_logits(torch.from_numpy(X[:4])).numpy()
        got = np.asarray([p["probabilities"] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, softmax(plain, 1.0), atol=1e-5)
    rows = audit_rows(database_url, "endpoint = '/distill-batch'")
    assert [r.watermark_id for r in rows] == [None, None]


def test_the_admin_api_shows_the_flag_and_id_only_and_toggles_keep_the_id(
    api: ApiHelper, client: TestClient, box_dir: Path, database_url: str
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], watermark=False)
    listed = client.get("/admin/keys", headers=api.admin).json()["items"]
    for k in listed:
        assert set(k) >= {"watermarked", "watermark_id"}
        assert not any("slot" in f or "mode" in f or "secret" in f for f in k)
    r = client.post(f"/admin/keys/{key['id']}/watermark", json={"enabled": True}, headers=api.admin)
    assert r.status_code == 200, r.text
    wid = r.json()["watermark_id"]
    assert r.json()["watermarked"] is True and wid.startswith("wm-")
    assert (
        np.abs(np.asarray(distill(client, headers)["soft_labels"]) - softmax(keyed(box_dir), 4.0)).max()
        > 1e-3
    )
    r = client.post(f"/admin/keys/{key['id']}/watermark", json={"enabled": False}, headers=api.admin)
    assert r.json() == {**r.json(), "watermarked": False, "watermark_id": wid}
    np.testing.assert_allclose(
        distill(client, headers)["soft_labels"], softmax(keyed(box_dir), 4.0), atol=1e-5
    )
    assert (
        client.post("/admin/keys/999999/watermark", json={"enabled": True}, headers=api.admin).status_code
        == 404
    )
    assert (
        client.post(f"/admin/keys/{key['id']}/watermark", json={"on": 1}, headers=api.admin).status_code
        == 422
    )
    user_token = {"Authorization": headers["Authorization"]}
    r = client.post(f"/admin/keys/{key['id']}/watermark", json={"enabled": True}, headers=user_token)
    assert r.status_code == 403
    # Revoked keys stay among the issued watermarks (traceable), with their slot and id.
    assert client.post(f"/admin/keys/{key['id']}/revoke", headers=api.admin).status_code == 200
    db = Database(database_url)
    try:
        with db.session() as s:
            issued = {w.key_id: w for w in crud_watermarks.issued_watermarks(s)}
    finally:
        db.dispose()
    assert issued[key["id"]].watermark_id == wid and issued[key["id"]].revoked_at is not None
    events = client.get("/admin/events", params={"action": "key.watermark.on"}, headers=api.admin).json()
    assert events["total"] == 1


def test_refuses_to_start_on_another_watermark_secret(make_settings: Any) -> None:
    from service.main import create_app

    with TestClient(create_app(make_settings())) as client:
        ApiHelper(client).user_with_key(scopes=["alpha"])
    other = "wm-other-secret-" + "0123456789abcdef" * 3
    with (
        pytest.raises(WatermarkSecretError, match=r"another watermark secret.*SDB_WATERMARK_SECRET"),
        TestClient(create_app(make_settings(watermark_secret=other))),
    ):
        pass
    # Demo mode warns and starts.
    with TestClient(create_app(make_settings(watermark_secret=other, demo=True))):
        pass


def test_slots_are_distinct_and_a_full_bank_is_refused(
    api: ApiHelper, client: TestClient, database_url: str
) -> None:
    keys = [api.user_with_key(scopes=["alpha"])[1] for _ in range(3)]
    db = Database(database_url)
    try:
        with db.session() as s:
            slots = [w.slot for w in crud_watermarks.issued_watermarks(s)]
        assert sorted(slots) == [0, 1, 2]
        with db.write() as s, pytest.raises(crud_watermarks.WatermarkBankFull, match="all 3 watermarks"):
            key = ApiKey(  # a fourth key, with a bank of three
                user_id=keys[0]["user_id"], prefix="sdb_full", key_hash="f" * 64, scopes=[], samples_used=0
            )
            s.add(key)
            s.flush()
            crud_watermarks.set_key_watermark(s, key, True, watermark_id=lambda i, p: "wm-x", bank_size=3)
    finally:
        db.dispose()


def test_the_class_pattern_starts_at_the_keys_pattern_after_th_sample(
    make_settings: Any, tmp_path: Path, database_url: str
) -> None:
    """A box whose watermark configuration has the class pattern from a key's 100th sample on: a key that
    was served 80 samples gets the pattern on rows 20 onward of a 64-row call (the top-1 probability of
    every row as without it), and on every row once it was served 100."""
    from dataclasses import asdict

    from sdb_core.artifact import make_test_box
    from sdb_core.watermark import CONFIG_KEY, WatermarkConfig
    from service.main import create_app

    make_test_box(
        tmp_path, name="gamma", seed=3, extra={CONFIG_KEY: asdict(WatermarkConfig(pattern_after=100))}
    )
    db = Database(database_url)

    def served(key_id: int, n: int) -> None:
        with db.write() as s:
            s.get(ApiKey, key_id).samples_used = n  # type: ignore[union-attr]

    with TestClient(create_app(make_settings(model_dir=tmp_path, default_model="gamma"))) as client:
        api = ApiHelper(client)
        _, key, headers = api.user_with_key(scopes=["gamma"])
        answers = {}
        for before in (0, 80, 100):
            served(key["id"], before)
            answers[before] = np.asarray(
                distill(client, headers, model="gamma")["soft_labels"], dtype=np.float64
            )
    top = answers[0].argmax(1)[:, None]
    for before, first in ((80, 20), (100, 0)):
        a, b = answers[0], answers[before]
        np.testing.assert_array_equal(b.argmax(1), a.argmax(1))
        np.testing.assert_allclose(np.take_along_axis(b, top, 1), np.take_along_axis(a, top, 1), atol=1e-6)
        np.testing.assert_allclose(b[:first], a[:first], atol=1e-7)
        moved = np.abs(b[first:] - a[first:]).max(1) > 1e-4
        # an untrained box's soft labels have narrow leads: rows the pattern would reorder stay unmoved
        assert moved.mean() > 0.25, moved.mean()
    db.dispose()
