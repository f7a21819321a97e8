"""The one helper that makes client-controlled text safe for logs and audit rows."""

from __future__ import annotations

from typing import Any


def clean(value: Any, limit: int = 200) -> str:
    """`value` as text without CR/LF or control characters (no forged log lines), at most `limit` long."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text[:limit]
