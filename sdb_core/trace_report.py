"""The traceability evaluation's report: what one trace says (the record each student gets in
traceability.json), the issue's targets on one run, and the report as text and Markdown tables.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from sdb_core.trace import TraceReport


def summarize_trace(rep: TraceReport, leakers: tuple[str, ...] = ()) -> dict[str, Any]:
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
                "top1_z": rep.result(wid).top1_statistic,
                "pattern_z": rep.result(wid).pattern_statistic,
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


def cost_entry(label_only: float, clean: list[float], marked: list[float]) -> dict[str, Any]:
    """What the watermark costs a family at one size: the delivered value (top-1 over the label-only
    student) of the watermarked students' mean against the clean students' mean, and the standard error of
    their difference from each side's spread (a side of one student counts as no spread); the ratio's
    standard error to first order in both means (the label-only student taken as exact)."""
    c, m = statistics.fmean(clean), statistics.fmean(marked)

    def var_of_mean(v: list[float]) -> float:
        return statistics.variance(v) / len(v) if len(v) > 1 else 0.0

    d_clean, d_marked = c - label_only, m - label_only
    ratio_se = (
        math.sqrt(var_of_mean(marked) / d_clean**2 + d_marked**2 * var_of_mean(clean) / d_clean**4)
        if d_clean > 0
        else None
    )
    return {
        "label_only": label_only,
        "clean_kd": c,
        "clean_kd_each": clean,
        "watermarked_kd_mean": m,
        "delivered_clean": c - label_only,
        "delivered_watermarked": m - label_only,
        "ratio": (m - label_only) / (c - label_only) if c > label_only else None,
        "difference": m - c,
        "difference_se": math.sqrt(var_of_mean(clean) + var_of_mean(marked)),
        "ratio_se": ratio_se,
    }


def check_trace_targets(result: dict[str, Any], final_size: int) -> dict[str, bool]:
    """The issue's targets on one run: on fresh probes, and again on the students' own images where the run
    traced them there (`own_images`, keys prefixed "own images: ")."""
    checks = _identification_checks(result["leaked"], result["innocent"], final_size, "")
    if any("own_images" in r for r in result["leaked"]):
        leaked = [{**r, **r["own_images"]} for r in result["leaked"] if "own_images" in r]
        innocent = [r["own_images"] for r in result["innocent"] if "own_images" in r]
        checks.update(_identification_checks(leaked, innocent, final_size, "own images: "))
    ratios = [c["ratio"] for c in result["cost"].values() if c["ratio"] is not None]
    checks["cost: delivered with watermark >= 0.9 x without"] = bool(ratios) and min(ratios) >= 0.9
    checks["top-1 identical for every sample"] = bool(result["top1_identical"])
    return checks


def _identification_checks(
    leaked: list[dict[str, Any]], innocent: list[dict[str, Any]], final_size: int, prefix: str
) -> dict[str, bool]:
    big = [r for r in leaked if r["transfer"] == final_size]
    small = [r for r in leaked if r["transfer"] != final_size]
    checks: dict[str, bool] = {}
    if big:
        checks[f"{prefix}{final_size} transfer: leaker first with corrected p < 1e-6, every student"] = all(
            r["leakers"][r["licensee"]]["rank"] == 1 and r["leakers"][r["licensee"]]["log10_corrected_p"] < -6
            for r in big
        )
    checks[f"{prefix}no framing: no innocent licensee at corrected p < 1e-3 in any leaked student"] = all(
        not r["framed"] for r in leaked
    )
    if small:
        first = sum(r["leakers"][r["licensee"]]["rank"] == 1 for r in small) / len(small)
        checks[f"{prefix}smaller transfer: leaker first in >= 90 % ({first:.0%})"] = first >= 0.9
    tests = sum(len(r["z"]) for r in innocent)
    accusations = sum(len(r["named"]) for r in innocent)
    checks[
        f"{prefix}innocent students: no accusation in >= 99 % of tests ({accusations}/{tests} accused)"
    ] = tests > 0 and 1 - accusations / tests >= 0.99
    return checks


def trace_summary(report: dict[str, Any]) -> str:
    """The checks of a traceability report, one line each."""
    lines = ["Traceability (sdb_core.trace_eval):"]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def _per_leaker(rec: dict[str, Any]) -> str:
    return "; ".join(
        f"{w}: {v['rank']}, {v['z']:.2f}, {v['log10_corrected_p']:.2f}" for w, v in rec["leakers"].items()
    )


def own_line(rec: dict[str, Any], wid: str | None = None) -> str:
    """The progress line's part on a student's own images, for a leaker `wid` or an innocent student."""
    own = rec.get("own_images")
    if own is None:
        return ""
    if wid is None:
        return f"; own images: named {own['named']} max z {max(own['z'].values()):.2f}"
    lk = own["leakers"][wid]
    return (
        f"; own images: rank {lk['rank']} z {lk['z']:.1f} log10p {lk['log10_corrected_p']:.1f} "
        f"framed {own['framed']}"
    )


def to_markdown(report: dict[str, Any]) -> str:
    """Tables of a traceability report (for docs/traceability.md)."""
    res = report["result"]
    lines = [
        "| family | transfer | licensee | student top-1 | leaker rank | leaker z | leaker log10 corrected p "
        "| decoys above | max innocent z | framed | own images: rank, z, log10 corrected p, max innocent z, "
        "framed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["leaked"]:
        lk = r["leakers"][r["licensee"]]
        own = r.get("own_images")
        own_cell = "-"
        if own is not None:
            ol = own["leakers"][r["licensee"]]
            own_cell = (
                f"{ol['rank']}, {ol['z']:.2f}, {ol['log10_corrected_p']:.2f}, {own['max_innocent_z']:.2f}, "
                f"{len(own['framed'])}"
            )
        lines.append(
            f"| {r['family']} | {r['transfer']} | {r['licensee']} | {r['top1']:.2f} "
            f"| {lk['rank']} | {lk['z']:.2f} "
            f"| {lk['log10_corrected_p']:.2f} | {lk['decoys_above']} | {r['max_innocent_z']:.2f} "
            f"| {len(r['framed'])} | {own_cell} |"
        )
    lines += [
        "",
        "| innocent student | family | transfer | top-1 | max z over the watermarks | named "
        "| decoy FPR at alpha "
        "| decoy KS | own images: max z, named |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["innocent"]:
        own = r.get("own_images")
        own_cell = "-" if own is None else f"{max(own['z'].values()):.2f}, {len(own['named'])}"
        lines.append(
            f"| {r['student']} | {r['family']} | {r['transfer']} | {r['top1']:.2f} "
            f"| {max(r['z'].values()):.2f} "
            f"| {len(r['named'])} | {r['decoy_fpr']:.4f} | {r['decoy_ks']:.3f} | {own_cell} |"
        )
    if res["cost"]:
        lines += [
            "",
            "| cost | label-only | clean KD (mean of n) | watermarked KD (mean) | delivered clean "
            "| delivered watermarked | ratio | watermarked minus clean (se) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, c in res["cost"].items():
            ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}"
            if c.get("ratio_se") is not None:
                ratio += f" (se {c['ratio_se']:.2f})"
            lines.append(
                f"| {k} | {c['label_only']:.2f} | {c['clean_kd']:.2f} (n={len(c['clean_kd_each'])}) "
                f"| {c['watermarked_kd_mean']:.2f} | {c['delivered_clean']:.2f} "
                f"| {c['delivered_watermarked']:.2f} | {ratio} "
                f"| {c['difference']:+.2f} ({c['difference_se']:.2f}) |"
            )
    if res["removal"]:
        lines += [
            "",
            "| removal attempt | probes | student top-1 | per leaker: rank, z, log10 corrected p "
            "| framed | own images: per leaker, framed | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["removal"]:
            own = r.get("own_images")
            own_cell = f"{_per_leaker(own)}; {len(own['framed'])}" if own else "-"
            lines.append(
                f"| {r['attack']} | {r['probes']} | {r['top1']:.2f} | {_per_leaker(r)} | {len(r['framed'])} "
                f"| {own_cell} | {r['note']} |"
            )
    lines += ["", "Targets:", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"
