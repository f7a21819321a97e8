"""Per-licensee watermarks: top-1 preserved by construction, deterministic derivation, orthogonal slots."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from sdb_core.data import Dataset
from sdb_core.watermark import (
    BASIS_KEY,
    CLIPS,
    CONFIG_KEY,
    LEGACY_CONFIG,
    WatermarkBasis,
    WatermarkConfig,
    apply_watermark,
    bank_size,
    basis_from_manifest,
    capacity,
    config_from_manifest,
    decoy_watermarks,
    derive_watermark,
    fit_basis,
    mark_deltas,
    retemper,
    watermark_id,
)

SECRET = b"test-watermark-secret-0123456789"


@pytest.fixture(scope="module")
def basis(digits: Dataset) -> WatermarkBasis:
    return fit_basis(digits.x_train)


def _wm(  # type: ignore[no-untyped-def]
    basis: WatermarkBasis,
    licensee: str = "alice",
    slot: int | None = 0,
    eps: float = 0.1,
    clip: str = "lead",
):
    return derive_watermark(
        SECRET,
        licensee,
        input_shape=(1, 8, 8),
        num_classes=10,
        cfg=WatermarkConfig(epsilon=eps, clip=clip),
        basis=basis,
        slot=slot,
    )


def _hard_rows(n: int, c: int, seed: int) -> torch.Tensor:
    """Random soft labels plus the cases that break naive marks: exact ties, near-ties, one-hot rows,
    near-one-hot rows, uniform rows."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1)
    p[0] = torch.full((c,), 1.0 / c)  # all tied
    p[1] = torch.zeros(c)
    p[1, 3] = 1.0  # one-hot
    p[2] = torch.tensor([0.45, 0.45] + [0.1 / (c - 2)] * (c - 2))  # tie on top
    p[3] = torch.tensor([0.4500001, 0.45] + [0.0999999 / (c - 2)] * (c - 2))  # near tie
    p[4] = torch.tensor([1 - 1e-7] + [1e-7 / (c - 1)] * (c - 1))  # near one-hot
    return p / p.sum(1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("clip", CLIPS)
def test_top1_identical_and_rows_sum_to_one(
    digits: Dataset, basis: WatermarkBasis, seed: int, eps: float, clip: str
) -> None:
    x = torch.from_numpy(digits.x_train[:400])
    p = _hard_rows(400, 10, seed)
    for t in (1.0, 4.0, 20.0):  # soft labels at any requested temperature
        pt = retemper(p, t)
        for slot in range(3):
            q = apply_watermark(_wm(basis, f"l{slot}", slot, eps, clip), x, pt)
            assert torch.equal(q.argmax(1), pt.argmax(1))
            assert torch.allclose(q.sum(1), torch.ones(400), atol=1e-5)
            assert (q >= 0).all()
            top = pt.argmax(1, keepdim=True)
            assert (q.gather(1, top) - pt.gather(1, top)).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("clip", CLIPS)
def test_mark_moves_the_top1_probability(digits: Dataset, basis: WatermarkBasis, clip: str) -> None:
    x = torch.from_numpy(digits.x_train[:400])
    p = retemper(_hard_rows(400, 10, 0), 4.0)
    wm = _wm(basis, clip=clip)
    q = apply_watermark(wm, x, p)
    top = p.argmax(1, keepdim=True)
    delta = (q.gather(1, top) - p.gather(1, top))[:, 0]
    expected = 0.1 * torch.cos(wm.phase(x))
    moved = delta != 0
    assert moved.float().mean() > 0.8  # most rows carry the mark; tied / one-hot rows may not
    # rows with room for the whole mark carry it exactly (these random rows at T = 4 have small leads)
    assert ((delta - expected).abs() < 1e-5).float().mean() > 0.3
    assert (delta * expected >= 0).all() and (delta.abs() <= expected.abs() + 1e-6).all()  # clipped: less
    corr = torch.corrcoef(torch.stack([delta[moved], expected[moved]]))[0, 1]
    # rows with a small lead are clipped (the symmetric clip also bounds the move up by the room below)
    assert corr > (0.9 if clip == "lead" else 0.8)


def test_symmetric_clip_averages_to_zero_over_the_phase(digits: Dataset, basis: WatermarkBasis) -> None:
    """With the symmetric clip a row's mark and the mark half a cycle away cancel, so no shift is common to
    all watermarks; the one-sided clip of older boxes does not cancel (rows with a small lead go up further
    than down, rows near 1 down further than up)."""
    x = torch.from_numpy(digits.x_train[:400])
    p = retemper(_hard_rows(400, 10, 1), 4.0)
    for clip in CLIPS:
        wm = _wm(basis, clip=clip, eps=0.3)
        opposite = replace(wm, mode=replace(wm.mode, phase=wm.mode.phase + math.pi))
        both = mark_deltas([wm, opposite], x, p).sum(1)
        if clip == "symmetric":
            assert both.abs().max() < 1e-6
        else:
            assert both.abs().max() > 1e-2


def test_config_is_read_from_the_box_manifest(basis: WatermarkBasis) -> None:
    cfg = WatermarkConfig(epsilon=0.05, frequency=2.0)
    assert config_from_manifest({"extra": {CONFIG_KEY: asdict(cfg)}}) == cfg
    # boxes that record no configuration were made with the legacy one (their licensees' marks stay as served)
    assert config_from_manifest({"extra": {BASIS_KEY: basis.to_dict()}}) == LEGACY_CONFIG
    assert config_from_manifest({}) == LEGACY_CONFIG
    # the defaults then, but the amplitude and the class pattern (added later: off where not recorded)
    assert replace(WatermarkConfig(), epsilon=0.1, pattern=0.0, pattern_after=0) == LEGACY_CONFIG
    before_patterns = {k: v for k, v in asdict(cfg).items() if not k.startswith("pattern")}
    assert config_from_manifest({"extra": {CONFIG_KEY: before_patterns}}) == replace(
        cfg, pattern=0.0, pattern_after=0
    )
    with pytest.raises(ValueError, match="does not know"):  # a newer version's field is not dropped
        config_from_manifest({"extra": {CONFIG_KEY: {**asdict(cfg), "harmonics": 3}}})
    with pytest.raises(ValueError, match="clip"):
        WatermarkConfig(clip="wide")


def test_derivation_is_deterministic_and_keyed(basis: WatermarkBasis) -> None:
    a1, a2 = _wm(basis, "alice", 0), _wm(basis, "alice", 0)
    assert a1 == a2 and a1.wid == watermark_id(SECRET, "alice")
    assert a1.wid.startswith("wm-") and len(a1.wid) == 15
    assert _wm(basis, "bob", 1).wid != a1.wid
    other = derive_watermark(
        b"another-secret-0123456789", "alice", input_shape=(1, 8, 8), num_classes=10, basis=basis, slot=0
    )
    assert other.wid != a1.wid and other.mode != a1.mode
    # without a slot the mode comes from the licensee id alone
    assert _wm(basis, "carol", None).mode == _wm(basis, "carol", None).mode


def test_repr_hides_the_secret_parameters(basis: WatermarkBasis) -> None:
    wm = _wm(basis)
    text = repr(wm) + str(wm)
    assert wm.wid in text
    assert "direction" not in text and "phase" not in text and str(wm.mode.phase) not in text


def test_slots_get_orthogonal_directions(basis: WatermarkBasis) -> None:
    k = capacity(WatermarkConfig())
    assert bank_size(WatermarkConfig()) == 2 * k
    w = np.array([_wm(basis, f"l{i}", i).mode.direction for i in range(k)])
    assert np.abs(w @ w.T - np.eye(k)).max() < 1e-9
    second = _wm(basis, "late", k).mode  # the second round shares a direction, in quadrature
    first = _wm(basis, "l0", 0).mode
    assert np.allclose(second.direction, first.direction)
    assert abs((second.phase - first.phase) - np.pi / 2) < 1e-9
    with pytest.raises(ValueError, match="slot"):
        _wm(basis, "too-many", 2 * k)


def test_basis_whitens_the_fitting_images_and_round_trips(digits: Dataset, basis: WatermarkBasis) -> None:
    g = basis.coordinates(torch.from_numpy(digits.x_train)).double()
    assert torch.allclose(g.mean(0), torch.zeros(g.shape[1], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(torch.cov(g.T), torch.eye(g.shape[1], dtype=torch.float64), atol=1e-3)
    again = WatermarkBasis.from_dict(basis.to_dict())
    assert again == basis


def test_decoys_are_never_issued(basis: WatermarkBasis) -> None:
    issued = {_wm(basis, f"l{i}", i).mode for i in range(5)}
    decoys = decoy_watermarks(50, basis=basis, num_classes=10, seed=b"s")
    assert not issued & {d.mode for d in decoys}
    assert [d.mode for d in decoys] == [
        d.mode for d in decoy_watermarks(50, basis=basis, num_classes=10, seed=b"s")
    ]


def test_bad_inputs_are_refused(digits: Dataset, basis: WatermarkBasis) -> None:
    with pytest.raises(ValueError, match="secret"):
        derive_watermark(b"short", "a", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="probs"):
        apply_watermark(_wm(basis), torch.from_numpy(digits.x_train[:3]), torch.full((2, 10), 0.1))
    with pytest.raises(ValueError, match="epsilon"):
        WatermarkConfig(epsilon=0.7)


def test_default_basis_works_without_data(digits: Dataset) -> None:
    wm = derive_watermark(SECRET, "a", input_shape=(1, 8, 8), num_classes=10, slot=0)
    x = torch.from_numpy(digits.x_train[:100])
    p = retemper(_hard_rows(100, 10, 5), 4.0)
    q = apply_watermark(wm, x, p)
    assert torch.equal(q.argmax(1), p.argmax(1)) and not torch.equal(q, p)


def test_basis_from_manifest(basis: WatermarkBasis) -> None:
    assert basis_from_manifest({"extra": {BASIS_KEY: basis.to_dict()}}) == basis
    assert basis_from_manifest({"extra": {"dataset": "digits"}}) is None  # a box from before watermarks
    assert basis_from_manifest({}) is None
