"""Decoding an Open Inference Protocol `infer` request: JSON tensors and the binary tensor data extension.

Two stages. `read_infer_request` reads the body (gzip/deflate inflated within the body limit), splits it
at `Inference-Header-Content-Length`, and validates the JSON header: the one input's name, datatype,
shape and declared binary size (against the bytes the body really holds), the requested outputs and the
parameters. Its result says which path the request wants, before any tensor is read. `decode_tensor`
then builds the batch and hands it to service.decode's `validate_batch`, the one validator of /predict
and /distill-batch (shape against the model's, float32, finite values, batch limit).

Statuses: 400 for a request that is not a valid protocol request (JSON, fields, datatype, shape against
the data, binary sizes); 413 for sizes over the limits (body, declared tensor bytes, batch); 404 for an
unknown model or version; 422 (from the shared validator) for values that do not fit the model (its input
shape, NaN or infinite values).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import HTTPException, Request

from service.decode import resolve_model, validate_batch
from service.inference.registry import ModelRegistry, ServedModel
from service.oip.protocol import (
    CLASSIFIABLE,
    DATATYPES,
    HEADER_LENGTH,
    INPUT_NAME,
    KEYED_OUTPUTS,
    OUTPUTS,
    PLAIN_OUTPUTS,
    UNSUPPORTED,
)
from service.outputs import MAX_TEMPERATURE, MIN_TEMPERATURE

MAX_DIMS = 8
MAX_CLASSIFICATION = 1000


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool  # answered as binary tensor data
    classification: int | None  # top-k as "value:index:class_name" strings (Triton's classification)


@dataclass(frozen=True)
class InferRequest:
    request_id: str | None
    outputs: list[RequestedOutput]
    keyed: bool  # the request asks for keyed outputs (soft labels): a bearer token is required
    temperature: float | None
    datatype: str
    shape: tuple[int, ...]
    data: Any  # the JSON `data`, or None for binary tensor data
    body: bytes
    binary_offset: int  # where the input's binary data starts in `body`
    binary_size: int | None


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def too_large(message: str) -> HTTPException:
    return HTTPException(status_code=413, detail=message)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = 31 if encoding == "gzip" else 15  # deflate is the zlib format (RFC 9110)
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise too_large(f"the {encoding} body inflates past the body limit of {limit} bytes")
    if not inflater.eof:
        raise bad_request(f"the {encoding} body is truncated")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"{where} `parameters` must be an object")
    return params


def _flag(params: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"{where} parameter `{key}` must be true or false")
    return value


def _temperature(params: dict[str, Any]) -> float | None:
    value = params.get("temperature")
    if value is None:
        return None
    if isinstance(value, str):  # parameters from gRPC-minded clients hold bool, int64 or string only
        try:
            value = float(value)
        except ValueError:
            raise bad_request("parameter `temperature` must be a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request("parameter `temperature` must be a number")
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise bad_request(f"parameter `temperature` must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
    return float(value)


def _outputs(header: dict[str, Any], binary_default: bool) -> list[RequestedOutput]:
    requested = header.get("outputs")
    if requested is None:
        return [RequestedOutput(name, binary_default, None) for name in PLAIN_OUTPUTS]
    if not isinstance(requested, list) or not requested:
        raise bad_request("`outputs` must be a non-empty list of {name, parameters}")
    outputs: list[RequestedOutput] = []
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad_request("each requested output must be an object with a string `name`")
        name = entry["name"]
        if name not in OUTPUTS:
            raise bad_request(f"unknown output {name[:64]!r}; outputs: {', '.join(OUTPUTS)}")
        if any(o.name == name for o in outputs):
            raise bad_request(f"output {name!r} is requested twice")
        params = _parameters(entry, f"output {name!r}")
        k = params.get("classification")
        if k is not None:
            if name not in CLASSIFIABLE:
                raise bad_request(f"`classification` applies to {', '.join(CLASSIFIABLE)}, not to {name!r}")
            if not _is_int(k) or not 1 <= k <= MAX_CLASSIFICATION:
                raise bad_request(f"`classification` must be an integer from 1 to {MAX_CLASSIFICATION}")
        binary = _flag(params, "binary_data", f"output {name!r}", binary_default)
        outputs.append(RequestedOutput(name, binary, k))
    keyed = {o.name in KEYED_OUTPUTS for o in outputs}
    if len(keyed) > 1:
        raise bad_request(
            f"the plain outputs ({', '.join(PLAIN_OUTPUTS)}) and the keyed outputs "
            f"({', '.join(KEYED_OUTPUTS)}) come from different paths: request them separately"
        )
    return outputs


def _shape(tensor: dict[str, Any]) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise bad_request(f"input `shape` must be a list of 1 to {MAX_DIMS} non-negative integers")
    return tuple(shape)


def _datatype(tensor: dict[str, Any]) -> str:
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise bad_request("input `datatype` must be a string such as FP32")
    if datatype in UNSUPPORTED:
        raise bad_request(
            f"datatype {datatype} cannot hold the model's inputs: send FP32 (or FP64, FP16, INTn, UINTn)"
        )
    if datatype not in DATATYPES:
        raise bad_request(f"unknown datatype {datatype[:32]!r}; supported: {', '.join(DATATYPES)}")
    return datatype


async def read_infer_request(request: Request, max_body: int, max_samples: int) -> InferRequest:
    """Stage one: the body and its JSON header, validated; no tensor is built yet."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, encoding, max_body)
    elif encoding != "identity":
        raise HTTPException(
            status_code=415,
            detail=f"unsupported Content-Encoding {encoding[:32]!r}: send gzip, deflate or none",
        )
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        header_len = len(body)
    else:
        try:
            header_len = int(declared)
        except ValueError:
            raise bad_request(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 < header_len <= len(body):
            raise bad_request(f"{HEADER_LENGTH} is {header_len}, but the body holds {len(body)} bytes")
    try:
        header = orjson.loads(body[:header_len])
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request's JSON header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad_request("the request must be a JSON object with `inputs`")

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("`id` must be a string")
    params = _parameters(header, "request")
    outputs = _outputs(header, _flag(params, "binary_data_output", "request", False))
    keyed = outputs[0].name in KEYED_OUTPUTS
    temperature = _temperature(params)
    if temperature is not None and not keyed:
        raise bad_request(
            f"parameter `temperature` applies to the keyed outputs ({', '.join(KEYED_OUTPUTS)}) only"
        )

    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f"`inputs` must be a list holding one tensor, {INPUT_NAME!r}")
    if len(inputs) != 1:
        raise bad_request(f"the model takes one input tensor, {INPUT_NAME!r}; got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise bad_request("each input must be an object {name, shape, datatype, data}")
    name = tensor.get("name")
    if name != INPUT_NAME:
        shown = name[:64] if isinstance(name, str) else name
        raise bad_request(f"unknown input {shown!r}: the model's input is {INPUT_NAME!r}")
    datatype = _datatype(tensor)
    shape = _shape(tensor)
    if shape[0] > max_samples:
        raise too_large(f"batch of {shape[0]} samples is over the limit of {max_samples}")
    nbytes = math.prod(shape) * DATATYPES[datatype].itemsize
    if nbytes > max_body:
        raise too_large(
            f"input shape {list(shape)} of {datatype} is {nbytes} bytes, over the limit of {max_body}"
        )

    binary_size = _parameters(tensor, "input").get("binary_data_size")
    binary_part = len(body) - header_len
    data = tensor.get("data")
    if binary_size is not None:
        if not _is_int(binary_size) or binary_size < 0:
            raise bad_request("`binary_data_size` must be a non-negative integer")
        if data is not None:
            raise bad_request("an input has either `data` or `binary_data_size`, not both")
        if binary_size != nbytes:
            raise bad_request(
                f"input declares binary_data_size {binary_size}, but shape {list(shape)} of {datatype} "
                f"needs {nbytes} bytes"
            )
        if binary_size != binary_part:
            raise bad_request(
                f"input declares {binary_size} bytes of binary data, but the body holds {binary_part} "
                f"bytes after its {header_len}-byte JSON header"
            )
    else:
        if data is None:
            raise bad_request("input has neither `data` nor a `binary_data_size` parameter")
        if binary_part:
            raise bad_request(
                f"the body has {binary_part} bytes after its JSON header, but no input declares binary data"
            )
    return InferRequest(
        request_id=request_id,
        outputs=outputs,
        keyed=keyed,
        temperature=temperature,
        datatype=datatype,
        shape=shape,
        data=data,
        body=body,
        binary_offset=header_len,
        binary_size=binary_size,
    )


def _json_tensor(req: InferRequest) -> np.ndarray:
    data = req.data
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad_request("input `data` must be a flat or rectangular nested list of numbers") from None
    kind = arr.dtype.kind
    dtype = DATATYPES[req.datatype]
    if arr.size and (kind not in "fiu" or (dtype.kind in "iu" and kind == "f")):
        expected = "integers" if dtype.kind in "iu" else "numbers"
        raise bad_request(f"input `data` must hold only {expected} for datatype {req.datatype}")
    if arr.size != math.prod(req.shape):
        raise bad_request(
            f"input `data` holds {arr.size} values, but shape {list(req.shape)} needs {math.prod(req.shape)}"
        )
    if arr.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise bad_request(f"input `data` holds values out of the range of {req.datatype}")
    return arr.reshape(req.shape)


def decode_tensor(req: InferRequest, model: ServedModel, max_samples: int) -> np.ndarray:
    """Stage two: the validated float32 batch [N, *model.input_shape] (service.decode.validate_batch)."""
    if req.binary_size is None:
        arr = _json_tensor(req)
    else:
        dtype = DATATYPES[req.datatype]
        count = math.prod(req.shape)
        arr = np.frombuffer(req.body, dtype=dtype, count=count, offset=req.binary_offset).reshape(req.shape)
    return validate_batch(arr, model.input_shape, max_samples)


def resolve(request: Request, registry: ModelRegistry, name: str, version: str | None) -> ServedModel:
    """The served model and version named in the path (404 otherwise)."""
    model = resolve_model(request, name, registry)
    if version is not None and version != model.version:
        raise HTTPException(
            status_code=404,
            detail=f"model {model.name!r} has no version {version[:32]!r}; served: {model.version!r}",
        )
    return model
