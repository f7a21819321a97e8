"""The attack suite: what each attack builds from an oracle; a top-1 plain path gives nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from sdb_core.artifact import load_box, make_test_box
from sdb_core.attacks import (
    HARD_LOGIT,
    LABEL_ONLY,
    AttackConfig,
    SkepticalStudent,
    attack_names,
    log_probs_of,
    run_attack,
    teacher_for,
)
from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig
from sdb_core.keys import BoxKey, load_key
from sdb_core.oracles import plain_api_oracle, stolen_weights_oracle
from sdb_core.training import TrainConfig
from sdb_core.zoo import arch_kwargs_for, build_model


def _linear_oracle(x: Tensor) -> Tensor:
    """A deterministic stand-in for a service: log-softmax of a fixed function of the pixels."""
    flat = x.flatten(1)
    z = torch.stack([flat[:, i::10].mean(1) * (i + 1) for i in range(10)], dim=1)
    return torch.log_softmax(z, dim=1)


def test_every_attack_of_the_suite_is_named(digits: Dataset) -> None:
    cfg = AttackConfig(other_key=BoxKey.from_int_seed(1, digits.input_shape))
    names = attack_names(cfg)
    assert names[0] == LABEL_ONLY
    for expected in ("retemper:1", "retemper:20", "average:noise", "average:shift", "skeptical", "htc"):
        assert expected in names
    assert "guess:lam=0.3" in names and "guess:other-box" in names
    assert attack_names(AttackConfig(attacks=("htc", "skeptical"))) == ["skeptical", "htc"]
    with pytest.raises(ValueError, match="unknown attack"):
        teacher_for("nope", _linear_oracle, digits, cfg)


def test_label_only_is_the_one_hot_top1_at_temperature_1(digits: Dataset) -> None:
    x = torch.from_numpy(digits.x_train[:32])
    fn, t = teacher_for(LABEL_ONLY, _linear_oracle, digits, AttackConfig())
    out = fn(x)
    assert t == 1.0
    assert torch.equal(out.argmax(1), _linear_oracle(x).argmax(1))
    assert torch.equal(out.max(1).values, torch.full((32,), HARD_LOGIT))
    assert int((out != 0).sum()) == 32


def test_retempering_and_composition(digits: Dataset) -> None:
    x = torch.from_numpy(digits.x_train[:16])
    fn, t = teacher_for("retemper:10", _linear_oracle, digits, AttackConfig())
    assert t == 10.0 and torch.equal(fn(x), _linear_oracle(x))
    htc, t = teacher_for("htc", _linear_oracle, digits, AttackConfig(htc_mix=0.5, htc_temperature=20.0))
    p = htc(x).exp()
    assert t == 1.0 and torch.allclose(p.sum(1), torch.ones(16), atol=1e-5)
    assert torch.all(p.max(1).values > 0.5)  # half the mass on the top-1, the rest softened


def test_query_averaging_averages_answers_under_noise(digits: Dataset) -> None:
    x = torch.from_numpy(digits.x_train[:8])
    calls: list[Tensor] = []

    def oracle(xq: Tensor) -> Tensor:
        calls.append(xq)
        return _linear_oracle(xq)

    cfg = AttackConfig(average_queries=4, average_noise=0.5)
    fn, t = teacher_for("average:noise", oracle, digits, cfg)
    out = fn(x)
    assert len(calls) == 4 and t == cfg.kd_temperature
    assert all(not torch.equal(c, x) for c in calls)
    expected = torch.stack([_linear_oracle(c).exp() for c in calls]).mean(0)
    assert torch.allclose(out.exp(), expected, atol=1e-6)
    shift, _ = teacher_for("average:shift", oracle, digits, cfg)
    calls.clear()
    shift(x)
    assert len(calls) == 4 and all(torch.allclose(c.sum((1, 2, 3)), x.sum((1, 2, 3))) for c in calls)


def test_key_guessing_mixes_a_pattern_in_the_attackers_units(digits: Dataset) -> None:
    x = torch.from_numpy(digits.x_train[:4])
    seen: list[Tensor] = []

    def oracle(xq: Tensor) -> Tensor:
        seen.append(xq)
        return _linear_oracle(xq)

    other = BoxKey.from_int_seed(9, digits.input_shape, 0.5)
    fn, _ = teacher_for("guess:other-box", oracle, digits, AttackConfig(other_key=other))
    fn(x)
    xn = digits.normalize(seen[0])
    assert torch.allclose(xn, other.apply(digits.normalize(x)), atol=1e-4)
    guess, _ = teacher_for("guess:lam=0.7", oracle, digits, AttackConfig())
    guess(x)
    assert not torch.allclose(seen[1], x)


def test_log_probs_keep_zero_probabilities_finite() -> None:
    out = log_probs_of(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.isfinite(out).all() and out.argmax(1).item() == 0


def test_skeptical_student_keeps_its_main_head(digits: Dataset) -> None:
    base = build_model("mlp", **arch_kwargs_for(digits.input_shape, 10, hidden=16))
    student = SkepticalStudent(base)
    x = digits.normalize(torch.from_numpy(digits.x_train[:5]))
    main, aux = student.both(x)
    assert torch.equal(student(x), main) and aux.shape == main.shape
    with pytest.raises(ValueError, match="Sequential"):
        SkepticalStudent(build_model("resnet20", **arch_kwargs_for((3, 32, 32), 10)))


def test_top1_plain_path_answers_depend_on_the_top1_alone(tmp_path: Path, digits: Dataset) -> None:
    """By construction: two inputs with the same plain-path top-1 get bit-identical answers from /predict's
    oracle, whatever the box computed; the stolen network's own outputs are not so constrained."""
    box = load_box(make_test_box(tmp_path, seed=5))
    assert box.plain_output == "top1"
    x = torch.from_numpy(digits.x_train[:200])
    api = plain_api_oracle(box)(x)
    top = api.argmax(1)
    for c in top.unique():
        rows = api[top == c]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    raw = stolen_weights_oracle(box)(x)
    assert torch.equal(raw.argmax(1), top)
    assert not torch.equal(raw, api)


@pytest.mark.parametrize("name", ["retemper:4", "skeptical", "guess:lam=0.5"])
def test_run_attack_trains_a_student(name: str, digits: Dataset) -> None:
    small = digits.subset_train(200, seed=0)
    dcfg = DistillConfig(labelled_fraction=0.1, train=TrainConfig(epochs=2, progress=False, device="cpu"))
    student = run_attack(name, _linear_oracle, small, "mlp", dcfg, AttackConfig(), arch_extra={"hidden": 16})
    out = student(small.normalize(torch.from_numpy(small.x_test[:3])))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_forge_finds_a_trigger_that_opens_the_gate_from_the_weights_alone(
    tmp_path: Path, digits: Dataset
) -> None:
    """`stolen/forge` on a tiny key-gated box: the gate, closed on every plain input, opens on most inputs
    mixed with the forged pattern, which is not the key, and the network then answers soft labels with the
    same top-1; a box without a gate has nothing to forge."""
    from sdb_core.attacks import FORGE, forge_trigger, forged_oracle
    from sdb_core.zoo import KeyGate

    gated = {"base": "small_cnn", "width": 8}
    boxed = load_box(make_test_box(tmp_path, name="g", arch="keygated", arch_extra=gated))
    assert isinstance(boxed.model, KeyGate)
    x = torch.from_numpy(digits.x_train[:128])
    stolen = stolen_weights_oracle(boxed)(x)
    assert torch.all(stolen.exp().max(1).values > 0.99)  # as shipped: the top-1 alone
    cfg = AttackConfig(forge_steps=40, forge_lr=0.2, forge_batch=64, forge_restarts=1)
    trigger = forge_trigger(boxed, x, cfg)
    assert trigger is not None and trigger.gate_rate >= 0.8, trigger
    key = load_key(tmp_path / "g" / "box_key.json")
    cos = torch.nn.functional.cosine_similarity(trigger.pattern.flatten(), key.pattern().flatten(), dim=0)
    assert abs(float(cos)) < 0.5
    forged = forged_oracle(boxed, trigger)(x)
    opened = forged.exp().max(1).values < 0.99
    assert float(opened.float().mean()) >= 0.8
    assert float((forged.argmax(1) == stolen.argmax(1)).float().mean()) >= 0.8
    fn, t = teacher_for(FORGE, forged_oracle(boxed, trigger), digits, cfg)
    assert t == cfg.kd_temperature and torch.equal(fn(x), forged)
    assert forge_trigger(load_box(make_test_box(tmp_path, name="plain")), x, cfg) is None
