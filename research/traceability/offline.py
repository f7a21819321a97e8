"""Re-score cached trial outputs (trial.py writes /tmp/i25_trial_*.npz) under other statistics, no training.

python research/traceability/offline.py /tmp/i25_trial_500d6.npz --directions 6
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sdb_core.data import load_dataset
from sdb_core.trace import statistics
from sdb_core.watermark import (
    WatermarkConfig,
    _bank,
    decoy_watermarks,
    derive_watermark,
    fit_basis,
    mark_deltas,
    retemper,
)


def covariates(ref: torch.Tensor) -> torch.Tensor:
    top = ref.argmax(1)
    p = ref.max(1).values.double()
    oh = torch.nn.functional.one_hot(top, ref.shape[1]).double()
    return torch.cat([oh, oh * p[:, None], oh * p[:, None] ** 2], dim=1)


def residualize(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    beta = torch.linalg.lstsq(c, r.double()[:, None]).solution
    return r.double() - (c @ beta)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--directions", type=int, default=16)
    args = ap.parse_args()
    d = np.load(args.path)
    ds = load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    own = rng.permutation(len(ds.x_train))[:10_000]
    wcfg = WatermarkConfig(directions=args.directions)
    basis = fit_basis(ds.x_train[own], wcfg)
    secret = b"trial-secret-0123456789abcdef"
    wms = [
        derive_watermark(
            secret, f"lic{i}", input_shape=(1, 28, 28), num_classes=10, cfg=wcfg, basis=basis, slot=i
        )
        for i in range(20)
    ]
    decoys = decoy_watermarks(
        min(1000, len(_bank(wcfg)) - 20), basis=basis, num_classes=10, cfg=wcfg, exclude=wms
    )
    x = torch.from_numpy(d["probes"])
    ref = retemper(torch.from_numpy(d["ref"]), 4.0)
    dl = mark_deltas(wms + decoys, x, ref)
    cov = covariates(ref)
    top = ref.argmax(1, keepdim=True)
    for name in d.files:
        if name in ("probes", "ref"):
            continue
        sus = retemper(torch.from_numpy(d[name]), 4.0)
        r = (sus.gather(1, top) - ref.gather(1, top))[:, 0]
        for label, rr in (("raw", r), ("resid", residualize(r, cov))):
            z = statistics(rr, dl)
            zi, zd = z[:20], z[20:]
            med = zd.median()
            s = 1.4826 * (zd - med).abs().median()
            zc = (zi - med) / s
            leak = int(name.split("lic")[1]) if "lic" in name else None
            top_i = int(zc.argmax())
            inn = zc[[i for i in range(20) if i != leak]].max() if leak is not None else zc.max()
            lz = float(zc[leak]) if leak is not None else float("nan")
            print(
                f"{name:12s} {label:5s} decoy sd {float(zd.std()):.2f} robust {float(s):.2f} leaker zc {lz:5.1f} "
                f"max innocent zc {float(inn):4.1f} argmax {top_i} decoy max zc {float(((zd - med) / s).max()):.1f}"
            )


if __name__ == "__main__":
    main()
