"""Sealed artifacts in the service: decrypted in memory at load; every failure refuses the start in one line
that names the artifact and the setting (the loader, `sdb serve`, the app's lifespan); SDB_REQUIRE_SEALED."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdb.cli import app as cli
from sdb_core.artifact import load_box, make_test_box, seal_artifact
from sdb_core.seal import new_master_key, read_master_key
from service.core.config import Settings
from service.inference.loading import ModelLoadError, load_registry, preflight
from tests._support.api import TEST_JWT_SECRET

runner = CliRunner()


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, Path]:
    """models/ with two sealed test boxes, and the master key file that opens them."""
    models = tmp_path / "models"
    key = new_master_key(tmp_path / "secrets" / "sdb_seal_key")
    for i, name in enumerate(("alpha", "beta")):
        seal_artifact(make_test_box(models, name=name, seed=10 + i), key)
    return models, Path(key.source)


def _settings(models: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {"demo": True, "model_dir": models, "device": "cpu", "torch_threads": 1}
    return Settings(**{**values, **kw})


def _refusal(models: Path, **kw: Any) -> str:
    """The one line both the loader and the pre-flight check refuse with."""
    with pytest.raises(ModelLoadError) as loaded:
        load_registry(_settings(models, **kw), warm_up=False)
    with pytest.raises(ModelLoadError) as checked:
        preflight(_settings(models, **kw))
    line = str(loaded.value)
    assert "\n" not in line and line == str(checked.value)
    return line


def test_a_sealed_model_serves_what_the_plaintext_box_serves(sealed: tuple[Path, Path]) -> None:
    models, key = sealed
    registry = load_registry(_settings(models, seal_key_file=key), warm_up=False)
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    try:
        got = asyncio.run(registry.get("alpha").infer("keyed", x))
    finally:
        asyncio.run(registry.aclose())
    reference = make_test_box(models.parent / "plain", name="alpha", seed=10)
    want = load_box(reference).keyed_logits(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_each_failure_refuses_in_one_line_naming_artifact_and_setting(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    models, key = sealed
    secret = read_master_key(key).key.hex()
    lines = {}
    lines["missing"] = _refusal(models)
    lines["wrong"] = _refusal(models, seal_key_file=new_master_key(tmp_path / "other.key").source)
    lines["unreadable"] = _refusal(models, seal_key_file=tmp_path / "no-such.key")
    alpha = models / "alpha"
    blob = bytearray((alpha / "weights.safetensors.sealed").read_bytes())
    blob[100] ^= 0xFF
    (alpha / "weights.safetensors.sealed").write_bytes(bytes(blob))
    lines["flipped"] = _refusal(models, seal_key_file=key)
    shutil.copy(models / "beta" / "weights.safetensors.sealed", alpha / "weights.safetensors.sealed")
    lines["swapped"] = _refusal(models, seal_key_file=key)
    assert "no master key is configured" in lines["missing"] and "SDB_SEAL_KEY_FILE" in lines["missing"]
    assert "not among the configured master keys" in lines["wrong"] and "SDB_SEAL_KEY_FILE" in lines["wrong"]
    assert "SDB_SEAL_KEY_FILE=" in lines["unreadable"] and "cannot read" in lines["unreadable"]
    assert "modified or belongs to another artifact" in lines["flipped"]
    assert "modified or belongs to another artifact" in lines["swapped"]
    for what, line in lines.items():
        assert secret not in line, what
        assert "alpha" in line or "SDB_SEAL_KEY_FILE=" in line, (what, line)


def _serve(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    import os
    import signal

    import uvicorn

    for k in [k for k in os.environ if k.startswith("SDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(signal, "signal", lambda *a, **k: None)
    started: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(k))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runner.invoke(cli, ["serve", "--port", "8199"]), started


def test_sdb_serve_refuses_to_start_in_one_line(
    sealed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    models, key = sealed
    base = {"SDB_JWT_SECRET": TEST_JWT_SECRET, "SDB_MODEL_DIR": str(models)}
    r, started = _serve(monkeypatch, base)
    assert r.exit_code == 1 and not started
    out = r.output.strip()
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert out.startswith("error: refusing to start: ") and "alpha" in out and "SDB_SEAL_KEY_FILE" in out
    r, started = _serve(monkeypatch, {**base, "SDB_SEAL_KEY_FILE": str(key)})
    assert r.exit_code == 0 and len(started) == 1, r.output
    # SDB_REQUIRE_SEALED: a plaintext artifact next to the sealed ones stops the start.
    make_test_box(models, name="gamma", seed=3)
    r, started = _serve(monkeypatch, {**base, "SDB_SEAL_KEY_FILE": str(key), "SDB_REQUIRE_SEALED": "true"})
    out = r.output.strip()
    assert r.exit_code == 1 and not started and len(out.splitlines()) == 1, out
    assert "gamma" in out and "SDB_REQUIRE_SEALED=true" in out and "sdb seal" in out


def test_the_app_lifespan_refuses_a_sealed_model_without_its_key(
    make_settings: Callable[..., Settings], sealed: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from service.main import create_app

    models, key = sealed
    app = create_app(make_settings(model_dir=models, default_model=None))
    with caplog.at_level(logging.ERROR), pytest.raises(ModelLoadError), TestClient(app):
        pass
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing to start")]
    assert len(refusals) == 1 and "alpha" in refusals[0] and "SDB_SEAL_KEY_FILE" in refusals[0]
    app = create_app(make_settings(model_dir=models, default_model=None, seal_key_file=key))
    with TestClient(app) as client:
        r = client.post("/predict", json={"model": "alpha", "inputs": np.zeros((1, 1, 8, 8)).tolist()})
        assert r.status_code == 200, r.text


def test_require_sealed_refuses_plaintext_and_warnings_outside_demo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    box = make_test_box(models, name="plain", seed=4)
    line = _refusal(models, require_sealed=True)
    assert "plain" in line and "SDB_REQUIRE_SEALED=true" in line
    (box / "box_key.json").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="service.inference.loading"):
        load_registry(_settings(models, demo=False, jwt_secret=TEST_JWT_SECRET), warm_up=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("is not sealed" in w and "plain" in w for w in warnings), warnings
    assert any("readable by group or others" in w and "644" in w for w in warnings), warnings
    caplog.clear()
    (box / "box_key.json").chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="service.inference.loading"):
        load_registry(_settings(models), warm_up=False)  # demo mode, owner-only key: nothing to say
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
