"""Re-score the students dark_marks.py saved (--save) with other statistics, without retraining.

python research/traceability/dark_rescore.py /tmp/dark
"""

from __future__ import annotations

import glob
import sys

import numpy as np
import torch

from research.traceability.dark_marks import C, basis_patterns, pair_patterns, residual

T = 4.0


def calibrated(issued: torch.Tensor, decoys: torch.Tensor) -> torch.Tensor:
    med = decoys.median()
    return (issued - med) / (1.4826 * (decoys - med).abs().median())


def main() -> None:
    issued = basis_patterns(20, np.random.default_rng(1), orthonormal=True)
    decoys = basis_patterns(1000, np.random.default_rng(2), orthonormal=False)
    pats = torch.cat([issued, decoys])
    ppats = torch.cat(
        [
            pair_patterns(20, np.random.default_rng(1), True),
            pair_patterns(1000, np.random.default_rng(2), False),
        ]
    )
    for path in sorted(glob.glob(f"{sys.argv[1]}/*.pt")):
        d = torch.load(path, weights_only=False)
        sus, ref, lic = d["sus"].double(), d["ref"].double(), d["lic"]
        top = ref.argmax(1)
        out = {}
        # 1. log space, per-class mean, unweighted
        r, _ = residual(sus, ref)
        s = (pats * r).flatten(1).sum(1)
        out["log"] = calibrated(s[:20], s[20:])
        # 1b. per class, the part of R along the reference's own centred log-profile removed (a student's tail
        # flatter or sharper than the teacher's)
        lt = ref.clamp_min(1e-30).log()
        off = torch.ones_like(ref, dtype=torch.bool).scatter(1, top[:, None], False)
        lt = torch.where(off, lt - (lt * off).sum(1, keepdim=True) / (C - 1), 0.0)
        prof = torch.zeros(C, C, dtype=torch.float64)
        for c in range(C):
            prof[c] = lt[top == c].mean(0)
        beta = (r * prof).sum(1, keepdim=True) / (prof * prof).sum(1, keepdim=True)
        rp = r - beta * prof
        s = (pats * rp).flatten(1).sum(1)
        out["logp"] = calibrated(s[:20], s[20:])
        # 1c. per row: the residual's slope on the row's own centred reference log-profile removed first
        ls = sus.clamp_min(1e-30).log()
        ls = torch.where(off, ls - (ls * off).sum(1, keepdim=True) / (C - 1), 0.0)
        rr = ls - lt
        b = (rr * lt).sum(1, keepdim=True) / (lt * lt).sum(1, keepdim=True).clamp_min(1e-12)
        rr = rr - b * lt
        r2 = torch.zeros(C, C, dtype=torch.float64)
        for c in range(C):
            r2[c] = rr[top == c].mean(0)
        s = (pats * r2).flatten(1).sum(1)
        out["rowp"] = calibrated(s[:20], s[20:])
        r2m = torch.zeros(C, C, dtype=torch.float64)
        for c in range(C):
            r2m[c] = rr[top == c].median(0).values
        s = (pats * r2m).flatten(1).sum(1)
        out["rowmed"] = calibrated(s[:20], s[20:])
        # 2. log space weighted by the reference's mean non-top probability at T per class
        ref4 = torch.softmax(ref.clamp_min(1e-30).log() / T, 1)
        w = torch.zeros(C, C, dtype=torch.float64)
        for c in range(C):
            w[c] = ref4[top == c].mean(0)
        w.fill_diagonal_(0)
        s = (pats * r * w).flatten(1).sum(1)
        out["logw"] = calibrated(s[:20], s[20:])
        # 3. probability space at T: the exact change each pattern makes, against the residual
        sus4 = torch.softmax(sus.clamp_min(1e-30).log() / T, 1)
        res = sus4 - ref4  # [N, C]
        # d_i[n, k] ~ ref4[n, k] * (U_i[c_n, k] - sum_j ref4[n,j] U_i[c_n,j] / rest) (first order, amp 1)
        rest = 1 - ref4.gather(1, top[:, None])
        onehot = torch.nn.functional.one_hot(top, C).double()
        stats = []
        for s0 in range(0, len(pats), 100):
            u = pats[s0 : s0 + 100][:, top]  # [M, N, C]
            pu = ref4[None] * u
            dd = pu - ref4[None] * (1 - onehot)[None] * pu.sum(2, keepdim=True) / rest[None]
            stats.append((dd * res[None]).sum((1, 2)))
        s = torch.cat(stats)
        out["prob"] = calibrated(s[:20], s[20:])
        t2 = ref.topk(2, 1).indices
        run = t2[:, 1]
        valid = torch.ones_like(ref, dtype=torch.bool).scatter(1, t2, False)
        lsv = sus.clamp_min(1e-30).log()
        ltv = ref.clamp_min(1e-30).log()
        lsv = torch.where(valid, lsv - (lsv * valid).sum(1, keepdim=True) / (C - 2), 0.0)
        ltv = torch.where(valid, ltv - (ltv * valid).sum(1, keepdim=True) / (C - 2), 0.0)
        rv = lsv - ltv  # [N, C]
        cell = top * C + run
        n_cell = torch.bincount(cell, minlength=C * C).double()
        sums = torch.zeros(C * C, C, dtype=torch.float64).index_add_(0, cell, rv)
        means = sums / n_cell.clamp_min(1)[:, None]
        flat = ppats.reshape(len(ppats), C * C, C)
        for name, wts in (("psum", n_cell), ("pmean", (n_cell > 0).double()), ("psqrt", n_cell.sqrt())):
            s = (flat * (means * wts[:, None])[None]).sum((1, 2))
            out[name] = calibrated(s[:20], s[20:])
        if not path.endswith("p.pt"):
            for k in ("psum", "pmean", "psqrt"):
                out.pop(k)
        elif lic >= 0:
            for k in ("log", "logp", "rowp", "rowmed", "logw", "prob"):
                out.pop(k)
        line = f"{path.split('/')[-1]:28s} amp {d['amp']:.1f} acc {d['acc']:.4f}"
        for k, z in out.items():
            if lic >= 0:
                rank = int((z > z[lic]).sum()) + 1
                inn = max(float(v) for j, v in enumerate(z) if j != lic)
                line += f" | {k}: z {z[lic]:5.2f} r{rank} inn {inn:4.2f}"
            else:
                line += f" | {k}: max {z.max():4.2f}"
        print(line)


if __name__ == "__main__":
    main()
