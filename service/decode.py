"""The one decoder of /predict and /distill-batch bodies: validated float32 arrays [N, *input_shape].

Three forms: JSON `{"inputs": [...]}` (small requests), JSON `{"inputs_b64": "<base64 .npy>"}` and a raw
`application/x-npy` body with the other fields as query parameters. `.npy` data is parsed by reading the
header and viewing the bytes (np.frombuffer): no pickle, no Python lists, no allocation trusted to a header
that lies about its size. Every problem is an HTTPException with a 4xx status and a message naming it.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from urllib.parse import parse_qsl

import numpy as np
from fastapi import HTTPException, Request
from pydantic import ValidationError

from service.inference.registry import ModelRegistry, ServedModel
from service.schemas import NPY_MEDIA_TYPE, InputsBody

M = TypeVar("M", bound=InputsBody)

_MAX_NPY_HEADER = 10_000
# scope["state"] key: the name of the served model a request was resolved to, set by `resolve_model`; the
# request metrics (MetricsMiddleware) and the audit row of a refused call read it.
MODEL_KEY = "sdb_model"
_JSON_TYPES = ("application/json",)
# Checked here rather than by a schema validator: the decoder is where the two forms part ways.
_ONE_INPUT = "Value error, give exactly one of `inputs` and `inputs_b64`"


@dataclass
class DecodedRequest(Generic[M]):
    params: M  # the validated request fields (inputs dropped: use `x`)
    model: ServedModel
    x: np.ndarray  # float32, C-contiguous, writable, finite, shape [N, *model.input_shape]


def _unprocessable(detail: Any) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


# The header np.save writes: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 8, 8), }
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?f[248])', 'fortran_order': (True|False), 'shape': \(((?:\d+, ?)*\d*)\), \} *\n"
)


_DTYPES: dict[bytes, np.dtype[Any]] = {}

# A shape dimension of 19 or more digits is never a real batch; refusing it up front also keeps numbers past
# Python's int/str conversion limit (4,300 digits: ValueError) out of int() and out of error messages.
_HUGE_INT = re.compile(rb"\d{19}")


def _refuse_huge_shape(data: bytes) -> None:
    """422 when the .npy header (1.0: a 2-byte length, 2.0/3.0: 4 bytes) holds an integer of 19+ digits."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        return
    if data[6] == 1:
        start, (length,) = 10, struct.unpack_from("<H", data, 8)
    elif len(data) >= 12:
        start, (length,) = 12, struct.unpack_from("<I", data, 8)
    else:
        return
    if _HUGE_INT.search(data, start, start + min(length, 1 << 16)):  # numpy's parser reads 10,000 at most
        raise _unprocessable(
            "inputs are not a valid .npy array: its shape holds a dimension of 19 or more digits"
        )


def _fast_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int] | None:
    """np.save's own float header (format 1.0), parsed without ast.literal_eval; None for anything else."""
    if len(data) < 10 or data[:8] != b"\x93NUMPY\x01\x00":
        return None
    (length,) = struct.unpack_from("<H", data, 8)
    m = _NPY_HEADER.fullmatch(data, 10, 10 + length)
    if m is None:
        return None
    shape = tuple(int(d) for d in m.group(3).replace(b" ", b"").split(b",") if d)
    descr = m.group(1)
    dtype = _DTYPES.get(descr)
    if dtype is None:
        dtype = _DTYPES[descr] = np.dtype(descr.decode())  # bounded: the regex admits a few float codes
    return shape, m.group(2) == b"True", dtype, 10 + length


def parse_npy(data: bytes) -> np.ndarray:
    """Parse the bytes of a `.npy` file (format 1.0 or 2.0) without pickle and without trusting its header."""
    _refuse_huge_shape(data)
    fast = _fast_header(data)
    if fast is not None:
        shape, fortran, dtype, offset = fast
        return _npy_view(data, shape, fortran, dtype, offset)
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=_MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:  # numpy's header parser also raises tokenize.TokenError, TypeError...
        raise _unprocessable(f"inputs are not a valid .npy array: {exc}") from None
    if not all(type(d) is int and d >= 0 for d in shape):  # e.g. (True, 1, 8, 8) passes numpy's own check
        raise _unprocessable("inputs are not a valid .npy array: its shape must hold non-negative integers")
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _unprocessable("inputs .npy must hold a float32 array, not objects or records (no pickle)")
    if dtype.kind != "f":
        raise _unprocessable(f"inputs .npy must hold float32 values, got dtype {dtype.name}")
    return _npy_view(data, shape, fortran, dtype, buf.tell())


def _npy_view(
    data: bytes, shape: tuple[int, ...], fortran: bool, dtype: np.dtype[Any], offset: int
) -> np.ndarray:
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(data) - offset != expected:
        # never str() a product of many dimensions: past 4,300 digits that raises ValueError
        announced = f"{expected} bytes" if expected < 2**63 else "more than 2**63 bytes"
        raise _unprocessable(
            f"inputs .npy is truncated or padded: its header announces {announced} of data, "
            f"the body holds {len(data) - offset}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_b64_npy(text: str) -> np.ndarray:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _unprocessable("inputs_b64 is not valid base64") from None
    return parse_npy(data)


def json_to_array(inputs: list[Any], max_samples: int) -> np.ndarray:
    if len(inputs) > max_samples:
        raise _unprocessable(f"batch of {len(inputs)} samples is over the limit of {max_samples}")
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise _unprocessable("inputs must be a rectangular nested list of numbers") from None
    if arr.size and arr.dtype.kind not in "fiu":
        raise _unprocessable("inputs must hold only numbers (no strings, booleans, nulls or objects)")
    return arr


def _expected(input_shape: tuple[int, ...]) -> str:
    return "[N, " + ", ".join(str(d) for d in input_shape) + "]"


def validate_batch(arr: np.ndarray, input_shape: tuple[int, ...], max_samples: int) -> np.ndarray:
    """Check and convert to a float32 batch [N, *input_shape]; accepts flat rows [N, prod(input_shape)]."""
    if arr.ndim == 0:
        raise _unprocessable(f"inputs must be a batch of shape {_expected(input_shape)}, got a scalar")
    if arr.size == 0 or arr.shape[0] == 0:
        raise _unprocessable("empty batch: send at least one sample")
    if arr.shape[0] > max_samples:
        raise _unprocessable(f"batch of {arr.shape[0]} samples is over the limit of {max_samples}")
    if tuple(arr.shape[1:]) != tuple(input_shape):
        if arr.ndim == 2 and arr.shape[1] == math.prod(input_shape):
            arr = arr.reshape((arr.shape[0], *input_shape))
        else:
            got = "[" + ", ".join(str(d) for d in arr.shape) + "]"
            raise _unprocessable(f"inputs must have shape {_expected(input_shape)}, got {got}")
    if arr.dtype == np.float32:  # no cast, so nothing can overflow: skip the errstate context
        x = np.ascontiguousarray(arr)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.ascontiguousarray(arr, dtype=np.float32)
    if not x.flags.writeable:
        x = x.copy()
    if not np.isfinite(x).all():
        raise _unprocessable("inputs contain NaN or infinite values (or values too large for float32)")
    return x


def resolve_model(request: Request, name: str | None, registry: ModelRegistry) -> ServedModel:
    """The served model `name` (the default when None); 404 naming the loaded ones if unknown."""
    key = registry.default_name if name is None else name
    model = registry.by_name.get(key) if key is not None else None  # a lookup: no method call per request
    if model is None:
        if not registry.by_name:
            raise HTTPException(status_code=503, detail="no model is loaded", headers={"Retry-After": "5"})
        raise HTTPException(status_code=404, detail=f"unknown model {name!r}; available: {registry.names()}")
    request.scope.setdefault("state", {})[MODEL_KEY] = model.name
    return model


def request_model(scope: MutableMapping[str, Any]) -> str | None:
    """The model that `resolve_model` resolved this request to (None before, or when it failed): the
    request metrics and the audit row of a refused call name it."""
    name = (scope.get("state") or {}).get(MODEL_KEY)
    return str(name) if name is not None else None


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def decode_inputs(
    request: Request, schema: type[M], registry: ModelRegistry, allowed_query: tuple[str, ...]
) -> DecodedRequest[M]:
    """Read, parse and validate the request's inputs for `schema` (PredictRequest or DistillRequest).

    The query parameters (only `allowed_query` names) hold the fields of a raw `.npy` request and a fallback
    `model` for JSON; they are validated by the same schema as the body fields.
    """
    media_type = _media_type(request)
    query: dict[str, Any] = dict(query_fields(request, allowed_query))
    max_samples = registry.max_request_samples
    if query:  # validated (and typed) by the same schema as the body fields
        try:
            typed = schema.model_validate({**query, "inputs": []}, strict=False)
        except ValidationError as exc:
            raise _unprocessable(_validation_detail(exc)) from None
        query = {k: getattr(typed, k) for k in query}
    if media_type == NPY_MEDIA_TYPE:
        params = cast(M, schema.model_construct(**query))
        model = resolve_model(request, params.model, registry)
        arr = parse_npy(await request.body())
    elif media_type in _JSON_TYPES or media_type.endswith("+json"):
        body = await request.body()
        try:
            params = schema.model_validate_json(body)
        except ValidationError as exc:
            if not _is_utf8(body):
                raise _unprocessable("the JSON body is not valid UTF-8") from None
            raise _unprocessable(_validation_detail(exc)) from None
        if (params.inputs is None) == (params.inputs_b64 is None):
            raise _unprocessable([{"loc": [], "msg": _ONE_INPUT, "type": "value_error"}])
        if "model" in query and params.model is not None and params.model != query["model"]:
            raise _unprocessable("the model named in the query differs from the body's `model`")
        extra = {k: v for k, v in query.items() if getattr(params, k, None) is None}
        model_name = extra.get("model", params.model)
        model = resolve_model(request, model_name, registry)
        if params.inputs_b64 is not None:
            arr = decode_b64_npy(params.inputs_b64)
        else:
            assert params.inputs is not None  # checked above
            arr = json_to_array(params.inputs, max_samples)
        params = params.model_copy(update={**extra, "inputs": None, "inputs_b64": None})  # one copy
    else:
        raise HTTPException(
            status_code=415,
            detail=f"unsupported content type {media_type or '(none)'!r}: "
            f"send application/json or {NPY_MEDIA_TYPE}",
        )
    x = validate_batch(arr, model.input_shape, max_samples)
    return DecodedRequest(params=params, model=model, x=x)


def query_fields(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters of an inference request: only `allowed` names, each at most once (else 422).

    Reads the raw query string only when there is one (most requests have none).
    """
    raw = request.scope.get("query_string", b"")
    if not raw:
        return {}
    fields: dict[str, str] = {}
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key not in allowed:
            raise _unprocessable(f"unknown query parameter {key[:40]!r}; allowed: {', '.join(allowed)}")
        if key in fields:
            raise _unprocessable(f"query parameter {key!r} given more than once")
        fields[key] = value
    return fields


def query_openapi(fields: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAPI `parameters` for the query fields of a raw `.npy` request."""
    return [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": "For x-npy bodies."}
        for name, schema in fields.items()
    ]
