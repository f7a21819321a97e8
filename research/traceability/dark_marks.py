"""Trial (2026-12-06, third round): marks on the dark knowledge, not on the top-1 probability.

A `small_cnn:16` student distilled from 10,000 images does not learn a smooth image-dependent mark well
enough to stand out of its own smooth residual (NOTES.md). But what a distilled student does learn, even
from few epochs, is the teacher's class-conditional dark knowledge: which wrong classes each class
resembles. This trial gives each licensee a class-conditional pattern U_i on the non-top classes: for a row
whose top-1 is c, log p_k += a * U_i[c, k] for every k != c, then the non-top classes are rescaled to keep
the top-1 probability as it was (top-1 preserved; a row whose runner-up would overtake stays unmarked).
U_i lives in the 80-dim space (10 classes x 8 zero-mean non-top dims), unit norm; issued licensees take
orthonormal rows; decoys are random unit patterns.

Trace: per row, the suspect's log-probabilities at T = 1 over the non-top classes of the reference's top-1,
centred, minus the reference's (the clean teacher); averaged per class into R[c, k]; statistic <R, U_i>;
calibrated against 1,000 decoys (median, 1.4826 MAD).

nice python research/traceability/dark_marks.py --families small_cnn:16 --sizes 10000 --amps 0.1,0.2,0.4
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch

from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig
from sdb_core.students import StudentJob, StudentPool
from sdb_core.training import TrainConfig, model_fn, train_classifier

C = 10


def basis_patterns(
    n: int, rng: np.random.Generator, orthonormal: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """n unit patterns [n, C, C]: zero diagonal, each row zero-mean over its non-top entries (over the
    entries of `mask` where given)."""
    off = ~torch.eye(C, dtype=torch.bool) if mask is None else mask
    u = torch.zeros(n, C, C, dtype=torch.float64)
    u[:, off] = torch.from_numpy(rng.standard_normal((n, int(off.sum()))))
    u = (u - u.sum(2, keepdim=True) / off.sum(1, keepdim=True).clamp_min(1)) * off
    if orthonormal:
        q, _ = torch.linalg.qr(u.flatten(1).T)
        u = q.T.reshape(n, C, C)
    return u / u.flatten(1).norm(dim=1)[:, None, None]


def pair_patterns(n: int, rng: np.random.Generator, orthonormal: bool) -> torch.Tensor:
    """n unit patterns [n, C, C, C] over (top c, runner-up c2, class k): zero unless k, c, c2 differ; zero
    mean over the valid k of each (c, c2)."""
    valid = torch.ones(C, C, C, dtype=torch.bool)
    for c in range(C):
        valid[c, c, :] = False
        valid[c, :, c] = False
        valid[:, c, c] = False
    u = torch.zeros(n, C, C, C, dtype=torch.float64)
    u[:, valid] = torch.from_numpy(rng.standard_normal((n, int(valid.sum()))))
    cnt = valid.sum(2, keepdim=True).clamp_min(1)
    u = (u - u.sum(3, keepdim=True) / cnt) * valid
    if orthonormal:
        q, _ = torch.linalg.qr(u.flatten(1).T)
        u = q.T.reshape(n, C, C, C)
    return u / u.flatten(1).norm(dim=1)[:, None, None, None]


def apply_pair(u: torch.Tensor, probs: torch.Tensor, amp: float) -> torch.Tensor:
    p = probs.double()
    t2 = p.topk(2, 1).indices
    top, run = t2[:, 0], t2[:, 1]
    shift = amp * math.sqrt(C * (C - 1) * (C - 3)) * u[top, run]
    fixed = torch.zeros_like(p, dtype=torch.bool).scatter(1, t2, True)
    q = torch.where(fixed, 0.0, p * torch.exp(shift))
    keep = p.gather(1, t2).sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300) * (1 - keep)
    q = torch.where(fixed, p, q)
    ok = q.argmax(1) == top
    return torch.where(ok[:, None], q, p).float()


def apply_dark(u: torch.Tensor, probs: torch.Tensor, amp: float) -> torch.Tensor:
    p = probs.double()
    top = p.argmax(1)
    shift = amp * math.sqrt(int((u.abs() > 0).sum()) - C) * u[top]  # per-entry RMS amp (about)
    q = p * torch.exp(shift)
    p1 = p.gather(1, top[:, None])
    q = q.scatter(1, top[:, None], 0.0)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300) * (1 - p1)
    q = q.scatter(1, top[:, None], p1)
    ok = q.argmax(1) == top
    return torch.where(ok[:, None], q, p).float()


def residual(sus: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of the centred non-top log-probability residual [C, C], and the rows' top-1."""
    top = ref.argmax(1)
    off = torch.ones_like(ref, dtype=torch.bool).scatter(1, top[:, None], False)
    ls, lt = sus.double().clamp_min(1e-30).log(), ref.double().clamp_min(1e-30).log()
    ls = torch.where(off, ls - (ls * off).sum(1, keepdim=True) / (C - 1), 0.0)
    lt = torch.where(off, lt - (lt * off).sum(1, keepdim=True) / (C - 1), 0.0)
    r = ls - lt
    out = torch.zeros(C, C, dtype=torch.float64)
    for c in range(C):
        m = top == c
        if m.any():
            out[c] = r[m].mean(0)
    return out, top


def score(r: torch.Tensor, pats: torch.Tensor) -> torch.Tensor:
    return (pats * r).flatten(1).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="small_cnn:16")
    ap.add_argument("--sizes", default="10000")
    ap.add_argument("--amps", default="0.1,0.2,0.4")
    ap.add_argument("--per-amp", type=int, default=1)
    ap.add_argument("--clean", type=int, default=2)
    ap.add_argument("--spare", type=int, default=0, help="leave each class's N most similar classes alone")
    ap.add_argument("--pairs", action="store_true", help="patterns over (top-1, runner-up)")
    ap.add_argument("--budget", type=int, default=100_000)
    ap.add_argument("--save", default="", help="a folder for the students' answers on the test images")
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
    mask = None
    if args.spare:
        with torch.no_grad():
            po = torch.softmax(tfn(torch.from_numpy(owner.x_train)) / 4.0, 1)
        sim = torch.stack([po[po.argmax(1) == c].mean(0) for c in range(C)])
        sim.fill_diagonal_(-1.0)
        mask = torch.ones(C, C, dtype=torch.bool)
        mask.fill_diagonal_(False)
        mask.scatter_(1, sim.topk(args.spare, 1).indices, False)
    if args.pairs:
        issued = pair_patterns(20, np.random.default_rng(1), orthonormal=True)
        decoys = pair_patterns(1000, np.random.default_rng(2), orthonormal=False)
    else:
        issued = basis_patterns(20, np.random.default_rng(1), True, mask)
        decoys = basis_patterns(1000, np.random.default_rng(2), False, mask)
    apply = apply_pair if args.pairs else apply_dark
    xtest = torch.from_numpy(ds.x_test)
    with torch.no_grad():
        ref = torch.softmax(tfn(xtest), 1)
    amps = [float(a) for a in args.amps.split(",")]
    print(f"teacher top-1 {(ref.argmax(1).numpy() == ds.y_test).mean():.4f} ({time.time() - t0:.0f}s)")
    with StudentPool(2) as pool:
        for size in (int(s) for s in args.sizes.split(",")):
            transfer = ds.subset(perm[20_000 : 20_000 + size], "transfer")
            xt = torch.from_numpy(transfer.x_train)
            with torch.no_grad():
                soft = torch.softmax(tfn(xt) / 4.0, dim=1)
            dcfg = DistillConfig(
                alpha=0.9,
                temperature=4.0,
                labelled_fraction=0.1,
                train=TrainConfig(epochs=max(1, min(120, args.budget // size)), progress=False),
            )
            for fam in args.families.split(","):
                arch, _, w = fam.partition(":")
                extra = {"width": int(w)} if arch == "small_cnn" else {"hidden": int(w)}
                plan = [(i, a) for a in amps for i in range(args.per_amp)]
                jobs = []
                for j, (_i, a) in enumerate(plan):
                    lic = (j * 7) % 20
                    marked = apply(issued[lic], soft, a)
                    changed = (marked.argmax(1) != soft.argmax(1)).sum().item()
                    assert changed == 0
                    jobs.append(StudentJob(transfer, arch, extra, 4.0 * torch.log(marked), dcfg, f"s{j}"))
                jobs += [
                    StudentJob(
                        transfer,
                        arch,
                        extra,
                        tfn(xt).detach(),
                        replace(dcfg, train=replace(dcfg.train, seed=100 + k)),
                        f"c{k}",
                    )
                    for k in range(args.clean)
                ]
                # clean students at other seeds
                for j, st in enumerate(pool.train(jobs)):
                    sfn = model_fn(st, transfer)
                    with torch.no_grad():
                        sus = torch.softmax(sfn(xtest), 1)
                    acc = (sus.argmax(1).numpy() == ds.y_test).mean()
                    if args.save:
                        torch.save(
                            {
                                "sus": sus,
                                "ref": ref,
                                "lic": (j * 7) % 20 if j < len(plan) else -1,
                                "amp": plan[j][1] if j < len(plan) else 0.0,
                                "acc": float(acc),
                            },
                            f"{args.save}/{fam}-{size}-{j}{'p' if args.pairs else ''}.pt",
                        )
                    if args.pairs:
                        print(
                            f"{fam} n={size} job {j}: top-1 {acc:.4f} ({time.time() - t0:.0f}s)", flush=True
                        )
                        continue
                    r, _ = residual(sus, ref)
                    d = score(r, decoys)
                    med = d.median()
                    spread = 1.4826 * (d - med).abs().median()
                    zs = (score(r, issued) - med) / spread
                    za = score(r, issued) * math.sqrt(int((issued[0].abs() > 0).sum()) - C) / r.norm()
                    if j < len(plan):
                        lic = (j * 7) % 20
                        rank = int((zs > zs[lic]).sum()) + 1
                        inn = max(float(z) for k, z in enumerate(zs) if k != lic)
                        print(
                            f"{fam} n={size} amp {plan[j][1]} lic {lic}: top-1 {acc:.4f} z {zs[lic]:.2f}"
                            f" (analytic {za[lic]:.2f}) rank {rank} max innocent {inn:.2f}"
                            f" |R| {r.norm():.3f} spread {spread:.4f} ({time.time() - t0:.0f}s)",
                            flush=True,
                        )
                    else:
                        print(
                            f"{fam} n={size} clean KD: top-1 {acc:.4f} max z {zs.max():.2f}"
                            f" |R| {r.norm():.3f} spread {spread:.4f} ({time.time() - t0:.0f}s)",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
