"""Re-score saved suspects (trial_cnn.py --save FILE) with variants of the trace statistic (no retraining).

python research/traceability/restat.py FILE.npz --features dct --frequency 1.0 --eps 0.1 [--clip symmetric]

Variants (one column each): the product's statistic; groups by reference class x confidence decile; the
unclipped cosine as the filter; the residual regressed on nuisance columns (the reference's log-probabilities,
the suspect's own non-top shape, the watermark coordinates, per class); clean shadow students (trial_cnn.py
--shadows) as the reference; the residual read at T = 1, 2 and 8 instead of 4. Each prints the decoys'
median and robust spread (1.4826 MAD) and, for leaked students, the leaker's calibrated z, its rank among the
20 and the largest innocent z.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from research.traceability.trial_cnn import fit_gap
from sdb_core.data import load_dataset
from sdb_core.trace import statistics
from sdb_core.watermark import (
    WatermarkConfig,
    _clipped,
    _phases,
    decoy_watermarks,
    derive_watermark,
    fit_basis,
    retemper,
)

T = 4.0


def confidence_groups(ref: Tensor, bins: int = 10) -> Tensor:
    top, conf = ref.argmax(1), ref.max(1).values.double()
    g = torch.zeros_like(top)
    for c in range(ref.shape[1]):
        m = top == c
        if m.any():
            q = torch.quantile(conf[m], torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
            g[m] = c * bins + torch.bucketize(conf[m], q)
    return g


def residualize(v: Tensor, nuis: Tensor) -> Tensor:
    """v [N, M] minus its least-squares fit on the nuisance columns [N, K]."""
    q, _ = torch.linalg.qr(nuis.double())
    return v.double() - q @ (q.T @ v.double())


def per_class(oh: Tensor, cols: Tensor) -> Tensor:
    return torch.cat([oh] + [oh * cols[:, j : j + 1] for j in range(cols.shape[1])], 1)


def nontop_shape(p: Tensor, top: Tensor) -> Tensor:
    lp = torch.log(p.double().clamp_min(1e-12)).scatter(1, top, 0.0)
    return (lp - lp.sum(1, keepdim=True) / (p.shape[1] - 1)).scatter(1, top, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("npz")
    ap.add_argument("--features", default="dct", choices=["gap", "dct"])
    ap.add_argument("--directions", type=int, default=20)
    ap.add_argument("--frequency", type=float, default=1.5)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--clip", default="lead", choices=["lead", "symmetric"])
    args = ap.parse_args()
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(0).permutation(len(ds.x_train))
    owner = ds.subset(perm[:20_000], "owner")
    wcfg = WatermarkConfig(
        epsilon=args.eps, directions=args.directions, frequency=args.frequency, clip=args.clip
    )
    basis = (
        fit_basis(owner.x_train, wcfg)
        if args.features == "dct"
        else fit_gap(owner.x_train, ds.mean[0], ds.std[0], args.directions, 64, 1)
    )
    wms = [
        derive_watermark(
            b"trial-secret-0123456789abcdef",
            f"lic{i}",
            input_shape=ds.input_shape,
            num_classes=10,
            cfg=wcfg,
            basis=basis,  # type: ignore[arg-type]
            slot=i,
        )
        for i in range(20)
    ]
    decoys = decoy_watermarks(1000, basis=basis, num_classes=10, cfg=wcfg, seed=b"d")  # type: ignore[arg-type]
    data = np.load(args.npz)
    x = torch.from_numpy(ds.x_test)
    ref_1 = torch.from_numpy(data["ref"])
    ref = retemper(ref_1, T)
    top = ref.argmax(1, keepdim=True)
    oh = torch.nn.functional.one_hot(top[:, 0], 10).double()
    g = basis.coordinates(x).double()
    cos = args.eps * torch.cos(_phases(g.float(), [w.mode for w in wms + decoys]))
    filt = _clipped(ref, cos, 1e-3, symmetric=args.clip == "symmetric")
    shadows = [retemper(torch.from_numpy(data[f]), T) for f in data.files if f.startswith("shadow")]

    def top1(p: Tensor) -> Tensor:
        return p.gather(1, top)[:, 0]

    Variant = Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]  # suspect@1 -> (r, filter, groups)
    variants: dict[str, Variant] = {
        "product": lambda s: (top1(retemper(s, T)) - top1(ref), filt, top[:, 0]),
        "conf-decile": lambda s: (top1(retemper(s, T)) - top1(ref), filt, confidence_groups(ref)),
        "cos-filter": lambda s: (top1(retemper(s, T)) - top1(ref), cos, top[:, 0]),
    }
    nuisances = {
        "nu:ref-logp": lambda s: per_class(oh, torch.log(ref.double().clamp_min(1e-12))),
        "nu:shape": lambda s: torch.cat([per_class(oh, nontop_shape(retemper(s, T), top)), oh], 1),
        "nu:coords": lambda s: per_class(oh, g),
    }
    for name, nu in nuisances.items():
        variants[name] = lambda s, nu=nu: (  # type: ignore[misc]
            residualize((top1(retemper(s, T)) - top1(ref))[:, None], nu(s))[:, 0],
            residualize(filt, nu(s)),
            None,
        )
    if shadows:
        mean_shadow = torch.stack(shadows).mean(0)
        variants["shadow-ref"] = lambda s: (top1(retemper(s, T)) - top1(mean_shadow), filt, top[:, 0])
    for tt in (1.0, 2.0, 8.0):
        variants[f"T={tt:g}"] = lambda s, tt=tt: (  # type: ignore[misc]
            top1(retemper(s, tt)) - top1(retemper(ref_1, tt)),
            filt,
            top[:, 0],
        )
    for name in data.files:
        if name == "ref" or name.startswith("shadow"):
            continue
        sus = torch.from_numpy(data[name])
        leaker = int(name.split("lic")[1]) if "lic" in name else None
        print(name)
        for label, variant in variants.items():
            r, d, groups = variant(sus)
            z = statistics(r, d, groups)
            zi, zd = z[:20], z[20:]
            med = zd.median()
            scale = 1.4826 * (zd - med).abs().median()
            zc = (zi - med) / scale
            line = f"  {label:12s} decoys {med:5.1f} +- {scale:4.1f}"
            if leaker is not None:
                innocent = torch.cat([zc[:leaker], zc[leaker + 1 :]]).max()
                rank = int((zc > zc[leaker]).sum()) + 1
                line += f"  leaker z {zc[leaker]:5.1f} rank {rank:2d}  max innocent {innocent:4.1f}"
            else:
                line += f"  max z {zc.max():4.1f}"
            print(line)


if __name__ == "__main__":
    main()
