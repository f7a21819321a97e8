"""Trial (2026-12-07, fourth round): the class pattern traced against shadow students.

A `small_cnn:16` student's pattern residual (its centred non-top log-probabilities minus the reference's,
averaged per reference top-1 class) is mostly its family's own error, which random decoy patterns project
too: the decoys' spread is wide and the leaker's z small. Here the owner trains shadow students of the
suspect's family on its *own* images (not the licensee's) from clean soft labels, and subtracts their mean
centred log-probabilities instead of the reference's. Same marks as the product (`sdb_core.pattern`), an
`mlp:512` teacher as in the third round's trial (faster than the protocol's box), students distilled like
the protocol's at 10,000 images (KD T = 4, alpha 0.9, 10 % labels, 10 epochs).

nice .venv/bin/python research/traceability/shadow_trial.py --amps 0.2,0.4 --shadows 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig
from sdb_core.pattern import apply_pattern, keyed_patterns, pattern_statistics, random_patterns
from sdb_core.students import StudentJob, StudentPool
from sdb_core.training import TrainConfig, model_fn, train_classifier

C, T, N_KEYS = 10, 4.0, 20


def centred(p: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    off = torch.ones_like(p, dtype=torch.bool).scatter(1, top[:, None], False)
    lp = p.double().clamp_min(1e-30).log()
    return torch.where(off, lp - (lp * off).sum(1, keepdim=True) / (C - 1), 0.0)


def per_class(r: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(C, C, dtype=torch.float64).index_add_(0, top, r)
    return sums / torch.bincount(top, minlength=C).clamp_min(1).double()[:, None]


def z_scores(residual: torch.Tensor, issued: torch.Tensor, decoys: torch.Tensor) -> torch.Tensor:
    s_i, s_d = pattern_statistics(residual, issued), pattern_statistics(residual, decoys)
    med = s_d.median()
    return (s_i - med) / (1.4826 * (s_d - med).abs().median())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amps", default="0.2,0.4")
    ap.add_argument("--shadows", type=int, default=2)
    ap.add_argument("--size", type=int, default=10_000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(0).permutation(len(ds.x_train))
    owner = ds.subset(perm[:20_000], "owner")
    teacher, _ = train_classifier(
        owner, "mlp", TrainConfig(epochs=8, progress=False), arch_extra={"hidden": 512}
    )
    tfn = model_fn(teacher, owner)
    issued = torch.tensor(keyed_patterns(1, C, N_KEYS), dtype=torch.float64).reshape(N_KEYS, C, C)
    decoys = random_patterns(1000, C, np.random.default_rng(2)).double()
    transfer = ds.subset(perm[20_000 : 20_000 + args.size], "transfer")
    shadow_set = ds.subset(perm[: args.size], "shadow")  # the owner's own images
    xtest = torch.from_numpy(ds.x_test)
    with torch.no_grad():
        ref = torch.softmax(tfn(xtest), 1)
        soft = torch.softmax(tfn(torch.from_numpy(transfer.x_train)) / T, 1)
        shadow_logits = tfn(torch.from_numpy(shadow_set.x_train))
    top = ref.argmax(1)
    dcfg = DistillConfig(
        alpha=0.9, temperature=T, labelled_fraction=0.1, train=TrainConfig(epochs=10, progress=False)
    )
    amps = [float(a) for a in args.amps.split(",")]
    extra = {"width": 16}
    jobs = []
    for j, a in enumerate(amps):
        marked = apply_pattern(issued[j * 7 % N_KEYS], soft, a)
        jobs.append(
            StudentJob(transfer, "small_cnn", extra, T * torch.log(marked.clamp_min(1e-30)), dcfg, f"a{a}")
        )
    jobs.append(
        StudentJob(
            transfer,
            "small_cnn",
            extra,
            tfn(torch.from_numpy(transfer.x_train)).detach(),
            replace(dcfg, train=replace(dcfg.train, seed=50)),
            "innocent",
        )
    )
    jobs += [
        StudentJob(
            shadow_set,
            "small_cnn",
            extra,
            shadow_logits,
            replace(dcfg, train=replace(dcfg.train, seed=100 + k)),
            f"shadow{k}",
        )
        for k in range(args.shadows)
    ]
    with StudentPool(2) as pool:
        students = pool.train(jobs)
    outs = []
    for st, job in zip(students, jobs, strict=True):
        with torch.no_grad():
            outs.append(torch.softmax(model_fn(st, job.ds)(xtest), 1))
    shadow_mean = torch.stack([centred(o, top) for o in outs[len(amps) + 1 :]]).mean(0)
    print(f"teacher top-1 {(top.numpy() == ds.y_test).mean():.4f} ({time.time() - t0:.0f}s)")
    for j, name in enumerate([*(f"leaker a={a}" for a in amps), "innocent (clean KD)"]):
        sus = centred(outs[j], top)
        for label, base in (("reference", centred(ref, top)), (f"{args.shadows} shadows", shadow_mean)):
            z = z_scores(per_class(sus - base, top), issued, decoys)
            lic = j * 7 % N_KEYS if j < len(amps) else -1
            others = torch.cat([z[:lic], z[lic + 1 :]]) if lic >= 0 else z
            lead = f"leaker z {z[lic]:.2f} rank {int((z > z[lic]).sum()) + 1}, " if lic >= 0 else ""
            acc = (outs[j].argmax(1).numpy() == ds.y_test).mean()
            print(f"{name:22s} top-1 {acc:.4f} against {label:10s}: {lead}max other z {others.max():.2f}")


if __name__ == "__main__":
    main()
