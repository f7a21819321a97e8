"""Model serving: the registry of loaded boxes, the dynamic batcher and request-body decoding."""

from service.inference.registry import (
    InferenceOverloaded,
    InferenceTimeout,
    ModelRegistry,
    ServedModel,
    UnknownModelError,
)

__all__ = ["InferenceOverloaded", "InferenceTimeout", "ModelRegistry", "ServedModel", "UnknownModelError"]
