"""Box training: turn a trained teacher into a Safe Distillation Box.

Objective per batch (f the box, f_adv the frozen teacher, x' = key.apply(x), x~ = x mixed with a freshly
drawn random non-key at lambda +- nonkey_lam_spread, p_T = softmax(z / T), y the label):

    L = w_ce_plain * CE(f(x), y) + w_ce_keyed * CE(f(x'), y)          # top-1 on both paths
      + w_dis * D(f(x))                                               # knowledge disturbance (plain)
      + w_pre * T^2 * KL(sharpen(p_T(f_adv(x)), y) || p_T(f(x')))     # preservation + augmentation (keyed)
      + w_nonkey * [w_ce_plain * CE(f(x~), y) + w_dis * D(f(x~))]     # wrong keys behave like no key

With `guard` (the default) the box is a zoo.TopOneGuard: a soft head z and a decision head d over one trunk.
The cross-entropy terms above train d (plus w_dec_pre * T^2 * KL(p_T(f_adv(x)) || p_T(d)) on plain and keyed
inputs), the disturbance and preservation terms train z, and the output is z with d's top-1 lifted to the top.
One head cannot both keep a wide top-1 margin and flatten its soft labels; two heads can (research/).

Disturbance forms D (all bounded, see losses.py), `disturb_form`:
- "target" (default): T_dis^2 * KL(r || p_Tdis(f(x))) where r inverts the teacher's dark knowledge (its
  least likely classes get the most mass) and keeps the true class on top by `dis_margin`. Bounded below by
  0, and top-1 is kept by construction.
- "box_first": -T_dis^2 * KL(p_Tdis(f(x)) || p_Tdis(f_adv(x))), the official code's term (box first, bounded
  by -T^2 * max(-log q)). On the bundled digits it either leaves students unharmed (the box just becomes
  over-confident) or, at larger weights, drives plain top-1 to chance; see research/evaluation-rounds.md.
- "teacher_first": Nasty-Teacher order with a probability floor, -T^2 * KL(p_T(f_adv) || p_T(f) + floor).
- "flat" (the default since 2026-11-30): KL(flat(y) || p_1(f(x))) + dis_spread * Var(wrong-class logits),
  flat(y) = 1 - dis_eps on y and the rest spread evenly: the soft labels inside the box carry the top-1 and as
  little else as training achieves, even with the key gate cut out of a stolen copy of the weights. Paired
  with `plain_output = "top1"`.
Derived from the official code (JngwenYe/SDB, train_smb.py), with the paper's lambda = 0.5.

With `gate` (the default since 2026-11-30) the box is a zoo.KeyGate: the network has one more output, a key
detector trained by binary cross-entropy (w_gate; keyed inputs 1, plain and non-key inputs 0), and answers
with `zoo.top1_logits` of its soft labels wherever the detector does not fire. The weights run as shipped,
without the key, then give the top-1 alone; the soft labels inside are still trained flat on plain inputs.

With `split_width > 0` the gated box is a zoo.KeySplit: its soft labels are the base's (from the teacher,
trained flat on keyed inputs too: `base_flat`) plus a residual network of its own that adds the keyed ranking
and is held at zero elsewhere (`w_quiet`), so that what the gate hides is what the residual adds. It leaks
less to a thief who cuts the gate out, and delivers less to small students (docs/evaluation.md).

`plain_output` says what the served plain path returns: "top1" (the default) replaces the box's plain logits
by a fixed distribution around their top-1 (`zoo.top1_logits`), so `/predict` gives away the top-1 and
nothing else whatever the attacker does with the answers; "soft" returns the box's own (disturbed) logits,
the paper's design. docs/evaluation.md measures both against the attack suite (`sdb_core.attacks`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.artifact import BoxedModel, load_box, save_box
from sdb_core.data import Dataset
from sdb_core.keys import BoxKey
from sdb_core.losses import (
    disturbance_loss,
    flat_disturbance_loss,
    preservation_loss,
    reverse_disturbance_loss,
    target_disturbance_loss,
)
from sdb_core.seal import Keyring
from sdb_core.training import TrainConfig, accuracy, fit, resolve_device, seed_everything
from sdb_core.watermark import BASIS_KEY, CONFIG_KEY, WatermarkConfig, fit_basis
from sdb_core.zoo import KeyGate, KeySplit, TopOneGuard, build_model


def default_temperature(num_classes: int) -> float:
    """The paper's T = T_dis: 4 for 10 classes, 20 for 100."""
    return 4.0 if num_classes <= 10 else 20.0


PLAIN_OUTPUTS = ("top1", "soft")
DISTURB_FORMS = ("flat", "target", "box_first", "teacher_first")


@dataclass
class BoxConfig:
    lam: float = 0.5
    temperature: float | None = None  # None: default_temperature(num_classes)
    temperature_dis: float | None = None
    plain_output: str = "top1"  # what the plain path serves: "top1" (fixed distribution) or "soft"
    w_ce_plain: float = 0.0  # the flat target already puts the label on top
    w_ce_keyed: float = 1.0
    w_dis: float = 1.0
    w_pre: float = 1.0
    sharpen: float = 0.1
    w_nonkey: float = 1.0
    nonkey_lam_spread: float = 0.3  # non-key mixes use lambda drawn uniformly in lam +- this
    init_from_teacher: bool = True
    freeze_layers: int = 0  # keep the teacher's first k child modules (Sequential models) frozen
    disturb_form: str = "flat"  # or "target", "box_first" (-KL(box || teacher)), "teacher_first" (floored)
    dis_eps: float = 0.1  # flat only: the probability mass spread evenly over the wrong classes
    dis_spread: float = 0.0  # flat only: weight of the wrong classes' logit variance (research/)
    dis_floor: float = 1e-3  # teacher_first only
    dis_margin: float = 0.1  # target only: true class above the top wrong class, in logits / T_dis
    dis_sharpness: float = 1.0  # target only: > 1 concentrates the wrong mass on fewer classes
    gate: bool = True  # zoo.KeyGate: a key detector inside the network; without the key, only the top-1
    w_gate: float = 1.0  # the detector's binary cross-entropy (keyed inputs 1, plain and non-key inputs 0)
    guard: bool = False  # two heads (soft, decision) behind zoo.TopOneGuard; False: one head does both
    guard_lift: float = 1.0  # logits by which a guarded box lifts its decision above the soft head's top
    w_dec_pre: float = 1.0  # guarded only: the decision head also imitates the teacher (plain and keyed)
    split_width: int = 0  # > 0: zoo.KeySplit, a residual network of this width adds the keyed ranking
    w_quiet: float = 1.0  # split only: the residual's centered output squared, on plain and non-key inputs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=0.05))

    def __post_init__(self) -> None:
        if self.disturb_form not in DISTURB_FORMS:
            raise ValueError(f"unknown disturb_form {self.disturb_form!r}; one of {', '.join(DISTURB_FORMS)}")
        if self.gate and self.guard:
            raise ValueError("a box has a key gate or a top-1 guard, not both")
        if self.plain_output not in PLAIN_OUTPUTS:
            raise ValueError(f"unknown plain_output {self.plain_output!r}; one of {', '.join(PLAIN_OUTPUTS)}")

    def temps(self, num_classes: int) -> tuple[float, float]:
        t = self.temperature or default_temperature(num_classes)
        return t, self.temperature_dis or t


def box_step_losses(
    box: nn.Module, teacher: nn.Module, key: BoxKey, xn: Tensor, y: Tensor, cfg: BoxConfig, num_classes: int
) -> dict[str, Tensor]:
    """Every term of the objective for one normalized batch (for training and for tests)."""
    t, t_dis = cfg.temps(num_classes)

    def disturb(zb: Tensor, zt: Tensor, yb: Tensor = y) -> Tensor:
        if cfg.disturb_form == "flat":
            return flat_disturbance_loss(zb, yb, cfg.dis_eps, cfg.dis_spread)
        if cfg.disturb_form == "target":
            return target_disturbance_loss(zb, zt, yb, t_dis, cfg.dis_margin, cfg.dis_sharpness)
        if cfg.disturb_form == "teacher_first":
            return reverse_disturbance_loss(zb, zt, t_dis, cfg.dis_floor)
        return disturbance_loss(zb, zt, t_dis)

    with torch.no_grad():
        z_adv = teacher(xn)
    xk = key.apply(xn)
    parts = [xn, xk]
    shape = (len(xn),) + (1,) * (xn.dim() - 1)  # one draw per sample, broadcast over its pixels
    if cfg.w_nonkey > 0:
        lam = key.lam + cfg.nonkey_lam_spread * (2 * torch.rand(shape, device=xn.device) - 1)
        lam = lam.clamp(0.05, 0.95)
        parts.append(lam * xn + (1.0 - lam) * torch.randn_like(xn))
    guarded = isinstance(box, TopOneGuard)
    score: Tensor | None = None
    base_soft: Tensor | None = None
    if isinstance(box, TopOneGuard):
        z, d = box.heads(torch.cat(parts))
    elif isinstance(box, KeySplit):
        base_soft, extra, score = box.parts(torch.cat(parts))
        z = d = base_soft + extra
    elif isinstance(box, KeyGate):
        z, score = box.heads(torch.cat(parts))
        d = z
    else:
        z = d = box(torch.cat(parts))
    n = len(xn)
    zp, zk = z[:n], z[n : 2 * n]
    out = {
        "ce_plain": F.cross_entropy(d[:n], y),
        "ce_keyed": F.cross_entropy(d[n : 2 * n], y),
        "disturb": disturb(zp, z_adv),
        "preserve": preservation_loss(zk, z_adv, y, t, cfg.sharpen),
    }
    if guarded:
        out["dec_preserve"] = preservation_loss(d[: 2 * n], z_adv.repeat(2, 1), y.repeat(2), t, 0.0)
    if score is not None:
        is_key = torch.zeros_like(score)
        is_key[n : 2 * n] = 1.0
        out["gate"] = F.binary_cross_entropy_with_logits(score, is_key)
    if base_soft is not None:
        # The base carries the top-1 alone on keyed inputs too; the residual adds nothing off the key.
        off_key = torch.ones(len(z), dtype=torch.bool, device=z.device)
        off_key[n : 2 * n] = False
        quiet = (extra - extra.mean(dim=1, keepdim=True))[off_key]
        out["quiet"] = (quiet**2).mean()
        out["base_flat"] = disturb(base_soft[n : 2 * n], z_adv)
    if cfg.w_nonkey > 0:
        zr = z[2 * n : 3 * n]
        out["ce_nonkey"] = F.cross_entropy(d[2 * n : 3 * n], y)
        out["disturb_nonkey"] = disturb(zr, z_adv)
    total = (
        cfg.w_ce_plain * out["ce_plain"]
        + cfg.w_ce_keyed * out["ce_keyed"]
        + cfg.w_dis * out["disturb"]
        + cfg.w_pre * out["preserve"]
    )
    if guarded:
        total = total + cfg.w_dec_pre * out["dec_preserve"]
    if score is not None:
        total = total + cfg.w_gate * out["gate"]
    if base_soft is not None:
        total = total + cfg.w_quiet * out["quiet"] + cfg.w_dis * out["base_flat"]
    if cfg.w_nonkey > 0:
        total = total + cfg.w_nonkey * (cfg.w_ce_plain * out["ce_nonkey"] + cfg.w_dis * out["disturb_nonkey"])
    out["total"] = total
    return out


def box_arch(arch: str, arch_kwargs: dict[str, Any], cfg: BoxConfig) -> tuple[str, dict[str, Any]]:
    """The box network's registered name and kwargs for a teacher of `arch` (wrapped when gated or
    guarded)."""
    if cfg.gate and cfg.split_width > 0:
        return "keysplit", {"base": arch, "residual": {"width": cfg.split_width}, **arch_kwargs}
    if cfg.gate:
        return "keygated", {"base": arch, **arch_kwargs}
    if cfg.guard:
        return "guarded", {"base": arch, "lift": cfg.guard_lift, **arch_kwargs}
    return arch, arch_kwargs


def train_box(
    teacher: nn.Module,
    ds: Dataset,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    key: BoxKey,
    cfg: BoxConfig,
    checkpoint: Path | None = None,
) -> nn.Module:
    """Train the box network (initialized from the teacher's weights by default)."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    name, kwargs = box_arch(arch, arch_kwargs, cfg)
    box = build_model(name, **kwargs)
    if cfg.init_from_teacher and isinstance(box, TopOneGuard | KeyGate):
        box.load_base_from(teacher)
    elif cfg.init_from_teacher:
        box.load_state_dict(teacher.state_dict())
    if cfg.freeze_layers > 0:
        layers = box.base if isinstance(box, TopOneGuard | KeyGate) else box
        for child in list(layers.children())[: cfg.freeze_layers]:
            for p in child.parameters():
                p.requires_grad_(False)
    box.to(device)

    def step(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return box_step_losses(box, teacher, key, xb, yb, cfg, ds.num_classes)["total"]

    return fit(box, ds, step, cfg.train, desc="box", checkpoint=checkpoint)


def wrong_key_fn(boxed: BoxedModel, lam: float, seed: int | None = None) -> Any:
    """A teacher function that feeds the box inputs mixed with a wrong (freshly drawn) key."""
    wrong = BoxKey.from_int_seed(seed, boxed.input_shape, lam) if seed is not None else None
    wrong = wrong or BoxKey.generate(boxed.input_shape, lam)

    def fn(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return boxed.model(wrong.apply(boxed.normalize(x)))

    return fn


def box_metrics(boxed: BoxedModel, ds: Dataset, wrong_key_seed: int = 12345) -> dict[str, float]:
    dev = boxed.device
    return {
        "plain_top1": accuracy(boxed.plain_logits, ds.x_test, ds.y_test, dev),
        "keyed_top1": accuracy(boxed.keyed_logits, ds.x_test, ds.y_test, dev),
        "wrong_key_top1": accuracy(
            wrong_key_fn(boxed, boxed.manifest["lam"], wrong_key_seed), ds.x_test, ds.y_test, dev
        ),
    }


def box_teacher(
    teacher: nn.Module,
    teacher_meta: dict[str, Any],
    ds: Dataset,
    out_dir: Path,
    *,
    name: str,
    version: str = "1",
    cfg: BoxConfig,
    key: BoxKey | None = None,
    teacher_top1: float | None = None,
    checkpoint: Path | None = None,
    keyring: Keyring | None = None,
    watermark: WatermarkConfig | None = None,
) -> BoxedModel:
    """Box, save the artifact (with metrics) to out_dir, and return it loaded back (checksums verified).
    With a keyring that has a current master key, the artifact is written sealed (sdb_core.seal). The
    manifest records the watermark basis fitted on ds and the watermark configuration (default: this
    version's), which the service derives licensees' watermarks with."""
    wcfg = watermark or WatermarkConfig()
    key = key or BoxKey.generate(ds.input_shape, cfg.lam)
    t_arch, t_kwargs = teacher_meta["arch"], teacher_meta["arch_kwargs"]
    box = train_box(teacher, ds, arch=t_arch, arch_kwargs=t_kwargs, key=key, cfg=cfg, checkpoint=checkpoint)
    arch, arch_kwargs = box_arch(t_arch, t_kwargs, cfg)
    t, t_dis = cfg.temps(ds.num_classes)
    common: dict[str, Any] = dict(
        model=box,
        arch=arch,
        arch_kwargs=arch_kwargs,
        key=key,
        name=name,
        version=version,
        input_shape=ds.input_shape,
        class_names=ds.class_names,
        normalization=ds.normalization,
        temperature=t,
        temperature_dis=t_dis,
        plain_output=cfg.plain_output,
        data_digest=ds.digest(),
        # public, for per-licensee watermarks on this box's soft labels (sdb_core.watermark)
        extra={
            "dataset": ds.name,
            "box_config": asdict(cfg),
            BASIS_KEY: fit_basis(ds.x_train, wcfg).to_dict(),
            CONFIG_KEY: asdict(wcfg),
        },
        master=keyring.current if keyring is not None else None,
    )
    save_box(out_dir, metrics={}, **common)
    boxed = load_box(out_dir, device=resolve_device(cfg.train.device), keyring=keyring)
    metrics: dict[str, Any] = dict(box_metrics(boxed, ds))
    if teacher_top1 is not None:
        metrics["teacher_top1"] = teacher_top1
    save_box(out_dir, metrics=metrics, **common)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    return load_box(out_dir, device=resolve_device(cfg.train.device), keyring=keyring)
