"""Which process does what: global rank 0 judged from the environment before any process group
exists (:func:`is_launch_rank_zero`), and work sharded across processes with its results gathered,
with plain ``torch.distributed``.

Lightning's Trainer (DDP) and Fabric both initialise the default process group, so the same
helpers serve the in-training callbacks, ``sample.py`` and ``evaluate.py``. Without a process group
they are the single-process identity. Rank r takes the contiguous block :func:`shard` of the
items; :func:`gather_rows` concatenates the blocks in rank order, which restores the global order,
so the result does not depend on the number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

# Set for the other ranks by Lightning's DDP launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK,
# GROUP_RANK) and SLURM / submitit (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 (the one that writes a run's shared files), judged
    from the environment: usable before any Trainer or process group exists."""
    return all(os.environ.get(var) in (None, "", "0") for var in RANK_VARIABLES)


def external_launch() -> tuple[int, int] | None:
    """(global rank, world size) when a launcher started every rank at once, judged from the
    environment before any process group exists: torchrun's RANK and WORLD_SIZE, or srun's
    SLURM_PROCID and SLURM_NTASKS (unless the job is named bash or interactive, as Lightning's
    SLURMEnvironment judges); None otherwise: one process, or a rank Lightning's own launcher
    starts when fitting begins (it sets LOCAL_RANK and WORLD_SIZE, not RANK)."""
    env = os.environ
    if env.get("RANK") and env.get("WORLD_SIZE"):
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if (
        env.get("SLURM_PROCID")
        and env.get("SLURM_NTASKS")
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    ):
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return None


def launch_local_rank() -> int:
    """This process's rank on its node, judged from the environment: ``LOCAL_RANK`` (torchrun,
    Lightning's own launcher) or srun's ``SLURM_LOCALID`` (of a launch :func:`external_launch`
    sees); 0 for one process."""
    env = os.environ
    if env.get("LOCAL_RANK"):
        return int(env["LOCAL_RANK"])
    if external_launch() is not None and env.get("SLURM_LOCALID"):
        return int(env["SLURM_LOCALID"])
    return 0


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``; block sizes differ by at most one."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return range(n * rank // world, n * (rank + 1) // world)


def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` (N_r, ...) along dim 0 in rank order, on every rank (CPU).

    Ranks may hold different numbers of rows (padded for the collective, then trimmed)."""
    x = x.detach().cpu()
    rank, world = rank_and_world()
    if world == 1:
        return x
    dev = _collective_device()
    counts = torch.zeros(world, dtype=torch.long, device=dev)
    counts[rank] = x.shape[0]
    dist.all_reduce(counts)
    per = int(counts.max())
    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(c)].cpu() for o, c in zip(out, counts.tolist())])


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over the ranks (CPU copy); ``x`` itself without a process group."""
    if rank_and_world()[1] == 1:
        return x
    y = x.detach().to(_collective_device()).clone()
    dist.all_reduce(y)
    return y.cpu()


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (a collective decision)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.long)
    return int(all_reduce_sum(t)) == 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_zero_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks (a download into a shared directory happens
    once). Collective; if rank 0 fails, every rank raises."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"failed on rank 0: {failed}")
    return fn() if rank != 0 else result


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
