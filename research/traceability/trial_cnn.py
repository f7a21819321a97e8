"""Trial (2026-12-06): marks on features a small CNN computes, for issue #25's CNN students.

small_cnn ends in a global average pool and a linear head: its logits are linear in position-averages of
local features (receptive field about 10 px), so a mark on global DCT coordinates (position templates) is
outside what it can represent. This trial swaps the watermark's coordinates for position-averaged local
features ("gap": mean over positions of ReLU(random 5x5 filter), whitened principal coordinates) and keeps
the rest of sdb_core.watermark / sdb_core.trace.

nice -n 5 python research/traceability/trial_cnn.py --features gap --transfer 500 --families cnn,mlp
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig, distill, distill_logits
from sdb_core.trace import TraceConfig, trace
from sdb_core.training import TrainConfig, model_fn, train_classifier
from sdb_core.watermark import (
    WatermarkConfig,
    apply_watermark,
    derive_watermark,
    fit_basis,
)

FAMILIES = {"cnn": ("small_cnn", {"width": 16}), "mlp": ("mlp", {"hidden": 512})}


@dataclass(frozen=True)
class GapBasis:
    """Position-averaged local features, whitened principal coordinates (duck-types WatermarkBasis)."""

    filters: torch.Tensor = field(repr=False, compare=False)
    bias: torch.Tensor = field(repr=False, compare=False)
    mean: torch.Tensor = field(repr=False, compare=False)
    comps: torch.Tensor = field(repr=False, compare=False)
    ds_mean: float = 0.0
    ds_std: float = 1.0
    pool: int = 1
    name: str = "gap"

    @property
    def directions(self) -> int:
        return self.comps.shape[0]

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return gap_raw(x, self.filters, self.bias, self.ds_mean, self.ds_std, self.pool)

    def coordinates(self, x_raw: torch.Tensor) -> torch.Tensor:
        return (self.raw(x_raw) - self.mean) @ self.comps.T


def gap_raw(x, filters, bias, m, s, pool):  # type: ignore[no-untyped-def]
    outs = []
    for i in range(0, len(x), 2000):
        xb = (torch.as_tensor(x[i : i + 2000]).float() - m) / s
        h = F.relu(F.conv2d(xb, filters, bias, padding=2))
        outs.append(F.adaptive_avg_pool2d(h, pool).flatten(1))
    return torch.cat(outs)


def fit_gap(x_raw: np.ndarray, ds_mean: float, ds_std: float, k: int, n_filters: int, pool: int) -> GapBasis:
    g = torch.Generator().manual_seed(7)
    filt = torch.randn(n_filters, 1, 5, 5, generator=g) / 5.0
    x = torch.from_numpy(x_raw[:5000])
    xb = (x - ds_mean) / ds_std
    resp = F.conv2d(xb, filt, padding=2)
    bias = -resp.transpose(0, 1).reshape(n_filters, -1).median(dim=1).values
    feats = gap_raw(x, filt, bias, ds_mean, ds_std, pool).double()
    mean = feats.mean(0)
    _, sv, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    scale = sv[:k] / np.sqrt(len(feats) - 1)
    comps = vh[:k] / scale[:, None]
    return GapBasis(filt, bias, mean.float(), comps.float(), ds_mean, ds_std, pool)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", default="gap", choices=["gap", "dct"])
    ap.add_argument("--transfer", type=int, default=500)
    ap.add_argument("--licensees", type=int, default=20)
    ap.add_argument("--leakers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--directions", type=int, default=20)
    ap.add_argument("--filters", type=int, default=64)
    ap.add_argument("--pool", type=int, default=1)
    ap.add_argument("--frequency", type=float, default=1.5)
    ap.add_argument("--families", default="cnn,mlp")
    ap.add_argument("--teacher", default="mlp")
    ap.add_argument("--innocents", type=int, default=1)
    ap.add_argument("--save", default="")
    ap.add_argument("--shadows", type=int, default=0)
    ap.add_argument("--clip", default="lead", choices=["lead", "symmetric"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(0).permutation(len(ds.x_train))
    own, tr = perm[:20_000], perm[20_000 : 20_000 + args.transfer]
    owner, transfer = ds.subset(own, "owner"), ds.subset(tr, "transfer")
    if args.teacher == "mlp":
        teacher, _ = train_classifier(
            owner, "mlp", TrainConfig(epochs=8, progress=False), arch_extra={"hidden": 512}
        )
    else:
        teacher, _ = train_classifier(
            owner, "small_cnn", TrainConfig(epochs=6, progress=False), arch_extra={"width": 32}
        )
    tfn = model_fn(teacher, owner)
    tacc = float((tfn(torch.from_numpy(ds.x_test)).argmax(1).numpy() == ds.y_test).mean())
    print(f"teacher {args.teacher} acc {tacc:.4f} {time.time() - t0:.0f}s", flush=True)
    wcfg = WatermarkConfig(
        epsilon=args.eps, directions=args.directions, frequency=args.frequency, clip=args.clip
    )
    if args.features == "dct":
        basis = fit_basis(owner.x_train, wcfg)
    else:
        basis = fit_gap(owner.x_train, ds.mean[0], ds.std[0], args.directions, args.filters, args.pool)  # type: ignore[assignment]
    secret = b"trial-secret-0123456789abcdef"
    wms = [
        derive_watermark(
            secret,
            f"lic{i}",
            input_shape=ds.input_shape,
            num_classes=10,
            cfg=wcfg,
            basis=basis,
            slot=i,  # type: ignore[arg-type]
        )
        for i in range(args.licensees)
    ]
    xt = torch.from_numpy(transfer.x_train)
    with torch.no_grad():
        soft = torch.softmax(tfn(xt) / 4.0, dim=1)
    dcfg = DistillConfig(
        alpha=0.9,
        temperature=4.0,
        labelled_fraction=0.1,
        train=TrainConfig(epochs=max(1, min(args.epochs, 100_000 // args.transfer)), progress=False),
    )
    probes = torch.from_numpy(ds.x_test)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(tfn(x), dim=1)

    saved: dict[str, np.ndarray] = {"ref": ref(probes).numpy()}

    def report(name: str, student: torch.nn.Module, leaker: int | None) -> None:
        sfn = model_fn(student, transfer)
        if args.save:
            saved[name] = torch.softmax(sfn(probes), dim=1).numpy()
            np.savez(args.save, **saved)
        rep = trace(
            lambda x: torch.softmax(sfn(x), dim=1),
            ref,
            probes,
            wms,
            TraceConfig(),
            watermark_cfg=wcfg,
            decoy_secret=b"d",
        )
        z = [r.statistic for r in rep.results]
        acc = float((sfn(probes).argmax(1).numpy() == ds.y_test).mean() * 100)
        line = f"{name}: acc {acc:.2f}"
        if leaker is not None:
            r = rep.results[leaker]
            inn = max(zz for i, zz in enumerate(z) if i != leaker)
            line += f" leaker z {r.statistic:.1f} (raw {r.raw_statistic:.1f}) rank {r.rank}"
            line += f" log10pc {r.log10_corrected_p:.1f}"
            line += f" dec_above {r.decoys_above}; max innocent z {inn:.2f}"
        else:
            line += f" max z {max(z):.2f}"
        line += f"; named {len(rep.matches)} null loc {rep.null_location:.2f} scale {rep.null_scale:.2f}"
        print(line + f" ({time.time() - t0:.0f}s)", flush=True)

    for fam in args.families.split(","):
        arch, extra = FAMILIES[fam]
        for k in range(args.shadows):  # clean students on other transfer sets: the owner's references
            idx = perm[40_000 + k * args.transfer : 40_000 + (k + 1) * args.transfer]
            other = ds.subset(idx, f"shadow{k}")
            sh = distill(other, arch, tfn, dcfg, arch_extra=extra)
            saved[f"shadow {fam} {k}"] = torch.softmax(model_fn(sh, other)(probes), dim=1).numpy()
            print(f"shadow {fam} {k} ({time.time() - t0:.0f}s)", flush=True)
        for i in range(args.leakers):
            marked = apply_watermark(wms[i], xt, soft)
            assert (marked.argmax(1) == soft.argmax(1)).all()
            st = distill_logits(transfer, arch, torch.log(marked) * 4.0, dcfg, arch_extra=extra, desc="s")
            report(f"{fam} leak lic{i}", st, i)
        if args.innocents > 1:
            hard = F.one_hot(soft.argmax(1), 10).float() * 20.0
            report(
                f"{fam} label-only",
                distill_logits(transfer, arch, hard, dcfg, arch_extra=extra, desc="l"),
                None,
            )
            report(f"{fam} normal KD", distill(transfer, arch, tfn, dcfg, arch_extra=extra), None)
        elif args.innocents:
            report(f"{fam} normal KD", distill(transfer, arch, tfn, dcfg, arch_extra=extra), None)
            report(f"{fam} scratch", distill(transfer, arch, None, dcfg, arch_extra=extra), None)
            hard = F.one_hot(soft.argmax(1), 10).float() * 20.0
            report(
                f"{fam} label-only",
                distill_logits(transfer, arch, hard, dcfg, arch_extra=extra, desc="l"),
                None,
            )


if __name__ == "__main__":
    main()
