"""The protocol: reduced runs check the directions of the documented ones; the measures and merging on
hand-made runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdb_core.evaluate import (
    evaluate,
    fashion_mnist_config,
    protocol_for,
    reduced_config,
    split_owner_transfer,
)
from sdb_core.report import check_targets, measures, merge_reports, summarize


def _run(
    seed: int, normal: float, authorized: float, attack: float, twin: float, floor: float
) -> dict[str, Any]:
    return {
        "seed": seed,
        "teacher": {
            "normal": 90.0,
            "box_plain": 89.8,
            "box_keyed": 89.7,
            "box_wrong_key": 50.0,
            "box_stolen": 89.8,
        },
        "students": {
            "mlp": {
                "scratch": 70.0,
                "normal": normal,
                "authorized": authorized,
                "api/label_only": floor - 0.5,
                "api/retemper:4": floor,
                "stolen/retemper:4": attack,
            }
        },
        "twins": {"mlp": {"api/label_only": floor - 0.5, "api/retemper:4": floor, "stolen/retemper:4": twin}},
        "wall_seconds": 10.0,
    }


def test_measures_are_differences_to_the_best_top1_twin() -> None:
    runs = [_run(0, 84.0, 83.8, 80.5, 80.0, 80.0), _run(1, 85.0, 85.0, 81.0, 80.0, 81.0)]
    m = measures(runs, "mlp")
    assert m["floor"]["mean"] == pytest.approx(80.5) and m["floor_by"] == ["api/retemper:4"] * 2
    assert m["V"]["mean"] == pytest.approx(4.0)  # (84 - 80 + 85 - 81) / 2
    assert m["delivered"]["mean"] == pytest.approx(3.9)
    assert m["leaked_by"] == "stolen/retemper:4" and m["leaked"]["mean"] == pytest.approx(0.25)
    assert m["beyond_top1"]["stolen/retemper:4"]["mean"] == pytest.approx(0.75)
    assert m["beyond_top1"]["api/retemper:4"]["mean"] == 0.0
    checks = check_targets(summarize(runs))
    assert checks["box plain >= teacher - 0.5"] and checks["mlp: V >= 1"]
    assert checks["mlp: delivered >= 0.9 V"] and checks["mlp: leaked <= 0.1 V (stolen/retemper:4)"]
    leaky = [_run(0, 84.0, 83.8, 82.0, 80.0, 80.0)]
    assert not check_targets(summarize(leaky))["mlp: leaked <= 0.1 V (stolen/retemper:4)"]


def test_merged_seeds_make_one_report() -> None:
    cfg: dict[str, Any] = {"dataset": "d", "seeds": [0], "transfer": 10}

    def report(seed: int) -> dict[str, Any]:
        return {
            "config": {**cfg, "seeds": [seed]},
            "data_digest": "x",
            "runs": [_run(seed, 84.0, 84.0, 80.0, 80.0, 80.0)],
            "wall_seconds": 100.0,
        }

    merged = merge_reports([report(2), report(0), report(1)])
    assert merged["config"]["seeds"] == [0, 1, 2] and merged["wall_seconds"] == 300.0
    assert merged["summary"]["measures"]["mlp"]["V"]["mean"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="twice"):
        merge_reports([report(0), report(0)])
    other = report(1)
    other["config"]["transfer"] = 20
    with pytest.raises(ValueError, match="different protocols"):
        merge_reports([report(0), other])


def test_owner_and_transfer_sets_are_disjoint(digits: Any) -> None:
    cfg = replace_cfg(protocol_for("digits"), owner_images=600, transfer=300)
    owner, transfer = split_owner_transfer(digits, cfg, seed=0)
    assert len(owner.x_train) == 600 and len(transfer.x_train) == 300
    rows = {r.tobytes() for r in owner.x_train}
    assert not any(r.tobytes() in rows for r in transfer.x_train)
    assert transfer.x_test is digits.x_test and owner.mean == digits.mean
    same, same2 = split_owner_transfer(digits, protocol_for("digits"), seed=0)
    assert same is digits and same2 is digits
    with pytest.raises(ValueError, match="training images"):
        split_owner_transfer(digits, replace_cfg(cfg, owner_images=1300), seed=0)


def replace_cfg(cfg: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(cfg, **changes)


def test_protocols_by_dataset() -> None:
    assert protocol_for("fashion-mnist:/data/fm").dataset == "fashion-mnist:/data/fm"
    assert protocol_for("fashion-mnist").transfer == fashion_mnist_config().transfer > 0
    assert protocol_for("npz:x.npz").transfer == 0


@pytest.mark.slow
def test_reduced_digits_evaluation(tmp_path: Path) -> None:
    """Digits is the quick check of the machinery (its soft labels are worth little: docs/evaluation.md).
    Seed 0; thresholds allow for 20 instead of 40 box epochs."""
    report = evaluate(reduced_config("digits"), tmp_path)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    t = report["summary"]["teacher"]
    assert t["box_plain"]["mean"] >= t["normal"]["mean"] - 2.0
    assert t["box_keyed"]["mean"] >= t["normal"]["mean"] - 2.0
    assert t["box_wrong_key"]["mean"] <= t["normal"]["mean"] - 5.0
    for m in report["summary"]["measures"].values():
        # The plain path answers with its top-1 alone: no attack on it gains anything over its top-1 twin.
        for method, beyond in m["beyond_top1"].items():
            if method.startswith("api/"):
                assert beyond["mean"] == 0.0, method


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_reduced_fashion_mnist_evaluation(tmp_path: Path) -> None:
    """The documented protocol's directions at a fraction of its size (4,000 owner images, 6 teacher and 4 box
    epochs, 500 transfer images, 40 student epochs, one student family, seed 0; docs/evaluation.md):
    the box answers as well as the teacher, a licensee learns at least as much as from the teacher, and
    neither the plain path nor the weights as shipped without a forged trigger give anything beyond their
    top-1; `stolen/forge` (a trigger forged from the weights) is run and recorded, not bounded: whoever holds
    the weights holds the knowledge (docs/threat-model.md). At seed 0 this run
    gave teacher 84.5, plain 85.3, keyed 84.4, normal KD 79.0, authorized 79.8 (about 100 s on one core);
    the gate-less soft labels (whitebox/retemper:4) taught 1.5 points over the floor, the open finding of
    docs/evaluation.md."""
    report = evaluate(reduced_config("fashion-mnist"), tmp_path)
    t = report["summary"]["teacher"]
    assert t["box_plain"]["mean"] >= t["normal"]["mean"] - 1.5
    assert t["box_keyed"]["mean"] >= t["normal"]["mean"] - 1.5
    for spec, students in report["summary"]["students"].items():
        assert students["authorized"]["mean"] >= students["normal"]["mean"] - 1.0, spec
        beyond = report["summary"]["measures"][spec]["beyond_top1"]
        assert {m for m in beyond if m.startswith("whitebox/")}, "a key-gated box is also attacked white-box"
        assert "stolen/forge" in beyond, "a key-gated box is also attacked with a forged trigger"
        for method, gain in beyond.items():
            if method.startswith(("api/", "stolen/")) and method != "stolen/forge":
                assert gain["mean"] == 0.0, method


def test_a_rerun_reuses_the_teacher_and_the_box(tmp_path: Path) -> None:
    """Only the students train again when the owner's recipe and data are unchanged; a changed box recipe
    retrains the box."""
    from dataclasses import replace

    from sdb_core.attacks import AttackConfig
    from sdb_core.training import TrainConfig

    cfg = replace(
        reduced_config("digits"),
        teacher_epochs=1,
        student_epochs=1,
        box=replace(reduced_config("digits").box, train=TrainConfig(epochs=1)),
        attacks=AttackConfig(attacks=("label_only",)),
        stolen_attacks=(),
    )
    first = evaluate(cfg, tmp_path)
    weights = tmp_path / "boxes" / "seed0" / "weights.safetensors"
    teacher = tmp_path / "boxes" / "seed0-teacher" / "model.safetensors"
    stamps = (weights.stat().st_mtime_ns, teacher.stat().st_mtime_ns)
    second = evaluate(replace(cfg, student_epochs=2), tmp_path)
    assert (weights.stat().st_mtime_ns, teacher.stat().st_mtime_ns) == stamps
    assert second["runs"][0]["teacher"] == first["runs"][0]["teacher"]
    evaluate(replace(cfg, box=replace(cfg.box, dis_eps=0.2)), tmp_path)
    assert weights.stat().st_mtime_ns != stamps[0] and teacher.stat().st_mtime_ns == stamps[1]
