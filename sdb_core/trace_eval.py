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
- cost: top-1 of students from watermarked vs clean soft labels (`clean_seeds` of them), over the
  label-only student (delivered);
- `shadows` clean students per family, distilled on the owner's own images: every trace of a student of
  that family tests the class pattern against them (`trace.trace`'s `shadows`);
- removal attempts on one leaked student: re-tempered distillation, argmax only, fine-tuning on 10 % true
  labels, a second generation, input noise at query time, two colluders averaging their soft labels (traced
  with `colluder_probe_factor` times the probes).

The configuration and the split: `sdb_core.trace_setup`; the removal attempts: `sdb_core.trace_removal`; what
each trace records, the targets and the tables: `sdb_core.trace_report`.

`python -m sdb_core.trace_eval --dataset fashion-mnist --out DIR` runs it (also `sdb evaluate --trace`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sdb_core.configurator import override
from sdb_core.data import Dataset, load_dataset
from sdb_core.distill import DistillConfig
from sdb_core.evaluate import (
    EvalConfig,
    owner_box,
    owner_teacher,
    parse_student,
    protocol_for,
    reduced_config,
)
from sdb_core.students import StudentJob, StudentPool
from sdb_core.trace import TraceConfig, trace, trace_licensees
from sdb_core.trace_removal import removal_attempts
from sdb_core.trace_report import (
    check_trace_targets,
    cost_entry,
    own_line,
    summarize_trace,
    to_markdown,
    trace_summary,
)
from sdb_core.trace_setup import (
    TraceEvalConfig,
    query,
    softmax_fn,
    split_data,
    student_distill_config,
    trace_config_for,
)
from sdb_core.training import accuracy, model_fn, resolve_device
from sdb_core.watermark import CLIPS, apply_watermark, derive_watermark, fit_basis


def run_trace_eval(
    cfg: EvalConfig, tcfg: TraceEvalConfig, out: Path, ds: Dataset | None = None, seed: int | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed = cfg.seeds[0] if seed is None else seed
    ds = ds or load_dataset(cfg.dataset)
    dev = resolve_device(cfg.device)
    owner, transfers, probes_all = split_data(ds, cfg, tcfg, seed)
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
    reference = softmax_fn(clean_logits)
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
    specs_all = sorted({s for v in tcfg.families.values() for s in v} if tcfg.families else set(cfg.students))
    if tcfg.removals and cfg.students[-1] not in specs_all:
        specs_all.append(cfg.students[-1])
    shadows: dict[str, list[Callable[[Tensor], Tensor]]] = {}  # trained on the students' pool below
    probes = torch.from_numpy(probes_all[: tcfg.probes])
    big_probes = torch.from_numpy(probes_all[: tcfg.probes * tcfg.colluder_probe_factor])

    def traced(
        logits_of: Callable[[Tensor], Tensor],
        leakers: tuple[str, ...] = (),
        *,
        many: bool = False,
        family: str = cfg.students[-1],
    ) -> dict[str, Any]:
        cfg_ = replace(trace_cfg, probes=len(big_probes)) if many else trace_cfg
        rep = trace(
            softmax_fn(logits_of),
            reference,
            big_probes if many else probes,
            wms,
            cfg_,
            decoy_secret=b"eval-decoys",
            watermark_cfg=wcfg,
            shadows=shadows.get(family, ()),
        )
        return summarize_trace(rep, leakers)

    def traced_own(
        logits_of: Callable[[Tensor], Tensor],
        transfer: Dataset,
        leakers: tuple[str, ...] = (),
        family: str = cfg.students[-1],
    ) -> dict[str, Any]:
        """The student traced on images of its own transfer set, the same ones under every watermark."""
        own = torch.from_numpy(transfer.x_train[: tcfg.own_probes])
        rep = trace_licensees(
            softmax_fn(logits_of),
            reference,
            [own] * len(wms),
            wms,
            trace_cfg,
            decoy_secret=b"eval-decoys",
            watermark_cfg=wcfg,
            shadows=shadows.get(family, ()),
        )
        return summarize_trace(rep, leakers)

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
    with StudentPool(tcfg.workers if dev.type == "cpu" else 1) as pool:
        if tcfg.shadows:
            shadows.update(_shadow_students(cfg, tcfg, owner, clean_logits, specs_all, seed, pool, log))
        for size, transfer in transfers.items():
            xt = transfer.x_train
            clean = query(clean_logits, xt)
            soft = torch.softmax(clean / t, dim=1)
            specs = tcfg.families.get(size, ()) if tcfg.families else cfg.students
            n_leak = min(tcfg.leakers.get(size, 0), tcfg.licensees)
            for spec in specs:
                arch, extra = parse_student(spec)
                dcfg = student_distill_config(cfg, tcfg, len(xt), seed, spec)
                n_leak_family = min(n_leak, tcfg.family_leakers.get(spec, n_leak))
                jobs = []
                for i in range(n_leak_family):
                    marked = apply_watermark(wms[i], torch.from_numpy(xt), soft)
                    top1_identical &= bool((marked.argmax(1) == soft.argmax(1)).all())
                    targets = t * torch.log(marked.clamp_min(1e-30))
                    jobs.append(StudentJob(transfer, arch, extra, targets, dcfg, f"{spec} leak {i}"))
                innocent: dict[str, tuple[Tensor | None, DistillConfig]] = {}
                if tcfg.innocents:
                    innocent = {
                        "scratch": (None, dcfg),
                        "label_only": (F.one_hot(soft.argmax(1), ds.num_classes).float() * 20.0, dcfg),
                        "normal_kd": (query(teacher_logits, xt), dcfg),
                    }
                    if tcfg.source == "box":  # with the teacher as source, clean KD is normal KD
                        innocent["clean_kd"] = (clean, dcfg)
                    for s in range(seed + 1, seed + tcfg.clean_seeds):
                        innocent[f"clean_kd:seed{s}"] = (clean, _reseeded(dcfg, s))
                jobs += [
                    StudentJob(transfer, arch, extra, v, c, f"{spec} {k}") for k, (v, c) in innocent.items()
                ]
                students = pool.train(jobs)

                marked_accs = []
                for i, st in enumerate(students[:n_leak_family]):
                    fn = model_fn(st, transfer)
                    acc = top1(fn)
                    marked_accs.append(acc)
                    rec = {
                        "family": spec,
                        "transfer": size,
                        "licensee": wms[i].wid,
                        "top1": acc,
                        **traced(fn, (wms[i].wid,), family=spec),
                    }
                    if tcfg.own_probes:
                        rec["own_images"] = traced_own(fn, transfer, (wms[i].wid,), spec)
                    result["leaked"].append(rec)
                    lk = rec["leakers"][wms[i].wid]
                    log(
                        f"{spec} n={size} leak {i}: rank {lk['rank']} z {lk['z']:.1f} "
                        f"log10p {lk['log10_corrected_p']:.1f} max innocent z {rec['max_innocent_z']:.2f} "
                        f"framed {rec['framed']}" + own_line(rec, wms[i].wid)
                    )
                if not tcfg.innocents:
                    continue
                accs = {}
                for name, st in zip(innocent, students[n_leak_family:], strict=True):
                    fn = model_fn(st, transfer)
                    accs[name] = top1(fn)
                    rec = {
                        "family": spec,
                        "transfer": size,
                        "student": name,
                        "top1": accs[name],
                        **traced(fn, family=spec),
                    }
                    if tcfg.own_probes:
                        rec["own_images"] = traced_own(fn, transfer, family=spec)
                    result["innocent"].append(rec)
                    log(
                        f"{spec} n={size} innocent {name}: top1 {accs[name]:.2f} named {rec['named']} "
                        f"max z {max(rec['z'].values()):.2f}" + own_line(rec)
                    )
                if marked_accs:
                    clean_names = ["clean_kd" if "clean_kd" in accs else "normal_kd"]
                    clean_names += [k for k in accs if k.startswith("clean_kd:")]
                    result["cost"][f"{spec}@{size}"] = cost_entry(
                        accs["label_only"], [accs[k] for k in clean_names], marked_accs
                    )
    result["top1_identical"] = top1_identical
    if tcfg.removals:
        result["removal"] = removal_attempts(
            cfg,
            tcfg,
            transfers[tcfg.removal_size],
            wms,
            soft_of=lambda x: torch.softmax(query(clean_logits, x) / t, dim=1),
            traced=traced,
            traced_own=traced_own if tcfg.own_probes else None,
            top1=top1,
            seed=seed,
            log=log,
        )
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _shadow_students(
    cfg: EvalConfig,
    tcfg: TraceEvalConfig,
    owner: Dataset,
    clean_logits: Callable[[Tensor], Tensor],
    specs: list[str],
    seed: int,
    pool: StudentPool,
    log: Callable[[str], None],
) -> dict[str, list[Callable[[Tensor], Tensor]]]:
    """`tcfg.shadows` clean students per family, distilled from the clean soft labels on the owner's own
    images (as many as the largest transfer set, with its recipe; seeds apart from every other student's),
    answering probabilities."""
    n = min(max(tcfg.transfers) or len(owner.x_train), len(owner.x_train))  # 0: the owner's images themselves
    own = owner.subset(np.arange(n), "shadow")
    targets = query(clean_logits, own.x_train)
    families = [spec for spec in specs for _ in range(tcfg.shadows)]
    jobs = []
    for spec in specs:
        arch, extra = parse_student(spec)
        dcfg = student_distill_config(cfg, tcfg, n, seed, spec)
        jobs += [
            StudentJob(own, arch, extra, targets, _reseeded(dcfg, seed + 1_000 + k), f"{spec} shadow {k}")
            for k in range(tcfg.shadows)
        ]
    out: dict[str, list[Callable[[Tensor], Tensor]]] = {}
    for spec, st in zip(families, pool.train(jobs), strict=True):
        out.setdefault(spec, []).append(softmax_fn(model_fn(st, own)))
    log(f"shadow students ready: {tcfg.shadows} per family, {n} owner images")
    return out


def _reseeded(dcfg: DistillConfig, seed: int) -> DistillConfig:
    return replace(dcfg, train=replace(dcfg.train, seed=seed))


def trace_evaluate(
    cfg: EvalConfig, tcfg: TraceEvalConfig, out_dir: str | Path, command: str = ""
) -> dict[str, Any]:
    """Run the traceability evaluation on the first seed and write OUT/traceability.json and its tables,
    OUT/traceability.md. The teacher and box are those `sdb evaluate` caches under OUT/boxes (trained there
    when missing)."""
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
    (out / "traceability.md").write_text(to_markdown(report))
    return report


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
    ap.add_argument(
        "--clean-seeds", type=int, default=0, help="clean students per family and size for the cost"
    )
    ap.add_argument(
        "--shadows",
        type=int,
        default=-1,
        help="shadow students per family for the class pattern (0: none; default: the configuration's)",
    )
    ap.add_argument("--teacher", default="", help="arch[:k=v,...]: replace the protocol's teacher (CPU time)")
    ap.add_argument("--teacher-epochs", type=int, default=0)
    ap.add_argument(
        "--family-limits",
        default="",
        help="family=leakers/sample_budget;... e.g. 'small_cnn:width=16=2/20000' (CPU time)",
    )
    ap.add_argument("--sizes", default="", help="family=size,size;... families traced per transfer size")
    ap.add_argument(
        "--frequency", type=float, default=0.0, help="the watermarks' frequency (default: this version's)"
    )
    ap.add_argument(
        "--clip", choices=CLIPS, default="", help="the watermarks' clip (default: this version's)"
    )
    ap.add_argument(
        "--epsilon", type=float, default=0.0, help="the watermarks' amplitude (default: this version's)"
    )
    ap.add_argument(
        "--watermark-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any WatermarkConfig field, e.g. pattern=0 or pattern_after=0 (repeatable)",
    )
    args = ap.parse_args(argv)
    cfg = reduced_config(args.dataset) if args.reduced else protocol_for(args.dataset)
    cfg = replace(cfg, seeds=(args.seed,), progress=True)
    tcfg = trace_config_for(args.dataset, args.reduced)
    tcfg = replace(
        tcfg,
        source=args.source,
        removals=tcfg.removals and not args.no_removals,
        innocents=not args.no_innocents,
        clean_seeds=args.clean_seeds or tcfg.clean_seeds,
        shadows=tcfg.shadows if args.shadows < 0 else args.shadows,
    )
    if args.frequency or args.clip or args.epsilon:
        wm = tcfg.watermark
        wm = replace(
            wm,
            frequency=args.frequency or wm.frequency,
            clip=args.clip or wm.clip,
            epsilon=args.epsilon or wm.epsilon,
        )
        tcfg = replace(tcfg, watermark=wm)
    if args.watermark_option:
        tcfg = replace(tcfg, watermark=override(tcfg.watermark, args.watermark_option))
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
