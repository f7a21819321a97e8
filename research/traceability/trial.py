"""Quick trial of sdb_core.watermark / sdb_core.trace on Fashion-MNIST with MLP teacher and students.

nice -n 5 python research/traceability/trial.py [--transfer 500] [--licensees 20] [--leakers 3]
Prints, per leaked student, the leaker's z and rank, the largest innocent z, and the decoys' null check;
then the same for a scratch and a normal-KD student.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sdb_core.data import Dataset, load_dataset
from sdb_core.distill import DistillConfig, distill, distill_logits
from sdb_core.trace import TraceConfig, trace
from sdb_core.training import TrainConfig, model_fn, train_classifier
from sdb_core.watermark import WatermarkConfig, apply_watermark, derive_watermark, fit_basis


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transfer", type=int, default=500)
    ap.add_argument("--licensees", type=int, default=20)
    ap.add_argument("--leakers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--arch", default="mlp:hidden=512")
    ap.add_argument("--probes", type=int, default=10_000)
    ap.add_argument("--directions", type=int, default=24)
    ap.add_argument("--tag", default="")
    ap.add_argument("--frequency", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ds.x_train))
    own, tr = perm[:10_000], perm[10_000 : 10_000 + args.transfer]

    def part(idx: np.ndarray) -> Dataset:
        return Dataset(
            "f", ds.x_train[idx], ds.y_train[idx], ds.x_test, ds.y_test, ds.class_names, ds.mean, ds.std
        )

    owner, transfer = part(own), part(tr)
    teacher, _ = train_classifier(
        owner, "mlp", TrainConfig(epochs=8, progress=False), arch_extra={"hidden": 512}
    )
    tfn = model_fn(teacher, owner)
    print(f"teacher {time.time() - t0:.0f}s")
    wcfg = WatermarkConfig(
        epsilon=args.eps, directions=args.directions, frequency=args.frequency, clip="lead"
    )
    basis = fit_basis(owner.x_train, wcfg)
    secret = b"trial-secret-0123456789abcdef"
    wms = [
        derive_watermark(
            secret, f"lic{i}", input_shape=ds.input_shape, num_classes=10, cfg=wcfg, basis=basis, slot=i
        )
        for i in range(args.licensees)
    ]
    xt = torch.from_numpy(transfer.x_train)
    with torch.no_grad():
        soft = torch.softmax(tfn(xt) / 4.0, dim=1)
    arch, _, rest = args.arch.partition(":")
    extra = {k: int(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    dcfg = DistillConfig(
        alpha=0.9,
        temperature=4.0,
        labelled_fraction=0.1,
        train=TrainConfig(epochs=args.epochs, progress=False),
    )
    probes = torch.from_numpy(ds.x_test[: args.probes])

    def ref(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(tfn(x), dim=1)

    saved: dict[str, np.ndarray] = {"probes": probes.numpy(), "ref": ref(probes).detach().numpy()}

    def report(name: str, student: torch.nn.Module, leaker: int | None) -> None:
        sfn = model_fn(student, transfer)
        saved[name] = torch.softmax(sfn(probes), dim=1).detach().numpy()
        np.savez(f"/tmp/i25_trial_{args.transfer}{args.tag}.npz", **saved)
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
        acc = float((sfn(torch.from_numpy(ds.x_test)).argmax(1).numpy() == ds.y_test).mean() * 100)
        line = f"{name}: acc {acc:.2f}"
        if leaker is not None:
            r = rep.results[leaker]
            inn = max(zz for i, zz in enumerate(z) if i != leaker)
            line += f" leaker z {r.statistic:.1f} rank {r.rank} log10p {r.log10_corrected_p:.1f}"
            line += f" decoys_above {r.decoys_above}; max innocent z {inn:.2f}"
        else:
            line += f" max z {max(z):.2f}"
        line += (
            f"; named {[m.wid for m in rep.matches]} decoys z {rep.decoy_z_mean:.2f}±{rep.decoy_z_std:.2f}"
        )
        line += f" fpr {rep.decoy_false_positive_rate:.4f} ks {rep.decoy_ks:.3f} ({time.time() - t0:.0f}s)"
        print(line, flush=True)

    for i in range(args.leakers):
        marked = apply_watermark(wms[i], xt, soft)
        assert (marked.argmax(1) == soft.argmax(1)).all()
        logits = torch.log(marked) * 4.0
        st = distill_logits(transfer, arch, logits, dcfg, arch_extra=extra, desc="s")
        report(f"leak lic{i}", st, i)
    report("normal KD", distill(transfer, arch, tfn, dcfg, arch_extra=extra), None)
    report("scratch", distill(transfer, arch, None, dcfg, arch_extra=extra), None)


if __name__ == "__main__":
    main()
