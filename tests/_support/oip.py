"""Open Inference Protocol bodies built by hand (JSON and binary tensor data), and binary answers parsed."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"


def json_request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A JSON-tensor request for float32 `x` [N, ...] (flat data, as clients send it)."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def binary_request(
    x: np.ndarray, datatype: str = "FP32", size: int | None = None, **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a binary-tensor request; `size` overrides the declared binary_data_size."""
    raw = x.tobytes()
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw) if size is None else size},
    }
    header = orjson.dumps({"inputs": [tensor], **extra})
    return header + raw, {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}


def outputs_of(content: bytes, headers: Any) -> dict[str, np.ndarray]:
    """Each output of an `infer` answer as a numpy array of its shape (binary or JSON tensors)."""
    length = headers.get(HEADER_LENGTH)
    n = int(length) if length is not None else len(content)
    body = orjson.loads(content[:n])
    offset = n
    arrays: dict[str, np.ndarray] = {}
    for out in body["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        dt = out["datatype"]
        if size is None:
            data = out["data"]
            arr = np.array(
                data, dtype=object if dt == "BYTES" else {"FP32": np.float32, "INT64": np.int64}[dt]
            )
        else:
            raw = content[offset : offset + size]
            offset += size
            if dt == "BYTES":
                items, i = [], 0
                while i < len(raw):
                    (k,) = struct.unpack_from("<I", raw, i)
                    items.append(raw[i + 4 : i + 4 + k].decode())
                    i += 4 + k
                arr = np.array(items, dtype=object)
            else:
                arr = np.frombuffer(raw, dtype={"FP32": "<f4", "INT64": "<i8"}[dt])
        arrays[out["name"]] = arr.reshape(out["shape"])
    assert offset == len(content), "bytes left over after the declared binary outputs"
    return arrays
