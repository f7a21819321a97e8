"""Trace a suspect model back to the licensee whose watermarked soft labels taught it.

The owner queries the suspect (black box: raw inputs -> probabilities) and its own clean reference (the box's
keyed soft labels without any watermark, or the teacher) on the same probe images. Both answers are brought
to the watermark's temperature (softmax(log p / T)); the residual r_i = suspect - reference on the reference's
top-1 class is what a learned watermark moves. For each watermark the matched filter d_i is the exact change
that watermark made to that top-1 probability (`watermark.mark_deltas`), and the statistic is the
self-normalised sum, r and d centred within each reference top-1 class,

    z = sum_i r_i d_i / sqrt(sum_i (r_i d_i)^2),

standard normal in the limit when the residual carries nothing of that watermark (the terms then have mean
zero; subtracting the reference removes the class structure every model of the task shares, and centring
within classes removes a suspect's overall over- or under-confidence, which would otherwise shift every z by
the mark's mean).

The limit is not the truth on real students: a student's residual is a smooth function of the image, not
noise, and its projections on low-frequency marks spread wider or narrower than N(0, 1)
(research/traceability/NOTES.md). By default (`null="decoys"`) z is therefore centred and scaled by the
median and robust spread (1.4826 MAD) of the decoys' z on the same answers: `decoys` watermarks never issued,
drawn exactly like issued ones (uniformly random directions of the same space), so they share the null of
every issued watermark that the suspect did not learn; an empirical null in Efron's sense. The p-value is
one-sided, P(N(0,1) >= z), kept in log10 so that tiny ones stay exact; it is corrected over the issued
watermarks tested (Holm by default, or Bonferroni), and a watermark is named when its corrected p-value is
below `alpha`. The report gives the decoys' own false-positive rate at `alpha`, the Kolmogorov-Smirnov
distance of their p-values from uniform, and each issued watermark's rank and the number of decoys above it.
The innocent students of `sdb_core.trace_eval` check the calibration out of sample.

Watermarks with a class pattern (`sdb_core.pattern`, the second channel) are tested on it too: the
suspect's centred non-top log-probabilities minus the reference's, averaged per reference top-1 class, are
projected on each pattern, and the projections are calibrated on the decoys' patterns the same way (or
against |R| / sqrt(D), the analytic null of a random unit pattern). A watermark's statistic is the larger of
its two calibrated z's, and its p-value that of the larger of two independent standard normals (Sidak:
1 - (1 - p)^2), which keeps the decoys' p-values uniform. `WatermarkResult` keeps both channels' z. With
`shadows` (clean students of the suspect's presumed family, distilled on the owner's own images) the pattern
channel subtracts their answers instead of the reference's: most of a student's residual is its family's
own error, which they share (research/traceability/NOTES.md, fourth round).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from sdb_core.pattern import analytic_scale, centred_log_residual, pattern_statistics
from sdb_core.watermark import Watermark, WatermarkConfig, decoy_watermarks, mark_deltas, retemper

CORRECTIONS = ("holm", "bonferroni")
NULLS = ("decoys", "analytic")
MIN_DECOYS = 100
LN10 = math.log(10.0)


@dataclass(frozen=True)
class TraceConfig:
    probes: int = 10_000  # at most this many probe images are sent to the suspect
    decoys: int = 1_000  # watermarks never issued, tested alongside as the null's check
    alpha: float = 1e-3  # a watermark is named when its corrected p-value is below this
    correction: str = "holm"  # over the issued watermarks tested: "holm" or "bonferroni"
    batch_size: int = 500  # probes per query to the suspect
    # "decoys": z is centred and scaled by the decoys' median and robust spread (1.4826 MAD) before the
    # normal tail is read (decoys and issued watermarks are drawn alike: random directions); "analytic": z
    # against N(0, 1) as it stands (over-confident on real students, research/traceability/NOTES.md)
    null: str = "decoys"

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"unknown correction {self.correction!r}; one of {', '.join(CORRECTIONS)}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.null not in NULLS:
            raise ValueError(f"unknown null {self.null!r}; one of {', '.join(NULLS)}")
        if self.null == "decoys" and self.decoys < MIN_DECOYS:
            raise ValueError(f"the decoy-calibrated null needs at least {MIN_DECOYS} decoys")
        if self.probes < 1 or self.decoys < 0 or self.batch_size < 1:
            raise ValueError("probes and batch_size must be >= 1 and decoys >= 0")


@dataclass(frozen=True)
class WatermarkResult:
    wid: str
    statistic: float  # z, calibrated (see TraceConfig.null): the larger of the channels' z
    raw_statistic: float  # the top-1 channel's z before calibration
    log10_p: float
    p_value: float  # 10 ** log10_p (0.0 below float range: read log10_p)
    log10_corrected_p: float
    corrected_p: float
    verdict: str  # "match" or "no evidence"
    rank: int  # 1 = the largest statistic among the issued watermarks
    decoys_above: int  # decoys whose statistic is at least this one's
    probes: int  # probe images this watermark was tested on
    top1_statistic: float = 0.0  # the top-1 cosine channel's calibrated z
    pattern_statistic: float | None = None  # the class pattern channel's calibrated z (None: no pattern)


@dataclass
class TraceReport:
    results: list[WatermarkResult]
    probes: int
    alpha: float
    correction: str
    decoys: int
    decoy_false_positive_rate: float  # decoys with uncorrected p < alpha
    decoy_false_positive_rate_corrected: float  # decoys that would be named after the same correction
    decoy_ks: float  # Kolmogorov-Smirnov distance of the decoys' p-values from uniform
    null: str
    null_location: float  # subtracted from the raw z
    null_scale: float  # the raw z divided by this
    decoy_z_mean: float
    decoy_z_std: float
    channels: int = 1  # 2 with the class pattern: p-values of the larger z of two (log10_p_upper)
    pattern_null_scale: float | None = None  # the pattern channel's raw projection divided by this
    decoy_statistics: list[float] = field(default_factory=list, repr=False)

    @property
    def matches(self) -> list[WatermarkResult]:
        return [r for r in self.results if r.verdict == "match"]

    @property
    def best(self) -> WatermarkResult | None:
        return min(self.results, key=lambda r: r.rank) if self.results else None

    def result(self, wid: str) -> WatermarkResult:
        for r in self.results:
            if r.wid == wid:
                return r
        raise KeyError(wid)

    def to_dict(self, *, with_decoy_statistics: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_decoy_statistics:
            d.pop("decoy_statistics")
        d["matches"] = [r.wid for r in self.matches]
        for r in d["results"]:  # JSON has no infinities
            for k in ("statistic", "log10_p", "log10_corrected_p"):
                if not math.isfinite(r[k]):
                    r[k] = None
        return d


def _query(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int, what: str) -> Tensor:
    outs = []
    for s in range(0, len(x), batch):
        with torch.no_grad():
            outs.append(torch.as_tensor(fn(x[s : s + batch])).detach().float().cpu())
    p = torch.cat(outs)
    if p.shape[0] != len(x) or p.dim() != 2:
        raise ValueError(f"the {what} answered shape {tuple(p.shape)} for {len(x)} probes")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"the {what} answered values that are not probabilities")
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-30)


def _centred(v: Tensor, groups: Tensor | None) -> Tensor:
    """v [N, M] minus its mean within each group (all rows one group when None)."""
    if groups is None:
        return v - v.mean(0, keepdim=True)
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, v.shape[1], dtype=v.dtype).index_add_(0, groups, v)
    counts = torch.bincount(groups, minlength=n_groups).clamp_min(1).to(v.dtype)
    return v - (sums / counts[:, None])[groups]


def statistics(residual: Tensor, deltas: Tensor, groups: Tensor | None = None) -> Tensor:
    """z per column of deltas [N, M] against residual [N], both centred within each group (the reference's
    top-1 class): a suspect that is on the whole less or more sure of a class than the reference, as every
    student is, shifts the residual's mean, which is not a mark."""
    r = _centred(residual.double()[:, None], groups)
    terms = r * _centred(deltas.double(), groups)
    den = terms.pow(2).sum(0).sqrt()
    z = terms.sum(0) / den.clamp_min(1e-300)
    return torch.where(den > 0, z, torch.zeros_like(z))


def log10_p_upper(z: Tensor, channels: int = 1) -> Tensor:
    """log10 P(max of `channels` independent N(0,1) >= z) = log10(1 - (1 - P(N(0,1) >= z))^channels)
    (Sidak), exact far into the tail: uniform under the null, as the decoys check."""
    lm = torch.special.log_ndtr(-z.double())  # ln P(N(0,1) >= z)
    if channels == 1:
        return lm / LN10
    m = lm.exp()
    exact = torch.log(-torch.expm1(channels * torch.log1p(-m.clamp(max=1 - 1e-16))))
    return torch.where(m < 1e-10, lm + math.log(channels), exact) / LN10


def corrected_log10(log10_p: Tensor, method: str) -> Tensor:
    """Family-wise corrected p-values (log10) over the m tests: Bonferroni m p, or Holm's step-down."""
    m = len(log10_p)
    if m == 0:
        return log10_p
    lm = math.log10(m)
    if method == "bonferroni":
        return (log10_p + lm).clamp(max=0.0)
    order = torch.argsort(log10_p)
    steps = torch.log10(torch.arange(m, 0, -1, dtype=torch.float64))
    adj = (log10_p[order] + steps).clamp(max=0.0)
    adj = torch.cummax(adj, dim=0).values
    out = torch.empty_like(adj)
    out[order] = adj
    return out


def _ks_uniform(p: Tensor) -> float:
    if len(p) == 0:
        return 0.0
    s = torch.sort(p.double()).values
    n = len(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - s, s - (i - 1) / n).max())


def trace(
    suspect: Callable[[Tensor], Tensor],
    reference: Callable[[Tensor], Tensor],
    probes: Tensor,
    watermarks: Sequence[Watermark],
    cfg: TraceConfig = TraceConfig(),
    *,
    decoy_secret: bytes | None = None,
    watermark_cfg: WatermarkConfig | None = None,
    shadows: Sequence[Callable[[Tensor], Tensor]] = (),
) -> TraceReport:
    """Test every issued watermark (and `cfg.decoys` decoys) on the suspect's answers to `probes`.

    suspect, reference: raw inputs [N, *input_shape] -> probabilities [N, C] (at temperature 1, as `/predict`
    answers). `decoy_secret` seeds the decoys (random when None); `watermark_cfg` is the configuration the
    watermarks were derived with (the decoys' frequency; taken from the watermarks when None). `shadows`:
    clean students of the suspect's presumed family (never taught any licensee's answers, e.g. distilled
    from the box's clean soft labels on the owner's images), answering like `suspect`: the class pattern
    channel subtracts their mean instead of the reference (`pattern.centred_log_residual`); the decoys
    calibrate it the same way."""
    if not watermarks:
        raise ValueError("no watermarks to test")
    basis = watermarks[0].basis
    temperature = watermarks[0].temperature
    if any(w.basis != basis or w.temperature != temperature for w in watermarks[1:]):
        raise ValueError("the watermarks were derived with different bases or temperatures")
    x = torch.as_tensor(probes, dtype=torch.float32)[: cfg.probes]
    ref = retemper(_query(reference, x, cfg.batch_size, "reference"), temperature)
    sus = retemper(_query(suspect, x, cfg.batch_size, "suspect"), temperature)
    if sus.shape != ref.shape:
        raise ValueError(f"suspect answers {tuple(sus.shape)} but the reference {tuple(ref.shape)}")
    top = ref.argmax(dim=1, keepdim=True)
    residual = (sus.gather(1, top) - ref.gather(1, top))[:, 0]
    groups = top[:, 0]

    w0 = watermarks[0]
    if any(
        (w.pattern_tensor() is None) != (w0.pattern_tensor() is None)
        or w.pattern_epsilon != w0.pattern_epsilon
        for w in watermarks[1:]
    ):
        raise ValueError("the watermarks were derived with different class pattern settings")
    wcfg = watermark_cfg or WatermarkConfig(
        epsilon=w0.epsilon,
        temperature=temperature,
        frequency=w0.mode.frequency,
        margin=w0.margin,
        clip=w0.clip,
        pattern=w0.pattern_epsilon,
    )
    wcfg = replace(wcfg, pattern=w0.pattern_epsilon)  # the decoys carry patterns where the watermarks do
    decoys = (
        decoy_watermarks(
            cfg.decoys,
            basis=basis,
            num_classes=watermarks[0].num_classes,
            cfg=wcfg,
            seed=decoy_secret or secrets.token_bytes(16),
        )
        if cfg.decoys
        else []
    )
    z_issued = statistics(residual, mark_deltas(list(watermarks), x, ref), groups)
    z_decoy = (
        torch.cat(
            [
                statistics(residual, mark_deltas(decoys[s : s + 200], x, ref), groups)
                for s in range(0, len(decoys), 200)
            ]
        )
        if decoys
        else torch.zeros(0, dtype=torch.float64)
    )

    loc, scale = _null(z_decoy, cfg.null)
    z_raw_issued = z_issued
    z_issued = (z_issued - loc) / scale
    z_decoy = (z_decoy - loc) / scale
    top1_issued = z_issued
    pattern_issued: Tensor | None = None
    channels, pattern_scale = 1, None  # pattern_scale: the pattern projections' calibration scale
    if w0.pattern_tensor() is not None:
        channels = 2
        shadow_answers = [
            retemper(_query(fn, x, cfg.batch_size, "shadow student"), temperature) for fn in shadows
        ]
        residual_cc = centred_log_residual(sus, ref, shadow_answers)
        raw_i = pattern_statistics(residual_cc, _patterns(watermarks))
        raw_d = (
            pattern_statistics(residual_cc, _patterns(decoys))
            if decoys
            else torch.zeros(0, dtype=torch.float64)
        )
        ploc, pattern_scale = (
            _null(raw_d, cfg.null) if cfg.null == "decoys" else (0.0, analytic_scale(residual_cc))
        )
        pattern_issued = (raw_i - ploc) / pattern_scale
        z_issued = torch.maximum(z_issued, pattern_issued)
        z_decoy = torch.maximum(z_decoy, (raw_d - ploc) / pattern_scale)
    lp = log10_p_upper(z_issued, channels)
    lpc, ranks = _corrected_and_ranked(z_issued, lp, cfg.correction)
    results = [
        WatermarkResult(
            wid=w.wid,
            statistic=float(z_issued[i]),
            raw_statistic=float(z_raw_issued[i]),
            log10_p=float(lp[i]),
            p_value=float(10 ** lp[i]),
            log10_corrected_p=float(lpc[i]),
            corrected_p=float(10 ** lpc[i]),
            verdict=_verdict(float(lpc[i]), cfg.alpha),
            rank=int(ranks[i]),
            decoys_above=int((z_decoy >= z_issued[i]).sum()),
            probes=len(x),
            top1_statistic=float(top1_issued[i]),
            pattern_statistic=float(pattern_issued[i]) if pattern_issued is not None else None,
        )
        for i, w in enumerate(watermarks)
    ]
    return TraceReport(
        results=results,
        probes=len(x),
        alpha=cfg.alpha,
        correction=cfg.correction,
        decoys=len(decoys),
        null=cfg.null,
        null_location=loc,
        null_scale=scale,
        channels=channels,
        pattern_null_scale=pattern_scale,
        **_decoy_measures(z_decoy, len(watermarks), cfg.alpha, channels),
    )


def _patterns(watermarks: Sequence[Watermark]) -> Tensor:
    """The watermarks' class patterns [M, C, C] (every one has one: `trace` checks the issued, and derives
    the decoys with the same pattern setting)."""
    return torch.stack([p for p in (w.pattern_tensor() for w in watermarks) if p is not None])


def _null(z_decoy: Tensor, null: str) -> tuple[float, float]:
    """The location and scale a channel's raw statistics are calibrated with: the decoys' median and
    robust spread (1.4826 MAD), or (0, 1) for the analytic null."""
    if null != "decoys" or len(z_decoy) == 0:
        return 0.0, 1.0
    med = z_decoy.median()
    return float(med), max(1e-12, float(1.4826 * (z_decoy - med).abs().median()))


def _corrected_and_ranked(z: Tensor, log10_p: Tensor, correction: str) -> tuple[Tensor, Tensor]:
    """Corrected log10 p-values over all the watermarks tested, and their ranks by z (1 = largest)."""
    order = torch.argsort(-z)
    ranks = torch.empty(len(order), dtype=torch.long)
    ranks[order] = torch.arange(1, len(order) + 1)
    return corrected_log10(log10_p, correction), ranks


def _verdict(log10_corrected_p: float, alpha: float) -> str:
    return "match" if log10_corrected_p < math.log10(alpha) else "no evidence"


def _decoy_measures(z_decoy: Tensor, m: int, alpha: float, channels: int = 1) -> dict[str, Any]:
    """The decoys' check of the null: their false-positive rate at alpha (uncorrected, and as if corrected
    over the m watermarks tested: Bonferroni's bound, Holm names no more), their p-values' KS distance from
    uniform, the mean and spread of their calibrated z."""
    n = len(z_decoy)
    lp = log10_p_upper(z_decoy, channels)
    log_alpha = math.log10(alpha)
    return {
        "decoy_false_positive_rate": float((lp < log_alpha).double().mean()) if n else 0.0,
        "decoy_false_positive_rate_corrected": float((lp + math.log10(m) < log_alpha).double().mean())
        if n
        else 0.0,
        "decoy_ks": _ks_uniform(10**lp),
        "decoy_z_mean": float(z_decoy.mean()) if n else 0.0,
        "decoy_z_std": float(z_decoy.std()) if n > 1 else 0.0,
        "decoy_statistics": [float(v) for v in z_decoy],
    }


def trace_licensees(
    suspect: Callable[[Tensor], Tensor],
    reference: Callable[[Tensor], Tensor],
    probe_sets: Sequence[Tensor],
    watermarks: Sequence[Watermark],
    cfg: TraceConfig = TraceConfig(),
    *,
    decoy_secret: bytes | None = None,
    watermark_cfg: WatermarkConfig | None = None,
    shadows: Sequence[Callable[[Tensor], Tensor]] = (),
) -> TraceReport:
    """`trace` with each watermark tested on probes of its own: `probe_sets[i]` are images that licensee i
    sent for labelling (a sample of its transfer set). A student reproduces its licensee's mark on the images
    it was taught on far better than on fresh ones (research/traceability/NOTES.md, 2026-12-06: `small_cnn:16`
    at 500 images, calibrated z 3.3-6.7 on 500 of its own images against -0.4-4.1 on 10,000 fresh ones).

    Watermarks whose sets are the same tensor share one query and one decoy null (licensees without images
    of their own can share the owner's probes), and `cfg.probes` bounds the queries to the suspect in all:
    each distinct set is cut to cfg.probes // (the number of distinct sets) images. Each
    watermark's z is calibrated on the decoys over its own probes; the p-values are then corrected over all
    the watermarks together, and ranks compare the calibrated z's. The report's decoy measures pool every
    set's decoys; `null_location` and `null_scale` are the medians over the sets."""
    if len(probe_sets) != len(watermarks):
        raise ValueError(f"{len(probe_sets)} probe sets for {len(watermarks)} watermarks")
    if not watermarks:
        raise ValueError("no watermarks to test")
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(probe_sets):
        if len(p) == 0:
            raise ValueError(f"no probes for watermark {watermarks[i].wid}")
        groups.setdefault(id(p), []).append(i)
    per = max(1, cfg.probes // len(groups))
    parts: list[tuple[list[int], TraceReport]] = []
    for members in groups.values():
        x = probe_sets[members[0]][:per]
        sub = trace(
            suspect,
            reference,
            x,
            [watermarks[i] for i in members],
            replace(cfg, probes=len(x)),
            decoy_secret=decoy_secret,
            watermark_cfg=watermark_cfg,
            shadows=shadows,
        )
        parts.append((members, sub))
    own: dict[int, WatermarkResult] = {}
    for members, sub in parts:
        own.update(zip(members, sub.results, strict=True))
    z = torch.tensor([own[i].statistic for i in range(len(watermarks))], dtype=torch.float64)
    lp = torch.tensor([own[i].log10_p for i in range(len(watermarks))], dtype=torch.float64)
    lpc, ranks = _corrected_and_ranked(z, lp, cfg.correction)
    results = [
        replace(
            own[i],
            log10_corrected_p=float(lpc[i]),
            corrected_p=float(10 ** lpc[i]),
            verdict=_verdict(float(lpc[i]), cfg.alpha),
            rank=int(ranks[i]),
        )
        for i in range(len(watermarks))
    ]
    z_decoy = torch.tensor([v for _, sub in parts for v in sub.decoy_statistics], dtype=torch.float64)
    return TraceReport(
        results=results,
        probes=sum(sub.probes for _, sub in parts),
        alpha=cfg.alpha,
        correction=cfg.correction,
        decoys=parts[0][1].decoys,
        null=cfg.null,
        null_location=float(torch.tensor([sub.null_location for _, sub in parts]).median()),
        null_scale=float(torch.tensor([sub.null_scale for _, sub in parts]).median()),
        channels=parts[0][1].channels,
        pattern_null_scale=parts[0][1].pattern_null_scale,
        **_decoy_measures(z_decoy, len(watermarks), cfg.alpha, parts[0][1].channels),
    )
