"""Per-licensee watermarks on the box's soft labels: each licensee's answers carry a signal of their own
that a student distilled from them learns, and that `sdb_core.trace` finds again in the student's outputs.

The design (research/traceability/NOTES.md has the trials behind it):

- **Coordinates.** Each image is reduced to its low-frequency 2-D DCT block (the top-left `dct_size` x
  `dct_size` coefficients of every channel: coarse, so a student learns functions of it from few images), then
  to its `directions` top principal coordinates over the owner's images (uncorrelated over the data by
  construction, unlike random pixel projections of low-rank images), each mapped through its empirical CDF so
  it is uniform on [0, 1] (DRW's CDF mapping). `WatermarkBasis` holds this map; it is public (not secret) and
  fitted once per box on the owner's images (`fit_basis`); without one a data-free fallback is used.
- **Codes.** A watermark is one Fourier mode of that torus: theta(x) = 2 pi (f1 u_a(x) + f2 u_b(x)) + phi
  over a pair of coordinates (a, b), integer frequencies (f1, f2) of norm in [`min_norm`, `max_norm`] (low:
  only low frequencies carry over to fresh probes, the issue's trial) and phi in {0, pi/2}. Distinct modes are
  orthogonal over independent uniform coordinates, so one licensee's signal is not another's: the no-framing
  property rests on issued watermarks never sharing a mode. The bank holds C(directions, 2) x |frequencies| x
  2 modes (1,440 by default); `slot` (the service's issue counter) picks modes without repeats through a
  permutation keyed by the secret, while a plain HMAC of the licensee picks one at random (collisions
  possible: the service should pass slots).
- **Signal.** At the box's soft-label temperature, the top-1 class's probability moves by eps * cos(theta(x))
  and the other classes are rescaled to keep the sum at 1, clipped so that the top-1 stays strictly on top:
  every returned row has the top-1 of its input row (CosWM/DRW put a cosine on one class the same way).

Everything secret (the mode) is derived by HMAC-SHA256 from the owner's secret and the licensee id; the public
watermark id is a one-way function of both. `repr()` of a `Watermark` shows only its id.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class WatermarkConfig:
    epsilon: float = 0.1  # amplitude on the top-1 probability at `temperature`
    temperature: float = 4.0  # the soft-label temperature the mark is designed for (and traced at)
    dct_size: int = 8  # low-frequency DCT block kept per channel
    directions: int = 16  # principal coordinates of the DCT block
    frequencies: tuple[int, ...] = (1, 2, 3)  # |f1|, |f2| per mode
    # sqrt(f1^2 + f2^2) bounds: lower modes ride on class structure, higher ones do not transfer
    min_norm: float = 2.2
    max_norm: float = 3.0
    quantiles: int = 257  # points of each coordinate's stored empirical CDF
    margin: float = 1e-3  # the top-1 stays at least min(margin, half its lead) above the runner-up

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 0.5:
            raise ValueError(f"epsilon must be in [0, 0.5), got {self.epsilon}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.directions < 2 or self.dct_size < 1:
            raise ValueError("need at least 2 directions and a DCT block of 1")


@dataclass(frozen=True)
class Mode:
    """One Fourier mode of the coordinate torus (secret when it belongs to a licensee)."""

    a: int
    b: int
    f1: int
    f2: int
    phase: float


@lru_cache(maxsize=16)
def _bank(cfg: WatermarkConfig) -> tuple[Mode, ...]:
    pairs = list(itertools.combinations(range(cfg.directions), 2))
    freqs = [
        (f1, s * f2)
        for f1 in cfg.frequencies
        for f2 in cfg.frequencies
        for s in (1, -1)
        if cfg.min_norm <= math.hypot(f1, f2) <= cfg.max_norm
    ]
    return tuple(
        Mode(a, b, f1, f2, phase) for (a, b) in pairs for (f1, f2) in freqs for phase in (0.0, math.pi / 2)
    )


def bank_size(cfg: WatermarkConfig = WatermarkConfig()) -> int:
    """How many mutually orthogonal watermarks the configuration holds."""
    return len(_bank(cfg))


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
    quantiles: tuple[tuple[float, ...], ...] = field(repr=False)  # [directions, q], ascending
    fitted: bool = True  # False: the data-free fallback

    def coordinates(self, x_raw: Tensor) -> Tensor:
        """[N, *shape] raw images -> [N, directions] coordinates, each uniform on the fitting images."""
        feats = dct_features(x_raw, self.dct_size)
        comps = torch.tensor(self.components, dtype=torch.float32, device=feats.device)
        if comps.shape[1] != feats.shape[1]:
            raise ValueError(f"basis expects {comps.shape[1]} DCT features, the inputs give {feats.shape[1]}")
        if not self.fitted:  # scale-free: each image's coefficients over its own RMS
            feats = feats / feats.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
        g = (feats - torch.tensor(self.mean, device=feats.device)) @ comps.T
        q = torch.tensor(self.quantiles, dtype=torch.float32, device=feats.device)
        return torch.stack([_interp(g[:, k], q[k]) for k in range(len(q))], dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dct_size": self.dct_size,
            "mean": list(self.mean),
            "components": [list(r) for r in self.components],
            "quantiles": [list(r) for r in self.quantiles],
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WatermarkBasis:
        return cls(
            dct_size=int(d["dct_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            components=tuple(tuple(float(v) for v in r) for r in d["components"]),
            quantiles=tuple(tuple(float(v) for v in r) for r in d["quantiles"]),
            fitted=bool(d.get("fitted", True)),
        )


def _interp(g: Tensor, q: Tensor) -> Tensor:
    """Piecewise-linear empirical CDF: g's position among the quantiles q, in [0, 1]."""
    n = len(q)
    idx = torch.searchsorted(q.contiguous(), g.contiguous()).clamp(1, n - 1)
    lo, hi = q[idx - 1], q[idx]
    frac = ((g - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    return ((idx - 1).float() + frac) / (n - 1)


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
    g = centred @ comps.T
    qs = torch.quantile(g, torch.linspace(0, 1, cfg.quantiles, dtype=torch.float64), dim=0).T
    qs = torch.cummax(qs, dim=1).values  # ascending even where quantiles tie
    return WatermarkBasis(
        dct_size=cfg.dct_size,
        mean=tuple(mean.tolist()),
        components=tuple(tuple(r) for r in comps.float().tolist()),
        quantiles=tuple(tuple(r) for r in qs.float().tolist()),
    )


@lru_cache(maxsize=16)
def default_basis(input_shape: tuple[int, ...], cfg: WatermarkConfig = WatermarkConfig()) -> WatermarkBasis:
    """Data-free fallback: the first AC coefficients of each image's DCT block over its own RMS, mapped
    through a normal CDF. Weaker than a fitted basis (coordinates neither uniform nor uncorrelated)."""
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
    normal = torch.distributions.Normal(0.0, 1.0)
    p = torch.linspace(1e-4, 1 - 1e-4, cfg.quantiles)
    q = tuple(normal.icdf(p).tolist())
    return WatermarkBasis(cfg.dct_size, (0.0,) * n, tuple(rows), (q,) * cfg.directions, fitted=False)


@dataclass(frozen=True)
class Watermark:
    """One licensee's watermark. `repr()` shows only the public id."""

    wid: str
    mode: Mode = field(repr=False)
    basis: WatermarkBasis = field(repr=False, compare=False)
    epsilon: float = field(repr=False, default=0.1)
    temperature: float = field(repr=False, default=4.0)
    margin: float = field(repr=False, default=1e-3)
    num_classes: int = field(repr=False, default=10)

    def phase(self, x_raw: Tensor) -> Tensor:
        """theta(x) for every image: [N]."""
        return _phases(self.basis.coordinates(x_raw), [self.mode])[:, 0]


def _phases(u: Tensor, modes: list[Mode]) -> Tensor:
    """theta of each mode at coordinates u [N, K]: [N, M]."""
    a = torch.tensor([m.a for m in modes], device=u.device)
    b = torch.tensor([m.b for m in modes], device=u.device)
    f1 = torch.tensor([float(m.f1) for m in modes], device=u.device)
    f2 = torch.tensor([float(m.f2) for m in modes], device=u.device)
    phi = torch.tensor([m.phase for m in modes], device=u.device)
    return 2 * math.pi * (f1 * u[:, a] + f2 * u[:, b]) + phi


def _mac(secret: bytes, label: str) -> bytes:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("the watermark secret must be at least 16 bytes")
    return hmac.new(secret, label.encode(), hashlib.sha256).digest()


def watermark_id(secret: bytes, licensee: str) -> str:
    """The public id of a licensee's watermark: "wm-" + 12 hex, one-way from (secret, licensee)."""
    return "wm-" + _mac(secret, f"sdb-watermark-id:{licensee}").hex()[:12]


def _slot_permutation(secret: bytes, n: int) -> np.ndarray:
    seed = int.from_bytes(_mac(secret, "sdb-watermark-bank"), "big")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).permutation(n)


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
    under this secret (0, 1, 2, ...): distinct slots below `bank_size(cfg)` get distinct, orthogonal modes,
    which is what keeps innocent licensees from being framed; None picks a mode from the licensee id alone
    (two licensees may then share one)."""
    if num_classes < 2:
        raise ValueError("a watermark needs at least 2 classes")
    modes = _bank(cfg)
    if slot is None:
        index = int.from_bytes(_mac(secret, f"sdb-watermark-mode:{licensee}"), "big") % len(modes)
    else:
        if slot < 0:
            raise ValueError("slot must be >= 0")
        index = int(_slot_permutation(secret, len(modes))[slot % len(modes)])
    return Watermark(
        wid=watermark_id(secret, licensee),
        mode=modes[index],
        basis=basis or default_basis(tuple(input_shape), cfg),
        epsilon=cfg.epsilon,
        temperature=cfg.temperature,
        margin=cfg.margin,
        num_classes=num_classes,
    )


def decoy_watermarks(
    n: int,
    *,
    basis: WatermarkBasis,
    num_classes: int,
    cfg: WatermarkConfig = WatermarkConfig(),
    exclude: list[Watermark] | tuple[Watermark, ...] = (),
    seed: bytes | None = None,
) -> list[Watermark]:
    """`n` watermarks never issued: modes of the bank outside `exclude`, drawn with the `seed` (wrapping
    around the unused modes when n exceeds them). Their statistics on a suspect show the null distribution."""
    taken = {w.mode for w in exclude}
    modes = [m for m in _bank(cfg) if m not in taken]
    if not modes:
        raise ValueError("every mode of the bank is issued: no decoys left")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed or b"sdb-decoys").digest(), "big"))
    order = rng.permutation(len(modes))
    out = []
    for i in range(n):
        m = modes[int(order[i % len(modes)])]
        wid = f"decoy-{i:05d}"
        out.append(Watermark(wid, m, basis, cfg.epsilon, cfg.temperature, cfg.margin, num_classes))
    return out


def retemper(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log(p) / T): probabilities at temperature 1 -> at T (and back with 1/T)."""
    return torch.softmax(torch.log(probs.float().clamp_min(1e-30)) / temperature, dim=1)


def mark_deltas(watermarks: list[Watermark], x_raw: Tensor, probs: Tensor) -> Tensor:
    """The change each watermark makes to the top-1 probability of each row of `probs`: [N, M]. All the
    watermarks must share one basis."""
    if not watermarks:
        return torch.zeros(len(probs), 0)
    basis, eps, margin = watermarks[0].basis, watermarks[0].epsilon, watermarks[0].margin
    u = basis.coordinates(x_raw)
    theta = _phases(u, [w.mode for w in watermarks])
    return _clipped(probs, eps * torch.cos(theta), margin)


def _clipped(probs: Tensor, delta: Tensor, margin: float) -> Tensor:
    """delta [N, M] clipped per row so that the top-1 probability stays strictly above the runner-up after
    the other classes are rescaled to the remaining mass, and below 1."""
    p = probs.double()
    top2 = p.topk(2, dim=1).values
    p1, p2 = top2[:, :1], top2[:, 1:]
    rest = (1.0 - p1).clamp_min(0.0)
    # After the move the runner-up is p2 (1 - p1') / rest: the top-1 stays on top iff p1' > p2 / (rest + p2).
    bound = p2 / (rest + p2).clamp_min(1e-300)
    lead = (p1 - bound).clamp_min(0.0)
    lo = bound + torch.minimum(torch.full_like(lead, margin), lead / 2)
    hi = torch.full_like(p1, 1.0 - 1e-6)
    movable = (rest > 1e-9) & (lead > 0)
    new = torch.minimum(torch.maximum(p1 + delta.double(), lo), torch.maximum(hi, p1))
    return torch.where(movable, new - p1, torch.zeros_like(new)).to(probs.dtype)


def apply_watermark(wm: Watermark, x_raw: Tensor, probs: Tensor) -> Tensor:
    """The licensee's answer: `probs` [N, C] (soft labels at the requested temperature; rows sum to 1) with
    the watermark on each row's top-1 probability. Rows still sum to 1 and keep their top-1 (the argmax
    index of every row is unchanged, ties included)."""
    if probs.dim() != 2 or len(probs) != len(x_raw):
        raise ValueError(f"probs must be [N, C] for N = {len(x_raw)} inputs, got {tuple(probs.shape)}")
    if len(probs) == 0:
        return probs
    p = probs.double()
    top = p.argmax(dim=1, keepdim=True)
    delta = mark_deltas([wm], x_raw, probs).double()  # [N, 1]
    p1 = p.gather(1, top)
    rest = (1.0 - p1).clamp_min(1e-300)
    scale = (1.0 - (p1 + delta)) / rest
    out = p * scale
    out = out.scatter(1, top, p1 + delta)
    out = torch.where(delta != 0, out, p).to(probs.dtype)
    # A lead below the output dtype's resolution could round into a tie: such rows go back unmarked.
    kept = out.argmax(dim=1) == probs.argmax(dim=1)
    return torch.where(kept[:, None], out, probs)
