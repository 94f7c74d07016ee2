"""Which process is global rank 0, judged from the environment before any Trainer exists."""

from __future__ import annotations

import os

# Set for the other ranks by Lightning's DDP launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK,
# GROUP_RANK) and SLURM / submitit (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 (the one that writes a run's shared files)."""
    return all(os.environ.get(var) in (None, "", "0") for var in RANK_VARIABLES)
