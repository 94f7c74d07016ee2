"""Logger factories. W&B never prompts and never hangs: without credentials or network it runs
offline and says how to sync; a resumed run keeps its W&B run id."""

from __future__ import annotations

import netrc
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

WANDB_HOST = "api.wandb.ai"
RUN_ID_FILE = "wandb_run_id.txt"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``online``/``offline``/``disabled`` as asked; ``auto`` picks online only when an API key
    is configured and the W&B host answers within 2 s. ``WANDB_MODE`` in the environment wins."""
    allowed = ("auto", "online", "offline", "disabled")
    if mode not in allowed:
        raise ValueError(f"logger.wandb.mode must be one of {allowed}, got {mode!r}")
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if mode != "auto":
        return mode
    if _has_wandb_credentials() and _reachable(WANDB_HOST):
        return "online"
    return "offline"


def wandb_logger(
    project: str = "ddpm",
    save_dir: str = ".",
    mode: str = "auto",
    id: str | None = None,  # noqa: A002 - W&B's name
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger`` that cannot block: offline without credentials/network, never prompts.

    The run id is written to ``<save_dir>/wandb_run_id.txt`` so a resumed run (same run
    directory, or ``id=...``) continues the same W&B run.
    """
    resolved = resolve_wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = resolved  # also for child processes (DDP ranks)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / RUN_ID_FILE
    if id is None and id_file.exists():
        id = id_file.read_text().strip() or None
    if id is None:
        id = uuid.uuid4().hex[:8]
    id_file.write_text(id)
    if resolved == "offline":
        rank_zero_info(
            f"W&B is offline (no credentials or no network). Sync later with: wandb sync "
            f"{Path(save_dir) / 'wandb'}/offline-run-*"
        )
    settings = kwargs.pop("settings", None)
    if settings is None:
        import wandb

        settings = wandb.Settings(init_timeout=60, console="off", x_disable_stats=True)
    if resolved == "offline" and kwargs.get("log_model"):
        kwargs["log_model"] = False  # cannot upload checkpoints offline
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        id=id,
        offline=resolved == "offline",
        mode=resolved,
        settings=settings,
        **kwargs,
    )
