"""The watermark configuration a licensee's mark is derived with is the one its box records, so a change of
the defaults never changes the marks of boxes already served (they stay traceable)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sdb_core.watermark import CONFIG_KEY, LEGACY_CONFIG, WatermarkConfig
from service.watermarks.issuer import Watermarker
from service.watermarks.secret import WatermarkSecret

SECRET = WatermarkSecret(b"issuer-test-secret-0123456789abcdef", "setting")


@dataclass
class Model:
    name: str
    manifest: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 8, 8)
    num_classes: int = 10


def test_each_box_gets_the_configuration_it_records() -> None:
    recorded = WatermarkConfig(epsilon=0.05, frequency=2.0)
    new = Model("new", {"extra": {CONFIG_KEY: asdict(recorded)}})
    old = Model("old", {"extra": {"dataset": "digits"}})  # boxed before configurations were recorded
    marks = Watermarker(SECRET)
    assert marks.config(new) == recorded and marks.config(old) == LEGACY_CONFIG
    wm_new, wm_old = (marks.watermark(1, "abcd", 0, m) for m in (new, old))
    assert (wm_new.epsilon, wm_new.mode.frequency, wm_new.clip) == (0.05, 2.0, recorded.clip)
    assert (wm_old.epsilon, wm_old.mode.frequency, wm_old.clip) == (0.1, 1.5, "lead")
    assert wm_new.wid == wm_old.wid  # the public id belongs to the key, whatever the box


def test_a_configuration_given_to_the_service_overrides_the_boxes() -> None:
    cfg = WatermarkConfig(epsilon=0.2)
    marks = Watermarker(SECRET, cfg=cfg)
    assert marks.config(Model("old")) == cfg
    assert marks.watermark(1, "abcd", 0, Model("old")).epsilon == 0.2
