"""The class pattern channel: keeps every row's top-1 probability, moves the non-top log-probabilities by
exactly the pattern, issued patterns are orthonormal, and its projections are calibrated on suspects that
carry no pattern."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdb_core.pattern import (
    analytic_z,
    apply_pattern,
    centred_log_residual,
    orthonormal_patterns,
    pattern_dims,
    pattern_statistics,
    random_patterns,
)

C = 10


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, C, generator=g) * 2, dim=1)
    p[0] = torch.full((C,), 1.0 / C)  # all tied: no pattern can keep the top-1 apart
    p[1] = torch.tensor([0.3, 0.29] + [0.41 / (C - 2)] * (C - 2))  # a narrow lead
    return p


def test_patterns_live_in_their_space_and_issued_ones_are_orthonormal() -> None:
    assert pattern_dims(C) == 80 and pattern_dims(2) == 0
    u = orthonormal_patterns(40, C, np.random.default_rng(0))
    flat = u.flatten(1)
    assert torch.allclose(flat @ flat.T, torch.eye(40, dtype=torch.float64), atol=1e-12)
    for pats in (u, random_patterns(50, C, np.random.default_rng(1))):
        assert torch.diagonal(pats, dim1=1, dim2=2).abs().max() == 0
        assert pats.sum(2).abs().max() < 1e-12  # zero mean over each row's non-top classes
        assert torch.allclose(pats.flatten(1).norm(dim=1), torch.ones(len(pats), dtype=torch.float64))
    assert len(orthonormal_patterns(200, 3, np.random.default_rng(0))) == pattern_dims(3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top1_probability_kept_and_non_top_moved_by_the_pattern(seed: int) -> None:
    p = _rows(500, seed)
    u = orthonormal_patterns(1, C, np.random.default_rng(seed))[0]
    q = apply_pattern(u, p, 0.4)
    top = p.argmax(1, keepdim=True)
    assert torch.equal(q.argmax(1), p.argmax(1))
    assert torch.equal(q.gather(1, top), p.gather(1, top))
    assert torch.allclose(q.sum(1), torch.ones(500), atol=1e-6)
    assert torch.equal(q[0], p[0])  # a tie stays as it was
    moved = (q != p).any(1)
    assert moved.float().mean() > 0.9
    # On a moved row every non-top log-probability moves by a sqrt(D) U[c, k] up to one common constant.
    lq, lp = q.double().log(), p.double().log()
    for i in torch.nonzero(moved)[:50, 0]:
        c = int(top[i])
        k = [j for j in range(C) if j != c]
        shift = (lq[i, k] - lp[i, k]) - 0.4 * math.sqrt(80) * u[c, k]
        assert float(shift.max() - shift.min()) < 1e-4


def test_projections_find_the_pattern_and_are_calibrated_without_it() -> None:
    """A suspect that learned half of pattern 3 (plus noise) projects far above the rest; 2,000 random
    patterns on a suspect that learned none give z with mean 0 +- 0.1 and sd 1 +- 0.1 (seed 0)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.softmax(torch.randn(5000, C, generator=g) * 2, dim=1)
    noisy = torch.softmax(ref.log() + 0.3 * torch.randn(5000, C, generator=g), dim=1)
    issued = orthonormal_patterns(20, C, np.random.default_rng(5))
    leaked = apply_pattern(issued[3], noisy, 0.2)
    leaked_residual = centred_log_residual(leaked, ref)
    z_issued = analytic_z(pattern_statistics(leaked_residual, issued), leaked_residual)
    assert int(z_issued.argmax()) == 3 and z_issued[3] > 5
    assert torch.cat([z_issued[:3], z_issued[4:]]).abs().max() < 3.5
    residual = centred_log_residual(noisy, ref)
    z = analytic_z(pattern_statistics(residual, random_patterns(2000, C, np.random.default_rng(6))), residual)
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


def test_the_pattern_starts_after_the_licensees_first_soft_labels(digits) -> None:  # type: ignore[no-untyped-def]
    """`served`: rows before the licensee's `pattern_after`-th soft label carry only the top-1 mark."""
    from sdb_core.watermark import WatermarkConfig, apply_watermark, derive_watermark, fit_basis

    cfg = WatermarkConfig(pattern_after=100)
    wm = derive_watermark(
        b"test-pattern-secret-0123456789",
        "l",
        input_shape=(1, 8, 8),
        num_classes=C,
        cfg=cfg,
        basis=fit_basis(digits.x_train, cfg),
        slot=0,
    )
    no_pattern = derive_watermark(
        b"test-pattern-secret-0123456789",
        "l",
        input_shape=(1, 8, 8),
        num_classes=C,
        cfg=WatermarkConfig(pattern=0.0),
        basis=fit_basis(digits.x_train, cfg),
        slot=0,
    )
    x = torch.from_numpy(digits.x_train[:300])
    p = _rows(300, 0)
    top1_only = apply_watermark(no_pattern, x, p)
    for served, first in ((0, 100), (60, 40), (100, 0), (5_000, 0)):
        q = apply_watermark(wm, x, p, served=served)
        assert torch.equal(q[:first], top1_only[:first])
        assert (q[first:] != top1_only[first:]).any(1).float().mean() > 0.9
        assert torch.equal(q.argmax(1), p.argmax(1))


def test_shadows_replace_the_reference_in_the_residual() -> None:
    """Against shadow students the residual is the suspect's against the reference minus the shadows' mean
    against it (rows grouped by the reference's top-1 either way)."""
    g = torch.Generator().manual_seed(3)
    ref, sus, s1, s2 = (torch.softmax(torch.randn(400, 10, generator=g), dim=1) for _ in range(4))
    expected = (
        centred_log_residual(sus, ref) - (centred_log_residual(s1, ref) + centred_log_residual(s2, ref)) / 2
    )
    assert torch.allclose(centred_log_residual(sus, ref, [s1, s2]), expected, atol=1e-12)
    assert torch.allclose(centred_log_residual(sus, ref, [ref]), centred_log_residual(sus, ref), atol=1e-12)
