"""Loss terms of box training and of Hinton distillation (pure functions of logits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossConfig:
    eps: float = 1e-12


CONFIG = LossConfig()


def kl_div(p_logits: Tensor, q_logits: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of KL(p_T || q_T), p_T = softmax(p_logits / T)."""
    log_p = F.log_softmax(p_logits / temperature, dim=1)
    log_q = F.log_softmax(q_logits / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def disturbance_loss(box_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Knowledge disturbance: -T^2 * KL(p_T(box) || p_T(teacher)), minimized to push the box's soft labels
    away from the teacher's. The box's own distribution comes first, so the term is bounded below by
    -T^2 * max_i(-log q_i) (the reverse order is unbounded and destroys top-1 accuracy)."""
    return -(temperature**2) * kl_div(box_logits, teacher_logits.detach(), temperature)


def reverse_disturbance_loss(
    box_logits: Tensor, teacher_logits: Tensor, temperature: float, floor: float = 1e-3
) -> Tensor:
    """Nasty-Teacher-style disturbance with the teacher first, -T^2 * KL(p_T(teacher) || p_T(box) + floor):
    the floor on the box's probabilities bounds it by -T^2 * (-log floor)."""
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_q = torch.log(q.clamp_min(CONFIG.eps))
    log_p = torch.log(F.softmax(box_logits / temperature, dim=1) + floor)
    return -(temperature**2) * (q * (log_q - log_p)).sum(dim=1).mean()


def adversarial_targets(
    teacher_logits: Tensor, y: Tensor, temperature: float, margin: float, sharpness: float = 1.0
) -> Tensor:
    """Soft labels at T whose dark knowledge inverts the teacher's (its least likely classes get the most
    mass, `sharpness` times more peaked) while the true class stays on top by `margin` (in logits / T)."""
    s = -sharpness * teacher_logits.detach() / temperature
    true = F.one_hot(y, s.shape[1]).bool()
    best_wrong = s.masked_fill(true, float("-inf")).max(dim=1, keepdim=True).values
    return F.softmax(torch.where(true, best_wrong + margin, s), dim=1)


def target_disturbance_loss(
    box_logits: Tensor,
    teacher_logits: Tensor,
    y: Tensor,
    temperature: float,
    margin: float,
    sharpness: float = 1.0,
) -> Tensor:
    """Bounded disturbance by imitation: T^2 * KL(adversarial_targets || p_T(box)) >= 0."""
    target = adversarial_targets(teacher_logits, y, temperature, margin, sharpness)
    log_q = F.log_softmax(box_logits / temperature, dim=1)
    return (temperature**2) * (target * (torch.log(target.clamp_min(CONFIG.eps)) - log_q)).sum(dim=1).mean()


def flat_targets(y: Tensor, num_classes: int, eps: float) -> Tensor:
    """1 - eps on the class y, eps spread evenly over the others: a distribution with no dark knowledge."""
    off = eps / (num_classes - 1)
    return torch.full((len(y), num_classes), off, device=y.device).scatter(1, y[:, None], 1.0 - eps)


def flat_disturbance_loss(box_logits: Tensor, y: Tensor, eps: float, spread: float = 0.0) -> Tensor:
    """KL(flat_targets(y) || softmax(box)) + spread * (variance of the wrong classes' logits): pulls the
    wrong classes' logits level with each other, so the box's own outputs on plain inputs carry the top-1
    and as little else as training achieves. The KL term alone barely sees differences among small
    probabilities; the variance term (the ranking of the wrong classes) works in logit units, what a
    re-tempering attacker amplifies. Non-negative, zero at the target."""
    num_classes = box_logits.shape[1]
    target = flat_targets(y, num_classes, eps)
    kl = (target * (torch.log(target) - F.log_softmax(box_logits, dim=1))).sum(dim=1).mean()
    if spread <= 0:
        return kl
    wrong = ~F.one_hot(y, num_classes).bool()
    others = box_logits[wrong].view(len(y), -1)
    return kl + spread * others.var(dim=1, unbiased=False).mean()


def sharpened_targets(teacher_logits: Tensor, y: Tensor, temperature: float, sharpen: float) -> Tensor:
    """The teacher's soft labels at T, moved a fraction `sharpen` toward the one-hot true class."""
    p = F.softmax(teacher_logits.detach() / temperature, dim=1)
    if sharpen <= 0:
        return p
    return (1.0 - sharpen) * p + sharpen * F.one_hot(y, p.shape[1]).to(p.dtype)


def preservation_loss(
    keyed_logits: Tensor, teacher_logits: Tensor, y: Tensor, temperature: float, sharpen: float = 0.0
) -> Tensor:
    """Knowledge preservation + augmentation on keyed inputs: T^2 * KL(target || p_T(box(x'))), with the
    target = the teacher's soft labels sharpened toward the true class. Non-negative, zero at the target."""
    target = sharpened_targets(teacher_logits, y, temperature, sharpen)
    log_q = F.log_softmax(keyed_logits / temperature, dim=1)
    log_t = torch.log(target.clamp_min(CONFIG.eps))
    return (temperature**2) * (target * (log_t - log_q)).sum(dim=1).mean()


def hinton_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    y: Tensor,
    alpha: float,
    temperature: float,
    labelled: Tensor | None = None,
) -> Tensor:
    """alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE(student, y).
    With `labelled` (bool mask), the CE term only covers labelled samples (0 if none in the batch)."""
    kd = (temperature**2) * kl_div(teacher_logits.detach(), student_logits, temperature)
    if labelled is None:
        ce = F.cross_entropy(student_logits, y)
    elif bool(labelled.any()):
        ce = F.cross_entropy(student_logits[labelled], y[labelled])
    else:
        ce = student_logits.sum() * 0.0
    return alpha * kd + (1.0 - alpha) * ce
