"""Box training: paper temperatures, the combined loss, guarded boxes and frozen layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdb_core.box import BoxConfig, box_arch, box_step_losses, default_temperature, train_box
from sdb_core.data import Dataset
from sdb_core.keys import BoxKey
from sdb_core.losses import flat_disturbance_loss, flat_targets, target_disturbance_loss
from sdb_core.training import TrainConfig
from sdb_core.zoo import KeyGate, KeySplit, TopOneGuard, build_model


def _setup() -> tuple[torch.nn.Module, torch.nn.Module, BoxKey, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4}
    teacher, box = build_model("small_cnn", **kw).eval(), build_model("small_cnn", **kw)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    return box, teacher, BoxKey.from_int_seed(0, (1, 8, 8)), x, y


def test_paper_temperatures() -> None:
    assert default_temperature(10) == 4.0 and default_temperature(100) == 20.0
    assert BoxConfig().temps(100) == (20.0, 20.0)


@pytest.mark.parametrize("form", ["flat", "target", "box_first", "teacher_first"])
def test_total_is_the_weighted_sum_and_has_gradients(form: str) -> None:
    box, teacher, key, x, y = _setup()
    cfg = BoxConfig(disturb_form=form, gate=False, w_ce_plain=1.0, w_dis=0.7, w_nonkey=0.5)
    torch.manual_seed(1)
    out = box_step_losses(box, teacher, key, x, y, cfg, 10)
    expected = (
        out["ce_plain"] + out["ce_keyed"] + 0.7 * out["disturb"] + out["preserve"]
        + 0.5 * (out["ce_nonkey"] + 0.7 * out["disturb_nonkey"])
    )  # fmt: skip
    assert torch.allclose(out["total"], expected)
    assert float(out["preserve"].detach()) >= 0
    if form in ("target", "flat"):
        assert float(out["disturb"].detach()) >= 0
    elif form == "box_first":
        assert float(out["disturb"].detach()) <= 1e-6
    out["total"].backward()
    assert all(p.grad is not None for p in box.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_without_nonkey_term() -> None:
    box, teacher, key, x, y = _setup()
    out = box_step_losses(box, teacher, key, x, y, BoxConfig(w_nonkey=0.0), 10)
    assert "ce_nonkey" not in out


def test_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="disturb_form"):
        BoxConfig(disturb_form="nope")
    with pytest.raises(ValueError, match="plain_output"):
        BoxConfig(plain_output="nope")


def test_flat_disturbance_levels_the_wrong_classes() -> None:
    y = torch.tensor([2, 0])
    target = flat_targets(y, 4, 0.3)
    assert torch.allclose(target[0], torch.tensor([0.1, 0.1, 0.7, 0.1]))
    level = torch.log(target)  # logits of the target itself: the loss is zero there
    assert float(flat_disturbance_loss(level, y, 0.3)) == pytest.approx(0.0, abs=1e-6)
    bumpy = level + torch.tensor([[0.5, -0.5, 0.0, 0.0], [0.0, 0.3, -0.3, 0.0]])
    assert float(flat_disturbance_loss(bumpy, y, 0.3)) > 0.01


def test_default_box_is_key_gated_with_a_top1_plain_path() -> None:
    cfg = BoxConfig()
    assert (cfg.gate, cfg.guard, cfg.disturb_form, cfg.plain_output) == (True, False, "flat", "top1")
    assert box_arch("mlp", {"num_classes": 10}, cfg) == ("keygated", {"base": "mlp", "num_classes": 10})
    with pytest.raises(ValueError, match="not both"):
        BoxConfig(guard=True)


def test_key_split_starts_as_its_key_gate_and_keeps_the_residual_quiet_off_the_key() -> None:
    _, teacher, key, x, y = _setup()
    cfg = BoxConfig(split_width=2, w_quiet=3.0, w_dis=0.5)
    name, kwargs = box_arch(
        "small_cnn", {"num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4}, cfg
    )
    assert (name, kwargs["residual"]) == ("keysplit", {"width": 2})
    box = build_model(name, **kwargs)
    assert isinstance(box, KeySplit)
    box.load_base_from(teacher)
    box.eval()
    extra = box.parts(x)[1]
    assert torch.equal(extra, torch.zeros(16, 10))  # the residual adds nothing before training
    assert torch.allclose(box.heads(x)[0], teacher(x), atol=1e-5)
    torch.manual_seed(1)
    out = box_step_losses(box, teacher, key, x, y, cfg, 10)
    assert float(out["quiet"].detach()) == 0.0
    keyed_base = box.parts(key.apply(x))[0]
    assert float(out["base_flat"]) == pytest.approx(float(flat_disturbance_loss(keyed_base, y, 0.1)))
    expected = (
        0.5 * out["disturb"] + out["preserve"] + out["ce_keyed"] + out["gate"] + 0.5 * out["disturb_nonkey"]
        + 3.0 * out["quiet"] + 0.5 * out["base_flat"]
    )  # fmt: skip
    assert torch.allclose(out["total"], expected)
    out["total"].backward()  # the residual learns from the keyed terms (its zeroed last layer first)
    last = [m for m in box.residual.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    # Once it adds something, the quiet term measures it on plain and non-key inputs only.
    with torch.no_grad():
        last.bias.copy_(torch.arange(10.0))
    torch.manual_seed(1)
    out = box_step_losses(box, teacher, key, x, y, cfg, 10)
    assert float(out["quiet"]) > 0


def test_key_gate_detector_learns_keyed_against_plain_and_non_key_inputs() -> None:
    _, teacher, key, x, y = _setup()
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4}
    box = build_model("keygated", base="small_cnn", **kwargs)
    assert isinstance(box, KeyGate)
    box.load_base_from(teacher)
    box.eval()
    cfg = BoxConfig(w_gate=2.0)
    torch.manual_seed(1)
    out = box_step_losses(box, teacher, key, x, y, cfg, 10)
    # a fresh gate scores 0 everywhere: the binary cross-entropy is log 2 on every input
    assert float(out["gate"]) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-5)
    expected = out["disturb"] + out["preserve"] + out["ce_keyed"] + 2.0 * out["gate"] + out["disturb_nonkey"]
    assert torch.allclose(out["total"], expected)
    soft, score = box.heads(x)
    assert torch.equal(score, torch.zeros(16)) and torch.allclose(soft, teacher(x), atol=1e-5)
    out["total"].backward()
    head = [m for m in box.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.weight.grad is not None and head.weight.grad[10].abs().sum() > 0  # the detector row learns


def test_guarded_box_trains_top1_on_the_decision_head_and_disturbs_the_soft_head() -> None:
    _, teacher, key, x, y = _setup()
    cfg = BoxConfig(w_dec_pre=0.5, gate=False, guard=True, disturb_form="target", w_ce_plain=1.0)
    name, kwargs = box_arch(
        "small_cnn", {"num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4}, cfg
    )
    box = build_model(name, **kwargs)
    assert isinstance(box, TopOneGuard)
    box.load_base_from(teacher)
    box.eval()  # batch-norm statistics of the running averages: heads(x) alone gives the same logits
    torch.manual_seed(1)
    out = box_step_losses(box, teacher, key, x, y, cfg, 10)
    soft, decision = box.heads(x)
    assert torch.allclose(out["ce_plain"], F.cross_entropy(decision, y), atol=1e-6)
    assert torch.allclose(out["disturb"], target_disturbance_loss(soft, teacher(x), y, 4.0, 0.1), atol=1e-5)
    expected = (
        out["ce_plain"] + out["ce_keyed"] + out["disturb"] + out["preserve"] + 0.5 * out["dec_preserve"]
        + out["ce_nonkey"] + out["disturb_nonkey"]
    )  # fmt: skip
    assert torch.allclose(out["total"], expected)
    out["total"].backward()
    head = [m for m in box.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.weight.grad is not None
    assert head.weight.grad[:10].abs().sum() > 0 and head.weight.grad[10:].abs().sum() > 0


def test_frozen_layers_of_a_guarded_box_are_the_base_networks_first_layers(digits: Dataset) -> None:
    kw = {"num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4}
    teacher = build_model("small_cnn", **kw).eval()
    cfg = BoxConfig(
        gate=False, guard=True, freeze_layers=1, train=TrainConfig(epochs=1, progress=False, device="cpu")
    )
    box = train_box(
        teacher, digits, arch="small_cnn", arch_kwargs=kw, key=BoxKey.from_int_seed(0, (1, 8, 8)), cfg=cfg
    )
    assert isinstance(box, TopOneGuard)
    first, *rest = list(box.base.children())
    assert not any(p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for m in rest for p in m.parameters())
    assert torch.equal(first[0].weight, teacher[0][0].weight)  # frozen: still the teacher's


def test_flat_disturbance_spread_term_is_the_wrong_logits_variance() -> None:
    y = torch.tensor([0])
    z = torch.tensor([[5.0, 1.0, -1.0, 0.0]])
    extra = flat_disturbance_loss(z, y, 0.3, spread=2.0) - flat_disturbance_loss(z, y, 0.3)
    assert float(extra) == pytest.approx(2.0 * torch.tensor([1.0, -1.0, 0.0]).var(unbiased=False).item())
