"""Null scale of the trace statistic for decoys with one direction for all classes vs one per class.

python research/traceability/nullscale.py NPZ --frequency 1.0 --eps 0.25
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sdb_core.data import load_dataset
from sdb_core.trace import statistics
from sdb_core.watermark import WatermarkConfig, _clipped, fit_basis, retemper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("npz")
    ap.add_argument("--frequency", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=0.25)
    ap.add_argument("--decoys", type=int, default=400)
    args = ap.parse_args()
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(0).permutation(len(ds.x_train))
    owner = ds.subset(perm[:20_000], "owner")
    basis = fit_basis(owner.x_train, WatermarkConfig(directions=20))
    g = basis.coordinates(torch.from_numpy(ds.x_test)).double()
    data = np.load(args.npz)
    ref = retemper(torch.from_numpy(data["ref"]), 4.0)
    top = ref.argmax(1)
    rng = np.random.default_rng(5)
    k = g.shape[1]

    def marks(per_class: bool) -> torch.Tensor:
        cols = []
        for _ in range(args.decoys):
            if per_class:
                w = torch.from_numpy(rng.standard_normal((10, k)))
                w = w / w.norm(dim=1, keepdim=True)
                phi = torch.from_numpy(rng.uniform(0, 2 * np.pi, 10))
                proj = (g * w[top]).sum(1)
                th = 2 * np.pi * args.frequency * torch.special.ndtr(proj) + phi[top]
            else:
                w = torch.from_numpy(rng.standard_normal(k))
                w = w / w.norm()
                th = 2 * np.pi * args.frequency * torch.special.ndtr(g @ w) + rng.uniform(0, 2 * np.pi)
            cols.append(args.eps * torch.cos(th))
        return _clipped(ref, torch.stack(cols, 1).float(), 1e-3, symmetric=False)

    shared, per = marks(False), marks(True)
    for name in data.files:
        if name == "ref" or name.startswith("shadow"):
            continue
        sus = retemper(torch.from_numpy(data[name]), 4.0)
        r = (sus.gather(1, top[:, None]) - ref.gather(1, top[:, None]))[:, 0]
        line = f"{name:18s}"
        for label, d in (("shared", shared), ("per-class", per)):
            z = statistics(r, d, top)
            med = z.median()
            line += f" | {label} loc {med:.2f} sc {1.4826 * (z - med).abs().median():.2f} sd {z.std():.2f}"
        print(line)


if __name__ == "__main__":
    main()
