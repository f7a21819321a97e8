"""Box keys: reproducible patterns from the seed, application with lambda, secrecy, invalid keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sdb_core.keys import BoxKey, BoxKeyError, load_key, save_key


def test_pattern_has_the_key_shape() -> None:
    key = BoxKey.generate((3, 5, 7))
    assert key.pattern().shape == (3, 5, 7)
    assert key.pattern().dtype == torch.float32


def test_pattern_is_reproducible_from_the_seed() -> None:
    key = BoxKey.generate((1, 8, 8))
    again = BoxKey(seed=key.seed, shape=(1, 8, 8), lam=key.lam)
    assert torch.equal(key.pattern(), again.pattern())


def test_different_seeds_give_different_patterns() -> None:
    a, b = BoxKey.generate((1, 8, 8)), BoxKey.generate((1, 8, 8))
    assert a.seed != b.seed
    assert not torch.allclose(a.pattern(), b.pattern())
    assert not torch.allclose(
        BoxKey.from_int_seed(1, (1, 8, 8)).pattern(), BoxKey.from_int_seed(2, (1, 8, 8)).pattern()
    )


def test_pattern_looks_like_a_normalized_input() -> None:
    p = BoxKey.generate((3, 32, 32)).pattern()
    assert abs(float(p.mean())) < 0.1 and 0.9 < float(p.std()) < 1.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_apply_mixes_with_lambda_on_any_dtype(dtype: torch.dtype) -> None:
    key = BoxKey.generate((1, 8, 8), lam=0.5)
    x = torch.randn(4, 1, 8, 8).to(dtype)
    out = key.apply(x)
    assert out.dtype == dtype and out.shape == x.shape
    expected = 0.5 * x.double() + 0.5 * key.pattern(dtype=torch.float64)
    tol = 1e-2 if dtype == torch.float16 else 1e-6
    assert torch.allclose(out.double(), expected, atol=tol)


def test_apply_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="key shape"):
        BoxKey.generate((1, 8, 8)).apply(torch.zeros(2, 1, 9, 9))


def test_repr_never_shows_the_seed() -> None:
    key = BoxKey.generate((1, 8, 8))
    for text in (repr(key), str(key), f"{key}"):
        assert key.seed.hex() not in text and "seed" not in text


def test_invalid_keys_are_refused() -> None:
    with pytest.raises(BoxKeyError):
        BoxKey(seed=b"short", shape=(1, 8, 8))
    with pytest.raises(BoxKeyError):
        BoxKey(seed=bytes(32), shape=(1, 8, 8), lam=1.5)


def test_save_and_load_round_trip_with_private_permissions(tmp_path: Path) -> None:
    key = BoxKey.generate((1, 8, 8), lam=0.7)
    save_key(key, tmp_path / "k.json")
    assert load_key(tmp_path / "k.json") == key
    assert os.stat(tmp_path / "k.json").st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "content", ["not json", '{"format": "other"}', '{"format": "sdb-box-key", "version": 1, "seed": "zz"}']
)
def test_malformed_key_files_fail_clearly(tmp_path: Path, content: str) -> None:
    (tmp_path / "k.json").write_text(content)
    with pytest.raises(BoxKeyError):
        load_key(tmp_path / "k.json")
