"""Sealed artifacts: no plaintext at rest, identical tensors after every conversion, one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from sdb_core.artifact import (
    ArtifactError,
    SealedArtifactError,
    load_box,
    make_test_box,
    read_artifact,
    read_manifest,
    reseal_artifact,
    seal_artifact,
    unseal_artifact,
)
from sdb_core.seal import CONFIG, Keyring, SealError, new_master_key, read_master_key

RUN = 64  # no run of this many plaintext bytes may appear in a sealed file


@pytest.fixture
def master(tmp_path: Path) -> Keyring:
    return Keyring.from_paths(new_master_key(tmp_path / "keys" / "master.key").source)


def _state(path: Path, keyring: Keyring | None = None) -> dict[str, torch.Tensor]:
    return load_safetensors(read_artifact(path, keyring).weights)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


def test_sealed_files_hold_no_run_of_the_plaintext(tmp_path: Path, master: Keyring) -> None:
    box = make_test_box(tmp_path, name="tbox", seed=3)
    plain_weights = (box / "weights.safetensors").read_bytes()
    plain_key = (box / "box_key.json").read_bytes()
    seal_artifact(box, master.sealing_key("tbox"))
    assert not (box / "weights.safetensors").exists() and not (box / "box_key.json").exists()
    sealed = b"".join(p.read_bytes() for p in box.iterdir() if p.name != "manifest.json")
    manifest_text = (box / "manifest.json").read_text()
    assert len(plain_weights) > 10 * RUN
    for plain in (plain_weights, plain_key):
        for i in range(len(plain) - RUN + 1):
            assert plain[i : i + RUN] not in sealed, f"plaintext bytes {i}..{i + RUN} found in a sealed file"
    # The manifest stays readable: algorithm and key id, never key material.
    manifest = json.loads(manifest_text)
    assert manifest["seal"]["algorithm"] == "AES-256-GCM"
    assert manifest["seal"]["key_id"] == master.sealing_key("tbox").key_id
    key_hex = read_master_key(master.sealing_key("tbox").source).key.hex()
    seal_record = json.loads((box / CONFIG.seal_file).read_text())
    for text in (manifest_text, json.dumps(seal_record)):
        assert key_hex not in text and json.loads(plain_key)["seed"] not in text


def test_load_seal_unseal_rotate_round_trip_to_identical_tensors(tmp_path: Path, master: Keyring) -> None:
    box = make_test_box(tmp_path, name="tbox", seed=3)
    original = load_file(str(box / "weights.safetensors"))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 16
    ref = load_box(box)
    seal_artifact(box, master.sealing_key("tbox"))
    sealed = load_box(box, keyring=master)
    assert _same(_state(box, master), original)
    assert torch.equal(sealed.keyed_logits(x), ref.keyed_logits(x))
    assert torch.equal(sealed.plain_logits(x), ref.plain_logits(x))
    # Rotation: a new master key, the old one kept only to open; no retraining, same tensors.
    new = new_master_key(tmp_path / "keys2" / "new.key")
    old_id = read_manifest(box)["seal"]["key_id"]
    weights_blob = (box / "weights.safetensors.sealed").read_bytes()
    reseal_artifact(box, master, new)
    assert read_manifest(box)["seal"]["key_id"] == new.key_id != old_id
    assert (box / "weights.safetensors.sealed").read_bytes() == weights_blob  # re-wrapped, not re-encrypted
    with pytest.raises(SealedArtifactError, match="not among the configured master keys"):
        load_box(box, keyring=master)  # the old key alone no longer opens it
    only_new = Keyring.from_paths(new.source)
    assert _same(_state(box, only_new), original)
    # Rekey: a fresh data key, every file re-encrypted.
    reseal_artifact(box, only_new, new, rekey=True)
    assert (box / "weights.safetensors.sealed").read_bytes() != weights_blob
    assert _same(_state(box, only_new), original)
    assert not [p for p in box.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    # Unseal (migration back): plaintext files, identical tensors, the box key 0600 again.
    unseal_artifact(box, only_new)
    assert "seal" not in read_manifest(box) and not (box / CONFIG.seal_file).exists()
    assert _same(load_file(str(box / "weights.safetensors")), original)
    assert (box / "box_key.json").stat().st_mode & 0o077 == 0
    assert torch.equal(load_box(box).keyed_logits(x), ref.keyed_logits(x))


def test_a_box_sealed_as_it_is_written_never_has_plaintext_files(tmp_path: Path, master: Keyring) -> None:
    from sdb_core.artifact import save_box
    from sdb_core.keys import BoxKey
    from sdb_core.zoo import arch_kwargs_for, build_model

    kwargs = arch_kwargs_for((1, 8, 8), 10, width=8)
    model = build_model("small_cnn", **kwargs)
    out = save_box(
        tmp_path / "sealed-box",
        model=model,
        arch="small_cnn",
        arch_kwargs=kwargs,
        key=BoxKey.from_int_seed(5, (1, 8, 8)),
        name="sealed-box",
        version="2",
        input_shape=(1, 8, 8),
        class_names=[str(i) for i in range(10)],
        normalization={"mean": [0.0], "std": [1.0]},
        temperature=4.0,
        temperature_dis=4.0,
        data_digest="x",
        metrics={},
        master=master.sealing_key("sealed-box"),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "box_key.json.sealed",
        "manifest.json",
        "seal.json",
        "weights.safetensors.sealed",
    ]
    boxed = load_box(out, keyring=master)
    assert _same(dict(boxed.model.state_dict()), dict(model.state_dict()))


def _sealed_pair(tmp_path: Path, master: Keyring) -> tuple[Path, Path]:
    a = make_test_box(tmp_path, name="a", seed=1)
    b = make_test_box(tmp_path, name="b", seed=2)
    seal_artifact(a, master.sealing_key("a"))
    seal_artifact(b, master.sealing_key("b"))
    return a, b


def test_a_flipped_byte_is_refused_in_one_line(tmp_path: Path, master: Keyring) -> None:
    a, _ = _sealed_pair(tmp_path, master)
    for name in ("weights.safetensors.sealed", "box_key.json.sealed", CONFIG.seal_file):
        path = a / name
        original = path.read_bytes()
        blob = bytearray(original)
        i = len(blob) // 2 if name != CONFIG.seal_file else original.index(b'"wrapped_data_key": "') + 30
        blob[i] ^= 0x01 if name != CONFIG.seal_file else 0x03  # hex stays hex: '0'<->'3', 'a'<->'b' ...
        path.write_bytes(bytes(blob))
        with pytest.raises(SealedArtifactError) as info:
            load_box(a, keyring=master)
        line = _one_line(info.value)
        assert str(a) in line and ("modified" in line or "does not open" in line), line
        path.write_bytes(original)
    load_box(a, keyring=master)


def test_a_swapped_file_is_refused(tmp_path: Path, master: Keyring) -> None:
    a, b = _sealed_pair(tmp_path, master)
    for name in ("weights.safetensors.sealed", CONFIG.seal_file):
        backup = (a / name).read_bytes()
        shutil.copy(b / name, a / name)
        with pytest.raises(SealedArtifactError) as info:
            load_box(a, keyring=master)
        line = _one_line(info.value)
        assert "another artifact" in line and str(a) in line, line
        (a / name).write_bytes(backup)
    # The manifest's weights digest is bound too: pointing it at b's weights changes the AAD.
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["checksums"]["weights.safetensors"] = read_manifest(b)["checksums"]["weights.safetensors"]
    from sdb_core.artifact import _manifest_bytes

    (a / "manifest.json").write_bytes(_manifest_bytes(manifest))
    with pytest.raises(SealedArtifactError, match="another artifact"):
        load_box(a, keyring=master)


def test_a_wrong_or_missing_master_key_is_refused_in_one_line(tmp_path: Path, master: Keyring) -> None:
    a, _ = _sealed_pair(tmp_path, master)
    wrong = Keyring.from_paths(new_master_key(tmp_path / "other.key").source)
    with pytest.raises(SealedArtifactError) as info:
        load_box(a, keyring=wrong)
    line = _one_line(info.value)
    assert "not among the configured master keys" in line and "SDB_SEAL_KEY_FILE" in line and str(a) in line
    with pytest.raises(SealedArtifactError) as info:
        load_box(a, keyring=Keyring())
    line = _one_line(info.value)
    assert "no master key is configured" in line and "SDB_SEAL_KEY_FILE" in line
    secret = read_master_key(master.sealing_key("a").source).key.hex()
    assert secret not in line
    # A key file that is not a key, or not there: the setting and the file are named.
    (tmp_path / "bad.key").write_text("not hex\n")
    with pytest.raises(SealError, match=r"SDB_SEAL_KEY_FILE=.*bad\.key: not a master key"):
        Keyring.from_paths(tmp_path / "bad.key")
    with pytest.raises(SealError, match=r"SDB_SEAL_KEY_FILE=.*nope\.key: cannot read"):
        Keyring.from_paths(tmp_path / "nope.key")


def test_a_key_directory_opens_boxes_sealed_under_older_keys(tmp_path: Path, master: Keyring) -> None:
    a, _ = _sealed_pair(tmp_path, master)
    current = new_master_key(tmp_path / "current.key")
    ring = Keyring.from_paths(current.source, tmp_path / "keys")  # the older key sits in the directory
    assert set(ring.keys) == {current.key_id, master.sealing_key("a").key_id}
    assert ring.sealing_key("a").key_id == current.key_id
    load_box(a, keyring=ring)


def test_sealing_twice_or_unsealing_plaintext_is_refused(tmp_path: Path, master: Keyring) -> None:
    box = make_test_box(tmp_path, name="tbox", seed=3)
    with pytest.raises(ArtifactError, match="not sealed"):
        unseal_artifact(box, master)
    seal_artifact(box, master.sealing_key("tbox"))
    with pytest.raises(ArtifactError, match="already sealed"):
        seal_artifact(box, master.sealing_key("tbox"))


def test_a_reseal_interrupted_between_its_two_renames_is_refused_then_finished(
    tmp_path: Path, master: Keyring
) -> None:
    box = make_test_box(tmp_path, name="tbox", seed=3)
    original = load_file(str(box / "weights.safetensors"))
    seal_artifact(box, master.sealing_key("tbox"))
    manifest_before = (box / "manifest.json").read_bytes()
    new = new_master_key(tmp_path / "new.key")
    reseal_artifact(box, master, new)
    (box / "manifest.json").write_bytes(manifest_before)  # as if it stopped before the manifest's rename
    both = Keyring.from_paths(new.source, tmp_path / "keys")
    with pytest.raises(SealedArtifactError, match="interrupted `sdb reseal`"):
        load_box(box, keyring=both)
    reseal_artifact(box, both, new)  # the rerun
    assert read_manifest(box)["seal"]["key_id"] == new.key_id
    assert _same(_state(box, Keyring.from_paths(new.source)), original)
