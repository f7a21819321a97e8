"""Pydantic models of the protocol's bodies, for the OpenAPI schema (the routes parse bodies themselves)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.oip.protocol import HEADER_LENGTH


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch dimension.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInputTensor(BaseModel):
    name: str = Field(description="`input`.")
    shape: list[int] = Field(description="[N, *input_shape] or [N, prod(input_shape)].")
    datatype: str = Field(
        description="FP32 (or FP64, FP16, INT8..INT64, UINT8..UINT64; converted to float32)."
    )
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: the tensor's bytes follow the JSON header (binary extension)."
    )
    data: list[Any] | None = Field(None, description="Row-major values, flat or nested.")


class RequestedOutputTensor(BaseModel):
    name: str = Field(
        description="label, class_name, probabilities (anyone); soft_labels, logits (a bearer token with the "
        "model in its scope)."
    )
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data` (bool); `classification` (k: top-k as value:index:class_name)."
    )


class InferRequestBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}],
                    "outputs": [
                        {"name": "label"},
                        {"name": "probabilities", "parameters": {"classification": 3}},
                    ],
                }
            ]
        }
    )

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output` (bool); `temperature` (keyed outputs only)."
    )
    inputs: list[InferInputTensor]
    outputs: list[RequestedOutputTensor] | None = Field(
        None, description="Omitted: the plain outputs (label, class_name, probabilities)."
    )


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` for binary tensor data.")
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="`temperature` of keyed answers.")
    outputs: list[OutputTensor]


class ProtocolError(BaseModel):
    error: str = Field(description="What was wrong.")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ProtocolError, "description": text}
    for code, text in {
        400: "Not a valid protocol request: JSON, fields, datatype, shape against the data, binary sizes.",
        401: "Keyed outputs without a valid bearer token.",
        403: "The token's scopes do not include this model.",
        404: "Unknown model or version.",
        413: "Body, declared tensor or batch over the limits.",
        415: "Content-Encoding other than gzip, deflate or identity.",
        422: "Inputs that do not fit the model: its input shape, NaN or infinite values.",
        429: "Rate limit or sample quota (see Retry-After, X-Quota-*).",
        503: "Overloaded, past the inference deadline, database unavailable, or no model loaded.",
    }.items()
}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def infer_openapi(versioned: bool) -> dict[str, Any]:
    """`openapi_extra` of the infer routes, which read their body, path and token themselves."""
    params = [_path_param("name", "The model's name.")]
    if versioned:
        params.append(_path_param("version", "The model's version (404 unless the served one)."))
    params.append(
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "Length of the JSON header when binary tensor data follows it.",
        }
    )
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": InferRequestBody.model_json_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"The JSON header ({HEADER_LENGTH} bytes), then the binary tensor data.",
                },
            },
        },
        "parameters": params,
        "security": [{}, {"BearerJWT": []}],  # anonymous for the plain outputs, a token for the keyed ones
    }
