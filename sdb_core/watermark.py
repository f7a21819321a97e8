"""Per-licensee watermarks on the box's soft labels: each licensee's answers carry a signal of their own
that a student distilled from them learns, and that `sdb_core.trace` finds again in the student's outputs.

The design (research/traceability/NOTES.md has the trials behind it):

- **Coordinates.** Each image is reduced to its low-frequency 2-D DCT block (the top-left `dct_size` x
  `dct_size` coefficients of every channel: coarse, so a student learns functions of it from few images), then
  to its `directions` top principal coordinates over the owner's images, whitened: uncorrelated over the data
  by construction, unlike random pixel projections of low-rank images. `WatermarkBasis` holds this map; it is
  public (not secret) and fitted once per box on the owner's images (`fit_basis`); without one a data-free
  fallback is used.
- **Codes.** A watermark is a unit direction w in those coordinates, a phase phi and a frequency f:
  theta(x) = 2 pi f Phi(w . g(x)) + phi, Phi the normal CDF so that the phase is near uniform (DRW). Issued
  watermarks (`slot` = the service's issue counter) take the rows of one orthogonal matrix keyed by the
  secret: their projections are uncorrelated over the images, so one licensee's signal does not show as
  another's. That is the no-framing property, and it holds for up to `directions` licensees (then pairs share
  a direction in quadrature). f is low (1.5 cycles over the CDF): higher ones are memorised on the transfer
  set and do not carry over to fresh probes (the issue's trial, research/traceability/NOTES.md); a CNN
  student, whose logits are linear in position-averaged local features, learns little beyond a cosine's
  linear part, and lower ones (1.0) rank its licensee first more often at weaker p-values.
- **Signal.** At the box's soft-label temperature, the top-1 class's probability moves by eps * cos(theta(x))
  and the other classes are rescaled to keep the sum at 1, clipped so that the top-1 stays strictly on top:
  every returned row has the top-1 of its input row (CosWM/DRW put a cosine on one class the same way). With
  `clip="symmetric"` a row also moves at most as far up as it may move down, so every row's mark averages to
  zero over the phase; the default one-sided clip gives every watermark a common shift on rows with a small
  lead (+3 to +7 on every decoy's statistic, against a spread of 2 to 5), which the decoy null removes.
- **Class pattern** (`sdb_core.pattern`, `pattern` > 0). A second channel for students that learn the
  cosine too weakly (`small_cnn:16` from 10,000 images): each slot also gets an orthonormal pattern over
  (top-1 class, other class), and from the licensee's `pattern_after`-th soft label on, the non-top
  classes' log-probabilities move by it (the top-1 probability and so the top-1 stay as they were).
- **Versions.** A box records the configuration its watermarks are made with (`CONFIG_KEY` in its
  manifest's "extra", read by `config_from_manifest`); a box that records none was made with
  `LEGACY_CONFIG`, so a licensee's watermark stays what it was served with when the defaults change.

For the service: one owner secret (>= 16 bytes) apart from the box key and the API keys; per API key its
slot (0, 1, 2, ... in issue order, never reused) and public `wid`; per box `basis_from_manifest` and
`config_from_manifest`; then `derive_watermark(...)` and `apply_watermark(wm, x_raw, probs, served)` on
`/distill-batch` answers. `sdb_core.trace.trace` takes the same watermarks (all ever issued).

Everything secret (the mode) is derived by HMAC-SHA256 from the owner's secret and the licensee id; the public
watermark id is a one-way function of both. `repr()` of a `Watermark` shows only its id.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdb_core.pattern import apply_pattern, keyed_patterns, one_pattern

BASIS_KEY = "watermark_basis"  # where a box manifest's "extra" keeps its fitted basis (sdb_core.box)
CONFIG_KEY = "watermark_config"  # ... and the configuration its watermarks are made with
CLIPS = ("symmetric", "lead")


@dataclass(frozen=True)
class WatermarkConfig:
    # amplitude on the top-1 probability at `temperature`; 0.1 until 2026-12-06 cost `mlp:512` students at
    # 10,000 images 0.56 points of the 2.63 clean soft labels deliver, 0.07 until 2026-12-07 cost
    # `mlp:512` students at 500 images 0.34 of 3.38 (docs/traceability.md, the amplitude)
    epsilon: float = 0.05
    temperature: float = 4.0  # the soft-label temperature the mark is designed for (and traced at)
    dct_size: int = 8  # low-frequency DCT block kept per channel
    directions: int = 20  # principal coordinates of the DCT block spanning the watermark space
    # cycles of the cosine over the CDF-mapped coordinate (1.0 ranks leakers first more often, at weaker
    # p-values: docs/traceability.md, research/traceability/NOTES.md 2026-12-06)
    frequency: float = 1.5
    margin: float = 1e-3  # the top-1 stays at least min(margin, half its lead) above the runner-up
    # "lead": down to the runner-up's tie, up to 1; "symmetric": also up at most as far as it may go down,
    # so that a row's mark averages to zero over the phase (no shift common to all watermarks)
    clip: str = "lead"
    # RMS shift of the non-top classes' log-probabilities at `temperature` by the licensee's class pattern
    # (sdb_core.pattern, the second channel; 0 turns it off). 0.2: traced against shadow students of the
    # suspect's family, the `small_cnn:16` students at 10,000 images carry as much evidence as at 0.4
    # without them, where 0.4 cost `mlp:512` students 0.3 of 2.6 points (NOTES.md, fourth round)
    pattern: float = 0.2
    # the pattern goes on a licensee's soft labels from the `pattern_after`-th one it is served: a transfer
    # set of a few hundred images pays for the pattern (about 1 point of student top-1 at 500 images)
    # and is traced without it, on the licensee's own images (research/traceability/NOTES.md, third round)
    pattern_after: int = 1_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 0.5:
            raise ValueError(f"epsilon must be in [0, 0.5), got {self.epsilon}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.directions < 2 or self.dct_size < 1:
            raise ValueError("need at least 2 directions and a DCT block of 1")
        if self.frequency <= 0:
            raise ValueError("frequency must be > 0")
        if self.clip not in CLIPS:
            raise ValueError(f"unknown clip {self.clip!r}; one of {', '.join(CLIPS)}")
        if not 0.0 <= self.pattern <= 2.0:
            raise ValueError(f"pattern must be in [0, 2], got {self.pattern}")
        if self.pattern_after < 0:
            raise ValueError("pattern_after must be >= 0")


# What boxes whose manifest records no watermark configuration were made with (before 2026-12-06): the
# defaults of then, spelled out so that a change of the defaults leaves those boxes' marks as served.
LEGACY_CONFIG = WatermarkConfig(
    epsilon=0.1,
    temperature=4.0,
    dct_size=8,
    directions=20,
    frequency=1.5,
    margin=1e-3,
    clip="lead",
    pattern=0.0,
    pattern_after=0,
)


@dataclass(frozen=True)
class Mode:
    """The secret part of a watermark: a unit direction in the whitened principal coordinates, the cosine's
    frequency over the CDF-mapped projection, its phase, and the class pattern (C x C, flattened)."""

    direction: tuple[float, ...]
    frequency: float
    phase: float
    pattern: tuple[float, ...] = ()


def bank_size(cfg: WatermarkConfig = WatermarkConfig()) -> int:
    """How many slots `derive_watermark` accepts (0 .. bank_size - 1): each direction twice, in quadrature."""
    return 2 * cfg.directions


def capacity(cfg: WatermarkConfig = WatermarkConfig()) -> int:
    """How many watermarks `slot` issues before two share a direction (then in quadrature, up to twice as
    many; beyond that, derive_watermark refuses)."""
    return cfg.directions


def _dct_matrix(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


def dct_features(x: Tensor, size: int) -> Tensor:
    """[N, C, H, W] raw images -> [N, C * b * b]: low-frequency 2-D DCT-II blocks (b = min(size, H, W))."""
    x = x.float()
    h, w = x.shape[-2:]
    bh, bw = min(size, h), min(size, w)
    dh, dw = _dct_matrix(h)[:bh].to(x.device), _dct_matrix(w)[:bw].to(x.device)
    return torch.einsum("ph,nchw,qw->ncpq", dh, x, dw).reshape(len(x), -1)


@dataclass(frozen=True)
class WatermarkBasis:
    """The public map from raw images to uniform coordinates in [0, 1]^directions (one per box)."""

    dct_size: int
    mean: tuple[float, ...]  # of the DCT features
    components: tuple[tuple[float, ...], ...] = field(repr=False)  # [directions, features], whitened
    fitted: bool = True  # False: the data-free fallback

    @property
    def directions(self) -> int:
        return len(self.components)

    def coordinates(self, x_raw: Tensor) -> Tensor:
        """[N, *shape] raw images -> [N, directions] whitened principal coordinates (mean 0, variance 1 and
        uncorrelated over the fitting images)."""
        feats = dct_features(x_raw, self.dct_size)
        comps = torch.tensor(self.components, dtype=torch.float32, device=feats.device)
        if comps.shape[1] != feats.shape[1]:
            raise ValueError(f"basis expects {comps.shape[1]} DCT features, the inputs give {feats.shape[1]}")
        if not self.fitted:  # scale-free: each image's coefficients over its own RMS
            feats = feats / feats.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
        return (feats - torch.tensor(self.mean, device=feats.device)) @ comps.T

    def to_dict(self) -> dict[str, Any]:
        return {
            "dct_size": self.dct_size,
            "mean": list(self.mean),
            "components": [list(r) for r in self.components],
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WatermarkBasis:
        return cls(
            dct_size=int(d["dct_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            components=tuple(tuple(float(v) for v in r) for r in d["components"]),
            fitted=bool(d.get("fitted", True)),
        )


def fit_basis(x_raw: Tensor | np.ndarray, cfg: WatermarkConfig = WatermarkConfig()) -> WatermarkBasis:
    """The principal coordinates of the owner's images' DCT blocks and their empirical CDFs."""
    x = torch.as_tensor(np.asarray(x_raw), dtype=torch.float32)
    feats = dct_features(x, cfg.dct_size).double()
    mean = feats.mean(0)
    centred = feats - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(cfg.directions, vh.shape[0])
    if k < cfg.directions:
        raise ValueError(f"{cfg.directions} directions need as many DCT features, got {vh.shape[0]}")
    comps = vh[:k]
    # A deterministic sign (SVD's is arbitrary): the largest-magnitude entry of each direction positive.
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * signs
    scale = (s[:k] / math.sqrt(max(len(feats) - 1, 1))).clamp_min(1e-12)
    comps = comps / scale[:, None]
    return WatermarkBasis(
        dct_size=cfg.dct_size,
        mean=tuple(mean.tolist()),
        components=tuple(tuple(r) for r in comps.float().tolist()),
    )


def basis_from_manifest(manifest: dict[str, Any]) -> WatermarkBasis | None:
    """The basis a box was made with (`sdb box` fits it on the owner's images), or None for boxes made
    before watermarks (derive_watermark then falls back to `default_basis`)."""
    rec = (manifest.get("extra") or {}).get(BASIS_KEY)
    return WatermarkBasis.from_dict(rec) if rec else None


def config_from_manifest(manifest: dict[str, Any]) -> WatermarkConfig:
    """The watermark configuration a box records (`sdb box` writes it), or `LEGACY_CONFIG` for boxes that
    record none. A recorded field this version does not know is refused rather than dropped: dropping it
    would change every licensee's watermark. A field added after the box was made takes its legacy value
    (the pattern channel is off for boxes that record no `pattern`)."""
    rec = (manifest.get("extra") or {}).get(CONFIG_KEY)
    if not rec:
        return LEGACY_CONFIG
    unknown = sorted(set(rec) - {f.name for f in fields(WatermarkConfig)})
    if unknown:
        raise ValueError(
            f"the box's watermark configuration has fields this version does not know: {unknown}"
        )
    return WatermarkConfig(**{**asdict(LEGACY_CONFIG), **rec})


@lru_cache(maxsize=16)
def default_basis(input_shape: tuple[int, ...], cfg: WatermarkConfig = WatermarkConfig()) -> WatermarkBasis:
    """Data-free fallback: the first AC coefficients of each image's DCT block over its own RMS, mapped
    mapped like fitted ones. Weaker than a fitted basis (coordinates neither whitened nor uncorrelated)."""
    c = input_shape[0]
    b = min(cfg.dct_size, *input_shape[-2:])
    n = c * b * b
    order = sorted((i + j, i, j) for i in range(b) for j in range(b))[1:]  # zig-zag-ish, DC left out
    rows = []
    for _, i, j in order[: cfg.directions]:
        r = [0.0] * n
        r[i * b + j] = 1.0 / 0.3  # a typical AC coefficient over the block RMS
        rows.append(tuple(r))
    if len(rows) < cfg.directions:
        raise ValueError(f"inputs of shape {input_shape} give fewer than {cfg.directions} AC coefficients")
    return WatermarkBasis(cfg.dct_size, (0.0,) * n, tuple(rows), fitted=False)


@dataclass(frozen=True)
class Watermark:
    """One licensee's watermark. `repr()` shows only the public id."""

    wid: str
    mode: Mode = field(repr=False)
    basis: WatermarkBasis = field(repr=False, compare=False)
    epsilon: float = field(repr=False, default=WatermarkConfig.epsilon)
    temperature: float = field(repr=False, default=4.0)
    margin: float = field(repr=False, default=1e-3)
    num_classes: int = field(repr=False, default=10)
    clip: str = field(repr=False, default="lead")
    pattern_epsilon: float = field(repr=False, default=0.0)
    pattern_after: int = field(repr=False, default=0)

    def pattern_tensor(self) -> Tensor | None:
        """The class pattern [C, C], or None where this watermark has none."""
        if self.pattern_epsilon == 0 or not self.mode.pattern:
            return None
        return torch.tensor(self.mode.pattern, dtype=torch.float64).reshape(
            self.num_classes, self.num_classes
        )

    def phase(self, x_raw: Tensor) -> Tensor:
        """theta(x) for every image: [N]."""
        return _phases(self.basis.coordinates(x_raw), [self.mode])[:, 0]


def _phases(g: Tensor, modes: list[Mode]) -> Tensor:
    """theta = 2 pi f Phi(g . w) + phi of each mode at whitened coordinates g [N, K]: [N, M]. Phi, the normal
    CDF, makes the phase near uniform over the images (DRW's mapping)."""
    w = torch.tensor([m.direction for m in modes], dtype=g.dtype, device=g.device)
    if w.shape[1] != g.shape[1]:
        raise ValueError(f"watermark directions have {w.shape[1]} coordinates, the basis {g.shape[1]}")
    f = torch.tensor([m.frequency for m in modes], dtype=g.dtype, device=g.device)
    phi = torch.tensor([m.phase for m in modes], dtype=g.dtype, device=g.device)
    u = torch.special.ndtr(g @ w.T)
    return 2 * math.pi * f * u + phi


def _mac(secret: bytes, label: str) -> bytes:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("the watermark secret must be at least 16 bytes")
    return hmac.new(secret, label.encode(), hashlib.sha256).digest()


def watermark_id(secret: bytes, licensee: str) -> str:
    """The public id of a licensee's watermark: "wm-" + 12 hex, one-way from (secret, licensee)."""
    return "wm-" + _mac(secret, f"sdb-watermark-id:{licensee}").hex()[:12]


def _seed(secret: bytes, label: str) -> int:
    return int.from_bytes(_mac(secret, label), "big")


def _rng(secret: bytes, label: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_seed(secret, label))))


def _unit(v: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in v / np.linalg.norm(v))


def _slot_mode(secret: bytes, slot: int, cfg: WatermarkConfig, k: int, num_classes: int) -> Mode:
    """Slot s: row s mod k of an orthogonal matrix keyed by the secret; the second round of slots reuses
    the rows in quadrature (phase + pi/2) of the first. The class pattern: pattern s of an orthonormal set
    keyed by the secret (a random one where the pattern space has fewer dimensions than slots)."""
    if not 0 <= slot < 2 * k:
        raise ValueError(f"slot {slot} outside the {2 * k} watermarks this configuration can issue apart")
    q, r = np.linalg.qr(_rng(secret, "sdb-watermark-directions").standard_normal((k, k)))
    q = q * np.sign(np.diag(r))  # a unique QR: Haar-distributed rows
    base = float(_rng(secret, f"sdb-watermark-phase:{slot % k}").uniform(0.0, 2 * math.pi))
    patterns = (
        keyed_patterns(_seed(secret, "sdb-watermark-patterns"), num_classes, 2 * k) if cfg.pattern else ()
    )
    if slot < len(patterns):
        pattern = patterns[slot]
    else:
        pattern = _pattern_of(_rng(secret, f"sdb-watermark-pattern:{slot}"), num_classes, cfg)
    return Mode(_unit(q[slot % k]), cfg.frequency, base + (slot // k) * math.pi / 2, pattern)


def _pattern_of(rng: np.random.Generator, num_classes: int, cfg: WatermarkConfig) -> tuple[float, ...]:
    return one_pattern(rng, num_classes) if cfg.pattern else ()


def derive_watermark(
    secret: bytes,
    licensee: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: WatermarkConfig = WatermarkConfig(),
    basis: WatermarkBasis | None = None,
    slot: int | None = None,
) -> Watermark:
    """The licensee's watermark, deterministic from (secret, licensee[, slot]) by HMAC-SHA256.

    `basis`: the box's fitted coordinates (`fit_basis` on the owner's images, stored with the box);
    None uses `default_basis(input_shape)`. `slot`: the index of this licensee among the watermarks issued
    under this secret (0, 1, 2, ...): slots below `capacity(cfg)` get mutually orthogonal directions, which
    is what keeps innocent licensees from being framed (up to twice that, pairs share a direction in
    quadrature); None draws a direction from the licensee id alone (random directions correlate, about
    1/sqrt(directions): the service should pass slots)."""
    if num_classes < 2:
        raise ValueError("a watermark needs at least 2 classes")
    basis = basis or default_basis(tuple(input_shape), cfg)
    k = basis.directions
    if slot is None:
        rng = _rng(secret, f"sdb-watermark-mode:{licensee}")
        mode = Mode(_unit(rng.standard_normal(k)), cfg.frequency, float(rng.uniform(0.0, 2 * math.pi)))
        prng = _rng(secret, f"sdb-watermark-pattern:{licensee}")
        mode = replace(mode, pattern=_pattern_of(prng, num_classes, cfg))
    else:
        mode = _slot_mode(secret, slot, cfg, k, num_classes)
    return Watermark(
        wid=watermark_id(secret, licensee),
        mode=mode,
        basis=basis,
        epsilon=cfg.epsilon,
        temperature=cfg.temperature,
        margin=cfg.margin,
        num_classes=num_classes,
        clip=cfg.clip,
        pattern_epsilon=cfg.pattern if mode.pattern else 0.0,
        pattern_after=cfg.pattern_after,
    )


def decoy_watermarks(
    n: int,
    *,
    basis: WatermarkBasis,
    num_classes: int,
    cfg: WatermarkConfig = WatermarkConfig(),
    seed: bytes | None = None,
) -> list[Watermark]:
    """`n` watermarks never issued: random directions and phases (from `seed`) at the issued frequency. A
    random direction overlaps an issued one by about 1/sqrt(directions), and the cosine at `frequency`
    passes on only a small power of that overlap; their statistics on a suspect show the null."""
    digest = int.from_bytes(hashlib.sha256(seed or b"sdb-decoys").digest(), "big")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(digest)))
    prng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([digest, 1])))  # the patterns' stream
    k = basis.directions
    out = []
    for i in range(n):
        mode = Mode(_unit(rng.standard_normal(k)), cfg.frequency, float(rng.uniform(0.0, 2 * math.pi)))
        mode = replace(mode, pattern=_pattern_of(prng, num_classes, cfg))
        out.append(
            Watermark(
                f"decoy-{i:05d}",
                mode,
                basis,
                cfg.epsilon,
                cfg.temperature,
                cfg.margin,
                num_classes,
                cfg.clip,
                cfg.pattern if mode.pattern else 0.0,
                cfg.pattern_after,
            )
        )
    return out


def retemper(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log(p) / T): probabilities at temperature 1 -> at T (and back with 1/T)."""
    return torch.softmax(torch.log(probs.float().clamp_min(1e-30)) / temperature, dim=1)


def mark_deltas(watermarks: list[Watermark], x_raw: Tensor, probs: Tensor) -> Tensor:
    """The change each watermark makes to the top-1 probability of each row of `probs`: [N, M]. All the
    watermarks must share one basis, amplitude and clip."""
    if not watermarks:
        return torch.zeros(len(probs), 0)
    w0 = watermarks[0]
    if any((w.epsilon, w.margin, w.clip) != (w0.epsilon, w0.margin, w0.clip) for w in watermarks[1:]):
        raise ValueError("the watermarks were derived with different amplitudes or clips")
    theta = _phases(w0.basis.coordinates(x_raw), [w.mode for w in watermarks])
    return _clipped(probs, w0.epsilon * torch.cos(theta), w0.margin, symmetric=w0.clip == "symmetric")


def _clipped(probs: Tensor, delta: Tensor, margin: float, *, symmetric: bool) -> Tensor:
    """delta [N, M] clipped per row so that the top-1 probability stays strictly above the runner-up after
    the other classes are rescaled to the remaining mass, and below 1; `symmetric`: also no further up than
    it may go down."""
    p = probs.double()
    top2 = p.topk(2, dim=1).values
    p1, p2 = top2[:, :1], top2[:, 1:]
    rest = (p.sum(1, keepdim=True) - p1).clamp_min(0.0)  # not 1 - p1: float rounding of p1 near 1
    # After the move the runner-up is p2 (1 - p1') / rest: the top-1 stays on top iff p1' > p2 / (rest + p2).
    bound = p2 / (rest + p2).clamp_min(1e-300)
    lead = (p1 - bound).clamp_min(0.0)
    lo = bound + torch.minimum(torch.full_like(lead, margin), lead / 2)
    hi = torch.full_like(p1, 1.0 - 1e-6)
    movable = (rest > 1e-9) & (lead > 0)
    if symmetric:
        room = torch.minimum(p1 - lo, hi - p1).clamp_min(0.0)
        new = p1 + torch.maximum(torch.minimum(delta.double(), room), -room)
    else:
        new = torch.minimum(torch.maximum(p1 + delta.double(), lo), torch.maximum(hi, p1))
    return torch.where(movable, new - p1, torch.zeros_like(new)).to(probs.dtype)


def apply_watermark(wm: Watermark, x_raw: Tensor, probs: Tensor, served: int = 0) -> Tensor:
    """The licensee's answer: `probs` [N, C] (soft labels at the requested temperature; rows sum to 1) with
    the watermark on each row's top-1 probability and, from the licensee's `pattern_after`-th soft label on
    (`served`: how many it was served before these rows), the class pattern on its other classes. Rows
    still sum to 1 and keep their top-1 (the argmax index of every row is unchanged, ties included)."""
    if probs.dim() != 2 or len(probs) != len(x_raw):
        raise ValueError(f"probs must be [N, C] for N = {len(x_raw)} inputs, got {tuple(probs.shape)}")
    if len(probs) == 0:
        return probs
    p = probs.double()
    top = p.argmax(dim=1, keepdim=True)
    delta = mark_deltas([wm], x_raw, probs).double()  # [N, 1]
    p = p / p.sum(1, keepdim=True)
    p1 = p.gather(1, top)
    rest = (1.0 - p1).clamp_min(1e-300)
    scale = (1.0 - (p1 + delta)) / rest
    out = p * scale
    out = out.scatter(1, top, p1 + delta)
    out = torch.where(delta != 0, out, p)
    pattern = wm.pattern_tensor()
    first = max(0, wm.pattern_after - served)  # rows before this one are served without the pattern
    if pattern is not None and first < len(out):
        out[first:] = apply_pattern(pattern, out[first:], wm.pattern_epsilon)
    out = out.to(probs.dtype)
    # A lead below the output dtype's resolution could round into a tie: such rows go back unmarked.
    kept = out.argmax(dim=1) == probs.argmax(dim=1)
    return torch.where(kept[:, None], out, probs)
