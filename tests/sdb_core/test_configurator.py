"""KEY=VALUE overrides of configuration dataclasses (`sdb box --box-option`, `sdb evaluate --*-option`)."""

from __future__ import annotations

import pytest

from sdb_core.box import BoxConfig
from sdb_core.configurator import OverrideError, override
from sdb_core.evaluate import EvalConfig


def test_values_are_parsed_by_the_fields_type() -> None:
    cfg = override(BoxConfig(), ["guard=false", "w_dis=2", "disturb_form=box_first", "temperature=3"])
    assert (cfg.guard, cfg.w_dis, cfg.disturb_form, cfg.temperature) == (False, 2.0, "box_first", 3.0)
    assert override(BoxConfig(), ["gate=0", "guard=1"]).guard is True
    assert override(EvalConfig(), ["transfer=500"]).transfer == 500


def test_a_section_reaches_the_nested_config_and_leaves_the_rest() -> None:
    base = BoxConfig()
    cfg = override(base, ["split_width=16", "train.lr=0.01", "train.epochs=12"])
    assert (cfg.split_width, cfg.train.lr, cfg.train.epochs) == (16, 0.01, 12)
    assert cfg.train.batch_size == base.train.batch_size
    assert (base.split_width, base.train.lr) == (0, 0.05)  # a copy: the original is untouched


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("guard=maybe", "guard"),  # not a boolean
        ("nope=1", "nope"),  # no such field
        ("w_dis", "w_dis"),  # no value
        ("w_dis=lots", "w_dis"),  # not a number
        ("train.nope=1", "nope"),  # no such field in the section
        ("lam.x=1", "lam"),  # not a section
        ("train=1", "train"),  # not a scalar
        ("disturb_form=nope", "disturb_form"),  # refused by the dataclass itself
    ],
)
def test_bad_overrides_are_refused_with_their_name(bad: str, named: str) -> None:
    with pytest.raises(OverrideError, match=named):
        override(BoxConfig(), [bad])
