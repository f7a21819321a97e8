"""KEY=VALUE overrides of a configuration dataclass, in the spirit of nanoGPT's configurator.py.

`override(BoxConfig(), ["guard=false", "train.lr=0.05"])` returns a copy with those fields replaced: each
value is converted to the type of the field's current value (`true`/`false`/`1`/`0` for booleans; a field
that is None takes a float), and `SECTION.KEY` reaches into a nested dataclass (`train.` for a box's
TrainConfig). Only scalar fields can be set; an unknown name or a bad value raises OverrideError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_BOOLS = {"true": True, "1": True, "false": False, "0": False}


class OverrideError(ValueError):
    """An override that names no scalar field of the configuration, or whose value does not parse."""


def override(cfg: T, options: Iterable[str]) -> T:
    """A copy of the dataclass `cfg` with every `KEY=VALUE` (or `SECTION.KEY=VALUE`) of `options` applied."""
    flat: dict[str, str] = {}
    nested: dict[str, list[str]] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OverrideError(f"unknown option {item!r}: write KEY=VALUE")
        section, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(section, []).append(f"{rest}={value}")
        else:
            flat[key] = value
    changes: dict[str, Any] = {k: _parse(cfg, k, v) for k, v in flat.items()}
    for section, items in nested.items():
        inner = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(inner) or isinstance(inner, type):
            raise OverrideError(f"unknown option section {section!r}")
        changes[section] = override(inner, items)
    try:
        return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
    except ValueError as exc:  # the dataclass's own check (e.g. BoxConfig.__post_init__)
        raise OverrideError(str(exc)) from None


def _parse(cfg: Any, key: str, value: str) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    if key not in names:
        raise OverrideError(f"unknown option {key!r}")
    current = getattr(cfg, key)
    if current is not None and not isinstance(current, bool | int | float | str):
        raise OverrideError(f"{key} is not a scalar setting")
    if isinstance(current, bool):  # bool("false") is True
        if value.lower() not in _BOOLS:
            raise OverrideError(f"{key} takes true or false, got {value!r}")
        return _BOOLS[value.lower()]
    if isinstance(current, str):
        return value
    try:
        return type(current)(value) if current is not None else float(value)
    except ValueError:
        raise OverrideError(f"{key} takes a {type(current or 0.0).__name__}, got {value!r}") from None
