"""The losses: KL, the disturbance terms and their gradients, adversarial targets, preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdb_core.losses import (
    adversarial_targets,
    disturbance_loss,
    hinton_kd_loss,
    kl_div,
    preservation_loss,
    reverse_disturbance_loss,
    target_disturbance_loss,
)

T = 4.0


def _logits(seed: int, n: int = 16, c: int = 10, scale: float = 5.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_kl_is_zero_on_equal_inputs_and_positive_otherwise() -> None:
    a, b = _logits(0), _logits(1)
    assert abs(float(kl_div(a, a, T))) < 1e-6
    assert float(kl_div(a, b, T)) > 0


def test_disturbance_is_non_positive_and_bounded() -> None:
    teacher = _logits(0)
    assert abs(float(disturbance_loss(teacher, teacher, T))) < 1e-4
    # -KL(box || teacher) >= -T^2 * E[-min log q]: the box can put all its mass on the teacher's least class
    log_q = F.log_softmax(teacher / T, dim=1)
    bound = float(-(T**2) * (-log_q.min(dim=1).values).mean())
    for seed in range(5):
        # extreme box logits: the bound must hold even for very confident boxes
        value = float(disturbance_loss(_logits(seed + 10, scale=100.0), teacher, T))
        assert bound - 1e-4 <= value <= 1e-6


def test_disturbance_gradient_moves_the_box_away_from_the_teacher() -> None:
    teacher = _logits(0)
    box = (teacher + 0.5 * _logits(1, scale=1.0)).requires_grad_(True)
    before = float(kl_div(box.detach(), teacher, T))
    disturbance_loss(box, teacher, T).backward()
    assert box.grad is not None and torch.isfinite(box.grad).all() and box.grad.abs().sum() > 0
    stepped = box.detach() - 0.5 * box.grad
    assert float(kl_div(stepped, teacher, T)) > before


def test_disturbance_does_not_backpropagate_into_the_teacher() -> None:
    teacher = _logits(0).requires_grad_(True)
    box = _logits(1).requires_grad_(True)
    disturbance_loss(box, teacher, T).backward()
    assert teacher.grad is None


def test_reverse_disturbance_is_bounded_by_its_floor() -> None:
    teacher = _logits(0)
    floor = 1e-3
    value = float(reverse_disturbance_loss(_logits(2, scale=200.0), teacher, T, floor))
    assert -(T**2) * -torch.log(torch.tensor(floor)) - 1e-3 <= value <= 0.0


def test_adversarial_targets_keep_top1_and_invert_the_dark_knowledge() -> None:
    teacher = _logits(0)
    y = teacher.argmax(1)
    r = adversarial_targets(teacher, y, T, margin=0.2)
    assert torch.allclose(r.sum(1), torch.ones(len(r)))
    assert torch.equal(r.argmax(1), y)
    wrong = F.one_hot(y, 10).bool()
    least_likely = teacher.masked_fill(wrong, float("inf")).argmin(1)
    r_wrong = r.masked_fill(wrong, -1.0)
    assert torch.equal(r_wrong.argmax(1), least_likely)


def test_target_disturbance_is_non_negative_zero_at_the_target_with_gradients() -> None:
    teacher = _logits(0)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    r = adversarial_targets(teacher, y, T, 0.2)
    at_target = T * torch.log(r)
    assert abs(float(target_disturbance_loss(at_target, teacher, y, T, 0.2))) < 1e-4
    box = _logits(5).requires_grad_(True)
    loss = target_disturbance_loss(box, teacher, y, T, 0.2)
    assert float(loss.detach()) > 0
    loss.backward()
    assert box.grad is not None and torch.isfinite(box.grad).all()


def test_preservation_is_non_negative_and_zero_at_the_teacher() -> None:
    teacher = _logits(0)
    y = teacher.argmax(1)
    assert abs(float(preservation_loss(teacher, teacher, y, T, sharpen=0.0))) < 1e-4
    box = _logits(7).requires_grad_(True)
    loss = preservation_loss(box, teacher, y, T, sharpen=0.2)
    assert float(loss.detach()) > 0
    loss.backward()
    assert box.grad is not None and torch.isfinite(box.grad).all()


def test_sharpening_raises_the_true_class_mass() -> None:
    teacher = _logits(0)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    box = _logits(3)
    # the preservation target with sharpening is closer to one-hot: lower CE to the one-hot labels
    from sdb_core.losses import sharpened_targets

    plain, sharp = sharpened_targets(teacher, y, T, 0.0), sharpened_targets(teacher, y, T, 0.3)
    idx = torch.arange(16)
    assert (sharp[idx, y] > plain[idx, y]).all()
    assert float(preservation_loss(box, teacher, y, T, 0.3)) != float(
        preservation_loss(box, teacher, y, T, 0.0)
    )


def test_hinton_kd_limits() -> None:
    s, t = _logits(1).requires_grad_(True), _logits(2)
    y = t.argmax(1)
    assert torch.allclose(hinton_kd_loss(s, t, y, alpha=0.0, temperature=T), F.cross_entropy(s, y))
    assert torch.allclose(hinton_kd_loss(s, t, y, alpha=1.0, temperature=T), T**2 * kl_div(t, s, T))
    none = torch.zeros(16, dtype=torch.bool)
    masked = hinton_kd_loss(s, t, y, alpha=0.5, temperature=T, labelled=none)
    assert torch.allclose(masked, 0.5 * T**2 * kl_div(t, s, T))
    masked.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
