"""The protocol's names: the tensors a served box takes and gives, their datatypes, and the extensions."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.inference.registry import ServedModel

INPUT_NAME = "input"
PLAIN_OUTPUTS = ("label", "class_name", "probabilities")  # the anonymous answer: /predict's
KEYED_OUTPUTS = ("soft_labels", "logits")  # a bearer token with the model in scope: /distill-batch's
OUTPUTS = PLAIN_OUTPUTS + KEYED_OUTPUTS
CLASSIFIABLE = ("probabilities", "soft_labels", "logits")  # outputs the `classification` parameter applies to
EXTENSIONS = ["binary_tensor_data", "classification", "parameters"]
HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "pytorch_sdb_box"

# Input datatypes, as little-endian numpy dtypes; every one is converted to float32 as /predict does.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "FP32": "<f4",
        "FP64": "<f8",
        "FP16": "<f2",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
    }.items()
}
UNSUPPORTED = ("BOOL", "BYTES", "BF16")  # protocol datatypes that cannot hold pixel values here


def output_spec(model: ServedModel, name: str) -> tuple[str, list[int]]:
    """(datatype, shape with -1 for the batch) of an output."""
    if name == "label":
        return "INT64", [-1]
    if name == "class_name":
        return "BYTES", [-1]
    return "FP32", [-1, model.num_classes]


def model_metadata(model: ServedModel) -> dict[str, Any]:
    outputs = []
    for name in OUTPUTS:
        datatype, shape = output_spec(model, name)
        outputs.append({"name": name, "datatype": datatype, "shape": shape})
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *model.input_shape]}],
        "outputs": outputs,
    }
