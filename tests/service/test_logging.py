"""uvicorn's access log never shows a query string, where a careless client may have put a token."""

from __future__ import annotations

import logging

import pytest

from service.main import create_app


def test_access_log_drops_query_strings(settings: object, caplog: pytest.LogCaptureFixture) -> None:
    create_app(settings)  # type: ignore[arg-type]
    access = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000",
            "POST",
            "/distill-batch?access_token=eyJhbGciOiJIUzI1NiJ9.secret.sig",
            "1.1",
            401,
        )
    assert '"POST /distill-batch HTTP/1.1" 401' in caplog.text
    assert "access_token" not in caplog.text and "secret" not in caplog.text
