"""The traceability evaluation (issue #25): N licensees on one box, each served soft labels with their own
watermark; students distilled from single licensees (leaked), innocent students, removal attempts, and what
`sdb_core.trace` says about each of them. Writes one JSON report.

Per run (one seed of an `evaluate.EvalConfig` protocol):

- the owner's images, a transfer pool of `max(transfers)` images apart from them (each smaller transfer set is
  its first images), and probes from the rest (the test split first, then training images in neither);
- the licensees' clean soft labels: the box's keyed path (`source="box"`, the protocol's box, cached like
  `sdb evaluate`'s) or the teacher (`source="teacher"`, a faster stand-in: the keyed path is trained to
  match it); `N` watermarks from one secret, slots 0..N-1, on a basis fitted to the owner's images;
- leaked students of every family at every transfer size, distilled (KD at the protocol's T and alpha, 10 %
  of labels known) from one licensee's watermarked answers; innocent students (scratch, label-only on the
  top-1, normal KD from the teacher, KD from clean unwatermarked soft labels);
- cost: top-1 of students from watermarked vs clean soft labels, over the label-only student (delivered);
- removal attempts on one leaked student: re-tempered distillation, argmax only, fine-tuning on 10 % true
  labels, a second generation, input noise at query time, two colluders averaging their soft labels (traced
  with `colluder_probe_factor` times the probes).

`python -m sdb_core.trace_eval --dataset fashion-mnist --out DIR` runs it (also `sdb evaluate --trace`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.data import Dataset, load_dataset
from sdb_core.distill import DistillConfig, distill, distill_logits
from sdb_core.evaluate import (
    EvalConfig,
    owner_box,
    owner_teacher,
    parse_student,
    protocol_for,
    reduced_config,
)
from sdb_core.trace import TraceConfig, TraceReport, trace
from sdb_core.training import TrainConfig, accuracy, fit, model_fn, resolve_device
from sdb_core.watermark import Watermark, WatermarkConfig, apply_watermark, derive_watermark, fit_basis


@dataclass
class TraceEvalConfig:
    licensees: int = 20
    transfers: tuple[int, ...] = (500, 10_000)
    leakers: dict[int, int] = field(default_factory=lambda: {500: 10, 10_000: 2})  # per size, per family
    # families traced at each size (a size not listed: none); empty: all of the protocol's students everywhere
    families: dict[int, tuple[str, ...]] = field(default_factory=dict)
    sample_budget: int = 100_000  # a student sees at most this many samples (epochs scaled down for big sets)
    family_leakers: dict[str, int] = field(default_factory=dict)  # caps `leakers` for a family
    family_sample_budget: dict[str, int] = field(default_factory=dict)  # overrides `sample_budget`
    probes: int = 10_000
    colluder_probe_factor: int = 4
    decoys: int = 1_000
    alpha: float = 1e-3
    source: str = "box"  # the licensees' clean soft labels: "box" (keyed path) or "teacher"
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    retemper: tuple[float, ...] = (1.0, 20.0)
    removal_size: int = 10_000  # transfer size of the student the removal attempts start from
    noise_std: float = 0.1  # input noise at query time, in units of the data's std
    finetune_epochs: int = 20
    removals: bool = True
    innocents: bool = True  # False: leaked students only (a supplementary run)


def trace_config_for(dataset: str, reduced: bool = False) -> TraceEvalConfig:
    """The traceability configuration that goes with a protocol (`sdb evaluate --trace`)."""
    if reduced:
        return reduced_trace_config(dataset)
    if dataset.startswith("fashion-mnist"):
        return TraceEvalConfig()
    # digits: 1,300 training images, the transfer set is the owner's own (as in its protocol)
    return TraceEvalConfig(transfers=(0,), leakers={0: 5}, probes=10_000, removal_size=0)


def reduced_trace_config(dataset: str) -> TraceEvalConfig:
    """Small enough for the test suite (digits: transfer sets are the owner's own images)."""
    if dataset.startswith("fashion-mnist"):
        return TraceEvalConfig(
            licensees=5,
            transfers=(500, 2_000),
            leakers={500: 2, 2_000: 1},
            probes=4_000,
            decoys=200,
            removal_size=2_000,
            removals=False,
        )
    return TraceEvalConfig(
        licensees=5,
        transfers=(0,),
        leakers={0: 3},
        probes=2_000,
        decoys=200,
        removal_size=0,
        removals=False,
    )


def _split(
    ds: Dataset, cfg: EvalConfig, tcfg: TraceEvalConfig, seed: int
) -> tuple[Dataset, dict[int, Dataset], np.ndarray]:
    """Owner, transfer sets by size, probe images (raw)."""
    biggest = max(tcfg.transfers)
    if biggest <= 0:  # digits: the owner's own images serve as transfer set; probes = test split
        return ds, {0: ds}, ds.x_test
    n = len(ds.x_train)
    owner_n = cfg.owner_images or n - biggest
    if owner_n + biggest > n:
        raise ValueError(f"{owner_n} owner + {biggest} transfer images > {n} training images")
    perm = np.random.default_rng(1_000 + seed).permutation(n)
    owner = ds.subset(perm[:owner_n], "owner")
    pool = perm[owner_n : owner_n + biggest]
    transfers = {t: ds.subset(pool[:t], f"transfer{t}") for t in tcfg.transfers}
    probes = np.concatenate([ds.x_test, ds.x_train[perm[owner_n + biggest :]]])
    return owner, transfers, probes


def _softmax_fn(logits_of: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.softmax(logits_of(x).float(), dim=1).cpu()

    return fn


def _query(fn: Callable[[Tensor], Tensor], x: np.ndarray, batch: int = 1_000) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [fn(torch.from_numpy(x[s : s + batch])).float().cpu() for s in range(0, len(x), batch)]
        )


def _dcfg(
    cfg: EvalConfig,
    tcfg: TraceEvalConfig,
    n: int,
    seed: int,
    spec: str = "",
    temperature: float | None = None,
) -> DistillConfig:
    budget = tcfg.family_sample_budget.get(spec, tcfg.sample_budget)
    epochs = max(1, min(cfg.student_epochs, budget // max(n, 1)))
    return DistillConfig(
        alpha=cfg.alpha,
        temperature=temperature or cfg.temperature,
        labelled_fraction=cfg.labelled_fraction,
        train=TrainConfig(epochs=epochs, seed=seed, device=cfg.device, progress=False),
    )


def _summary(rep: TraceReport, leakers: tuple[str, ...] = ()) -> dict[str, Any]:
    """What one trace says, in short: every watermark's z and corrected p, and the verdicts."""
    out: dict[str, Any] = {
        "probes": rep.probes,
        "named": [r.wid for r in rep.matches],
        "decoy_fpr": rep.decoy_false_positive_rate,
        "decoy_ks": rep.decoy_ks,
        "null_scale": rep.null_scale,
        "z": {r.wid: round(r.statistic, 3) for r in rep.results},
        "log10_corrected_p": {r.wid: round(r.log10_corrected_p, 3) for r in rep.results},
    }
    if leakers:
        best = rep.best
        others = [r for r in rep.results if r.wid not in leakers]
        out["leakers"] = {
            wid: {
                "rank": rep.result(wid).rank,
                "z": rep.result(wid).statistic,
                "log10_corrected_p": rep.result(wid).log10_corrected_p,
                "decoys_above": rep.result(wid).decoys_above,
            }
            for wid in leakers
        }
        out["first"] = best.wid if best else None
        out["max_innocent_z"] = max((r.statistic for r in others), default=None)
        out["min_innocent_log10_corrected_p"] = min((r.log10_corrected_p for r in others), default=None)
        out["framed"] = [r.wid for r in others if r.verdict == "match"]
    return out


def run_trace_eval(
    cfg: EvalConfig, tcfg: TraceEvalConfig, out: Path, ds: Dataset | None = None, seed: int | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed = cfg.seeds[0] if seed is None else seed
    ds = ds or load_dataset(cfg.dataset)
    dev = resolve_device(cfg.device)
    owner, transfers, probes_all = _split(ds, cfg, tcfg, seed)
    log: Callable[[str], None] = (
        (lambda m: print(f"[{time.perf_counter() - start:6.0f}s] {m}", flush=True))
        if cfg.progress
        else (lambda m: None)
    )
    teacher, _ = owner_teacher(cfg, owner, seed, out / f"seed{seed}-teacher")
    teacher_logits = model_fn(teacher, owner)
    if tcfg.source == "box":
        _, boxed = owner_box(
            cfg, owner, seed, out / f"seed{seed}", name=f"trace-seed{seed}", cache=out / f"seed{seed}-teacher"
        )
        clean_logits: Callable[[Tensor], Tensor] = boxed.keyed_logits
    elif tcfg.source == "teacher":
        clean_logits = teacher_logits
    else:
        raise ValueError(f"unknown source {tcfg.source!r}; 'box' or 'teacher'")
    log(f"owner ready ({tcfg.source})")
    reference = _softmax_fn(clean_logits)
    wcfg = replace(tcfg.watermark, temperature=cfg.temperature)
    basis = fit_basis(owner.x_train, wcfg)
    secret = f"sdb-trace-eval-secret:{seed}".encode()
    wms = [
        derive_watermark(
            secret,
            f"licensee-{i:02d}",
            input_shape=ds.input_shape,
            num_classes=ds.num_classes,
            cfg=wcfg,
            basis=basis,
            slot=i,
        )
        for i in range(tcfg.licensees)
    ]
    trace_cfg = TraceConfig(probes=tcfg.probes, decoys=tcfg.decoys, alpha=tcfg.alpha)
    probes = torch.from_numpy(probes_all[: tcfg.probes])
    big_probes = torch.from_numpy(probes_all[: tcfg.probes * tcfg.colluder_probe_factor])

    def traced(
        logits_of: Callable[[Tensor], Tensor], leakers: tuple[str, ...] = (), *, many: bool = False
    ) -> dict[str, Any]:
        cfg_ = replace(trace_cfg, probes=len(big_probes)) if many else trace_cfg
        rep = trace(
            _softmax_fn(logits_of),
            reference,
            big_probes if many else probes,
            wms,
            cfg_,
            decoy_secret=b"eval-decoys",
            watermark_cfg=wcfg,
        )
        return _summary(rep, leakers)

    def top1(model_logits: Callable[[Tensor], Tensor]) -> float:
        return accuracy(model_logits, ds.x_test, ds.y_test, dev)

    result: dict[str, Any] = {
        "seed": seed,
        "source": tcfg.source,
        "watermarks": [w.wid for w in wms],
        "probes_available": len(probes_all),
        "leaked": [],
        "innocent": [],
        "cost": {},
        "removal": [],
    }
    t = cfg.temperature
    top1_identical = True
    for size, transfer in transfers.items():
        xt = transfer.x_train
        clean = _query(clean_logits, xt)
        soft = torch.softmax(clean / t, dim=1)
        specs = tcfg.families.get(size, ()) if tcfg.families else cfg.students
        n_leak = min(tcfg.leakers.get(size, 0), tcfg.licensees)
        for spec in specs:
            arch, extra = parse_student(spec)
            dcfg = _dcfg(cfg, tcfg, len(xt), seed, spec)
            n_leak_family = min(n_leak, tcfg.family_leakers.get(spec, n_leak))

            def student_from(
                targets: Tensor | None,
                desc: str,
                d: DistillConfig = dcfg,
                ds_: Dataset = transfer,
                arch_: str = arch,
                extra_: dict[str, Any] = extra,
            ) -> nn.Module:
                if targets is None:
                    return distill(ds_, arch_, None, d, arch_extra=extra_, desc=desc)
                return distill_logits(ds_, arch_, targets, d, arch_extra=extra_, desc=desc)

            marked_accs = []
            for i in range(n_leak_family):
                marked = apply_watermark(wms[i], torch.from_numpy(xt), soft)
                top1_identical &= bool((marked.argmax(1) == soft.argmax(1)).all())
                st = student_from(t * torch.log(marked.clamp_min(1e-30)), f"{spec} leak {i}")
                fn = model_fn(st, transfer)
                acc = top1(fn)
                marked_accs.append(acc)
                rec = {
                    "family": spec,
                    "transfer": size,
                    "licensee": wms[i].wid,
                    "top1": acc,
                    **traced(fn, (wms[i].wid,)),
                }
                result["leaked"].append(rec)
                lk = rec["leakers"][wms[i].wid]
                log(
                    f"{spec} n={size} leak {i}: rank {lk['rank']} z {lk['z']:.1f} "
                    f"log10p {lk['log10_corrected_p']:.1f} max innocent z {rec['max_innocent_z']:.2f} "
                    f"framed {rec['framed']}"
                )
            if not tcfg.innocents:
                continue
            innocents: dict[str, nn.Module] = {
                "scratch": student_from(None, f"{spec} scratch"),
                "label_only": student_from(
                    F.one_hot(soft.argmax(1), ds.num_classes).float() * 20.0, f"{spec} label-only"
                ),
                "normal_kd": student_from(_query(teacher_logits, xt), f"{spec} normal"),
            }
            if tcfg.source == "box":  # with the teacher as source, clean KD is normal KD
                innocents["clean_kd"] = student_from(clean, f"{spec} clean")
            accs = {}
            for name, st in innocents.items():
                fn = model_fn(st, transfer)
                accs[name] = top1(fn)
                rec = {"family": spec, "transfer": size, "student": name, "top1": accs[name], **traced(fn)}
                result["innocent"].append(rec)
                log(
                    f"{spec} n={size} innocent {name}: top1 {accs[name]:.2f} named {rec['named']} "
                    f"max z {max(rec['z'].values()):.2f}"
                )
            if marked_accs:
                floor = accs["label_only"]
                accs.setdefault("clean_kd", accs["normal_kd"])
                clean_gain = accs["clean_kd"] - floor
                marked_gain = float(np.mean(marked_accs)) - floor
                result["cost"][f"{spec}@{size}"] = {
                    "label_only": floor,
                    "clean_kd": accs["clean_kd"],
                    "watermarked_kd_mean": float(np.mean(marked_accs)),
                    "delivered_clean": clean_gain,
                    "delivered_watermarked": marked_gain,
                    "ratio": marked_gain / clean_gain if clean_gain > 0 else None,
                }
    result["top1_identical"] = top1_identical
    if tcfg.removals:
        result["removal"] = _removals(
            cfg,
            tcfg,
            transfers[tcfg.removal_size],
            wms,
            soft_of=lambda x: torch.softmax(_query(clean_logits, x) / t, dim=1),
            traced=traced,
            top1=top1,
            seed=seed,
            log=log,
        )
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _removals(
    cfg: EvalConfig,
    tcfg: TraceEvalConfig,
    transfer: Dataset,
    wms: list[Watermark],
    *,
    soft_of: Callable[[np.ndarray], Tensor],
    traced: Callable[..., dict[str, Any]],
    top1: Callable[[Callable[[Tensor], Tensor]], float],
    seed: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each removal attempt against licensee 0's soft labels with the protocol's last student family."""
    spec = cfg.students[-1]
    arch, extra = parse_student(spec)
    t = cfg.temperature
    xt = transfer.x_train
    soft = soft_of(xt)
    wm0, wm1 = wms[0], wms[1]
    marked0 = apply_watermark(wm0, torch.from_numpy(xt), soft)
    marked1 = apply_watermark(wm1, torch.from_numpy(xt), soft)
    base = _dcfg(cfg, tcfg, len(xt), seed, spec)
    out: list[dict[str, Any]] = []

    def record(
        name: str,
        st_fn: Callable[[Tensor], Tensor],
        leakers: tuple[str, ...],
        note: str = "",
        *,
        many: bool = False,
    ) -> None:
        rec = {
            "attack": name,
            "family": spec,
            "transfer": len(xt),
            "top1": top1(st_fn),
            "note": note,
            **traced(st_fn, leakers, many=many),
        }
        out.append(rec)
        lk = rec["leakers"]
        log(
            f"removal {name}: "
            + ", ".join(f"{w} rank {v['rank']} log10p {v['log10_corrected_p']:.1f}" for w, v in lk.items())
            + f" framed {rec['framed']}"
        )

    logits0 = t * torch.log(marked0.clamp_min(1e-30))
    leaked = distill_logits(transfer, arch, logits0, base, arch_extra=extra, desc="removal base")
    leaked_fn = model_fn(leaked, transfer)
    record("none", leaked_fn, (wm0.wid,))
    for t2 in tcfg.retemper:
        st = distill_logits(
            transfer, arch, logits0, replace(base, temperature=t2), arch_extra=extra, desc=f"retemper {t2}"
        )
        record(
            f"retemper:{t2:g}",
            model_fn(st, transfer),
            (wm0.wid,),
            "KD at this temperature from the licensee's soft labels",
        )
    hard = F.one_hot(marked0.argmax(1), transfer.num_classes).float() * 20.0
    st = distill_logits(transfer, arch, hard, base, arch_extra=extra, desc="argmax")
    record(
        "argmax_only",
        model_fn(st, transfer),
        (wm0.wid,),
        "out of reach: the mark never changes the top-1, so hard labels carry none of it",
    )
    # Fine-tune the leaked student on 10 % of the transfer set with true labels.
    ft = _copy(leaked)
    n_ft = max(1, len(xt) // 10)
    sub = transfer.subset(np.arange(n_ft), "finetune")

    def ce(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(ft(xb), yb)

    fit(
        ft,
        sub,
        ce,
        TrainConfig(epochs=tcfg.finetune_epochs, lr=0.01, seed=seed, device=cfg.device, progress=False),
        desc="finetune",
    )
    record(
        "finetune_10pct_labels",
        model_fn(ft, transfer),
        (wm0.wid,),
        f"{tcfg.finetune_epochs} epochs, lr 0.01, on {n_ft} true labels",
    )
    second = distill_logits(
        transfer, arch, _query(leaked_fn, xt), base, arch_extra=extra, desc="second generation"
    )
    record(
        "second_generation",
        model_fn(second, transfer),
        (wm0.wid,),
        "a student of the leaked student, same transfer images",
    )
    std = torch.tensor(transfer.std).view(-1, 1, 1)
    gen = torch.Generator().manual_seed(seed)

    def noisy(x: Tensor) -> Tensor:
        return leaked_fn(x + tcfg.noise_std * std * torch.randn(x.shape, generator=gen))

    record(
        f"input_noise:{tcfg.noise_std:g}",
        noisy,
        (wm0.wid,),
        "Gaussian noise on every probe, in units of the data's std",
    )
    avg = (marked0 + marked1) / 2
    st = distill_logits(
        transfer, arch, t * torch.log(avg.clamp_min(1e-30)), base, arch_extra=extra, desc="colluders"
    )
    col_fn = model_fn(st, transfer)
    record("colluders_average", col_fn, (wm0.wid, wm1.wid), "1x probes")
    record(
        "colluders_average", col_fn, (wm0.wid, wm1.wid), f"{tcfg.colluder_probe_factor}x probes", many=True
    )
    return out


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def check_trace_targets(result: dict[str, Any], final_size: int) -> dict[str, bool]:
    """The issue's targets on one run."""
    leaked = result["leaked"]
    big = [r for r in leaked if r["transfer"] == final_size]
    small = [r for r in leaked if r["transfer"] != final_size]
    checks: dict[str, bool] = {}
    if big:
        checks[f"{final_size} transfer: leaker first with corrected p < 1e-6, every student"] = all(
            r["leakers"][r["licensee"]]["rank"] == 1 and r["leakers"][r["licensee"]]["log10_corrected_p"] < -6
            for r in big
        )
    checks["no framing: no innocent licensee at corrected p < 1e-3 in any leaked student"] = all(
        not r["framed"] for r in leaked
    )
    if small:
        first = sum(r["leakers"][r["licensee"]]["rank"] == 1 for r in small) / len(small)
        checks[f"smaller transfer: leaker first in >= 90 % ({first:.0%})"] = first >= 0.9
    tests = sum(len(r["z"]) for r in result["innocent"])
    accusations = sum(len(r["named"]) for r in result["innocent"])
    checks[f"innocent students: no accusation in >= 99 % of tests ({accusations}/{tests} accused)"] = (
        tests > 0 and 1 - accusations / tests >= 0.99
    )
    ratios = [c["ratio"] for c in result["cost"].values() if c["ratio"] is not None]
    checks["cost: delivered with watermark >= 0.9 x without"] = bool(ratios) and min(ratios) >= 0.9
    checks["top-1 identical for every sample"] = bool(result["top1_identical"])
    return checks


def trace_evaluate(
    cfg: EvalConfig, tcfg: TraceEvalConfig, out_dir: str | Path, command: str = ""
) -> dict[str, Any]:
    """Run the traceability evaluation on the first seed and write OUT/traceability.json. The teacher and box
    are those `sdb evaluate` caches under OUT/boxes (trained there when missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.dataset)
    result = run_trace_eval(cfg, tcfg, out / "boxes", ds)
    report = {
        "command": command,
        "config": {
            "protocol": json.loads(json.dumps(asdict(cfg), default=str)),
            "trace": json.loads(json.dumps(asdict(tcfg), default=str)),
        },
        "data_digest": ds.digest(),
        "result": result,
        "checks": check_trace_targets(result, max(tcfg.transfers)),
    }
    (out / "traceability.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def trace_summary(report: dict[str, Any]) -> str:
    """The checks of a traceability report, one line each."""
    lines = ["Traceability (sdb_core.trace_eval):"]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reduced", action="store_true", help="the reduced (CI) configuration")
    ap.add_argument("--source", choices=("box", "teacher"), default="box")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--students", default="", help="comma-separated student families (default: the protocol's)"
    )
    ap.add_argument("--leakers", default="", help="size=count,... (default: the configuration's)")
    ap.add_argument("--no-removals", action="store_true")
    ap.add_argument("--no-innocents", action="store_true", help="leaked students only")
    ap.add_argument("--teacher", default="", help="arch[:k=v,...]: replace the protocol's teacher (CPU time)")
    ap.add_argument("--teacher-epochs", type=int, default=0)
    ap.add_argument(
        "--family-limits",
        default="",
        help="family=leakers/sample_budget;... e.g. 'small_cnn:width=16=2/20000' (CPU time)",
    )
    ap.add_argument("--sizes", default="", help="family=size,size;... families traced per transfer size")
    args = ap.parse_args(argv)
    cfg = reduced_config(args.dataset) if args.reduced else protocol_for(args.dataset)
    cfg = replace(cfg, seeds=(args.seed,), progress=True)
    tcfg = trace_config_for(args.dataset, args.reduced)
    tcfg = replace(
        tcfg,
        source=args.source,
        removals=tcfg.removals and not args.no_removals,
        innocents=not args.no_innocents,
    )
    if args.students:
        cfg = replace(cfg, students=tuple(args.students.split(";")))
    if args.teacher:
        arch, extra = parse_student(args.teacher)
        cfg = replace(cfg, teacher_arch=arch, teacher_extra=extra)
    if args.teacher_epochs:
        cfg = replace(cfg, teacher_epochs=args.teacher_epochs)
    for item in filter(None, args.family_limits.split(";")):
        fam, _, lim = item.rpartition("=")
        n, _, budget = lim.partition("/")
        tcfg.family_leakers[fam] = int(n)
        if budget:
            tcfg.family_sample_budget[fam] = int(budget)
    if args.sizes:
        per_size: dict[int, list[str]] = {}
        for item in filter(None, args.sizes.split(";")):
            fam, _, sizes = item.rpartition("=")
            for size in sizes.split(","):
                per_size.setdefault(int(size), []).append(fam)
        tcfg.families = {k: tuple(v) for k, v in per_size.items()}
    if args.leakers:
        tcfg = replace(
            tcfg, leakers={int(k): int(v) for k, v in (kv.split("=") for kv in args.leakers.split(","))}
        )
    report = trace_evaluate(
        cfg,
        tcfg,
        args.out,
        command="python -m sdb_core.trace_eval " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(trace_summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def to_markdown(report: dict[str, Any]) -> str:
    """Tables of a traceability report (for docs/evaluation.md)."""
    res = report["result"]
    lines = [
        "| family | transfer | licensee | student top-1 | leaker rank | leaker z | leaker log10 corrected p "
        "| decoys above | max innocent z | framed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["leaked"]:
        lk = r["leakers"][r["licensee"]]
        lines.append(
            f"| {r['family']} | {r['transfer']} | {r['licensee']} | {r['top1']:.2f} "
            f"| {lk['rank']} | {lk['z']:.2f} "
            f"| {lk['log10_corrected_p']:.2f} | {lk['decoys_above']} | {r['max_innocent_z']:.2f} "
            f"| {len(r['framed'])} |"
        )
    lines += [
        "",
        "| innocent student | family | transfer | top-1 | max z over the watermarks | named "
        "| decoy FPR at alpha "
        "| decoy KS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["innocent"]:
        lines.append(
            f"| {r['student']} | {r['family']} | {r['transfer']} | {r['top1']:.2f} "
            f"| {max(r['z'].values()):.2f} "
            f"| {len(r['named'])} | {r['decoy_fpr']:.4f} | {r['decoy_ks']:.3f} |"
        )
    if res["cost"]:
        lines += [
            "",
            "| cost | label-only | clean KD | watermarked KD (mean) | delivered clean "
            "| delivered watermarked "
            "| ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, c in res["cost"].items():
            ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}"
            lines.append(
                f"| {k} | {c['label_only']:.2f} | {c['clean_kd']:.2f} | {c['watermarked_kd_mean']:.2f} "
                f"| {c['delivered_clean']:.2f} | {c['delivered_watermarked']:.2f} | {ratio} |"
            )
    if res["removal"]:
        lines += [
            "",
            "| removal attempt | probes | student top-1 | per leaker: rank, z, log10 corrected p "
            "| framed | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["removal"]:
            per = "; ".join(
                f"{w}: {v['rank']}, {v['z']:.2f}, {v['log10_corrected_p']:.2f}"
                for w, v in r["leakers"].items()
            )
            lines.append(
                f"| {r['attack']} | {r['probes']} | {r['top1']:.2f} | {per} | {len(r['framed'])} "
                f"| {r['note']} |"
            )
    lines += ["", "Targets:", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"
