"""Trial (2026-12-06): probe a suspect on the images its licensee sent, not on fresh ones.

A student reproduces its licensee's mark on its own transfer images far better than on fresh probes
(learnability.py: `small_cnn:16` at 500 images, f = 1.5: slope 0.52 there, 0.20 on fresh probes). The
service sees every image a licensee sends to /distill-batch, so it could keep a sample of them per API key
and trace each licensee on its own images. This trial measures what that would give: the product's marks
(DCT 8, 20 directions, f = 1.5, eps 0.1, one-sided clip), `leakers` students per family and size, each
traced twice with 1,000 decoys: on the 10,000 test images, and on `own` of its own transfer images. The
other 19 licensees' watermarks on the same probes are the innocent licensees (framing).

nice python research/traceability/own_probes.py --families small_cnn:16,mlp:512 --sizes 500,10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sdb_core.data import load_dataset
from sdb_core.distill import DistillConfig
from sdb_core.students import StudentJob, StudentPool
from sdb_core.trace import TraceConfig, trace
from sdb_core.training import TrainConfig, model_fn, train_classifier
from sdb_core.watermark import WatermarkConfig, apply_watermark, derive_watermark, fit_basis


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="small_cnn:16")
    ap.add_argument("--sizes", default="500")
    ap.add_argument("--leakers", type=int, default=4)
    ap.add_argument("--own", type=int, default=500, help="own transfer images used as probes")
    ap.add_argument("--innocents", action="store_true", help="also a clean KD student per family and size")
    ap.add_argument("--budget", type=int, default=100_000, help="samples a student sees (epochs x images)")
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
    wcfg = WatermarkConfig()
    basis = fit_basis(owner.x_train, wcfg)
    wms = [
        derive_watermark(
            b"own-probes-secret-0123456789",
            f"lic{i}",
            input_shape=ds.input_shape,
            num_classes=10,
            cfg=wcfg,
            basis=basis,
            slot=i,
        )
        for i in range(20)
    ]
    test_probes = torch.from_numpy(ds.x_test)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(tfn(x), dim=1)

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
            own = xt[: args.own]
            for fam in args.families.split(","):
                arch, _, w = fam.partition(":")
                extra = {"width": int(w)} if arch == "small_cnn" else {"hidden": int(w)}
                jobs = [
                    StudentJob(
                        transfer, arch, extra, 4.0 * torch.log(apply_watermark(wms[i], xt, soft)), dcfg, "s"
                    )
                    for i in range(args.leakers)
                ]
                if args.innocents:
                    jobs.append(StudentJob(transfer, arch, extra, tfn(xt).detach(), dcfg, "clean"))
                for i, st in enumerate(pool.train(jobs)):
                    sfn = model_fn(st, transfer)
                    line = f"{fam} n={size} " + (f"leak {i}" if i < args.leakers else "clean KD")
                    for name, probes in (("test", test_probes), ("own", own)):
                        rep = trace(
                            lambda x, f=sfn: torch.softmax(f(x), dim=1),
                            ref,
                            probes,
                            wms,
                            TraceConfig(),
                            watermark_cfg=wcfg,
                            decoy_secret=b"d",
                        )
                        zs = [r.statistic for r in rep.results]
                        if i < args.leakers:
                            r = rep.results[i]
                            inn = max(z for j, z in enumerate(zs) if j != i)
                            line += (
                                f" | {name}: z {r.statistic:.1f} rank {r.rank}"
                                f" log10pc {r.log10_corrected_p:.1f}"
                                f" max innocent {inn:.1f} scale {rep.null_scale:.2f}"
                            )
                        else:
                            line += f" | {name}: max z {max(zs):.1f} named {len(rep.matches)}"
                    print(line + f" ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
