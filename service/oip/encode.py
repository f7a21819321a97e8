"""The answer to an Open Inference Protocol `infer`: JSON tensors, or binary tensor data after a JSON header.

Tensors come from the same arrays /predict and /distill-batch answer with (float32 probabilities, soft
labels and logits, the argmax label, the class names), so both protocols give the same numbers.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

from service.inference.registry import ServedModel
from service.oip.decode import RequestedOutput
from service.oip.protocol import HEADER_LENGTH
from service.outputs import top_k_indices
from service.schemas import FastJSONResponse

BINARY_MEDIA_TYPE = "application/octet-stream"


def _bytes_tensor(values: list[str]) -> bytes:
    """The protocol's binary BYTES form: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for v in values:
        b = v.encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _classification(scores: np.ndarray, k: int, names: list[str]) -> list[str]:
    """Triton's classification form: "value:index:class_name" for the top k of each row, best first."""
    order = top_k_indices(scores, k)
    return [f"{row[i]}:{i}:{names[i]}" for row, idx in zip(scores, order.tolist(), strict=True) for i in idx]


def _tensor(
    model: ServedModel, name: str, arrays: dict[str, np.ndarray], k: int | None
) -> tuple[str, list[int], Any]:
    """(datatype, shape, values): values a numpy array or, for BYTES, a list of str (row-major)."""
    if name == "label":
        labels = arrays["probabilities"].argmax(axis=1).astype(np.int64)
        return "INT64", [len(labels)], labels
    if name == "class_name":
        labels = arrays["probabilities"].argmax(axis=1).tolist()
        return "BYTES", [len(labels)], [model.class_names[i] for i in labels]
    scores = arrays[name]
    if k is not None:
        k = min(k, scores.shape[1])
        return "BYTES", [len(scores), k], _classification(scores, k, model.class_names)
    return "FP32", list(scores.shape), scores


def infer_response(
    model: ServedModel,
    request_id: str | None,
    outputs: list[RequestedOutput],
    arrays: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """`arrays` holds "probabilities" (plain) or "soft_labels" and "logits" (keyed), float32 [N, C]."""
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = parameters
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        datatype, shape, values = _tensor(model, out.name, arrays, out.classification)
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary:
            if datatype == "BYTES":
                raw = _bytes_tensor(values)
            else:
                raw = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = values.ravel() if isinstance(values, np.ndarray) else values
        entries.append(entry)
    body["outputs"] = entries
    if not chunks:
        return FastJSONResponse(body, headers=headers)
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        header + b"".join(chunks),
        media_type=BINARY_MEDIA_TYPE,
        headers={**(headers or {}), HEADER_LENGTH: str(len(header))},
    )
