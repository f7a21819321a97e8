"""What each access to a box answers, as an attack oracle (`sdb_core.attacks.Oracle`): log-probabilities
of plain inputs, as `/predict` serves them, as the stolen weights give them without the key, and as the soft
labels inside a key-gated box give them with the gate cut out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sdb_core.artifact import BoxedModel
from sdb_core.attacks import Oracle
from sdb_core.zoo import KeyGate


def log_softmax_oracle(logits_of: Callable[[Tensor], Tensor]) -> Oracle:
    """An oracle answering the log-softmax of `logits_of` (float32, on the CPU)."""
    return lambda x: F.log_softmax(logits_of(x).float(), dim=1).cpu()


def plain_api_oracle(boxed: BoxedModel) -> Oracle:
    """What `/predict` gives an anonymous client: log of the plain path's probabilities."""
    return log_softmax_oracle(boxed.plain_logits)


def stolen_weights_oracle(boxed: BoxedModel) -> Oracle:
    """The box's network run on plain inputs by someone who copied its weights but not its key."""
    return log_softmax_oracle(boxed.raw_plain_logits)


def whitebox_oracle(boxed: BoxedModel) -> Oracle | None:
    """A key-gated box's soft labels on plain inputs, read by someone who copied the weights and cut the gate
    out of the network (None for a box without a gate: its stolen outputs are already the soft labels)."""
    model = boxed.model
    if not isinstance(model, KeyGate):
        return None

    def soft_labels(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model.heads(boxed.normalize(x))[0]

    return log_softmax_oracle(soft_labels)
