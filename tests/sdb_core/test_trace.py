"""`trace`: a suspect that learned a licensee's mark names that licensee and nobody else; on suspects that
carry no mark the p-values are calibrated (checked on decoys and on the issued watermarks)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from sdb_core.data import Dataset
from sdb_core.pattern import apply_pattern, random_patterns
from sdb_core.trace import TraceConfig, corrected_log10, log10_p_upper, trace, trace_licensees
from sdb_core.watermark import (
    Watermark,
    WatermarkBasis,
    apply_watermark,
    derive_watermark,
    fit_basis,
    retemper,
)

SECRET = b"test-trace-secret-0123456789abcd"
T = 4.0


@pytest.fixture(scope="module")
def setup(digits: Dataset) -> tuple[WatermarkBasis, list[Watermark], Tensor, Callable[[Tensor], Tensor]]:
    basis = fit_basis(digits.x_train)
    wms = [
        derive_watermark(SECRET, f"lic{i}", input_shape=(1, 8, 8), num_classes=10, basis=basis, slot=i)
        for i in range(10)
    ]
    # A fixed "teacher": a random linear map of the image to logits (any function of x will do).
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 0.05

    def reference(x: Tensor) -> Tensor:
        return torch.softmax(x.reshape(len(x), -1) @ w, dim=1)

    probes = torch.from_numpy(np.concatenate([digits.x_test, digits.x_train]))
    return basis, wms, probes, reference


def _marked(
    wm: Watermark, reference: Callable[[Tensor], Tensor], scale: float = 1.0
) -> Callable[[Tensor], Tensor]:
    """A suspect whose soft labels at T carry `scale` of the watermark, back at temperature 1."""

    def fn(x: Tensor) -> Tensor:
        pt = retemper(reference(x), T)
        q = apply_watermark(wm, x, pt)
        return retemper(pt + scale * (q - pt), 1.0 / T)

    return fn


def _noisy(reference: Callable[[Tensor], Tensor], seed: int, sd: float = 0.3) -> Callable[[Tensor], Tensor]:
    """An unmarked suspect: the reference's logits plus noise drawn per probe, independent of every mark."""
    g = torch.Generator().manual_seed(seed)

    def fn(x: Tensor) -> Tensor:
        return torch.softmax(torch.log(reference(x)) + sd * torch.randn(len(x), 10, generator=g), dim=1)

    return fn


def test_a_marked_suspect_names_its_licensee_only(setup) -> None:  # type: ignore[no-untyped-def]
    _, wms, probes, reference = setup
    rep = trace(
        _marked(wms[3], reference, 0.5), reference, probes, wms, TraceConfig(decoys=200), decoy_secret=b"d"
    )
    assert [r.wid for r in rep.matches] == [wms[3].wid]
    best = rep.result(wms[3].wid)
    assert best.rank == 1 and best.log10_corrected_p < -6 and best.decoys_above == 0
    assert json_safe(rep.to_dict())


def test_a_suspect_that_learned_only_the_class_pattern_is_named_by_it(setup) -> None:  # type: ignore[no-untyped-def]
    """The second channel on its own: a suspect whose non-top classes carry half of licensee 6's pattern
    (and nothing of its top-1 cosine) is named through the pattern's z, and nobody else is."""
    _, wms, probes, reference = setup
    wm = wms[6]
    pattern = wm.pattern_tensor()
    assert pattern is not None

    def suspect(x: Tensor) -> Tensor:
        pt = retemper(reference(x), T)
        return retemper(apply_pattern(pattern, pt, 0.5 * wm.pattern_epsilon), 1.0 / T)

    rep = trace(suspect, reference, probes, wms, TraceConfig(decoys=300), decoy_secret=b"p")
    assert rep.channels == 2 and [r.wid for r in rep.matches] == [wm.wid]
    hit = rep.result(wm.wid)
    assert hit.pattern_statistic is not None and hit.pattern_statistic > 6 and hit.top1_statistic < 3
    assert hit.statistic == max(hit.top1_statistic, hit.pattern_statistic)


def test_shadow_students_take_the_family_error_out_of_the_pattern_channel(setup) -> None:  # type: ignore[no-untyped-def]
    """Students of one family share a strong class-conditional error (a random pattern at amplitude 1.0, no
    licensee's). A leaker of that family carrying a quarter of licensee 3's pattern is not named against
    the reference (the decoys spread with the family error); against a shadow student of the family (its
    error without any mark) it is named, and nobody else is; an innocent of the family is not named
    against the shadow either."""
    _, wms, probes, reference = setup
    wm = wms[3]
    pattern = wm.pattern_tensor()
    assert pattern is not None
    family_error = random_patterns(1, 10, np.random.default_rng(7))[0]

    def family(x: Tensor) -> Tensor:
        return retemper(apply_pattern(family_error, retemper(reference(x), T), 1.0), 1.0 / T)

    def leaker(x: Tensor) -> Tensor:
        return retemper(apply_pattern(pattern, retemper(family(x), T), 0.25 * wm.pattern_epsilon), 1.0 / T)

    cfg = TraceConfig(decoys=300)
    plain = trace(_noisy(leaker, 0, 0.1), reference, probes, wms, cfg, decoy_secret=b"s")
    assert not plain.matches
    shadowed = trace(_noisy(leaker, 0, 0.1), reference, probes, wms, cfg, decoy_secret=b"s", shadows=[family])
    assert [r.wid for r in shadowed.matches] == [wm.wid]
    hit = shadowed.result(wm.wid)
    assert hit.pattern_statistic is not None and hit.pattern_statistic > plain.result(wm.wid).statistic + 3
    innocent = trace(_noisy(family, 1, 0.1), reference, probes, wms, cfg, decoy_secret=b"s", shadows=[family])
    assert not innocent.matches


def json_safe(d: dict) -> bool:
    import json

    json.dumps(d, allow_nan=False)
    return True


@pytest.mark.parametrize("null", ["analytic", "decoys"])
def test_p_values_are_calibrated_on_unmarked_suspects(setup, null: str) -> None:  # type: ignore[no-untyped-def]
    """Over 1,000 decoys on each of 3 unmarked suspects (seeds 0-2): the fraction with p < 0.05 is within
    0.05 +- 0.03 and the p-values' Kolmogorov-Smirnov distance from uniform is below 0.08 (the 1 % critical
    value for n = 1,000 is 0.052; the decoys share the probes, so the bound is looser)."""
    _, wms, probes, reference = setup
    for seed in range(3):
        rep = trace(
            _noisy(reference, seed),
            reference,
            probes,
            wms,
            TraceConfig(alpha=0.05, null=null),
            decoy_secret=bytes([seed]),
        )
        assert rep.decoys == 1000
        assert abs(rep.decoy_false_positive_rate - 0.05) < 0.03, rep.decoy_false_positive_rate
        assert rep.decoy_ks < 0.08, rep.decoy_ks
        assert not rep.matches


def test_holm_and_bonferroni() -> None:
    p = torch.tensor([0.01, 0.04, 0.03, 0.005], dtype=torch.float64)
    holm = 10 ** corrected_log10(torch.log10(p), "holm")
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 with the running max
    assert torch.allclose(holm, torch.tensor([0.03, 0.06, 0.06, 0.02], dtype=torch.float64))
    bonf = 10 ** corrected_log10(torch.log10(p), "bonferroni")
    assert torch.allclose(bonf, torch.tensor([0.04, 0.16, 0.12, 0.02], dtype=torch.float64))
    assert math.isclose(float(10 ** log10_p_upper(torch.tensor([1.6448536]))), 0.05, rel_tol=1e-5)
    assert float(log10_p_upper(torch.tensor([40.0]))) < -340  # far below float range, still exact


def test_bad_suspects_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    _, wms, probes, reference = setup
    with pytest.raises(ValueError, match="suspect"):
        trace(lambda x: torch.ones(len(x), 3), reference, probes, wms, TraceConfig(decoys=100))
    with pytest.raises(ValueError, match="probabilities"):
        trace(lambda x: -torch.ones(len(x), 10), reference, probes, wms, TraceConfig(decoys=100))
    with pytest.raises(ValueError, match="decoys"):
        TraceConfig(decoys=10)


def _memorised(
    wm: Watermark, taught: Tensor, reference: Callable[[Tensor], Tensor], scale: float
) -> Callable[[Tensor], Tensor]:
    """A suspect that carries the mark only on the images it was taught on (`taught`), like a student that
    memorised its transfer set; elsewhere it answers as the reference, plus noise."""
    keys = {row.numpy().tobytes() for row in taught}
    noisy = _noisy(reference, 9, sd=0.1)
    marked = _marked(wm, reference, scale)

    def fn(x: Tensor) -> Tensor:
        out = noisy(x)
        seen = torch.tensor([row.numpy().tobytes() in keys for row in x])
        if seen.any():
            out[seen] = marked(x[seen])
        return out

    return fn


def test_tracing_each_licensee_on_its_own_images_finds_a_mark_fresh_probes_miss(setup) -> None:  # type: ignore[no-untyped-def]
    _, wms, probes, reference = setup
    own = [probes[150 * i : 150 * (i + 1)] for i in range(len(wms))]  # each licensee's own images
    suspect = _memorised(wms[2], own[2], reference, 1.0)
    cfg = TraceConfig(decoys=200, probes=10 * 150)
    fresh = trace(suspect, reference, probes[1500:], wms, cfg, decoy_secret=b"d")
    assert fresh.matches == []
    rep = trace_licensees(suspect, reference, own, wms, cfg, decoy_secret=b"d")
    assert [r.wid for r in rep.matches] == [wms[2].wid]
    best = rep.result(wms[2].wid)
    assert best.rank == 1 and best.log10_corrected_p < -6 and best.decoys_above == 0
    assert rep.probes == 1500 and rep.decoys == 200 and len(rep.decoy_statistics) == 10 * 200
    # The same licensee's images under every watermark (licensees who labelled the same public images):
    # the other marks tested on images the suspect memorised with licensee 2's mark frame nobody.
    shared = trace_licensees(suspect, reference, [own[2]] * len(wms), wms, cfg, decoy_secret=b"d")
    assert [r.wid for r in shared.matches] == [wms[2].wid] and shared.probes == 150


def test_tracing_on_own_images_is_calibrated_on_unmarked_suspects(setup) -> None:  # type: ignore[no-untyped-def]
    _, wms, probes, reference = setup
    own = [probes[150 * i : 150 * (i + 1)] for i in range(len(wms))]
    cfg = TraceConfig(decoys=200, probes=1000)  # a budget below 10 x 150: 100 probes each
    for seed in range(3):
        rep = trace_licensees(_noisy(reference, seed), reference, own, wms, cfg, decoy_secret=b"d%d" % seed)
        assert rep.matches == [] and rep.probes == 1000
        assert rep.decoy_false_positive_rate <= 0.01
    with pytest.raises(ValueError, match="probe sets"):
        trace_licensees(_noisy(reference, 0), reference, own[:3], wms, cfg)
