"""The README configuration table lists every SDB_ setting of service.core.config.Settings."""

from __future__ import annotations

import re
import subprocess
import sys

from service.core.config import Settings
from tests._support.ops import REPO


def test_every_setting_has_a_meaning() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"settings without a description (the README's 'meaning' column): {missing}"


def test_readme_table_is_generated_from_settings() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_readme_table_names_exactly_the_settings() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("config-table:start", 1)[1].split("config-table:end", 1)[0]
    in_table = set(re.findall(r"^\| `(SDB_[A-Z0-9_]+)`", block, flags=re.MULTILINE))
    expected = {f"SDB_{name.upper()}" for name in Settings.model_fields}
    assert in_table == expected


def test_every_variable_of_env_example_is_in_the_configuration_table() -> None:
    section = (REPO / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    names = re.findall(r"^#?\s*(SDB_[A-Z_]+)=", (REPO / ".env.example").read_text(), flags=re.MULTILINE)
    assert names
    missing = [n for n in names if f"`{n}`" not in table]
    assert not missing, f".env.example offers settings that the configuration table lacks: {missing}"
