"""The removal attempts of the traceability evaluation: a licensee's leaked student re-tempered, trained on
hard labels, fine-tuned on true labels, distilled again (a second generation), queried through input noise,
and two colluders averaging their soft labels; each traced like any other student (`sdb_core.trace_eval`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdb_core.data import Dataset
from sdb_core.distill import distill_logits
from sdb_core.evaluate import EvalConfig, parse_student
from sdb_core.trace_report import own_line
from sdb_core.trace_setup import TraceEvalConfig, query, student_distill_config
from sdb_core.training import TrainConfig, fit, model_fn
from sdb_core.watermark import Watermark, apply_watermark


def removal_attempts(
    cfg: EvalConfig,
    tcfg: TraceEvalConfig,
    transfer: Dataset,
    wms: list[Watermark],
    *,
    soft_of: Callable[[np.ndarray], Tensor],
    traced: Callable[..., dict[str, Any]],
    traced_own: Callable[..., dict[str, Any]] | None = None,
    top1: Callable[[Callable[[Tensor], Tensor]], float],
    seed: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each removal attempt against licensee 0's soft labels with the protocol's last student family, traced
    on fresh probes and, with `traced_own`, on the transfer images the licensee sent (1x probes only)."""
    spec = cfg.students[-1]
    arch, extra = parse_student(spec)
    t = cfg.temperature
    xt = transfer.x_train
    soft = soft_of(xt)
    wm0, wm1 = wms[0], wms[1]
    marked0 = apply_watermark(wm0, torch.from_numpy(xt), soft)
    marked1 = apply_watermark(wm1, torch.from_numpy(xt), soft)
    base = student_distill_config(cfg, tcfg, len(xt), seed, spec)
    out: list[dict[str, Any]] = []

    def record(
        name: str,
        st_fn: Callable[[Tensor], Tensor],
        leakers: tuple[str, ...],
        note: str = "",
        *,
        many: bool = False,
    ) -> None:
        rec = {
            "attack": name,
            "family": spec,
            "transfer": len(xt),
            "top1": top1(st_fn),
            "note": note,
            **traced(st_fn, leakers, many=many),
        }
        if traced_own is not None and not many:
            rec["own_images"] = traced_own(st_fn, transfer, leakers)
        out.append(rec)
        lk = rec["leakers"]
        log(
            f"removal {name}: "
            + ", ".join(f"{w} rank {v['rank']} log10p {v['log10_corrected_p']:.1f}" for w, v in lk.items())
            + f" framed {rec['framed']}"
            + "".join(own_line(rec, w) for w in lk)
        )

    logits0 = t * torch.log(marked0.clamp_min(1e-30))
    leaked = distill_logits(transfer, arch, logits0, base, arch_extra=extra, desc="removal base")
    leaked_fn = model_fn(leaked, transfer)
    record("none", leaked_fn, (wm0.wid,))
    for t2 in tcfg.retemper:
        st = distill_logits(
            transfer, arch, logits0, replace(base, temperature=t2), arch_extra=extra, desc=f"retemper {t2}"
        )
        record(
            f"retemper:{t2:g}",
            model_fn(st, transfer),
            (wm0.wid,),
            "KD at this temperature from the licensee's soft labels",
        )
    hard = F.one_hot(marked0.argmax(1), transfer.num_classes).float() * 20.0
    st = distill_logits(transfer, arch, hard, base, arch_extra=extra, desc="argmax")
    record(
        "argmax_only",
        model_fn(st, transfer),
        (wm0.wid,),
        "out of reach: the mark never changes the top-1, so hard labels carry none of it",
    )
    # Fine-tune the leaked student on 10 % of the transfer set with true labels.
    ft = _copy(leaked)
    n_ft = max(1, len(xt) // 10)
    sub = transfer.subset(np.arange(n_ft), "finetune")

    def ce(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(ft(xb), yb)

    fit(
        ft,
        sub,
        ce,
        TrainConfig(epochs=tcfg.finetune_epochs, lr=0.01, seed=seed, device=cfg.device, progress=False),
        desc="finetune",
    )
    record(
        "finetune_10pct_labels",
        model_fn(ft, transfer),
        (wm0.wid,),
        f"{tcfg.finetune_epochs} epochs, lr 0.01, on {n_ft} true labels",
    )
    second = distill_logits(
        transfer, arch, query(leaked_fn, xt), base, arch_extra=extra, desc="second generation"
    )
    record(
        "second_generation",
        model_fn(second, transfer),
        (wm0.wid,),
        "a student of the leaked student, same transfer images",
    )
    std = torch.tensor(transfer.std).view(-1, 1, 1)
    gen = torch.Generator().manual_seed(seed)

    def noisy(x: Tensor) -> Tensor:
        return leaked_fn(x + tcfg.noise_std * std * torch.randn(x.shape, generator=gen))

    record(
        f"input_noise:{tcfg.noise_std:g}",
        noisy,
        (wm0.wid,),
        "Gaussian noise on every probe, in units of the data's std",
    )
    avg = (marked0 + marked1) / 2
    st = distill_logits(
        transfer, arch, t * torch.log(avg.clamp_min(1e-30)), base, arch_extra=extra, desc="colluders"
    )
    col_fn = model_fn(st, transfer)
    record("colluders_average", col_fn, (wm0.wid, wm1.wid), "1x probes")
    record(
        "colluders_average", col_fn, (wm0.wid, wm1.wid), f"{tcfg.colluder_probe_factor}x probes", many=True
    )
    return out


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
