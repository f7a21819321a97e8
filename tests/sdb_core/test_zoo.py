"""The model zoo: registered architectures, forward shapes, and the top-1 guard."""

from __future__ import annotations

import pytest
import torch

from sdb_core.zoo import TopOneGuard, arch_kwargs_for, build_model, list_models


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


def _guard() -> TopOneGuard:
    torch.manual_seed(0)
    model = build_model("guarded", base="small_cnn", lift=0.5, **arch_kwargs_for((1, 8, 8), 10, width=4))
    assert isinstance(model, TopOneGuard)
    for m in model.modules():  # spread the logits so that the two heads' top-1 often differ
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=3.0)
    return model.eval()


def test_guard_output_has_the_decision_heads_top1_and_otherwise_the_soft_heads_logits() -> None:
    guard = _guard()
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        soft, decision = guard.heads(x)
        out = guard(x)
    k = decision.argmax(1)
    assert torch.equal(out.argmax(1), k)
    agree = soft.argmax(1) == k
    assert 0 < int(agree.sum()) < len(x)  # untrained heads: both cases occur
    assert torch.equal(out[agree], soft[agree])
    lifted = soft[~agree].clone()
    lifted[torch.arange(len(lifted)), k[~agree]] = soft[~agree].max(1).values + 0.5
    assert torch.allclose(out[~agree], lifted)


@pytest.mark.parametrize("arch", [a for a in list_models() if a not in ("guarded", "keygated", "keysplit")])
def test_guard_starts_with_both_heads_equal_to_a_trained_single_head_model(arch: str) -> None:
    shape = (1, 8, 8) if arch in {"small_cnn", "mlp"} else (3, 32, 32)
    kwargs = arch_kwargs_for(shape, 10)
    torch.manual_seed(0)
    guard = build_model("guarded", base=arch, **kwargs).eval()
    single = build_model(arch, **kwargs).eval()
    assert isinstance(guard, TopOneGuard)
    guard.load_base_from(single)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        soft, decision = guard.heads(x)
        assert torch.allclose(soft, single(x)) and torch.allclose(decision, single(x))
        assert torch.allclose(guard(x), single(x))


def test_guard_cannot_wrap_itself() -> None:
    with pytest.raises(ValueError, match="guard"):
        build_model("guarded", base="guarded")


def test_key_gate_answers_with_the_top1_unless_its_detector_fires() -> None:
    from sdb_core.zoo import KeyGate, top1_logits

    torch.manual_seed(0)
    gate = build_model("keygated", base="mlp", **arch_kwargs_for((1, 8, 8), 10, hidden=8)).eval()
    assert isinstance(gate, KeyGate)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        last = gate.base[-1]
        last.bias[10] = -1e6  # detector off everywhere
        soft, _ = gate.heads(x)
        assert torch.equal(gate(x), top1_logits(soft))
        last.bias[10] = 1e6  # detector on everywhere
        assert torch.equal(gate(x), gate.heads(x)[0])
    with pytest.raises(ValueError, match="key gate"):
        build_model("keygated", base="keygated")
