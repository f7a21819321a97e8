"""One quick tuning trial on digits (one seed): teacher -> box -> students, printed as one JSON line.

Usage: .venv/bin/python scripts/core_trial.py [seed=0] [ep=30] [bep=30] [sep=30] [frac=1.0] [tw=32] [bw=tw]
           [blr=0.05] [students=small_cnn:8,mlp] [hard=0|1] [BoxConfig field=value ...]
hard=1 adds a label-only attacker: a student distilled from the plain path's top-1 alone.
e.g.   .venv/bin/python scripts/core_trial.py w_dis=2 dis_sharpness=2
       .venv/bin/python scripts/core_trial.py bw=64 bep=40 dis_sharpness=-4   (a box wider than the teacher,
       trained from scratch with the box objective)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F

from sdb_core.artifact import BoxedModel
from sdb_core.box import BoxConfig, train_box, wrong_key_fn
from sdb_core.data import load_digits
from sdb_core.distill import DistillConfig, distill
from sdb_core.keys import BoxKey
from sdb_core.training import TrainConfig, accuracy, model_fn, predict, resolve_device, train_classifier


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    args = dict(a.split("=", 1) for a in argv)
    seed, ep, bep, sep = (int(args.pop(k, d)) for k, d in (("seed", 0), ("ep", 30), ("bep", 30), ("sep", 30)))
    frac, tw, blr = float(args.pop("frac", 1.0)), int(args.pop("tw", 32)), float(args.pop("blr", 0.05))
    bw = int(args.pop("bw", tw))
    hard = bool(int(args.pop("hard", 0)))
    students = args.pop("students", "small_cnn:8,mlp").split(",")
    ds, dev = load_digits(), resolve_device("cpu")
    t0 = time.time()
    tcfg = TrainConfig(epochs=ep, seed=seed, progress=False)
    teacher, kw = train_classifier(ds, "small_cnn", tcfg, arch_extra={"width": tw})
    teacher_fn = model_fn(teacher, ds)
    bcfg = BoxConfig(train=TrainConfig(epochs=bep, seed=seed, progress=False, lr=blr))
    types = {f.name: f.type for f in fields(BoxConfig)}
    for k, v in args.items():
        setattr(bcfg, k, v if "str" in str(types[k]) else int(v) if "int" in str(types[k]) else float(v))
    key = BoxKey.from_int_seed(seed + 100, ds.input_shape, bcfg.lam)
    if bw != tw:
        bcfg.init_from_teacher = False
    box = train_box(teacher, ds, arch="small_cnn", arch_kwargs={**kw, "width": bw}, key=key, cfg=bcfg)
    manifest = {"name": "trial", "version": "1", "input_shape": list(ds.input_shape), "num_classes": 10,
                "class_names": ds.class_names, "temperature": 4.0, "arch": "small_cnn",
                "normalization": ds.normalization, "lam": bcfg.lam}  # fmt: skip
    boxed = BoxedModel(box, key, manifest, "cpu")
    wrong = wrong_key_fn(boxed, bcfg.lam, 999)
    paths = {"teacher": teacher_fn, "plain": boxed.plain_logits, "keyed": boxed.keyed_logits, "wrong": wrong}
    r: dict[str, Any] = {k: accuracy(fn, ds.x_test, ds.y_test, dev) for k, fn in paths.items()}
    t1 = time.time()
    for spec in students:
        arch, _, w = spec.partition(":")
        extra = {"width": int(w)} if w else {}
        teachers = {"scratch": None, "normal": teacher_fn, "unauth": boxed.plain_logits,
                    "auth": boxed.keyed_logits, "wrong": wrong}  # fmt: skip
        if hard:  # label-only extraction: the plain path's top-1 as (nearly one-hot) soft labels
            teachers["unauth_top1"] = lambda x: 100.0 * F.one_hot(boxed.plain_logits(x).argmax(1), 10).float()
        for name, fn in teachers.items():
            dcfg = DistillConfig(
                labelled_fraction=frac, train=TrainConfig(epochs=sep, seed=seed, progress=False)
            )
            student = distill(ds, arch, fn, dcfg, arch_extra=extra)
            r[f"{spec}/{name}"] = accuracy(model_fn(student, ds), ds.x_test, ds.y_test, dev)
    r["t_box"], r["t_students"] = round(t1 - t0, 1), round(time.time() - t1, 1)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
    y = torch.from_numpy(ds.y_test)
    rows = torch.arange(len(y))
    for name, fn in paths.items():
        z = predict(fn, ds.x_test, dev)
        p = F.softmax(z / 4, 1)
        others = p.clone()
        others[rows, y] = 0
        top = others.sort(1, descending=True).values
        print(
            f"{name}: p4_true={p[rows, y].mean():.3f} p4_2nd={top[:, 0].mean():.3f} "
            f"p4_3rd={top[:, 1].mean():.3f} logit_range={(z.max(1).values - z.min(1).values).mean():.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
