"""The sdb CLI's model commands: help, train -> box -> distill, remote distillation, box options."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdb.cli import app
from sdb_core.artifact import load_box
from sdb_core.watermark import WatermarkConfig, config_from_manifest

runner = CliRunner()


@pytest.mark.parametrize("command", ["train-teacher", "box", "distill", "evaluate", "demo"])
def test_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def _json_tail(output: str) -> dict[str, object]:
    return json.loads(output[output.index("{") :])


def test_train_box_distill_pipeline(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    r = runner.invoke(
        app, ["train-teacher", "--out", str(teacher), "--epochs", "2", "--width", "8", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert (teacher / "model.safetensors").exists()
    box = tmp_path / "models" / "mini"
    key = tmp_path / "secrets" / "mini.json"
    r = runner.invoke(
        app,
        [
            "box",
            "--teacher",
            str(teacher),
            "--out",
            str(box),
            "--epochs",
            "1",
            "--key-out",
            str(key),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert not (box / "box_key.json").exists() and key.exists()
    assert load_box(box, key_path=key).name == "mini"
    default = load_box(box, key_path=key)
    assert default.arch == "keygated" and default.plain_output == "top1"  # key gate, top-1 plain path
    guarded = tmp_path / "models" / "guarded"
    args = ["box", "--teacher", str(teacher), "--out", str(guarded), "--epochs", "1", "--device", "cpu"]
    r = runner.invoke(
        app,
        [
            *args,
            "--box-option",
            "gate=false",
            "--box-option",
            "guard=true",
            "--box-option",
            "plain_output=soft",
            "--watermark-option",
            "epsilon=0.1",
        ],
    )
    assert r.exit_code == 0, r.output
    boxed = load_box(guarded)
    assert boxed.arch == "guarded" and boxed.plain_output == "soft"
    assert boxed.manifest["extra"]["box_config"]["guard"] is True
    # the watermark configuration the service derives licensees' marks with is recorded with the box
    assert config_from_manifest(boxed.manifest) == replace(WatermarkConfig(), epsilon=0.1)
    assert config_from_manifest(load_box(box, key_path=key).manifest) == WatermarkConfig()
    r = runner.invoke(app, [*args, "--box-option", "nope=1"])
    assert r.exit_code != 0 and "nope" in r.output
    r = runner.invoke(app, [*args, "--watermark-option", "epsilon=0.7"])
    assert r.exit_code != 0 and "epsilon" in r.output
    student = tmp_path / "student"
    r = runner.invoke(
        app,
        [
            "distill",
            "--box",
            str(box),
            "--key-path",
            str(key),
            "--path",
            "keyed",
            "--epochs",
            "1",
            "--out",
            str(student),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "keyed" in str(_json_tail(r.output)["source"])


def test_distill_remote_needs_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDB_API_KEY", raising=False)
    r = runner.invoke(app, ["distill", "--remote", "http://127.0.0.1:9", "--epochs", "1"])
    assert r.exit_code != 0


def test_distill_remote_uses_the_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    import sdb.client

    calls: list[tuple[object, ...]] = []

    def fake_remote_teacher(base_url: str, api_key: str, model: str | None, path: str, **kw: Any) -> object:
        calls.append((base_url, api_key, model, path))
        return lambda x: torch.zeros(len(x), 10)

    monkeypatch.setattr(sdb.client, "remote_teacher", fake_remote_teacher)
    r = runner.invoke(
        app,
        [
            "distill",
            "--remote",
            "http://svc",
            "--api-key",
            "k-123",
            "--model",
            "m",
            "--path",
            "plain",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert calls == [("http://svc", "k-123", "m", "plain")]
    assert "k-123" not in r.output


def test_a_bad_box_option_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    for bad in ("guard=maybe", "nope=1", "disturb_form=nope"):
        r = CliRunner().invoke(
            app, ["evaluate", "--out", str(tmp_path / "eval"), "--reduced", "--box-option", bad]
        )
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output


def test_version() -> None:
    from importlib.metadata import version

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"sdb {version('sdb')}"


def _quota_error() -> Exception:
    from sdb.client import SdbError

    return SdbError(429, {"error": "quota_exceeded", "message": "sample quota exhausted", "resets": "never"})


def _auth_error() -> Exception:
    from sdb.client import SdbError

    return SdbError(401, {"error": "invalid_token", "message": "invalid or expired access token"})


def _unreachable() -> Exception:
    import httpx

    return httpx.ConnectError("[Errno 111] Connection refused")


@pytest.mark.parametrize(
    ("error", "code", "needle"),
    [(_auth_error, 4, "API key"), (_quota_error, 5, "quota"), (_unreachable, 7, "cannot reach")],
)
def test_ordinary_errors_are_one_line_with_their_own_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Any, code: int, needle: str
) -> None:
    import sys

    import sdb.cli
    import sdb.client

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise error()

    monkeypatch.setattr(sdb.client, "remote_teacher", failing)
    argv = ["sdb", "distill", "--remote", "http://127.0.0.1:9", "--api-key", "k-1", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        sdb.cli.main()
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err and "--debug" in err
    monkeypatch.setattr(sys, "argv", [*argv[:1], "--debug", *argv[1:]])
    with pytest.raises(type(error())):  # --debug: the exception and its traceback, as before
        sdb.cli.main()


@pytest.mark.parametrize(
    "command",
    [["distill"], ["train-teacher"], ["box", "--teacher", "runs/none"], ["evaluate", "--reduced"]],
)
@pytest.mark.parametrize("data", ["no-such-data", "fashion-mnist:/no/such/dir"])
def test_a_missing_or_unknown_data_set_is_one_line_with_the_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str], data: str
) -> None:
    import sys

    import sdb.cli

    monkeypatch.setattr(sys, "argv", ["sdb", *command, "--data", data, "--out", "runs/never"])
    with pytest.raises(SystemExit) as exit_info:
        sdb.cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == sdb.cli.EXIT_INPUT, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--data" in err and ("fashion-mnist:DIR" in err or "npz:FILE" in err), err


class _QuotaClient:
    """Stands in for the SdbClient of a remote teacher: GET /auth/key only."""

    def __init__(self, quota: int | None, used: int) -> None:
        self.answer = {
            "sample_quota": quota,
            "samples_used": used,
            "samples_remaining": None if quota is None else quota - used,
        }

    def own_key(self) -> dict[str, Any]:
        return self.answer


def _remote_distill(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, quota: int | None, used: int, *extra: str
) -> tuple[Any, list[int]]:
    import torch

    import sdb.client

    asked: list[int] = []

    def fake_remote_teacher(*args: Any, **kwargs: Any) -> Any:
        def teacher(x: Any) -> Any:
            asked.append(len(x))
            return torch.zeros(len(x), 10)

        teacher.client = _QuotaClient(quota, used)  # type: ignore[attr-defined]
        return teacher

    monkeypatch.setattr(sdb.client, "remote_teacher", fake_remote_teacher)
    argv = ["distill", "--remote", "http://svc", "--api-key", "k-1", "--epochs", "1", "--device", "cpu"]
    r = runner.invoke(app, [*argv, "--out", str(tmp_path / "s"), *extra])
    return r, asked


def test_remote_distill_says_what_it_will_spend_and_wants_yes_above_half_the_quota_left(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sdb_core.data import load_dataset

    n = len(load_dataset("digits").x_train)
    r, asked = _remote_distill(monkeypatch, tmp_path, 100 * n, 0)
    assert r.exit_code == 0, r.output
    assert f"{n:,} samples" in r.output and f"{100 * n:,} of {100 * n:,}" in r.output
    assert sum(asked) == n
    assert "teacher:" in r.output and "%|" in r.output  # the progress bar while the answers arrive
    r, asked = _remote_distill(
        monkeypatch, tmp_path, 3 * n, n + n // 2
    )  # takes more than half of what is left
    assert r.exit_code == 1 and "--yes" in r.output and not asked, r.output
    r, asked = _remote_distill(monkeypatch, tmp_path, 3 * n, n + n // 2, "--yes")
    assert r.exit_code == 0 and sum(asked) == n, r.output
    r, asked = _remote_distill(monkeypatch, tmp_path, n, 1)  # not enough left: nothing is spent
    assert r.exit_code == 5 and f"{n - 1:,}" in r.output and not asked, r.output
    r, asked = _remote_distill(monkeypatch, tmp_path, None, 0)
    assert r.exit_code == 0 and "no sample quota" in r.output, r.output


def test_evaluate_runs_the_protocol_on_the_threads_it_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`evaluate()` sets torch's threads from its config: --threads has to reach it (it once did not, and
    the protocol ran on one core whatever --threads said)."""
    import sdb_core.evaluate

    seen: list[Any] = []

    def fake_evaluate(cfg: Any, out: Path) -> dict[str, Any]:
        seen.append(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("ok\n")
        return {"checks": {}}

    monkeypatch.setattr(sdb_core.evaluate, "evaluate", fake_evaluate)
    out = tmp_path / "eval"
    args = ["evaluate", "--out", str(out), "--reduced", "--threads", "2", "--protocol-option", "workers=1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (seen[0].threads, seen[0].workers) == (2, 1)
