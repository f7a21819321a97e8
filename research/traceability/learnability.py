"""How much of its licensee's mark a student reproduces, on its own transfer images and on fresh probes.

FEAT=dct|gap FAM=cnn|mlp EPS=0.1 FREQ=1.5 CLIP=lead N=500 python research/traceability/learnability.py

Prints the least-squares slope of the student's residual (its top-1 probability at T = 4 minus the
teacher's) on the mark's change to that probability, and their correlation, both within the teacher's top-1
classes: slope 1 = the mark reproduced exactly, 0 = not at all.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from research.traceability.trial_cnn import FAMILIES, fit_gap
from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig, distill_logits
from sdb_core.training import TrainConfig, model_fn, train_classifier
from sdb_core.watermark import WatermarkConfig, apply_watermark, derive_watermark, fit_basis, mark_deltas


def main() -> None:
    torch.set_num_threads(1)
    feat, fam = os.environ.get("FEAT", "dct"), os.environ.get("FAM", "cnn")
    eps, freq = float(os.environ.get("EPS", "0.1")), float(os.environ.get("FREQ", "1.5"))
    n = int(os.environ.get("N", "500"))
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(0).permutation(len(ds.x_train))
    owner, transfer = ds.subset(perm[:20_000], "o"), ds.subset(perm[20_000 : 20_000 + n], "t")
    teacher, _ = train_classifier(
        owner, "mlp", TrainConfig(epochs=8, progress=False), arch_extra={"hidden": 512}
    )
    tfn = model_fn(teacher, owner)
    clip = os.environ.get("CLIP", "lead")
    wcfg = WatermarkConfig(epsilon=eps, directions=20, frequency=freq, clip=clip)
    basis = (
        fit_basis(owner.x_train, wcfg)
        if feat == "dct"
        else fit_gap(owner.x_train, ds.mean[0], ds.std[0], 20, 64, 1)
    )
    wm = derive_watermark(
        b"trial-secret-0123456789abcdef",
        "lic1",
        input_shape=ds.input_shape,
        num_classes=10,
        cfg=wcfg,
        basis=basis,  # type: ignore[arg-type]
        slot=1,
    )
    xt = torch.from_numpy(transfer.x_train)
    marked = apply_watermark(wm, xt, torch.softmax(tfn(xt) / 4, 1))
    arch, extra = FAMILIES[fam]
    train = TrainConfig(epochs=min(120, 100_000 // n), progress=False)
    dcfg = DistillConfig(alpha=0.9, temperature=4.0, labelled_fraction=0.1, train=train)
    sfn = model_fn(distill_logits(transfer, arch, torch.log(marked) * 4, dcfg, arch_extra=extra), transfer)
    for name, x in (("transfer", xt), ("probes", torch.from_numpy(ds.x_test))):
        ref = torch.softmax(tfn(x) / 4, 1)
        top = ref.argmax(1, keepdim=True)
        r = (torch.softmax(sfn(x) / 4, 1).gather(1, top) - ref.gather(1, top))[:, 0].double()
        d = mark_deltas([wm], x, ref)[:, 0].double()
        for c in range(10):
            m = top[:, 0] == c
            if m.any():
                r[m] -= r[m].mean()
                d[m] -= d[m].mean()
        slope = float((r * d).sum() / (d * d).sum())
        corr = float(torch.corrcoef(torch.stack([r, d]))[0, 1])
        print(f"{feat} f={freq} eps={eps} {fam} n={n} {name}: slope {slope:.3f} corr {corr:.3f}")


if __name__ == "__main__":
    main()
