from __future__ import annotations

import pytest
import torch

from sdb_core.zoo import arch_kwargs_for, build_model, list_models


def test_the_paper_architectures_are_registered() -> None:
    assert {"small_cnn", "mlp", "cnn", "resnet18", "resnet20", "resnet32", "resnet56", "mobilenetv2"} <= set(
        list_models()
    )


@pytest.mark.parametrize("arch", list_models())
def test_forward_shapes(arch: str) -> None:
    shape = (1, 8, 8) if arch in {"small_cnn", "mlp"} else (3, 32, 32)
    model = build_model(arch, **arch_kwargs_for(shape, 7)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="small_cnn"):
        build_model("nope")
