"""Property-based fuzz of the OpenAPI schema, in process (schemathesis `from_asgi`).

Every operation gets positive (schema-valid) and negative (schema-violating) data, sent with a valid
token of the right role; the checks are: no 5xx, responses match their documented schema, and a route
that declares authentication refuses the same request without it or with a wrong token (ignored_auth).
Examples per operation: SDB_FUZZ_EXAMPLES (default 25); the seed is fixed, so a failure replays.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import ignored_auth, not_a_server_error, response_schema_conformance
from schemathesis.generation import GenerationMode
from sqlalchemy import Engine, update

from service.core.config import Settings
from service.core.security import TokenConfig, issue_token, new_api_key
from service.crud import accounts
from service.db.models import ROLE_ADMIN, ROLE_USER, ApiKey, User
from service.db.session import Database
from service.main import create_app
from tests._support.boxes import MODEL
from tests._support.db import run_migrations
from tests._support.server import JWT_SECRET

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SDB_FUZZ_EXAMPLES", "25"))
SEED = 20260601


@dataclass
class FuzzContext:
    engine: Engine
    admin_headers: dict[str, str]
    user_headers: dict[str, str]

    def headers_for(self, path: str) -> dict[str, str]:
        if path.startswith("/admin"):
            return self.admin_headers
        if path == "/distill-batch":
            return self.user_headers
        return {}

    def reset(self) -> None:
        """Undo what fuzzed admin calls may have done to the fuzzer's own principals."""
        with self.engine.begin() as c:
            c.execute(update(ApiKey).values(revoked_at=None, expires_at=None, samples_used=0))
            c.execute(update(User).values(disabled=False, disabled_at=None))


def _principal(db: Database, cfg: TokenConfig, name: str, role: str, scopes: list[str]) -> dict[str, str]:
    key = new_api_key()
    with db.write() as s:
        user = accounts.create_user(s, name, role)
        row = accounts.create_api_key(
            s, user, prefix=key.prefix, digest=key.digest, scopes=scopes, sample_quota=None, expires_at=None
        )
        user_id, key_id = user.id, row.id
    # Tokens outlive the whole fuzz run; they are re-checked against the database on every request.
    token, _ = issue_token(cfg, user_id=user_id, key_id=key_id, scopes=scopes)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def fuzz_context(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzContext]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    run_migrations(url)
    settings = Settings(
        database_url=url,
        model_dir=model_dir,
        default_model=MODEL,
        device="cpu",
        jwt_secret=JWT_SECRET,
        predict_rate_per_minute=0,
        distill_rate_per_minute=0,
        max_request_samples=64,
        max_body_bytes=256 * 1024,
        log_level="WARNING",
    )
    cfg = TokenConfig(JWT_SECRET, settings.jwt_issuer, settings.jwt_audience, settings.token_ttl_seconds)
    db = Database(url)
    ctx = FuzzContext(
        engine=db.engine,
        admin_headers=_principal(db, cfg, "fuzz-admin", ROLE_ADMIN, []),
        user_headers=_principal(db, cfg, "fuzz-user", ROLE_USER, [MODEL]),
    )
    app = create_app(settings)
    ctx.app = app  # type: ignore[attr-defined]
    yield ctx
    db.dispose()


@pytest.fixture(scope="module")
def api_schema(fuzz_context: FuzzContext) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_context.app)  # type: ignore[attr-defined]
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES, deterministic=True
    )
    return schema


def _fuzz_operation(operation: Any, mode: GenerationMode, ctx: FuzzContext) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # report the first failure unshrunk
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.seed(SEED)
    def run(case: Any) -> None:
        try:
            case.call_and_validate(
                headers=ctx.headers_for(case.path),
                checks=[not_a_server_error, response_schema_conformance, ignored_auth],
            )
        finally:
            ctx.reset()

    run()


def test_openapi_fuzz(api_schema: Any, fuzz_context: FuzzContext) -> None:
    """schemathesis' pytest plugin (lazy schemas) does not run on pytest 9, so operations are driven here."""
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(operation, mode, fuzz_context)
            except hypothesis.errors.Unsatisfiable:
                # Nothing to violate (no parameters, no body): no negative case exists.
                if mode is GenerationMode.POSITIVE:
                    raise
            except (Exception, BaseExceptionGroup) as exc:  # a failed check: fuzz the other operations too
                failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}]: {exc}"[:3000])
    assert operations >= 15, "the schema lost operations?"
    assert not failures, "\n\n".join(failures)
