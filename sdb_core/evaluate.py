"""The whole protocol over several seeds: teacher -> box -> students, written as JSON, Markdown and PNG.

Per seed: train the teacher, box it (artifact saved and reloaded, checksums verified), then train every
student architecture five ways (scratch, normal KD, unauthorized KD from the box's plain path, authorized
KD from the keyed path, KD from the box fed a wrong key) in two settings: all labels known, and the API
customer's transfer set with only `labelled_fraction` of the labels known.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdb_core.box import BoxConfig, box_teacher, wrong_key_fn
from sdb_core.data import Dataset, load_dataset
from sdb_core.distill import DistillConfig, distill
from sdb_core.keys import BoxKey
from sdb_core.training import TrainConfig, accuracy, model_fn, resolve_device, train_classifier

METHODS = ("scratch", "normal", "unauthorized", "authorized", "wrong_key")
METHOD_LABELS = {
    "scratch": "scratch",
    "normal": "normal KD",
    "unauthorized": "unauthorized KD (plain)",
    "authorized": "authorized KD (keyed)",
    "wrong_key": "wrong-key KD",
}


@dataclass
class EvalConfig:
    dataset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_arch: str = "small_cnn"
    teacher_extra: dict[str, Any] = field(default_factory=lambda: {"width": 32})
    teacher_epochs: int = 30
    students: tuple[str, ...] = ("small_cnn:width=8", "mlp:hidden=64")
    student_epochs: int = 30
    alpha: float = 0.9
    temperature: float = 4.0
    labelled_fraction: float = 0.1  # the API-customer setting; <= 0 skips it
    train_subset: int = 0  # > 0: use only this many training samples (reduced configurations)
    box: BoxConfig = field(default_factory=BoxConfig)
    device: str = "auto"
    threads: int = 1  # torch intra-op threads; small models run fastest on one (0 = torch's default)
    progress: bool = True


def reduced_config() -> EvalConfig:
    """A small configuration that checks the same directions quickly (for the test suite)."""
    return EvalConfig(
        seeds=(0,),
        teacher_epochs=20,
        student_epochs=20,
        students=("small_cnn:width=8",),
        labelled_fraction=0.0,
        box=replace(BoxConfig(), train=TrainConfig(epochs=20)),
        progress=False,
    )


def parse_student(spec: str) -> tuple[str, dict[str, Any]]:
    """`arch` or `arch:key=value,key=value` (ints/floats parsed)."""
    arch, _, rest = spec.partition(":")
    extra: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            extra[k] = int(v)
        except ValueError:
            extra[k] = float(v)
    return arch, extra


def _train_cfg(cfg: EvalConfig, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, seed=seed, device=cfg.device, progress=cfg.progress)


def run_seed(cfg: EvalConfig, ds: Dataset, seed: int, out_dir: Path) -> dict[str, Any]:
    dev = resolve_device(cfg.device)
    teacher, kwargs = train_classifier(
        ds, cfg.teacher_arch, _train_cfg(cfg, cfg.teacher_epochs, seed), arch_extra=cfg.teacher_extra
    )
    teacher_fn = model_fn(teacher, ds)
    teacher_top1 = accuracy(teacher_fn, ds.x_test, ds.y_test, dev)
    box_cfg = replace(
        cfg.box, train=replace(cfg.box.train, seed=seed, device=cfg.device, progress=cfg.progress)
    )
    key = BoxKey.from_int_seed(seed, ds.input_shape, box_cfg.lam)
    boxed = box_teacher(
        teacher,
        {"arch": cfg.teacher_arch, "arch_kwargs": kwargs},
        ds,
        out_dir / f"seed{seed}",
        name=f"eval-seed{seed}",
        cfg=box_cfg,
        key=key,
        teacher_top1=teacher_top1,
    )
    teachers = {
        "scratch": None,
        "normal": teacher_fn,
        "unauthorized": boxed.plain_logits,
        "authorized": boxed.keyed_logits,
        "wrong_key": wrong_key_fn(boxed, box_cfg.lam, seed + 1_000_003),
    }
    result: dict[str, Any] = {
        "seed": seed,
        "teacher": {
            "normal": teacher_top1,
            "box_plain": boxed.manifest["metrics"]["plain_top1"],
            "box_keyed": boxed.manifest["metrics"]["keyed_top1"],
            "box_wrong_key": boxed.manifest["metrics"]["wrong_key_top1"],
        },
        "students": {},
    }
    settings = {"full": 1.0}
    if cfg.labelled_fraction > 0:
        settings["transfer"] = cfg.labelled_fraction
    for setting, frac in settings.items():
        for spec in cfg.students:
            arch, extra = parse_student(spec)
            for method, fn in teachers.items():
                dcfg = DistillConfig(
                    alpha=cfg.alpha,
                    temperature=cfg.temperature,
                    labelled_fraction=frac,
                    train=_train_cfg(cfg, cfg.student_epochs, seed),
                )
                student = distill(ds, arch, fn, dcfg, arch_extra=extra, desc=f"{spec} {method}")
                top1 = accuracy(model_fn(student, ds), ds.x_test, ds.y_test, dev)
                result["students"].setdefault(setting, {}).setdefault(spec, {})[method] = top1
    return result


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"teacher": {}, "students": {}}
    for k in runs[0]["teacher"]:
        summary["teacher"][k] = _stats([r["teacher"][k] for r in runs])
    for setting, per_arch in runs[0]["students"].items():
        for spec, per_method in per_arch.items():
            for method in per_method:
                vals = [r["students"][setting][spec][method] for r in runs]
                summary["students"].setdefault(setting, {}).setdefault(spec, {})[method] = _stats(vals)
    return summary


def check_targets(summary: dict[str, Any]) -> dict[str, bool]:
    """The issue's quality targets on means (percent points)."""
    t = summary["teacher"]
    checks = {
        "box_plain >= teacher - 1": t["box_plain"]["mean"] >= t["normal"]["mean"] - 1.0,
        "box_keyed >= teacher - 1": t["box_keyed"]["mean"] >= t["normal"]["mean"] - 1.0,
    }
    for spec, m in summary["students"].get("full", {}).items():
        mean = {k: v["mean"] for k, v in m.items()}
        checks[f"{spec}: unauthorized <= normal - 5"] = mean["unauthorized"] <= mean["normal"] - 5.0
        checks[f"{spec}: unauthorized < scratch"] = mean["unauthorized"] < mean["scratch"]
        checks[f"{spec}: authorized >= normal - 0.5"] = mean["authorized"] >= mean["normal"] - 0.5
        checks[f"{spec}: wrong_key <= normal - 5"] = mean["wrong_key"] <= mean["normal"] - 5.0
    return checks


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def to_markdown(report: dict[str, Any]) -> str:
    s, cfg = report["summary"], report["config"]
    lines = [
        f"Dataset `{cfg['dataset']}`, seeds {list(cfg['seeds'])}, top-1 % on the test split, mean ± std.",
        "",
        "| teacher | box plain | box keyed | box wrong key |",
        "|---|---|---|---|",
        "| "
        + " | ".join(_fmt(s["teacher"][k]) for k in ("normal", "box_plain", "box_keyed", "box_wrong_key"))
        + " |",
    ]
    titles = {
        "full": "all labels known",
        "transfer": f"transfer set, {cfg['labelled_fraction']:.0%} labelled",
    }
    for setting, per_arch in s["students"].items():
        lines += ["", f"Students ({titles[setting]}; KD alpha={cfg['alpha']}, T={cfg['temperature']}):", ""]
        lines += [
            "| student | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " |",
            "|---" * (len(METHODS) + 1) + "|",
        ]
        for spec, m in per_arch.items():
            lines.append(f"| {spec} | " + " | ".join(_fmt(m[k]) for k in METHODS) + " |")
    lines += ["", "Targets (on means, all-labels setting):", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    lines += ["", f"Wall time: {report['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    settings = list(s["students"])
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(5 + 6 * len(settings), 4.2), squeeze=False)
    ax = axes[0][0]
    keys = ("normal", "box_plain", "box_keyed", "box_wrong_key")
    ax.bar(
        range(4),
        [s["teacher"][k]["mean"] for k in keys],
        yerr=[s["teacher"][k]["std"] for k in keys],
        color=["#555", "#c44", "#4a4", "#c84"],
    )
    ax.set_xticks(range(4), ["teacher", "box plain", "box keyed", "wrong key"], rotation=20)
    ax.set_ylabel("top-1 %")
    ax.set_title("teachers")
    colors = ["#888", "#555", "#c44", "#4a4", "#c84"]
    for i, setting in enumerate(settings, start=1):
        ax = axes[0][i]
        per_arch = s["students"][setting]
        width = 0.8 / len(METHODS)
        for j, m in enumerate(METHODS):
            xs = [a + j * width for a in range(len(per_arch))]
            ax.bar(
                xs,
                [v[m]["mean"] for v in per_arch.values()],
                width,
                yerr=[v[m]["std"] for v in per_arch.values()],
                label=METHOD_LABELS[m],
                color=colors[j],
            )
        ax.set_xticks([a + 0.4 - width / 2 for a in range(len(per_arch))], list(per_arch))
        low = min(v[m]["mean"] - v[m]["std"] for v in per_arch.values() for m in METHODS)
        ax.set_ylim(max(0.0, low - 5.0), 100.5)
        ax.set_title(f"students: {setting}")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(cfg: EvalConfig, out_dir: str | Path, ds: Dataset | None = None) -> dict[str, Any]:
    """Run the protocol and write results.json, results.md and results.png into out_dir."""
    start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = ds or load_dataset(cfg.dataset)
    if cfg.train_subset > 0:
        ds = ds.subset_train(cfg.train_subset, seed=0)
    runs = [run_seed(cfg, ds, seed, out / "boxes") for seed in cfg.seeds]
    summary = summarize(runs)
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "data_digest": ds.digest(),
        "runs": runs,
        "summary": summary,
        "checks": check_targets(summary),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(report))
    plot(report, out / "results.png")
    return report
