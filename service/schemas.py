"""The request and response models of the inference and auth API, and a fast JSON response (the admin
API's models are in service.schemas_admin).

The routes parse bodies themselves (service.inference.decode) so that `.npy` inputs never become Python
lists; these models validate the JSON form and document both forms in the OpenAPI schema.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.outputs import MAX_TEMPERATURE, MIN_TEMPERATURE

NPY_MEDIA_TYPE = "application/x-npy"
_EXAMPLE_ROW: list[Any] = [[0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0]]


def _example_b64() -> str:
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 1, 8, 8), dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


class InputsBody(BaseModel):
    """Inputs as a nested JSON list, or as a base64-encoded float32 `.npy` array (faster, exact): exactly one
    of the two, which `service.decode.decode_inputs` checks (422).

    Strict: a JSON `true` is not the number 1 and "4" is not 4 (the query parameters of a raw `.npy` request,
    text by nature, are validated with strict=False).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None, min_length=1, max_length=128, description="Model name; the default model when omitted."
    )
    inputs: list[Any] | None = Field(
        None, description="Nested list of numbers, shape [N, *input_shape] (or [N, prod(input_shape)])."
    )
    inputs_b64: str | None = Field(
        None, description="Base64 of a `.npy` file holding a float32 array of shape [N, *input_shape]."
    )


class PredictRequest(InputsBody):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "demo", "inputs": [[_EXAMPLE_ROW * 8]], "top_k": 3}]},
    )

    top_k: int | None = Field(None, ge=1, le=1000, description="Also return the k most probable classes.")


class DistillRequest(InputsBody):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "demo", "inputs_b64": _example_b64(), "temperature": 4.0}]},
    )

    temperature: float | None = Field(
        None,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Softmax temperature; the model's distillation temperature if omitted.",
    )


class TopClass(BaseModel):
    label: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    label: int = Field(description="Top-1 class index.")
    class_name: str
    probabilities: list[float] = Field(description="The plain path's softmax over all classes.")
    top_k: list[TopClass] | None = None


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "demo",
                    "version": "1",
                    "predictions": [
                        {
                            "label": 3,
                            "class_name": "3",
                            "probabilities": [0.01, 0.01, 0.02, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
                            "top_k": [{"label": 3, "class_name": "3", "probability": 0.9}],
                        }
                    ],
                }
            ]
        }
    )

    model: str
    version: str
    predictions: list[Prediction]


class DistillResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "demo",
                    "version": "1",
                    "temperature": 4.0,
                    "soft_labels": [[0.05, 0.05, 0.1, 0.4, 0.05, 0.05, 0.1, 0.05, 0.1, 0.05]],
                    "logits": [[-1.2, -1.1, 1.3, 6.8, -0.9, -1.0, 1.1, -1.3, 1.4, -1.2]],
                }
            ]
        }
    )

    model: str
    version: str
    temperature: float
    soft_labels: list[list[float]] = Field(description="softmax(logits / temperature) of the keyed path.")
    logits: list[list[float]] = Field(description="The keyed path's logits.")


class ErrorResponse(BaseModel):
    detail: Any = Field(description="What was wrong with the request.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        404: "Unknown model.",
        413: "Body larger than SDB_MAX_BODY_BYTES.",
        415: "Content type other than application/json or application/x-npy.",
        422: "Invalid inputs: shape, dtype, non-finite values, empty or oversized batch, bad encoding.",
        429: "Rate limit exceeded (see Retry-After).",
        503: "Overloaded or past the inference deadline (see Retry-After).",
    }.items()
}


def request_body_openapi(schema: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a body that the route reads itself: JSON (schema) or raw `.npy`."""
    json_schema = schema.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_schema},
                NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


class FastJSONResponse(Response):
    """JSON via orjson; numpy arrays are serialized directly (no Python lists)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def quota_headers(quota: int | None, used: int | None) -> dict[str, str]:
    """The X-Quota-* headers of a /distill-batch answer (200, or 429 once the quota is spent)."""
    if quota is None:
        return {
            "X-Quota-Limit": "unlimited",
            "X-Quota-Remaining": "unlimited",
            "X-Quota-Used": str(used or 0),
        }
    used = used or 0
    return {
        "X-Quota-Limit": str(quota),
        "X-Quota-Used": str(used),
        "X-Quota-Remaining": str(max(0, quota - used)),
    }


# ------------------------------------------------------------------------------------------------ auth


class TokenResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "access_token": "eyJhbGciOiJIUzI1NiIs...",
                    "token_type": "bearer",
                    "expires_in": 900,
                    "scope": "demo",
                }
            ]
        }
    )

    access_token: str = Field(description="JWT (HS256) for `Authorization: Bearer`.")
    token_type: str = Field("bearer")
    expires_in: int = Field(description="Seconds until the token expires.")
    scope: str = Field(description="Space-separated model names the token may distill.")


class TokenRequestJSON(BaseModel):
    grant_type: str | None = Field("client_credentials", examples=["client_credentials"])
    api_key: str | None = Field(None, description="The API key (alias: client_secret).")
    client_secret: str | None = Field(None, description="The API key.")
    scope: str | None = Field(None, description="Optional: a space-separated subset of the key's scopes.")


class OwnKeyOut(BaseModel):
    id: int
    name: str | None
    prefix: str = Field(description="The key's first characters, to recognize it (not a secret).")
    scopes: list[str] = Field(description="The models this token may distill (`*`: all).")
    sample_quota: int | None = Field(description="Samples the key may pull in total; null = unlimited.")
    samples_used: int
    samples_remaining: int | None = Field(description="Samples left; null = unlimited.")
    expires_at: datetime | None
