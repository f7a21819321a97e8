"""A quick trial of one box design against the white-box leak (research/evaluation-rounds.md).

One seed of the Fashion-MNIST protocol's owner/transfer split, the protocol's teacher (cached in OUT) and a
box with the given BoxConfig overrides; then the `mlp:hidden=512` family only: normal KD, authorized KD and
the three `whitebox/retemper:T` attacks with their top-1 twins (the floor here is the best twin). It also
prints how flat the soft labels inside the box are (wrong-class logit spread and its correlation with the
teacher's) on the owner's images, the transfer set and the test set. Roughly a third of a protocol seed.

    .venv/bin/python research/whitebox_trial.py OUT [seed=N] [KEY=VALUE ...] # e.g. dis_spread=5 train.lr=0.05
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdb_core.artifact import BoxedModel
from sdb_core.attacks import AttackConfig, attack_targets, top1_oracle, train_on_targets
from sdb_core.configurator import override
from sdb_core.data import load_dataset
from sdb_core.distill import distill
from sdb_core.evaluate import (
    distill_config,
    fashion_mnist_config,
    owner_box,
    split_owner_transfer,
)
from sdb_core.keys import BoxKey
from sdb_core.oracles import whitebox_oracle
from sdb_core.training import TeacherFn, accuracy, model_fn
from sdb_core.zoo import KeyGate, KeySplit

STUDENT = ("mlp", {"hidden": 512})
ATTACKS = ("retemper:1", "retemper:4", "retemper:20")


def flatness(boxed: BoxedModel, teacher: TeacherFn, x: np.ndarray, part: str = "soft") -> dict[str, float]:
    """Wrong-class logits of the soft labels inside (gate cut out; `part="base"`: a split box's base alone):
    spread, and correlation with the teacher's wrong-class logits (0: nothing beyond the top-1; 1: the
    teacher's ranking)."""
    assert isinstance(boxed.model, KeyGate)
    xs = torch.from_numpy(x[:2000])
    with torch.inference_mode():
        xn = boxed.normalize(xs)
        if part == "base":
            assert isinstance(boxed.model, KeySplit)
            z = boxed.model.parts(xn)[0]
        else:
            z = boxed.model.heads(xn)[0]
        zt = teacher(xs)
    wrong = ~F.one_hot(z.argmax(1), z.shape[1]).bool()
    zw, tw = z[wrong].view(len(z), -1), zt[wrong].view(len(z), -1)
    zc, tc = zw - zw.mean(1, keepdim=True), tw - tw.mean(1, keepdim=True)
    corr = ((zc * tc).sum(1) / (zc.norm(dim=1) * tc.norm(dim=1) + 1e-9)).mean()
    # How sure each answer is: the top logit's margin over the mean wrong logit, across inputs.
    margin = z.max(1).values - zw.mean(1)
    t_margin = zt.gather(1, z.argmax(1, keepdim=True))[:, 0] - tw.mean(1)
    mc, tmc = margin - margin.mean(), t_margin - t_margin.mean()
    return {
        "wrong_std": float(zw.std(1).mean()),
        "teacher_wrong_std": float(tw.std(1).mean()),
        "corr": float(corr),
        "margin_mean": float(margin.mean()),
        "margin_std": float(margin.std()),
        "teacher_margin_std": float(t_margin.std()),
        "margin_corr": float((mc * tmc).sum() / (mc.norm() * tmc.norm() + 1e-9)),
    }


def main(out: Path, options: list[str], seed: int = 0) -> dict[str, object]:
    start = time.perf_counter()
    torch.set_num_threads(1)
    cfg = fashion_mnist_config()
    cfg = replace(cfg, progress=False, box=override(cfg.box, options))  # as `sdb box --box-option`
    ds = load_dataset(cfg.dataset)
    owner, transfer = split_owner_transfer(ds, cfg, seed)
    key = BoxKey.from_int_seed(seed, ds.input_shape, cfg.box.lam)
    tag = "-".join(options) or "default"
    teacher, boxed = owner_box(cfg, owner, seed, out / tag, name="trial", key=key, cache=out / "teacher")
    dev = torch.device("cpu")
    dcfg = distill_config(replace(cfg, device="cpu"), seed)
    acfg = AttackConfig()
    arch, extra = STUDENT

    def score(student: torch.nn.Module) -> float:
        return accuracy(model_fn(student, transfer), transfer.x_test, transfer.y_test, dev)

    res: dict[str, float] = {
        "normal": score(distill(transfer, arch, teacher, dcfg, arch_extra=extra)),
        "authorized": score(distill(transfer, arch, boxed.keyed_logits, dcfg, arch_extra=extra)),
    }
    wb = whitebox_oracle(boxed)
    assert wb is not None, "the trial needs a key-gated box"
    twins: dict[str, float] = {}
    for name in ATTACKS:
        for oracle, into in ((wb, res), (top1_oracle(wb), twins)):
            t = attack_targets(name, oracle, transfer, acfg)
            into[name if into is twins else f"whitebox/{name}"] = score(
                train_on_targets(transfer, arch, t, dcfg, acfg, arch_extra=extra)
            )
    floor = max(twins.values())
    report: dict[str, object] = {
        "overrides": options,
        "seed": seed,
        "box": {k: v for k, v in boxed.manifest["metrics"].items() if isinstance(v, float)},
        "students": res,
        "twins": twins,
        "floor": floor,
        "V": res["normal"] - floor,
        "delivered": res["authorized"] - floor,
        "whitebox_leak": max(v for k, v in res.items() if k.startswith("whitebox/")) - floor,
        "flatness": {
            f"{split}/{part}": flatness(boxed, teacher, x, part)
            for split, x in (("owner", owner.x_train), ("transfer", transfer.x_train), ("test", ds.x_test))
            for part in (("soft", "base") if isinstance(boxed.model, KeySplit) else ("soft",))
        },
        "wall_seconds": time.perf_counter() - start,
    }
    (out / tag / "trial.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    seeds = [int(o.removeprefix("seed=")) for o in sys.argv[2:] if o.startswith("seed=")]
    rest = [o for o in sys.argv[2:] if not o.startswith("seed=")]
    print(json.dumps(main(Path(sys.argv[1]), rest, *seeds[-1:]), indent=2))
