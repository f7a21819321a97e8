"""Training on several processes: `torchrun --nproc-per-node N -m sdb train-teacher|box|distill ...`.

How the processes cooperate (used by `training.fit`; a no-op in a single process):

- Joining: `session(device)` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and initializes the default
  process group: NCCL with one GPU per process (cuda:LOCAL_RANK) when training runs on CUDA, gloo on CPU.
- Data: every rank draws the same permutation (same seed), cuts each global minibatch into WORLD_SIZE
  contiguous shards (`shard`) and runs the step function on its own shard. The global batch size, the number
  of optimizer steps per epoch and the learning rate are those of one process.
- Gradients: after `backward()` each rank scales its gradients by its share of the global batch and they are
  summed across ranks (`all_reduce_gradients`), so every rank steps with the gradient of the mean loss over
  the whole global batch, as one process would (exactly, for losses that are means over samples). This is
  done explicitly instead of through DistributedDataParallel: DDP only synchronizes gradients of forward
  passes through its wrapper, and the step functions (the box's `box.heads(...)`, the students' closures)
  call the bare module. Parameters and buffers start equal (broadcast from rank 0) and stay equal because
  every rank applies the same update.
- BatchNorm: each rank normalizes with the statistics of its own shard while training (as DDP does without
  SyncBatchNorm; small shards on many GPUs want a larger --batch), and the running statistics are averaged
  across ranks after every epoch, so every rank holds the same model; it is broadcast from rank 0 at the end.
- Side effects: rank 0 alone shows progress bars, writes checkpoints and artifacts, evaluates and prints;
  the others wait at a barrier. Resumable checkpoints are read by every rank, so they must lie on a file
  system all ranks see (one machine, or a shared mount).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")

_BUCKET_ELEMENTS = 1 << 24  # gradients are summed in flat buckets of at most this many elements


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets WORLD_SIZE) with more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto") -> str:
    """Join the process group torchrun describes (if any); returns the device this process trains on.

    Without torchrun (or with one process) nothing happens and `device` comes back unchanged."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= local:
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def session(device: str = "auto") -> Iterator[str]:
    """`init` for the duration of a command; the group is destroyed at the end (after a barrier)."""
    dev = init(device)
    try:
        yield dev
    except BaseException:
        # No barrier: the other ranks may never reach it; torchrun stops them when this process fails.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if launched():
        shutdown()


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled; e.g. a freshly generated box key)."""
    if not active():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def from_main(fn: Callable[[], Tensor]) -> Tensor:
    """fn() run on rank 0 only, its tensor sent to every rank (on CPU): e.g. the teacher's answers for a
    transfer set, asked once (a remote teacher sees the same requests as with one process)."""
    if not active():
        return fn()
    out = fn().cpu() if is_main() else None
    meta: tuple[tuple[int, ...], torch.dtype] | None = (
        (tuple(out.shape), out.dtype) if out is not None else None
    )
    meta = broadcast_object(meta)
    assert meta is not None
    shape, dtype = meta
    buf = (out if out is not None else torch.empty(shape, dtype=dtype)).to(_comm_device()).contiguous()
    dist.broadcast(buf, src=0)
    return buf.cpu()


def shard(n: int) -> slice:
    """This rank's contiguous part of a global batch of n samples (sizes differ by at most one)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if not active():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def average_buffers(model: nn.Module) -> None:
    """Floating-point buffers (BatchNorm running statistics) averaged across ranks."""
    if not active():
        return
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b.data)
                b.data /= world_size()


def all_reduce_sum(values: list[float]) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def _buckets(params: list[nn.Parameter]) -> Iterator[list[int]]:
    """Indices of params grouped by (device, dtype), cut into buckets of bounded size."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for idxs in groups.values():
        bucket: list[int] = []
        size = 0
        for i in idxs:
            if bucket and size + params[i].numel() > _BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(i)
            size += params[i].numel()
        if bucket:
            yield bucket


def all_reduce_gradients(parameters: Iterable[nn.Parameter], weight: float) -> None:
    """Every rank's gradients become sum over ranks of weight_r * grad_r (weight_r: this rank's share of the
    global batch). A parameter that got no gradient on any rank keeps `grad = None` (as in one process, the
    optimizer then leaves it alone); one that got a gradient on some ranks only counts zeros for the
    others."""
    if not active():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    dev = _comm_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(has)
    any_grad = has.cpu().tolist()
    with torch.no_grad():
        for bucket in _buckets(params):
            parts = []
            for i in bucket:
                g = params[i].grad
                parts.append(
                    g.reshape(-1) * weight if g is not None else params[i].new_zeros(params[i].numel())
                )
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            offset = 0
            for i in bucket:
                p = params[i]
                n = p.numel()
                if any_grad[i]:
                    p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
