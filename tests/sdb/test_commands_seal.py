"""`sdb box` sealing with SDB_SEAL_KEY_FILE set; `sdb seal`, `sdb unseal`, `sdb reseal`, `sdb seal-key`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sdb.cli import app
from sdb_core.artifact import load_box, make_test_box, read_manifest

runner = CliRunner()


def _lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_sdb_box_writes_a_sealed_artifact_when_a_master_key_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = tmp_path / "teacher"
    r = runner.invoke(
        app, ["train-teacher", "--out", str(teacher), "--epochs", "1", "--width", "8", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    key = tmp_path / "secrets" / "master.key"
    r = runner.invoke(app, ["seal-key", "new", str(key)])
    assert r.exit_code == 0 and key.stat().st_mode & 0o077 == 0, r.output
    key_id = _lines(r.output)[0]["key_id"]
    assert runner.invoke(app, ["seal-key", "id", str(key)]).output.strip() == key_id
    assert runner.invoke(app, ["seal-key", "new", str(key)]).exit_code != 0  # never overwritten
    monkeypatch.setenv("SDB_SEAL_KEY_FILE", str(key))
    box = tmp_path / "models" / "mini"
    args = ["box", "--teacher", str(teacher), "--out", str(box), "--epochs", "1", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{") :])["sealed"] == key_id
    assert sorted(p.name for p in box.iterdir()) == [
        "box_key.json.sealed",
        "manifest.json",
        "seal.json",
        "weights.safetensors.sealed",
    ]
    assert read_manifest(box)["metrics"]["keyed_top1"] > 0
    r = runner.invoke(app, [*args, "--key-out", str(tmp_path / "k.json")])
    assert r.exit_code != 0 and "--key-out" in r.output


def test_seal_unseal_reseal_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    make_test_box(models, name="a", seed=1)
    make_test_box(models, name="b", seed=2)
    x = torch.rand(2, 1, 8, 8) * 16
    want = load_box(models / "a").keyed_logits(x)
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    for k in (old, new):
        assert runner.invoke(app, ["seal-key", "new", str(k)]).exit_code == 0
    monkeypatch.delenv("SDB_SEAL_KEY_DIR", raising=False)
    monkeypatch.setenv("SDB_SEAL_KEY_FILE", str(old))
    r = runner.invoke(app, ["seal", str(models)])  # a models directory: every artifact in it
    assert r.exit_code == 0, r.output
    assert [o["sealed"] for o in _lines(r.output)] == [str(models / "a"), str(models / "b")]
    assert "already sealed" in runner.invoke(app, ["seal", str(models / "a")]).output
    r = runner.invoke(app, ["reseal", str(models / "a"), "--to", str(new)])
    assert r.exit_code == 0, r.output
    (moved,) = _lines(r.output)
    assert moved["from"] != moved["to"] and read_manifest(models / "a")["seal"]["key_id"] == moved["to"]
    r = runner.invoke(app, ["reseal", str(models / "b"), "--to", str(new), "--rekey"])
    assert r.exit_code == 0 and _lines(r.output)[0]["rekeyed"] is True, r.output
    # The old key alone opens neither any more: one line, from `sdb` itself, no traceback.
    monkeypatch.setattr(sys, "argv", ["sdb", "unseal", str(models / "a")])
    with pytest.raises(SystemExit) as exit_info:
        from sdb.cli import main

        main()
    assert exit_info.value.code != 0
    monkeypatch.setenv("SDB_SEAL_KEY_FILE", str(new))
    r = runner.invoke(app, ["unseal", str(models)])
    assert r.exit_code == 0, r.output
    assert (models / "a" / "weights.safetensors").is_file() and not (models / "a" / "seal.json").exists()
    assert torch.equal(load_box(models / "a").keyed_logits(x), want)


def test_cli_errors_about_seals_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdb.cli import main

    box = make_test_box(tmp_path, name="a", seed=1)
    assert runner.invoke(app, ["seal-key", "new", str(tmp_path / "k.key")]).exit_code == 0
    assert runner.invoke(app, ["seal", str(box), "--key-file", str(tmp_path / "k.key")]).exit_code == 0
    assert runner.invoke(app, ["seal-key", "new", str(tmp_path / "other.key")]).exit_code == 0
    monkeypatch.delenv("SDB_SEAL_KEY_DIR", raising=False)
    monkeypatch.setenv("SDB_SEAL_KEY_FILE", str(tmp_path / "other.key"))
    monkeypatch.setattr(sys, "argv", ["sdb", "unseal", str(box)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "not among the configured master keys" in err and str(box) in err
    key_hex = (tmp_path / "k.key").read_text().strip()
    assert key_hex not in err
