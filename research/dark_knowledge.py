"""Where the teacher's dark knowledge lives on the Fashion-MNIST protocol, and whether top-1 answers alone
can recover it (research/evaluation-rounds.md, "Fifth round").

One seed of the protocol's owner/transfer split and its teacher (cached in OUT), then one student family
distilled from the teacher's logits on the transfer set (with `box=DIR`: from the soft labels inside that
box, its gate cut out, beside the teacher's), taken apart:

- `normal`: the teacher's logits (normal KD, T = 4);
- `ranking`: every answer's wrong-class logits as the teacher's, its margin (top logit over the mean wrong
  logit) set to the mean margin over the transfer set (raised to 0.5 over the runner-up where that would
  lose the top-1): *which* wrong class, not *how sure*;
- `margin`: the wrong classes flat, the margin the teacher's: *how sure*, not which wrong class;
- `margin-shuffled`: the same margins dealt to other images (the same distribution, no per-image knowledge);
- `flat`: one margin for every answer (label smoothing);
- the top-1 recipes of the suite (`label_only`, `retemper:T` on the top-1), whose best is the floor;
- `smooth:SIGMA:T`: many-query top-1 smoothing, the `average:noise` attack with 64 queries per image at a
  Gaussian noise of SIGMA data stds, on the teacher's top-1 (what a thief with the weights can afford).

    .venv/bin/python research/dark_knowledge.py OUT SEED STUDENT [box=DIR] [students=N]
    #   e.g. runs/dk 0 mlp:hidden=512; box=DIR: a key-gated box of that seed (research/whitebox_trial.py)
    .venv/bin/python research/dark_knowledge.py OUT summary        # OUT/summary.json: mean ± std over seeds
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdb_core.artifact import load_box
from sdb_core.attacks import AttackConfig, Oracle, attack_targets, top1_oracle, train_on_targets
from sdb_core.data import load_dataset
from sdb_core.distill import distill_logits, query_teacher
from sdb_core.evaluate import (
    distill_config,
    fashion_mnist_config,
    owner_teacher,
    parse_student,
    split_owner_transfer,
)
from sdb_core.oracles import log_softmax_oracle, whitebox_oracle
from sdb_core.training import accuracy, model_fn

SMOOTHING = ((0.05, 1.0), (0.05, 4.0), (0.1, 1.0), (0.1, 4.0), (0.2, 4.0))


def parts(z: Tensor, seed: int) -> dict[str, Tensor]:
    """The teacher's logits split into which-wrong-class and how-sure (see the module docstring)."""
    top = z.argmax(1)
    hot = torch.nn.functional.one_hot(top, z.shape[1]).bool()
    wrong_mean = z.masked_fill(hot, 0).sum(1) / (z.shape[1] - 1)
    margin = z.gather(1, top[:, None])[:, 0] - wrong_mean
    centered = (z - wrong_mean[:, None]).masked_fill(hot, 0)  # wrong classes around their mean, label 0

    def with_margin(base: Tensor, m: Tensor) -> Tensor:
        return base + hot.float() * m[:, None]

    shuffled = margin[torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))]
    flat = torch.zeros_like(z)
    return {
        "normal": z,
        # one margin for all, raised where a wrong class would otherwise overtake the top-1
        "ranking": with_margin(centered, torch.maximum(margin.mean(), centered.max(1).values + 0.5)),
        "margin": with_margin(flat, margin),
        "margin-shuffled": with_margin(flat, shuffled),
        "flat": with_margin(flat, margin.mean().expand_as(margin)),
    }


def main(out: Path, seed: int, student: str, box: Path | None = None, students: int = 1) -> dict[str, object]:
    """Teacher mode (no `box`): the teacher's parts and the smoothing attacks. Box mode: the parts of the
    soft labels inside `box` with its gate cut out (`whitebox_oracle`), beside the teacher's logits and its
    margin alone (also rescaled to the box's mean margin); the floor is then the best top-1 recipe on the
    box's own top-1. Each cell is averaged over `students` student seeds (seed + 1000 s), each against the
    floor of its own seed."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    cfg = replace(fashion_mnist_config(), progress=False, device="cpu")
    ds = load_dataset(cfg.dataset)
    owner, transfer = split_owner_transfer(ds, cfg, seed)
    teacher = model_fn(owner_teacher(cfg, owner, seed, cache=out / f"teacher-s{seed}")[0], owner)
    dev = torch.device("cpu")
    arch, extra = parse_student(student)
    acfg = AttackConfig()
    z = query_teacher(teacher, transfer.x_train)
    oracle: Oracle = log_softmax_oracle(teacher)
    cells = parts(z, seed)
    if box is not None:
        wb = whitebox_oracle(load_box(box, device=dev))
        if wb is None:
            raise SystemExit(f"{box} has no key gate to cut out")
        oracle, box_cells = wb, parts(query_teacher(wb, transfer.x_train), seed)
        # "margin" is zero but for the top-1, so its row max is each answer's margin
        margin_t, margin_b = cells["margin"].max(1).values, box_cells["margin"].max(1).values
        cells = {
            "teacher": z,
            "teacher/margin": cells["margin"],
            "teacher/margin@box-scale": cells["margin"] * margin_b.mean() / margin_t.mean(),
            **{f"box/{name}": t for name, t in box_cells.items()},
        }
    top1 = top1_oracle(oracle)

    def score(model: torch.nn.Module) -> float:
        return accuracy(model_fn(model, transfer), ds.x_test, ds.y_test, dev)

    runs = []
    for s in range(students):
        dcfg = distill_config(cfg, seed + 1000 * s)
        res = {
            name: score(distill_logits(transfer, arch, t, dcfg, arch_extra=extra))
            for name, t in cells.items()
        }
        floor = {
            name: score(
                train_on_targets(
                    transfer, arch, attack_targets(name, top1, transfer, acfg), dcfg, acfg, arch_extra=extra
                )
            )
            for name in ("label_only", *(f"retemper:{t:g}" for t in acfg.temperatures))
        }
        for sigma, t in SMOOTHING if box is None else ():
            scfg = replace(acfg, average_queries=64, average_noise=sigma, kd_temperature=t)
            targets = attack_targets("average:noise", top1, transfer, scfg)
            res[f"smooth:{sigma:g}:{t:g}"] = score(
                train_on_targets(transfer, arch, targets, dcfg, scfg, arch_extra=extra)
            )
        runs.append({"student_seed": dcfg.train.seed, "floor_recipes": floor, "students": res})
    over = [{k: v - max(r["floor_recipes"].values()) for k, v in r["students"].items()} for r in runs]
    report: dict[str, object] = {
        "seed": seed,
        "student": student,
        "box": str(box) if box else None,
        "teacher_top1": accuracy(teacher, ds.x_test, ds.y_test, dev),
        "floor": statistics.mean(max(r["floor_recipes"].values()) for r in runs),
        "over_floor": {k: statistics.mean(o[k] for o in over) for k in over[0]},
        "over_floor_sem": {
            k: statistics.stdev(o[k] for o in over) / len(over) ** 0.5 if len(over) > 1 else 0.0
            for k in over[0]
        },
        "runs": runs,
        "wall_seconds": time.perf_counter() - start,
    }
    (out / f"{'box-' if box else ''}s{seed}-{arch}.json").write_text(json.dumps(report, indent=2))
    return report


def summary(out: Path) -> dict[str, object]:
    """Every teacher-mode `OUT/s*-*.json` by student, and each part's points over the floor as mean ± std
    over seeds; box-mode reports (`OUT/box-*.json`) ride along as they are."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("s*-*.json")):
        report = json.loads(path.read_text())
        runs.setdefault(report["student"], []).append(report)
    stats = {
        student: {
            name: {
                "mean": round(statistics.mean(r["over_floor"][name] for r in reports), 2),
                "std": round(statistics.stdev(r["over_floor"][name] for r in reports), 2)
                if len(reports) > 1
                else 0.0,
            }
            for name in reports[0]["over_floor"]
        }
        for student, reports in runs.items()
    }
    boxes = [json.loads(p.read_text()) for p in sorted(out.glob("box-s*-*.json"))]
    merged: dict[str, object] = {"summary": stats, "runs": runs, "boxes": boxes}
    (out / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
    return stats


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "summary":
        print(json.dumps(summary(Path(sys.argv[1])), indent=2))
    elif len(sys.argv) >= 4:
        opts = dict(o.split("=", 1) for o in sys.argv[4:])
        box = Path(opts["box"]) if "box" in opts else None
        report = main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], box, int(opts.get("students", 1)))
        print(json.dumps({k: report[k] for k in ("floor", "over_floor", "over_floor_sem")}, indent=2))
    else:
        sys.exit(__doc__)
