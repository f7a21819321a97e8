"""Each watermarked key's own images (service/watermarks/samples.py), in process, on SQLite and PostgreSQL:
the service keeps the SDB_LICENSEE_IMAGES images of smallest keyed rank that a watermarked key sent per model
(a bottom-k sample: bounded, order-free, a resent image kept once), nothing for unwatermarked keys, /predict
or SDB_LICENSEE_IMAGES=0; and POST /admin/trace tests a key on them, which finds a student that carries the
mark only on the images it was taught on, where the owner's probe images find nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from sdb_core.trace import TraceConfig
from service.crud import licensee_images as crud
from service.crud.watermarks import issued_watermarks
from service.db.models import LicenseeImage, utcnow
from service.main import create_app
from service.watermarks.samples import images_of
from service.watermarks.tracing import keyed_reference, probe_images, run_trace
from tests._support.api import ApiHelper
from tests._support.suspects import memorising_student, predict_endpoint


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def _send(client: TestClient, headers: dict[str, str], x: np.ndarray, path: str = "/distill-batch") -> None:
    r = client.post(path, json={"model": "alpha", "inputs": x.tolist()}, headers=headers)
    assert r.status_code == 200, r.text


def _kept_ranks(state: Any, key_id: int, model: str = "alpha") -> list[int]:
    with state.db.session() as s:
        return sorted(
            s.scalars(
                select(LicenseeImage.rank).where(
                    LicenseeImage.api_key_id == key_id, LicenseeImage.model == model
                )
            )
        )


def test_a_watermarked_key_keeps_a_bounded_keyed_sample_of_what_it_sent(make_settings: Any) -> None:
    with TestClient(create_app(make_settings(licensee_images=40))) as client:
        api = ApiHelper(client)
        state = client.app.state.sdb  # type: ignore[attr-defined]
        _, key, headers = api.user_with_key(scopes=["alpha"])
        _, plain, plain_headers = api.user_with_key(scopes=["alpha"], watermark=False)
        batches = [_images(seed, 64) for seed in range(3)]
        for x in batches:
            _send(client, headers, x)
            _send(client, plain_headers, x)
            _send(client, {}, x, "/predict")
        sent = np.concatenate(batches)
        ranks = state.licensee_images.ranks(sent)
        assert _kept_ranks(state, key["id"]) == sorted(ranks.tolist())[:40]  # the 40 smallest of all sent
        _send(client, headers, batches[1])  # resent: nothing changes
        assert _kept_ranks(state, key["id"]) == sorted(ranks.tolist())[:40]
        assert _kept_ranks(state, plain["id"]) == []  # no mark, nothing kept; /predict keeps nothing
        with state.db.session() as s:
            assert s.scalar(select(func.count()).select_from(LicenseeImage)) == 40
        kept = images_of(state.db, [key["id"], plain["id"]], "alpha", (1, 8, 8), 100)
        assert list(kept) == [key["id"]] and kept[key["id"]].shape == (40, 1, 8, 8)
        by_rank = dict(zip(ranks.tolist(), sent, strict=True))
        np.testing.assert_array_equal(kept[key["id"]], np.stack([by_rank[r] for r in sorted(by_rank)[:40]]))
        # The same images in another order, to another model's sample: the same ones are kept.
        with state.db.write() as s:
            for part in np.array_split(np.arange(len(sent))[::-1], 5):
                crud.offer(s, key["id"], "other", sent[part], ranks[part], 40)
        assert _kept_ranks(state, key["id"], "other") == _kept_ranks(state, key["id"])


def test_none_kept_when_turned_off(make_settings: Any) -> None:
    with TestClient(create_app(make_settings(licensee_images=0))) as client:
        api = ApiHelper(client)
        _, key, headers = api.user_with_key(scopes=["alpha"])
        _send(client, headers, _images(0, 16))
        assert _kept_ranks(client.app.state.sdb, key["id"]) == []  # type: ignore[attr-defined]


def test_a_trace_probes_each_key_with_its_own_images(make_settings: Any) -> None:
    settings = make_settings(
        trace_allowed_hosts=["127.0.0.1"], trace_probe_data="digits", licensee_images=300
    )
    with TestClient(create_app(settings)) as client:
        api = ApiHelper(client)
        state = client.app.state.sdb  # type: ignore[attr-defined]
        keys = [api.user_with_key(scopes=["alpha"]) for _ in range(4)]
        sent = [_images(10 + i, 300) for i in range(4)]
        for (_, _, headers), x in zip(keys, sent, strict=True):
            for part in np.array_split(x, 3):
                _send(client, headers, part)
        leaker = keys[2][1]
        served = state.models.get("alpha")
        with state.db.session() as s:
            issued = issued_watermarks(s)
        w = next(w for w in issued if w.key_id == leaker["id"])
        wm = state.watermarks.watermark(w.key_id, w.prefix, w.slot, served)
        # a student that memorised its transfer set and learned nothing else
        student = memorising_student(wm, sent[2], keyed_reference(served.box.keyed_logits))
        with predict_endpoint(student) as url:
            body = {"model": "alpha", "suspect_url": url, "probes": 1500, "decoys": 200}
            r = client.post("/admin/trace", json=body, headers=api.admin)
        assert r.status_code == 200, r.text
        report = r.json()
        top = report["keys"][0]
        assert top["key_id"] == leaker["id"] and top["verdict"] == "match" and top["corrected_p"] < 1e-6
        assert [m["key_id"] for m in report["matches"]] == [leaker["id"]]
        assert {k["own_images"] for k in report["keys"]} == {300}  # 4 own sets of a 1,500-probe budget
        assert report["probes"] == 1200
        # The owner's probe images alone (no image of the key's own): nothing to find.
        fresh = run_trace(
            suspect=student,
            reference=keyed_reference(served.box.keyed_logits),
            probes=probe_images(_images(99, 1500), 1500, 0),
            issued=issued,
            marks=state.watermarks,
            model=served,
            cfg=TraceConfig(probes=1500, decoys=200),
            now=utcnow(),
            decoy_secret=b"d",
        )
        assert fresh["matches"] == [] and {k["own_images"] for k in fresh["keys"]} == {0}
