"""torch.distributed glue: init from torchrun's environment, rank queries, gathers.

Launch with ``torchrun --nproc_per_node N -m <domain>.train ...``; there is no launcher of our
own. Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper degrades to the
single-process answer, so samplers and evaluation code can call :func:`gather` unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_LOCAL = [0]  # depth of local() blocks


def is_distributed() -> bool:
    return _LOCAL[0] == 0 and dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within the block this process acts alone: every helper gives the single-process answer and
    :func:`init_distributed` joins no group, so a nested :class:`~core.engine.trainer.Trainer` (e.g. an
    evaluation classifier trained by rank 0 alone, after the run) makes no collective call the other
    ranks would never answer."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); False when not launched so.

    The CUDA device of this rank must already be chosen (``device``, from ``LOCAL_RANK``).
    """
    if is_distributed():
        return True
    if _LOCAL[0] or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average of ``t`` over ranks (a new tensor; ``t`` itself when single-process)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (shape ``(n_r, ...)``, ``n_r`` may differ per rank) along dim 0 in rank order.

    Every rank receives the full ``(sum n_r, ...)`` tensor; single-process returns ``t``. Used
    by samplers and evaluation to collect per-rank shards of samples or metrics.
    """
    if not is_distributed():
        return t
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    biggest = max(counts)
    if t.shape[0] < biggest:
        pad = t.new_zeros((biggest - t.shape[0], *t.shape[1:]))
        t = torch.cat([t, pad])
    out = t.new_empty((biggest * len(counts), *t.shape[1:]))
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.1x
    gather_single(out, t)
    return torch.cat([out[i * biggest: i * biggest + c] for i, c in enumerate(counts)])


def shard_range(n: int) -> range:
    """The indices ``0..n-1`` this rank handles when ``n`` items are split over ranks (contiguous)."""
    ws, r = world_size(), rank()
    per = -(-n // ws)
    return range(min(r * per, n), min((r + 1) * per, n))
