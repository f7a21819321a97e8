"""Fixtures for sdb_core tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdb_core.artifact import make_test_box
from sdb_core.data import Dataset, load_digits


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_digits()


@pytest.fixture
def test_box(tmp_path: Path) -> Path:
    return make_test_box(tmp_path, name="tbox", seed=3)
