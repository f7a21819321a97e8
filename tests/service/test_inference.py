"""Model registry and served models: loading from SDB_MODEL_DIR, paths, separation, deadlines."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdb_core.artifact import load_box, make_test_box
from sdb_core.keys import load_key
from service.core.config import Settings
from service.inference.batcher import BatcherConfig
from service.inference.loading import load_registry
from service.inference.registry import (
    InferenceTimeout,
    ModelRegistry,
    UnknownModelError,
)
from service.inference.runtime import resolve_device


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    make_test_box(d, name="alpha", seed=1)
    make_test_box(d, name="beta", seed=2, input_shape=(3, 8, 8), num_classes=4)
    (d / "not-a-model").mkdir()
    return d


def settings(model_dir: Path, **kw: object) -> Settings:
    return Settings(demo=True, model_dir=model_dir, device="auto", torch_threads=1, **kw)  # type: ignore[arg-type]


def test_registry_loads_every_artifact_with_a_default(model_dir: Path) -> None:
    reg = load_registry(settings(model_dir))
    try:
        assert reg.names() == ["alpha", "beta"]
        assert reg.get().name == "alpha"  # the first by name when SDB_DEFAULT_MODEL is unset
        assert reg.get("beta").input_shape == (3, 8, 8)
        assert reg.ready and len(reg) == 2
        with pytest.raises(UnknownModelError):
            reg.get("gamma")
        assert str(reg.get().device) == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        reg.close()


@pytest.mark.parametrize("calibrate", [True, False])
def test_forward_batch_calibration_caps_both_paths(model_dir: Path, calibrate: bool) -> None:
    reg = load_registry(settings(model_dir, calibrate_forward_batch=calibrate, max_batch_size=64))
    try:
        for model in reg:
            caps = {b.forward_cap for b in model._batchers.values()}
            if calibrate:
                (cap,) = caps  # one cap for both paths (the same network)
                assert cap in (8, 16, 32, 64)
            else:
                assert caps == {None}
    finally:
        reg.close()


def test_default_model_setting_is_honoured_and_checked(model_dir: Path) -> None:
    reg = load_registry(settings(model_dir, default_model="beta"))
    assert reg.get().name == "beta"
    reg.close()
    with pytest.raises(RuntimeError, match="SDB_DEFAULT_MODEL"):
        load_registry(settings(model_dir, default_model="gamma"))


def test_empty_model_dir_gives_a_registry_that_is_not_ready(tmp_path: Path) -> None:
    reg = load_registry(settings(tmp_path / "missing"))
    assert not reg.ready
    with pytest.raises(UnknownModelError):
        reg.get()


def test_a_broken_artifact_refuses_start_with_its_path(tmp_path: Path) -> None:
    box = make_test_box(tmp_path, name="broken")
    (box / "weights.safetensors").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="broken"):
        load_registry(settings(tmp_path))


def test_box_keys_can_live_in_their_own_directory(tmp_path: Path) -> None:
    """SDB_BOX_KEY_DIR: the box key comes from a secret-store mount, not from the artifact directory."""
    models, keys = tmp_path / "models", tmp_path / "keys"
    keys.mkdir()
    box = make_test_box(models, name="alpha", seed=3)
    reference = load_box(box)
    (box / "box_key.json").rename(keys / "alpha.json")
    with pytest.raises(RuntimeError, match="alpha"):
        load_registry(settings(models), warm_up=False)  # no key beside the weights
    registry = load_registry(settings(models, box_key_dir=keys), warm_up=False)
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    try:
        got = asyncio.run(registry.get("alpha").infer("keyed", x))
    finally:
        asyncio.run(registry.aclose())
    want = reference.keyed_logits(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_info_holds_no_key_material(model_dir: Path) -> None:
    reg = load_registry(settings(model_dir), warm_up=False)
    key = load_key(model_dir / "alpha" / "box_key.json")
    text = json.dumps(reg.get("alpha").info())
    assert key.seed.hex() not in text and "seed" not in text
    reg.close()


def test_infer_matches_the_box_on_both_paths(model_dir: Path) -> None:
    reg = load_registry(settings(model_dir))
    box = load_box(model_dir / "alpha")
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        m = reg.get("alpha")
        return await m.infer("plain", x), await m.infer("keyed", torch.from_numpy(x))

    plain, keyed = asyncio.run(main())
    np.testing.assert_allclose(plain, box.plain_logits(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keyed, box.keyed_logits(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain, keyed)  # the key changes what the network sees
    reg.close()


class MarkerBox:
    """A fake box whose plain path returns 0 and keyed path 1 per row, recording every batch it sees."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.name, self.version, self.input_shape = "marker", "1", (2,)
        self.num_classes, self.class_names, self.temperature = 2, ["a", "b"], 4.0
        self.device = torch.device("cpu")
        self.delay_s = delay_s
        self.batches: list[tuple[str, list[float]]] = []
        self.lock = threading.Lock()

    def _run(self, path: str, x: torch.Tensor, value: float) -> torch.Tensor:
        time.sleep(self.delay_s)
        with self.lock:
            self.batches.append((path, x[:, 0].tolist()))
        return torch.full((len(x), 2), value)

    def plain_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("plain", x, 0.0)

    def keyed_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("keyed", x, 1.0)


def test_plain_and_keyed_requests_are_never_mixed_in_a_batch() -> None:
    box = MarkerBox(delay_s=0.01)
    reg = ModelRegistry.from_boxes([box], batching=BatcherConfig(max_batch_size=64, max_delay_s=0.02))
    m = reg.get()

    async def main() -> list[np.ndarray]:
        calls = []
        for i in range(40):
            path = "plain" if i % 2 == 0 else "keyed"
            x = np.full((1, 2), 0.0 if path == "plain" else 1.0, dtype=np.float32)
            calls.append(m.infer(path, x))  # type: ignore[arg-type]
        return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    for i, out in enumerate(outs):
        assert float(out[0, 0]) == (0.0 if i % 2 == 0 else 1.0)
    assert all(set(mk) == {0.0 if p == "plain" else 1.0} for p, mk in box.batches)
    assert max(len(mk) for _, mk in box.batches) > 1  # and batching did merge requests
    reg.close()


def test_deadline_gives_inference_timeout_and_the_model_keeps_serving() -> None:
    box = MarkerBox(delay_s=0.3)
    reg = ModelRegistry.from_boxes([box], batching=BatcherConfig(max_delay_s=0.0), timeout_s=0.1)
    m = reg.get()
    x = np.zeros((1, 2), np.float32)

    async def main() -> np.ndarray:
        with pytest.raises(InferenceTimeout):
            await m.infer("plain", x)
        m.timeout_s = 5.0
        return await m.infer("plain", x)

    assert asyncio.run(main()).shape == (1, 2)
    reg.close()


def test_infer_rejects_wrong_shapes_and_paths() -> None:
    reg = ModelRegistry.from_boxes([MarkerBox()])
    m = reg.get()
    with pytest.raises(ValueError, match="shape"):
        asyncio.run(m.infer("plain", np.zeros((1, 3), np.float32)))
    with pytest.raises(ValueError, match="path"):
        asyncio.run(m.infer("other", np.zeros((1, 2), np.float32)))  # type: ignore[arg-type]
    reg.close()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")
