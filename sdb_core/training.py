"""Shared training machinery: seeds, devices, the epoch loop with progress bar and resumable checkpoints,
accuracy, and the teacher checkpoint format (safetensors + JSON)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sdb_core import parallel
from sdb_core.data import Dataset
from sdb_core.zoo import arch_kwargs_for, build_model

TeacherFn = Callable[[Tensor], Tensor]  # RAW inputs [N, *input_shape] -> logits [N, classes]


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    augment: bool = False  # random crop (pad 4) + horizontal flip; for 32x32 natural images only
    progress: bool = True
    checkpoint_every: int = 0  # epochs between resumable checkpoints (0 = none)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_tensor(x: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(x).to(device)


def augment_batch(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip (CIFAR-style)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=g).tolist()
    j = torch.randint(0, 9, (n,), generator=g).tolist()
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.stack([padded[k, :, i[k] : i[k] + h, j[k] : j[k] + w] for k in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def minibatches(n: int, batch_size: int, g: torch.Generator) -> Iterator[Tensor]:
    perm = torch.randperm(n, generator=g)
    for s in range(0, n, batch_size):
        yield perm[s : s + batch_size]


@torch.no_grad()
def predict(fn: Callable[[Tensor], Tensor], x: np.ndarray, device: torch.device, batch: int = 512) -> Tensor:
    """fn over x in batches; logits on CPU."""
    outs = [fn(to_tensor(x[s : s + batch], device)).float().cpu() for s in range(0, len(x), batch)]
    return torch.cat(outs)


def accuracy(fn: Callable[[Tensor], Tensor], x: np.ndarray, y: np.ndarray, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    pred = predict(fn, x, device).argmax(1).numpy()
    return float((pred == y).mean() * 100.0)


def model_fn(model: nn.Module, ds: Dataset) -> TeacherFn:
    """RAW inputs -> logits of a plain (unboxed) model trained on normalized `ds` inputs."""

    def fn(x: Tensor) -> Tensor:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            return model(ds.normalize(x.to(device=device, dtype=torch.float32)))

    return fn


StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (idx, x_normalized, y) -> loss


def fit(
    model: nn.Module,
    ds: Dataset,
    step: StepFn,
    cfg: TrainConfig,
    *,
    desc: str,
    n_train: int | None = None,
    checkpoint: Path | None = None,
) -> nn.Module:
    """SGD (momentum, weight decay, cosine schedule) over the training split; `step` computes the loss.

    Under torchrun (an initialized process group, see `sdb_core.parallel`) each process runs `step` on its
    shard of every global minibatch and the gradients are summed across processes before each optimizer step;
    only rank 0 shows the progress bar and writes checkpoints."""
    device = resolve_device(cfg.device)
    g = seed_everything(cfg.seed)
    multi = parallel.active()
    if multi:  # same permutation from g on every rank; different noise (dropout, non-key draws) per shard
        torch.manual_seed(cfg.seed + 1_000_003 * parallel.rank())
    model.to(device).train()
    parallel.broadcast_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    x_all = to_tensor(ds.x_train, device)
    y_all = to_tensor(ds.y_train, device)
    n = n_train if n_train is not None else len(x_all)
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        start = int(state["epoch"])
    show = cfg.progress and parallel.is_main()
    bar = tqdm(range(start, cfg.epochs), desc=desc, disable=not show, leave=False)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for idx in minibatches(n, cfg.batch_size, g):
            global_n = len(idx)
            part = parallel.shard(global_n) if multi else slice(None)
            if cfg.augment:  # the whole global batch, so that g advances alike on every rank
                xb = augment_batch(x_all[idx.to(device)], g)[part]
                idx = idx[part]
            else:
                idx = idx[part]
                xb = x_all[idx.to(device)]
            opt.zero_grad(set_to_none=True)
            if len(idx):
                loss = step(idx, ds.normalize(xb), y_all[idx.to(device)])
                loss.backward()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            if multi:
                parallel.all_reduce_gradients(model.parameters(), len(idx) / global_n)
            opt.step()
        sched.step()
        if multi:
            total, count_f = parallel.all_reduce_sum([total, float(count)])
            count = int(count_f)
            parallel.average_buffers(model)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        if checkpoint is not None and cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
            if parallel.is_main():
                tmp = checkpoint.with_name(checkpoint.name + ".tmp")
                torch.save(
                    {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "rng": g.get_state(),
                        "epoch": epoch + 1,
                    },
                    tmp,
                )
                os.replace(tmp, checkpoint)
            parallel.barrier()
    parallel.broadcast_module(model)  # equal already; this makes "what rank 0 saves" hold by construction
    model.eval()
    return model


def train_classifier(
    ds: Dataset,
    arch: str,
    cfg: TrainConfig,
    *,
    arch_extra: dict[str, Any] | None = None,
    desc: str = "teacher",
    checkpoint: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a model with cross-entropy; returns the model and its builder kwargs."""
    seed_everything(cfg.seed)
    kwargs = arch_kwargs_for(ds.input_shape, ds.num_classes, **(arch_extra or {}))
    model = build_model(arch, **kwargs)

    def step(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(model(xb), yb)

    return fit(model, ds, step, cfg, desc=desc, checkpoint=checkpoint), kwargs


def save_model(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    ds: Dataset,
    metrics: dict[str, Any],
    train_config: TrainConfig | None = None,
) -> Path:
    """A (teacher) checkpoint: `model.safetensors` + `model.json` (arch, normalization, data digest)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
        str(out / "model.safetensors"),
    )
    meta = {
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "dataset": ds.name,
        "input_shape": list(ds.input_shape),
        "class_names": ds.class_names,
        "normalization": ds.normalization,
        "data_digest": ds.digest(),
        "metrics": metrics,
        "train_config": asdict(train_config) if train_config else None,
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    p = Path(path)
    meta = json.loads((p / "model.json").read_text())
    model = build_model(meta["arch"], **meta["arch_kwargs"])
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    return model.to(device).eval(), meta
