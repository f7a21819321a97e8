"""The evaluation's report: the measures over seeds (V, delivered, leaked, the label-only floor), the
quality targets, and the report as JSON, Markdown and PNG; merging the reports of separate runs.

A report is plain data (what `results.json` holds): `config` (the protocol's record), `data_digest`, the
per-seed `runs` of `sdb_core.evaluate.run_seed`, their `summary` and the `checks` of the targets. The
measures are defined in `sdb_core.evaluate`'s docstring.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

BASE_METHODS = ("scratch", "normal", "authorized")


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def attacks_of(per_method: dict[str, Any]) -> list[str]:
    """The unauthorized methods of one student family: every attack on the plain path or the stolen
    weights."""
    return [m for m in per_method if m not in BASE_METHODS]


def floor_of(run: dict[str, Any], spec: str) -> tuple[float, str]:
    """The label-only floor of one seed: the best student any recipe of the suite trains from top-1 answers
    alone (the top-1 twins), and the recipe that trained it."""
    twins = run["twins"][spec]
    best = max(twins, key=lambda m: twins[m])
    return twins[best], best


def measures(runs: list[dict[str, Any]], spec: str) -> dict[str, Any]:
    """V, delivered and leaked (mean ± std over seeds of per-seed differences to the label-only floor), and
    what each attack gained over the floor and over its own top-1 twin (beyond the top-1)."""

    def over_floor(method: str) -> dict[str, float]:
        return _stats([r["students"][spec][method] - floor_of(r, spec)[0] for r in runs])

    attacks = attacks_of(runs[0]["students"][spec])
    gains = {m: over_floor(m) for m in attacks}
    beyond = {m: _stats([r["students"][spec][m] - r["twins"][spec][m] for r in runs]) for m in attacks}
    worst = max(gains, key=lambda m: gains[m]["mean"])
    return {
        "floor": _stats([floor_of(r, spec)[0] for r in runs]),
        "floor_by": [floor_of(r, spec)[1] for r in runs],
        "V": over_floor("normal"),
        "delivered": over_floor("authorized"),
        "leaked": gains[worst],
        "leaked_by": worst,
        "gains": gains,
        "beyond_top1": beyond,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"teacher": {}, "students": {}, "measures": {}}
    for k in runs[0]["teacher"]:
        summary["teacher"][k] = _stats([r["teacher"][k] for r in runs])
    for spec, per_method in runs[0]["students"].items():
        summary["students"][spec] = {m: _stats([r["students"][spec][m] for r in runs]) for m in per_method}
        summary["measures"][spec] = measures(runs, spec)
    return summary


def check_targets(summary: dict[str, Any]) -> dict[str, bool]:
    """The quality targets on means (top-1 points)."""
    t = summary["teacher"]
    checks = {
        "box plain >= teacher - 0.5": t["box_plain"]["mean"] >= t["normal"]["mean"] - 0.5,
        "box keyed >= teacher - 0.5": t["box_keyed"]["mean"] >= t["normal"]["mean"] - 0.5,
    }
    for spec, m in summary["measures"].items():
        v = m["V"]["mean"]
        checks[f"{spec}: V >= 1"] = v >= 1.0
        checks[f"{spec}: delivered >= 0.9 V"] = m["delivered"]["mean"] >= 0.9 * v
        checks[f"{spec}: leaked <= 0.1 V ({m['leaked_by']})"] = m["leaked"]["mean"] <= 0.1 * v
    return checks


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def to_markdown(report: dict[str, Any]) -> str:
    s, cfg = report["summary"], report["config"]
    transfer = (
        f"a transfer set of {cfg['transfer']} images apart from the owner's"
        if cfg["transfer"] > 0
        else "the owner's own training images as the transfer set"
    )
    lines = [
        f"Dataset `{cfg['dataset']}`, seeds {list(cfg['seeds'])}, {transfer}, "
        f"{cfg['labelled_fraction']:.0%} of its labels known; top-1 % on the whole test split, mean ± std.",
        "",
        "| teacher | box plain | box keyed | box wrong key | stolen weights (no key) |",
        "|---|---|---|---|---|",
        "| "
        + " | ".join(
            _fmt(s["teacher"][k]) for k in ("normal", "box_plain", "box_keyed", "box_wrong_key", "box_stolen")
        )
        + " |",
        "",
        "Knowledge delivered and leaked, in top-1 points over the label-only floor (the best student trained"
        " from top-1 answers alone; per-seed differences):",
        "",
        "| student | label-only floor | V = normal KD - floor | delivered (authorized) "
        "| leaked (best attack) "
        "| best attack |",
        "|---|---|---|---|---|---|",
    ]
    for spec, m in s["measures"].items():
        lines.append(
            f"| {spec} | {_fmt(m['floor'])} | {_fmt(m['V'])} | {_fmt(m['delivered'])} | {_fmt(m['leaked'])} "
            f"| `{m['leaked_by']}` |"
        )
    specs = list(s["students"])
    lines += [
        "",
        f"Students (KD alpha={cfg['alpha']}, T={cfg['temperature']}), top-1 %; for each attack, "
        "its gain over "
        "its own top-1 twin (what the answers gave beyond their top-1):",
        "",
        "| method | " + " | ".join(f"{sp} | beyond top-1" for sp in specs) + " |",
        "|---" * (2 * len(specs) + 1) + "|",
    ]
    for method in s["students"][specs[0]]:
        cells = []
        for sp in specs:
            beyond = s["measures"][sp]["beyond_top1"].get(method)
            cells += [_fmt(s["students"][sp][method]), _fmt(beyond) if beyond else ""]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (on means):", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    lines += ["", f"Wall time: {report['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    keys = ("normal", "box_plain", "box_keyed", "box_wrong_key", "box_stolen")
    ax.bar(
        range(len(keys)),
        [s["teacher"][k]["mean"] for k in keys],
        yerr=[s["teacher"][k]["std"] for k in keys],
        color=["#555", "#c44", "#4a4", "#c84", "#848"],
    )
    ax.set_xticks(range(len(keys)), ["teacher", "box plain", "box keyed", "wrong key", "stolen"], rotation=20)
    low = min(s["teacher"][k]["mean"] for k in keys)
    ax.set_ylim(max(0.0, low - 5.0), 100.0)
    ax.set_ylabel("top-1 %")
    ax.set_title("teacher and box")
    ax = axes[1]
    specs = list(s["measures"])

    def worst(m: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
        gains = [g for name, g in m["gains"].items() if name.startswith(prefixes)]
        return max(gains, key=lambda g: g["mean"]) if gains else {"mean": 0.0, "std": 0.0}

    bars = [
        ("V (normal KD)", "#555", lambda m: m["V"]),
        ("delivered (licensee)", "#4a4", lambda m: m["delivered"]),
        ("leaked: /predict, weights as shipped", "#c44", lambda m: worst(m, ("api/", "stolen/"))),
        ("leaked: weights, gate cut out", "#e9a", lambda m: worst(m, ("whitebox/",))),
    ]
    width = 0.8 / len(bars)
    for j, (label, color, pick) in enumerate(bars):
        xs = [a + j * width for a in range(len(specs))]
        values = [pick(s["measures"][sp]) for sp in specs]
        ax.bar(
            xs, [v["mean"] for v in values], width, yerr=[v["std"] for v in values], label=label, color=color
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks([a + width * (len(bars) - 1) / 2 for a in range(len(specs))], specs)
    ax.set_ylabel("top-1 points over the label-only floor")
    ax.set_title("dark knowledge: delivered vs leaked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(report))
    plot(report, out / "results.png")


def build_report(
    config: dict[str, Any], runs: list[dict[str, Any]], digest: str, wall: float
) -> dict[str, Any]:
    """The report of `runs` made by the protocol recorded in `config` on data of `digest`."""
    summary = summarize(runs)
    return {
        "config": config,
        "data_digest": digest,
        "runs": runs,
        "summary": summary,
        "checks": check_targets(summary),
        "wall_seconds": wall,
    }


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report over the seeds of several runs of the same protocol (e.g. one seed per command)."""
    first = reports[0]
    strip = ("seeds",)
    base = {k: v for k, v in first["config"].items() if k not in strip}
    for r in reports[1:]:
        if {k: v for k, v in r["config"].items() if k not in strip} != base:
            raise ValueError("the reports were made with different protocols")
        if r["data_digest"] != first["data_digest"]:
            raise ValueError("the reports were made on different data")
    runs = sorted((run for r in reports for run in r["runs"]), key=lambda run: run["seed"])
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice: {seeds}")
    config = {**first["config"], "seeds": seeds}
    return build_report(config, runs, first["data_digest"], sum(r["wall_seconds"] for r in reports))
