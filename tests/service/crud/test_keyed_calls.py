"""KeyedCall, the audit lifecycle of a keyed call, used by a route other than /distill-batch: its rows carry
that route's endpoint, a failed block gives the samples back, a refusal is audited, and the sweep releases
its stale reservations like /distill-batch's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from service.core.security import TokenClaims, new_api_key
from service.crud import accounts, quota
from service.crud.audits import STATUS_RELEASED
from service.crud.keyed_calls import KeyedCall
from service.crud.quota import DistillDenied
from service.db.session import Database
from tests._support.db import audit_rows

ENDPOINT = "/v2/models/alpha/infer"


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


def _key(db: Database, quota_: int | None = 10) -> TokenClaims:
    new = new_api_key()
    with db.write() as s:
        user = accounts.create_user(s, "licensee", "user")
        key = accounts.create_api_key(
            s,
            user,
            prefix=new.prefix,
            digest=new.digest,
            scopes=["alpha"],
            sample_quota=quota_,
            expires_at=None,
        )
        now = int(time.time())
        return TokenClaims(user.id, key.id, frozenset({"alpha"}), now, now + 600)


def _used(db: Database, key_id: int) -> int:
    with db.session() as s:
        return accounts.get_key(s, key_id).samples_used


def _x(n: int) -> np.ndarray:
    return np.zeros((n, 1, 8, 8), dtype=np.float32)


def test_a_settled_call_is_audited_under_its_own_endpoint(db: Database, database_url: str) -> None:
    claims = _key(db)

    async def call() -> None:
        keyed = KeyedCall(db, "client-1", endpoint=ENDPOINT)
        async with keyed.reserved(claims, model="alpha", x=_x(4), rate_per_minute=0) as grant:
            assert (grant.n_samples, grant.used) == (4, 4)
            await keyed.settle(200)

    asyncio.run(call())
    rows = audit_rows(database_url, "api_key_id = :k", {"k": claims.key_id})
    assert [(r.endpoint, r.status, r.n_samples) for r in rows] == [(ENDPOINT, 200, 4)]
    assert rows[0].input_digest is not None and _used(db, claims.key_id) == 4


def test_a_block_that_fails_unsettled_gives_the_samples_back(db: Database, database_url: str) -> None:
    claims = _key(db)

    async def call() -> None:
        async with KeyedCall(db, None, endpoint=ENDPOINT).reserved(
            claims, model="alpha", x=_x(3), rate_per_minute=0
        ):
            raise RuntimeError("the forward pass failed")

    with pytest.raises(RuntimeError):
        asyncio.run(call())
    rows = audit_rows(database_url, "api_key_id = :k", {"k": claims.key_id})
    assert [(r.endpoint, r.status) for r in rows] == [(ENDPOINT, 500)]
    assert _used(db, claims.key_id) == 0


def test_refusals_are_audited_under_the_endpoint(db: Database, database_url: str) -> None:
    claims = _key(db, quota_=2)

    async def calls() -> None:
        await KeyedCall(db, "client-2", endpoint=ENDPOINT).reject(422, claims, "alpha")
        with pytest.raises(DistillDenied) as denied:
            async with KeyedCall(db, "client-2", endpoint=ENDPOINT).reserved(
                claims, model="alpha", x=_x(5), rate_per_minute=0
            ):
                pass
        assert denied.value.reason == "quota"

    asyncio.run(calls())
    rows = audit_rows(database_url, "api_key_id = :k", {"k": claims.key_id})
    assert [(r.endpoint, r.status, r.n_samples) for r in rows] == [(ENDPOINT, 422, 0), (ENDPOINT, 429, 0)]


def test_the_sweep_releases_a_stale_reservation_of_any_keyed_endpoint(
    db: Database, database_url: str
) -> None:
    claims = _key(db)
    grant = quota.reserve_distill(
        db,
        claims,
        model="alpha",
        n_samples=4,
        client_id=None,
        digest=None,
        rate_per_minute=0,
        endpoint=ENDPOINT,
    )
    assert _used(db, claims.key_id) == 4
    assert quota.release_stale_reservations(db, older_than_s=60, now=time.time() + 120) == 1
    assert _used(db, claims.key_id) == 0
    with pytest.raises(quota.ReservationReleased):
        quota.finalize_distill(db, grant, status=200, latency_ms=1.0)
    rows = audit_rows(database_url, "api_key_id = :k", {"k": claims.key_id})
    assert [(r.endpoint, r.status) for r in rows] == [(ENDPOINT, STATUS_RELEASED)]
