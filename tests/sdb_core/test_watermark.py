"""Per-licensee watermarks: top-1 preserved by construction, deterministic derivation, orthogonal slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdb_core.data import Dataset
from sdb_core.watermark import (
    BASIS_KEY,
    WatermarkBasis,
    WatermarkConfig,
    apply_watermark,
    bank_size,
    basis_from_manifest,
    capacity,
    decoy_watermarks,
    derive_watermark,
    fit_basis,
    retemper,
    watermark_id,
)

SECRET = b"test-watermark-secret-0123456789"


@pytest.fixture(scope="module")
def basis(digits: Dataset) -> WatermarkBasis:
    return fit_basis(digits.x_train)


def _wm(basis: WatermarkBasis, licensee: str = "alice", slot: int | None = 0, eps: float = 0.1):  # type: ignore[no-untyped-def]
    return derive_watermark(
        SECRET,
        licensee,
        input_shape=(1, 8, 8),
        num_classes=10,
        cfg=WatermarkConfig(epsilon=eps),
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
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_top1_identical_and_rows_sum_to_one(
    digits: Dataset, basis: WatermarkBasis, seed: int, eps: float
) -> None:
    x = torch.from_numpy(digits.x_train[:400])
    p = _hard_rows(400, 10, seed)
    for t in (1.0, 4.0, 20.0):  # soft labels at any requested temperature
        pt = retemper(p, t)
        for slot in range(3):
            q = apply_watermark(_wm(basis, f"l{slot}", slot, eps), x, pt)
            assert torch.equal(q.argmax(1), pt.argmax(1))
            assert torch.allclose(q.sum(1), torch.ones(400), atol=1e-5)
            assert (q >= 0).all()
            assert (q - pt).abs().max() <= eps + 1e-6


def test_mark_moves_the_top1_probability(digits: Dataset, basis: WatermarkBasis) -> None:
    x = torch.from_numpy(digits.x_train[:400])
    p = retemper(_hard_rows(400, 10, 0), 4.0)
    wm = _wm(basis)
    q = apply_watermark(wm, x, p)
    top = p.argmax(1, keepdim=True)
    delta = (q.gather(1, top) - p.gather(1, top))[:, 0]
    expected = 0.1 * torch.cos(wm.phase(x))
    moved = delta != 0
    assert moved.float().mean() > 0.8  # most rows carry the mark; tied / one-hot rows may not
    corr = torch.corrcoef(torch.stack([delta[moved], expected[moved]]))[0, 1]
    assert corr > 0.9  # rows with a small lead are clipped


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
