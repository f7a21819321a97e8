"""Trial (2026-12-06, second round): does a larger watermark space help `small_cnn:16` students?

The calibrated z of a leaker is about (its learned mark) / (the spread of its own smooth residual over random
marks of the family). If the residual's energy in the family's span is fixed, a family of D_eff effectively
independent marks spreads it over D_eff, so a richer family (more whitened directions, a larger DCT block) or
one that avoids the principal coordinates where every student's residual sits (`skipK`: drop the K largest)
could raise z, if the CNN still learns the marks. Each configuration: the same teacher, `leakers` CNN
students at 500 images (120 epochs, as the protocol's), one per licensee slot, traced on the 10,000 test
images against 1,000 decoys of the same family.

nice python research/traceability/sweep_cnn.py --configs dct8:d20,dct8:d40,dct8:d64,dct8:skip3:d20
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig
from sdb_core.students import StudentJob, StudentPool
from sdb_core.trace import TraceConfig, trace
from sdb_core.training import TrainConfig, model_fn, train_classifier
from sdb_core.watermark import WatermarkConfig, apply_watermark, derive_watermark, fit_basis


def parse(spec: str) -> tuple[int, int, int]:
    dct, skip, d = 8, 0, 20
    for part in spec.split(":"):
        if part.startswith("dct"):
            dct = int(part[3:])
        elif part.startswith("skip"):
            skip = int(part[4:])
        elif part.startswith("d"):
            d = int(part[1:])
    return dct, skip, d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="dct8:d20,dct8:d40")
    ap.add_argument("--leakers", type=int, default=6)
    ap.add_argument("--transfer", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--frequency", type=float, default=1.5)
    ap.add_argument("--clip", default="lead")
    ap.add_argument("--family", default="small_cnn:16")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    ds = load_dataset("fashion-mnist")
    perm = np.random.default_rng(0).permutation(len(ds.x_train))
    owner = ds.subset(perm[:20_000], "owner")
    transfer = ds.subset(perm[20_000 : 20_000 + args.transfer], "transfer")
    teacher, _ = train_classifier(
        owner, "mlp", TrainConfig(epochs=8, progress=False), arch_extra={"hidden": 512}
    )
    tfn = model_fn(teacher, owner)
    print(f"teacher {time.time() - t0:.0f}s", flush=True)
    xt = torch.from_numpy(transfer.x_train)
    with torch.no_grad():
        soft = torch.softmax(tfn(xt) / 4.0, dim=1)
    dcfg = DistillConfig(
        alpha=0.9,
        temperature=4.0,
        labelled_fraction=0.1,
        train=TrainConfig(epochs=max(1, min(120, 60_000 // args.transfer)), progress=False),
    )
    probes = torch.from_numpy(ds.x_test)
    arch, _, w = args.family.partition(":")
    extra = {"width": int(w)} if arch == "small_cnn" else {"hidden": int(w)}

    def ref(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(tfn(x), dim=1)

    with StudentPool(2) as pool:
        for spec in args.configs.split(","):
            dct, skip, d = parse(spec)
            wcfg = WatermarkConfig(
                epsilon=args.eps, dct_size=dct, directions=skip + d, frequency=args.frequency, clip=args.clip
            )
            full = fit_basis(owner.x_train, wcfg)
            basis = replace(full, components=full.components[skip:])
            wcfg = replace(wcfg, directions=d)
            wms = [
                derive_watermark(
                    b"sweep-secret-0123456789",
                    f"lic{i}",
                    input_shape=ds.input_shape,
                    num_classes=10,
                    cfg=wcfg,
                    basis=basis,
                    slot=i,
                )
                for i in range(max(20, args.leakers))
            ]
            jobs = [
                StudentJob(
                    transfer, arch, extra, 4.0 * torch.log(apply_watermark(wms[i], xt, soft)), dcfg, "s"
                )
                for i in range(args.leakers)
            ]
            zs, ranks, scales, accs = [], [], [], []
            for i, st in enumerate(pool.train(jobs)):
                sfn = model_fn(st, transfer)
                rep = trace(
                    lambda x, f=sfn: torch.softmax(f(x), dim=1),
                    ref,
                    probes,
                    wms[:20],
                    TraceConfig(),
                    watermark_cfg=wcfg,
                    decoy_secret=b"d",
                )
                r = rep.results[i]
                zs.append(r.statistic)
                ranks.append(r.rank)
                scales.append(rep.null_scale)
                accs.append(float((sfn(probes).argmax(1).numpy() == ds.y_test).mean() * 100))
            print(
                f"{spec}: z {' '.join(f'{z:.1f}' for z in zs)} (mean {np.mean(zs):.2f}) ranks {ranks} "
                f"first {sum(r == 1 for r in ranks)}/{len(ranks)} null scale {np.mean(scales):.2f} "
                f"acc {np.mean(accs):.2f} ({time.time() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
