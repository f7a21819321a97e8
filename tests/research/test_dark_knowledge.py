"""research/dark_knowledge.py (the fifth evaluation round): its pure parts, on hand-made logits."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "research" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _margin(z: torch.Tensor) -> torch.Tensor:
    top = z.argmax(1, keepdim=True)
    wrong = z.scatter(1, top, 0).sum(1) / (z.shape[1] - 1)
    return z.gather(1, top)[:, 0] - wrong


def test_dark_knowledge_parts_split_ranking_from_margin() -> None:
    """Every part keeps the teacher's top-1; `ranking` keeps the wrong classes and levels the margin (raised
    only where the mean would lose the top-1), `margin` keeps the margin and levels the wrong classes,
    `margin-shuffled` deals the same margins to other images, `flat` is one margin for all."""
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    parts = _script("dark_knowledge").parts(z, seed=0)
    top = z.argmax(1)
    hot = torch.nn.functional.one_hot(top, 10).bool()
    for name, t in parts.items():
        assert torch.equal(t.argmax(1), top), name
    margin = _margin(z)
    assert torch.allclose(_margin(parts["margin"]), margin, atol=1e-5)
    assert torch.allclose(_margin(parts["flat"]), margin.mean().expand(64), atol=1e-5)
    shuffled = _margin(parts["margin-shuffled"])
    assert torch.allclose(shuffled.sort().values, margin.sort().values, atol=1e-5)
    assert not torch.allclose(shuffled, margin)

    shift = (parts["ranking"] - z)[~hot].view(64, 9)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5), (
        "wrong classes kept, up to a shift"
    )
    ranked = _margin(parts["ranking"])
    raised = ranked > margin.mean() + 1e-5
    assert raised.any() and not raised.all() and torch.all(ranked >= margin.mean() - 1e-5)
    centered = z - z.masked_fill(hot, 0).sum(1, keepdim=True) / 9
    runner_up = centered.masked_fill(hot, -1e9).max(1).values
    assert torch.allclose(ranked[raised], runner_up[raised] + 0.5, atol=1e-5)
    for name in ("margin", "margin-shuffled", "flat"):
        assert torch.equal(parts[name].masked_fill(hot, 0), torch.zeros_like(z)), name


def test_dark_knowledge_summary_averages_each_part_over_seeds(tmp_path: Path) -> None:
    import json

    for seed, gain in ((0, 1.0), (1, 2.0), (2, 4.5)):
        report = {"student": "mlp:hidden=512", "seed": seed, "over_floor": {"normal": gain, "flat": -gain}}
        (tmp_path / f"s{seed}-mlp.json").write_text(json.dumps(report))
    (tmp_path / "s0-small_cnn.json").write_text(
        json.dumps({"student": "small_cnn:width=16", "seed": 0, "over_floor": {"normal": 0.5}})
    )
    (tmp_path / "box-s2-mlp.json").write_text(json.dumps({"student": "mlp:hidden=512", "over_floor": {}}))
    stats = _script("dark_knowledge").summary(tmp_path)
    assert stats["mlp:hidden=512"]["normal"] == {"mean": 2.5, "std": 1.8}
    assert stats["mlp:hidden=512"]["flat"]["mean"] == -2.5
    assert stats["small_cnn:width=16"]["normal"] == {"mean": 0.5, "std": 0.0}
    merged = json.loads((tmp_path / "summary.json").read_text())
    assert [r["seed"] for r in merged["runs"]["mlp:hidden=512"]] == [0, 1, 2]
    assert [b["student"] for b in merged["boxes"]] == ["mlp:hidden=512"], "box-mode reports kept apart"
