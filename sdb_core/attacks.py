"""The attack suite: every way an outsider turns plain-path answers (or stolen weights) into a student.

An attacker has an `Oracle`: RAW inputs [N, *shape] -> log-probabilities [N, C]. Through the service that is
`log` of what `POST /predict` returns (`plain_api_oracle`, `sdb.client.predict_oracle`); with the box's
weights copied off a server but without the box key it is the network itself (`stolen_weights_oracle`).
Each attack builds a teacher function from the oracle (its soft targets for the attacker's transfer set) and
trains a student with the same Hinton KD loop as everyone else (`sdb_core.distill`). The attacks:

- ``label_only``: the top-1 as pseudo-labels (cross-entropy). The floor: any service that answers correctly
  gives this away. Tramer et al., "Stealing Machine Learning Models via Prediction APIs" (USENIX Sec 2016).
- ``retemper:T``: the probabilities turned back into logits (log p) and softened at T in {1, 2, 4, 10, 20}:
  Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); high T amplifies small differences.
- ``average:noise`` / ``average:shift``: each input queried `average_queries` times under Gaussian noise or
  a random one-pixel shift, the answers averaged (turns top-1 votes into a smoothed distribution, cf. Cohen
  et al., "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019), then KD at T.
- ``skeptical``: Kundu et al., "Analyzing the Confidentiality of Undistillable Teachers in Knowledge
  Distillation" (NeurIPS 2021): the soft labels supervise an auxiliary head only; the main head learns the
  top-1 and is what the attacker keeps.
- ``htc``: high-temperature composition in the spirit of Jandial et al., "Distilling the Undistillable:
  Learning from a Nasty Teacher" (ECCV 2022): the answers softened at a high temperature and mixed with the
  one-hot top-1, learned at T = 1.
- ``guess:lam=L`` / ``guess:other-box``: inputs mixed as lam * x + (1 - lam) * k' with fresh random patterns
  k' (the box key's distribution) at several lam, or with another box's key; KD at T on the answers.
- ``forge`` (stolen weights only): the thief holds the weights and the manifest (architecture, lambda,
  normalization), not the key. A gradient search through the network finds a pattern p that, mixed like the
  key (lam * x + (1 - lam) * p), makes the key gate fire while the plain top-1 is kept (`forge_trigger`, in
  the spirit of reverse-engineered backdoor triggers: Wang et al., "Neural Cleanse", IEEE S&P 2019); the
  network as shipped, fed that pattern (`forged_oracle`), is then distilled at T like a keyed path.

Every attack has a top-1 twin: the same recipe run on `top1_oracle(oracle)`, the answers cut down to their
top-1. What an attack gains over its twin is what the answers gave beyond the top-1 (`sdb_core.evaluate`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig, distill_logits, labelled_mask, query_teacher
from sdb_core.keys import BoxKey
from sdb_core.losses import kl_div
from sdb_core.training import TeacherFn, fit, seed_everything
from sdb_core.zoo import KeyGate, arch_kwargs_for, build_model, top1_logits

if TYPE_CHECKING:
    from sdb_core.artifact import BoxedModel

Oracle = Callable[[Tensor], Tensor]  # RAW inputs -> log-probabilities [N, C]

LABEL_ONLY = "label_only"
FORGE = "forge"
HARD_LOGIT = 100.0  # one-hot pseudo-labels as logits: softmax at T = 1 is one-hot to float precision


@dataclass
class AttackConfig:
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 10.0, 20.0)
    kd_temperature: float = 4.0  # for the averaged, skeptical and key-guessing attacks
    average_queries: int = 8
    average_noise: float = 0.25  # Gaussian noise std, in units of the data's per-channel std
    skeptical_weight: float = 1.0
    htc_temperature: float = 20.0
    htc_mix: float = 0.5  # weight of the softened answers against the one-hot top-1
    guess_lams: tuple[float, ...] = (0.3, 0.5, 0.7)
    guess_seed: int = 4242  # the attacker's random key patterns
    other_key: BoxKey | None = None  # another box's key, if the attacker holds one
    # The forged trigger's search (`forge_trigger`): Adam on the pattern, restarts from fresh random ones.
    forge_steps: int = 300
    forge_lr: float = 0.05
    forge_batch: int = 128
    forge_restarts: int = 2
    forge_margin: float = 2.0  # the gate score the search pushes every mixed input above
    forge_seed: int = 4343
    attacks: tuple[str, ...] = field(default_factory=tuple)  # empty: all of `attack_names(cfg)`


def attack_names(cfg: AttackConfig) -> list[str]:
    names = [LABEL_ONLY]
    names += [f"retemper:{t:g}" for t in cfg.temperatures]
    names += ["average:noise", "average:shift", "skeptical", "htc"]
    names += [f"guess:lam={lam:g}" for lam in cfg.guess_lams]
    if cfg.other_key is not None:
        names.append("guess:other-box")
    return [n for n in names if not cfg.attacks or n in cfg.attacks]


def log_probs_of(probabilities: Tensor) -> Tensor:
    """log p of returned probabilities, with zeros (float underflow) kept finite."""
    return torch.log(probabilities.double().clamp_min(1e-300)).float()


def _one_hot_logits(log_p: Tensor) -> Tensor:
    return HARD_LOGIT * F.one_hot(log_p.argmax(1), log_p.shape[1]).float()


def _mix_pattern(x: Tensor, ds: Dataset, pattern: Tensor, lam: float) -> Tensor:
    """lam * x + (1 - lam) * pattern in the attacker's own normalized units, back to raw inputs."""
    mean = torch.tensor(ds.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(ds.std, dtype=x.dtype).view(-1, 1, 1)
    return lam * x + (1.0 - lam) * (mean + std * pattern)


def _averaged(oracle: Oracle, ds: Dataset, cfg: AttackConfig, kind: str) -> TeacherFn:
    std = torch.tensor(ds.std).view(-1, 1, 1)
    g = torch.Generator().manual_seed(cfg.guess_seed)

    def fn(x: Tensor) -> Tensor:
        total = torch.zeros(len(x), 1, dtype=torch.float64)
        for _ in range(cfg.average_queries):
            if kind == "noise":
                xq = x + cfg.average_noise * std * torch.randn(x.shape, generator=g)
            else:  # every sample shifted by its own random (dy, dx) in {-1, 0, 1}^2
                shifts = torch.randint(-1, 2, (len(x), 2), generator=g).tolist()
                xq = torch.stack(
                    [torch.roll(xi, (dy, dx), dims=(-2, -1)) for xi, (dy, dx) in zip(x, shifts, strict=True)]
                )
            total = total + oracle(xq).double().exp()
        return log_probs_of(total / cfg.average_queries)

    return fn


def _htc(oracle: Oracle, cfg: AttackConfig) -> TeacherFn:
    def fn(x: Tensor) -> Tensor:
        log_p = oracle(x)
        soft = F.softmax(log_p / cfg.htc_temperature, dim=1)
        hard = F.one_hot(log_p.argmax(1), log_p.shape[1]).float()
        return log_probs_of((1.0 - cfg.htc_mix) * hard + cfg.htc_mix * soft)

    return fn


def _guess(oracle: Oracle, ds: Dataset, pattern: Tensor, lam: float) -> TeacherFn:
    return lambda x: oracle(_mix_pattern(x, ds, pattern, lam))


def teacher_for(name: str, oracle: Oracle, ds: Dataset, cfg: AttackConfig) -> tuple[TeacherFn, float]:
    """The teacher function and KD temperature of one attack (for `skeptical`: what its auxiliary head
    learns from)."""
    if name == LABEL_ONLY:
        return (lambda x: _one_hot_logits(oracle(x))), 1.0
    kind, _, arg = name.partition(":")
    if kind == "skeptical":
        return oracle, cfg.kd_temperature
    if kind == "retemper":
        return oracle, float(arg)
    if kind == "average":
        return _averaged(oracle, ds, cfg, arg), cfg.kd_temperature
    if kind == "htc":
        return _htc(oracle, cfg), 1.0
    if kind == FORGE:  # `oracle` is already the network fed the forged trigger (`forged_oracle`)
        return oracle, cfg.kd_temperature
    if kind == "guess":
        shape = ds.input_shape
        if arg == "other-box":
            if cfg.other_key is None:
                raise ValueError("guess:other-box needs AttackConfig.other_key")
            return _guess(oracle, ds, cfg.other_key.pattern(), cfg.other_key.lam), cfg.kd_temperature
        lam = float(arg.removeprefix("lam="))
        g = torch.Generator().manual_seed(cfg.guess_seed + round(lam * 1000))
        return _guess(oracle, ds, torch.randn(shape, generator=g), lam), cfg.kd_temperature
    raise ValueError(f"unknown attack {name!r}")


class SkepticalStudent(nn.Module):
    """A zoo model split into trunk and head, plus an auxiliary head on the trunk's features."""

    def __init__(self, model: nn.Module, hidden: int = 64) -> None:
        super().__init__()
        if not (isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear)):
            raise ValueError("the skeptical student needs a Sequential zoo model ending in nn.Linear")
        head = model[-1]
        self.trunk = model[:-1]
        self.head = head
        self.aux = nn.Sequential(
            nn.Linear(head.in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, head.out_features)
        )

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.trunk(x)
        return self.head(f), self.aux(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def top1_oracle(oracle: Oracle) -> Oracle:
    """The same oracle with every answer cut down to its top-1 (`zoo.top1_logits`): what an attack gets
    from an answer's top-1 alone. An attack that does better on `oracle` than on this twin has used more."""
    return lambda x: F.log_softmax(top1_logits(oracle(x)), dim=1)


@dataclass(frozen=True)
class Targets:
    """What one attack trains its student on: teacher logits for every transfer image, a KD temperature, and
    whether they go to a skeptical student's auxiliary head."""

    logits: Tensor
    temperature: float
    skeptical: bool

    def digest(self) -> str:
        h = hashlib.sha256(self.logits.detach().cpu().float().numpy().tobytes())
        h.update(f"{self.temperature}:{self.skeptical}".encode())
        return h.hexdigest()


def attack_targets(
    name: str, oracle: Oracle, ds: Dataset, cfg: AttackConfig, batch_size: int = 256
) -> Targets:
    """Query the oracle as attack `name` would, once per transfer image (several times when averaging)."""
    fn, t = teacher_for(name, oracle, ds, cfg)
    return Targets(query_teacher(fn, ds.x_train, batch_size), t, name == "skeptical")


def train_on_targets(
    ds: Dataset,
    arch: str,
    targets: Targets,
    dcfg: DistillConfig,
    cfg: AttackConfig,
    *,
    arch_extra: dict[str, Any] | None = None,
    desc: str = "attack",
) -> nn.Module:
    """The attacker's student: Hinton KD on the targets (plus CE on the known labels), or, for a skeptical
    student, CE on their top-1 for the main head and KD for the auxiliary head only."""
    run_cfg = replace(dcfg, temperature=targets.temperature)
    if not targets.skeptical:
        return distill_logits(ds, arch, targets.logits, run_cfg, arch_extra=arch_extra, desc=desc)
    seed_everything(dcfg.train.seed)
    base = build_model(arch, **arch_kwargs_for(ds.input_shape, ds.num_classes, **(arch_extra or {})))
    student = SkepticalStudent(base)
    log_p, t = targets.logits, targets.temperature
    top1 = log_p.argmax(1)
    mask = torch.from_numpy(labelled_mask(len(ds.x_train), dcfg.labelled_fraction, dcfg.train.seed))

    def step(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        main, aux = student.both(xb)
        target = torch.where(mask[idx], yb, top1[idx])
        return F.cross_entropy(main, target) + cfg.skeptical_weight * (t**2) * kl_div(log_p[idx], aux, t)

    return fit(student, ds, step, dcfg.train, desc=desc)


def run_attack(
    name: str,
    oracle: Oracle,
    ds: Dataset,
    arch: str,
    dcfg: DistillConfig,
    cfg: AttackConfig,
    *,
    arch_extra: dict[str, Any] | None = None,
) -> nn.Module:
    """Query the oracle and train the attacker's student of `arch` on ds's training split (its transfer
    set)."""
    targets = attack_targets(name, oracle, ds, cfg, dcfg.teacher_batch_size)
    return train_on_targets(ds, arch, targets, dcfg, cfg, arch_extra=arch_extra, desc=f"{arch} {name}")


@dataclass(frozen=True)
class ForgedTrigger:
    """A forged key pattern (normalized units, the key's shape) and how it does on the images it was searched
    on: the fraction where the gate fires with the plain top-1 kept."""

    pattern: Tensor
    lam: float
    gate_rate: float


def _gate_and_top1(gate: KeyGate, mixed: Tensor, top1: Tensor) -> Tensor:
    soft, score = gate.heads(mixed)
    return (score > 0) & (soft.argmax(1) == top1)


def forge_trigger(boxed: BoxedModel, x: Tensor, cfg: AttackConfig) -> ForgedTrigger | None:
    """Search a trigger for a key-gated box from its weights and manifest alone (None for a box without a
    gate: its raw outputs already are its soft labels). `x`: the thief's RAW images."""
    gate = boxed.model
    if not isinstance(gate, KeyGate):
        return None
    lam = float(boxed.manifest["lam"])
    xn = boxed.normalize(x).detach()
    with torch.inference_mode():
        top1 = torch.cat([gate.heads(xb)[0].argmax(1) for xb in xn.split(512)])
    g = torch.Generator().manual_seed(cfg.forge_seed)
    best: ForgedTrigger | None = None
    for _ in range(max(1, cfg.forge_restarts)):
        p = torch.randn(boxed.input_shape, generator=g).to(xn.device).requires_grad_(True)
        opt = torch.optim.Adam([p], lr=cfg.forge_lr)
        for _ in range(cfg.forge_steps):
            idx = torch.randint(len(xn), (min(cfg.forge_batch, len(xn)),), generator=g).to(xn.device)
            soft, score = gate.heads(lam * xn[idx] + (1.0 - lam) * p)
            loss = F.softplus(cfg.forge_margin - score).mean() + F.cross_entropy(soft, top1[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pattern = p.detach()
        with torch.inference_mode():
            hits = torch.cat(
                [
                    _gate_and_top1(gate, lam * xb + (1.0 - lam) * pattern, tb)
                    for xb, tb in zip(xn.split(512), top1.split(512), strict=True)
                ]
            )
        found = ForgedTrigger(pattern.cpu(), lam, float(hits.float().mean()))
        if best is None or found.gate_rate > best.gate_rate:
            best = found
    return best


def forged_oracle(boxed: BoxedModel, trigger: ForgedTrigger) -> Oracle:
    """The network as shipped, fed each RAW input mixed with the forged trigger like the key would be."""
    offset = (1.0 - trigger.lam) * trigger.pattern.to(boxed.device)

    def fn(x: Tensor) -> Tensor:
        with torch.inference_mode():
            z = boxed.model(trigger.lam * boxed.normalize(x) + offset)
        return F.log_softmax(z.float(), dim=1).cpu()

    return fn
