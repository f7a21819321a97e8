"""Artifacts: round trips, manifests without key material, separate key files, tamper checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sdb_core.artifact import ArtifactError, load_box, make_test_box, read_manifest
from sdb_core.keys import BoxKey, load_key, save_key
from sdb_core.zoo import TOP1_MARGIN


def _raw(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 16


def test_round_trip_reproduces_both_paths(test_box: Path) -> None:
    boxed = load_box(test_box)
    assert boxed.name == "tbox" and boxed.input_shape == (1, 8, 8) and boxed.num_classes == 10
    x = _raw()
    key = load_key(test_box / "box_key.json")
    norm = boxed.manifest["normalization"]
    xn = (x - norm["mean"][0]) / norm["std"][0]
    with torch.no_grad():
        raw = boxed.model(xn)
        assert torch.allclose(boxed.raw_plain_logits(x), raw, atol=1e-5)
        assert torch.allclose(boxed.keyed_logits(x), boxed.model(key.apply(xn)), atol=1e-5)
    # A "top1" box (the default) serves a fixed distribution around the network's top-1 on the plain path.
    assert boxed.plain_output == "top1"
    served = boxed.plain_logits(x)
    assert torch.equal(served.argmax(1), raw.argmax(1))
    assert torch.equal(served, TOP1_MARGIN * torch.nn.functional.one_hot(raw.argmax(1), 10).float())
    assert not torch.allclose(boxed.raw_plain_logits(x), boxed.keyed_logits(x))


def test_a_soft_box_serves_its_own_logits(tmp_path: Path) -> None:
    path = make_test_box(tmp_path, seed=2)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["plain_output"] == "top1"
    old = load_box(path)
    old.plain_output = "soft"  # what artifacts written before plain_output existed are read as
    assert torch.equal(old.plain_logits(_raw()), old.raw_plain_logits(_raw()))


def test_same_seed_same_box(tmp_path: Path) -> None:
    a = load_box(make_test_box(tmp_path / "a", seed=1))
    b = load_box(make_test_box(tmp_path / "b", seed=1))
    assert torch.equal(a.keyed_logits(_raw()), b.keyed_logits(_raw()))


def test_manifest_holds_no_key_material(test_box: Path) -> None:
    seed_hex = load_key(test_box / "box_key.json").seed.hex()
    assert seed_hex not in (test_box / "manifest.json").read_text()
    assert "seed" not in json.dumps(read_manifest(test_box)).lower().replace("test_box", "")


def test_key_may_live_elsewhere(test_box: Path, tmp_path: Path) -> None:
    moved = tmp_path / "secrets" / "key.json"
    moved.parent.mkdir()
    (test_box / "box_key.json").rename(moved)
    with pytest.raises(ArtifactError, match=r"box_key\.json"):
        load_box(test_box)
    assert load_box(test_box, key_path=moved).keyed_logits(_raw()).shape == (5, 10)


def test_shape_errors_are_value_errors(test_box: Path) -> None:
    with pytest.raises(ValueError, match="expected inputs"):
        load_box(test_box).plain_logits(torch.zeros(2, 1, 7, 7))


def _assert_refused(path: Path, match: str, seed_hex: str, **kw: object) -> None:
    with pytest.raises(ArtifactError, match=match) as err:
        load_box(path, **kw)  # type: ignore[arg-type]
    assert seed_hex not in str(err.value)


def test_tampered_weights_are_refused(test_box: Path) -> None:
    seed_hex = load_key(test_box / "box_key.json").seed.hex()
    w = test_box / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    _assert_refused(test_box, "weights checksum mismatch", seed_hex)


def test_tampered_manifest_is_refused(test_box: Path) -> None:
    seed_hex = load_key(test_box / "box_key.json").seed.hex()
    m = json.loads((test_box / "manifest.json").read_text())
    m["class_names"][0] = "cat"
    (test_box / "manifest.json").write_text(json.dumps(m))
    _assert_refused(test_box, "manifest checksum mismatch", seed_hex)


def test_manifest_naming_unknown_arch_is_refused_even_with_a_fixed_checksum(test_box: Path) -> None:
    from sdb_core.artifact import _manifest_digest

    m = json.loads((test_box / "manifest.json").read_text())
    m["arch"] = "os.system"
    m["manifest_sha256"] = _manifest_digest(m)
    (test_box / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unknown architecture"):
        load_box(test_box)


def test_tampered_key_is_refused(test_box: Path) -> None:
    kpath = test_box / "box_key.json"
    original = load_key(kpath)
    other = BoxKey.generate(original.shape, original.lam)
    save_key(other, kpath)
    _assert_refused(test_box, "does not match this box", original.seed.hex())
    _assert_refused(test_box, "does not match this box", other.seed.hex())


def test_garbled_key_file_is_refused(test_box: Path) -> None:
    seed_hex = load_key(test_box / "box_key.json").seed.hex()
    (test_box / "box_key.json").write_text("{ not json")
    _assert_refused(test_box, "not valid JSON", seed_hex)


@pytest.mark.parametrize("missing", ["manifest.json", "weights.safetensors"])
def test_missing_files_are_refused(test_box: Path, missing: str) -> None:
    (test_box / missing).unlink()
    with pytest.raises(ArtifactError, match="not found"):
        load_box(test_box)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_box(tmp_path / "nope")


def test_file_permissions_keep_the_key_private(test_box: Path) -> None:
    import stat

    assert stat.S_IMODE((test_box / "box_key.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((test_box / "weights.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(test_box.stat().st_mode) == 0o755


def test_saving_again_replaces_the_artifact(tmp_path: Path) -> None:
    first = make_test_box(tmp_path, name="m", seed=1)
    again = make_test_box(tmp_path, name="m", seed=2)
    assert first == again
    assert load_box(again).keyed_logits(_raw()).shape == (5, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directories left behind


@pytest.mark.parametrize(
    ("arch", "shape", "extra"),
    [
        ("small_cnn", (1, 8, 8), None),
        ("resnet20", (3, 32, 32), {}),
        ("guarded", (1, 8, 8), {"base": "small_cnn", "width": 8}),  # data-dependent gather/scatter
    ],
)
def test_scripted_box_gives_the_eager_outputs_on_both_paths(
    tmp_path: Path, arch: str, shape: tuple[int, ...], extra: dict[str, Any] | None
) -> None:
    d = make_test_box(tmp_path, name="s", arch=arch, input_shape=shape, seed=7, arch_extra=extra)
    eager, scripted = load_box(d), load_box(d).script()
    assert isinstance(scripted.model, torch.jit.ScriptModule)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0)) * 3 + 1  # another batch size
    torch.testing.assert_close(scripted.plain_logits(x), eager.plain_logits(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scripted.keyed_logits(x), eager.keyed_logits(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scripted.plain_logits(x), scripted.keyed_logits(x))


def test_top1_logits_keep_non_finite_rows_visible() -> None:
    from sdb_core.zoo import top1_logits

    z = torch.tensor([[0.1, 2.0, -1.0], [float("inf"), 0.0, 0.0], [float("nan"), 1.0, 0.0]])
    out = top1_logits(z, margin=5.0)
    assert torch.equal(out[0], torch.tensor([0.0, 5.0, 0.0]))
    assert torch.isnan(out[1:]).all()
