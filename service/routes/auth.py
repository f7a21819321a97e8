"""POST /auth/token: exchange an API key for a short-lived access token (OAuth2 client credentials).

The API key is the client secret. It is accepted as a form field (`grant_type=client_credentials`,
`client_secret=<key>`), as HTTP Basic credentials (RFC 6749 2.3.1, the key as password), or as JSON
(`{"api_key": "<key>"}`). Every failure answers the same 401 body, whatever was wrong with the key.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from service.core.security import issue_token
from service.core.state import get_state
from service.crud.principals import unknown_scopes, unknown_scopes_message
from service.crud.tokens import ExchangeRefused, exchange_api_key
from service.observability import metrics
from service.schemas import TokenRequestJSON, TokenResponse

router = APIRouter(tags=["auth"])

FORM = "application/x-www-form-urlencoded"
INVALID_CLIENT = "invalid API key"
BASIC_HEADERS = {"WWW-Authenticate": 'Basic realm="sdb"'}


_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            FORM: {
                "schema": {
                    "type": "object",
                    "required": ["grant_type", "client_secret"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": ["client_credentials"]},
                        "client_id": {"type": "string", "description": "Ignored (the key identifies you)."},
                        "client_secret": {"type": "string", "description": "Your API key (sdb_...)."},
                        "scope": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": TokenRequestJSON.model_json_schema()},
        },
    }
}


def _bad_request(error: str, detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail={"error": error, "message": detail})


def _invalid_client() -> HTTPException:
    metrics.record_auth_failure("invalid_api_key")
    return HTTPException(
        status_code=401, detail={"error": "invalid_client", "message": INVALID_CLIENT}, headers=BASIC_HEADERS
    )


def _fields(content_type: str, body: bytes, authorization: str | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    if authorization and authorization.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise _bad_request("invalid_request", "malformed Basic credentials") from None
        _, _, secret = decoded.partition(":")
        fields["client_secret"] = secret
    if not body:
        return fields
    if content_type == FORM:
        try:
            parsed = parse_qs(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, max_num_fields=10
            )
        except (UnicodeDecodeError, ValueError):
            raise _bad_request("invalid_request", "malformed form body") from None
        for k, v in parsed.items():
            if len(v) != 1:
                raise _bad_request("invalid_request", f"parameter {k[:40]!r} given more than once")
            fields[k] = v[0]
    elif content_type == "application/json" or content_type.endswith("+json"):
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise _bad_request("invalid_request", "malformed JSON body") from None
        except RecursionError:  # json.loads recurses once per nesting level
            raise _bad_request("invalid_request", "malformed JSON body: nested too deeply") from None
        if not isinstance(data, dict) or not all(isinstance(v, str | None) for v in data.values()):
            raise _bad_request("invalid_request", "the JSON body must be an object of strings")
        fields.update({k: v for k, v in data.items() if v is not None})
    else:
        raise HTTPException(status_code=415, detail=f"send {FORM} or application/json")
    return fields


@router.post(
    "/auth/token",
    response_model=TokenResponse,
    summary="Exchange an API key for a short-lived access token",
    openapi_extra=_OPENAPI_BODY,
    responses={
        400: {"description": "Malformed request or unsupported grant type."},
        401: {"description": "Unknown, revoked or expired API key, or disabled user."},
        415: {"description": "Unsupported content type."},
    },
)
async def token(request: Request) -> TokenResponse:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    fields = _fields(content_type, await request.body(), request.headers.get("authorization"))
    grant_type = fields.get("grant_type", "client_credentials")
    if grant_type != "client_credentials":
        raise _bad_request("unsupported_grant_type", "only grant_type=client_credentials is supported")
    secret = fields.get("client_secret") or fields.get("api_key")
    if not secret:
        raise _bad_request("invalid_request", "client_secret (your API key) is required")
    requested = fields.get("scope")
    state = get_state(request)
    if requested is not None:  # checked like the body's syntax, before the key (the model names are public)
        unknown = unknown_scopes(requested.split(), state.models.names())
        if unknown:
            raise _bad_request("invalid_scope", unknown_scopes_message(unknown, state.models.names()))
    client = state.client_ids.anonymous_id(request)
    try:
        grant = await run_in_threadpool(exchange_api_key, state.db, secret, requested, client)
    except ExchangeRefused as exc:
        if exc.reason == "invalid_scope":
            raise _bad_request("invalid_scope", "the key does not hold every requested scope") from None
        raise _invalid_client() from None
    access, lifetime = issue_token(
        state.tokens,
        user_id=grant.user_id,
        key_id=grant.key_id,
        scopes=grant.scopes,
        expires_at=grant.expires_at.timestamp() if grant.expires_at else None,
    )
    return TokenResponse(
        access_token=access, token_type="bearer", expires_in=lifetime, scope=" ".join(grant.scopes)
    )
