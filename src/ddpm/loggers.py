"""Loggers, and W&B the way its users know it.

:func:`wandb_logger` (``logger=wandb``) starts the W&B run on global rank 0 when the logger is
built, with system metrics and console capture on (switchable), the run URL printed, a
multirun job grouped by its sweep and named by its overrides, and checkpoints uploaded as
artifacts when online and asked for (``log_model``). It never prompts and never hangs: ``auto``
mode goes online only with credentials for the configured server (``WANDB_BASE_URL`` /
``wandb login --host``) that answers, and falls back to offline (printing the ``wandb sync``
command) whenever the online start fails. A resumed run keeps its W&B run id: only rank 0 writes
``<run dir>/wandb_run_id.txt``; the other ranks read the id from the environment rank 0 sets
before Lightning starts them, or from that file.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger

from ddpm.run.checkpoint_files import source_run_dir
from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
RUN_ID_ENV = "DDPM_WANDB_RUN_ID"  # set by rank 0 for the ranks Lightning starts after it
MODES = ("auto", "online", "offline", "disabled")
PROBE_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------- online or not
def _netrc_has(hosts: list[str]) -> bool:
    path = os.environ.get("NETRC") or None
    try:
        entries = netrc.netrc(path)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(entries.authenticators(h) for h in hosts)


def has_wandb_credentials(settings: Any) -> bool:
    """Whether W&B has credentials for ``settings.base_url`` without asking anyone: an API key
    or identity token in the environment, an ``api_key`` in W&B's settings files, or a
    ``.netrc`` entry for the server (``wandb login`` writes it)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if getattr(settings, "api_key", None):
        return True
    import wandb

    hosts = [urlsplit(settings.base_url).netloc]
    if settings.base_url == wandb.Settings().base_url:  # W&B's cloud: `wandb login` host
        hosts.append("api.wandb.ai")
    return _netrc_has(hosts)


def server_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the server of ``url`` (or to the proxy that requests to it
    would use) opens within ``timeout`` seconds."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname, p.port or 80
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> tuple[str, str]:
    """``(mode, reason)``: ``online``/``offline``/``disabled`` as asked (``WANDB_MODE`` in the
    environment wins); ``auto`` and ``online`` go online only when W&B has credentials for its
    configured server and that server answers within 2 s (never a login prompt, never a wait for
    a server that is down). ``reason`` says why a run is offline."""
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode must be one of {list(MODES)}, got {mode!r}")
    env = os.environ.get("WANDB_MODE")
    if env == "":
        del os.environ["WANDB_MODE"]  # empty means unset; W&B itself would reject it
    elif env not in (None, "online", "offline", "disabled", "dryrun"):
        raise ValueError(f"WANDB_MODE={env} is not a W&B mode: use online, offline or disabled")
    if env in ("offline", "disabled", "dryrun"):
        return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
    if env == "online":
        mode = "online"
    if mode in ("offline", "disabled"):
        return mode, f"logger.wandb.mode={mode}"
    import wandb

    try:
        settings = wandb.setup().settings  # W&B's own view: settings files, WANDB_BASE_URL, ...
    except Exception as e:  # e.g. an unreadable W&B settings file
        return "offline", f"W&B's settings cannot be read ({type(e).__name__}: {e})"
    if settings.mode in ("offline", "dryrun", "disabled"):
        return ("disabled" if settings.mode == "disabled" else "offline"), "`wandb offline` is set"
    if not has_wandb_credentials(settings):
        why = "no W&B credentials (run `wandb login` or set WANDB_API_KEY)"
        if mode == "online":
            log.warning("logger.wandb.mode=online, but %s: logging offline", why)
        return "offline", why
    if not server_answers(settings.base_url):
        why = f"the W&B server {settings.base_url} did not answer"
        if mode == "online":
            log.warning("logger.wandb.mode=online, but %s: logging offline", why)
        return "offline", why
    return "online", ""


# ---------------------------------------------------------------------------- run id
def _read_id(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def shared_run_id(save_dir: Path, given: str | None = None) -> str | None:
    """This run's W&B id. Rank 0: ``given``, else the id in ``<save_dir>/wandb_run_id.txt`` (a
    resumed run), else a new one; it writes the file and exports :data:`RUN_ID_ENV` for the
    ranks started after it. Other ranks never write: ``given``, the environment, or the file."""
    path = save_dir / RUN_ID_FILE
    if not is_launch_rank_zero():
        return given or os.environ.get(RUN_ID_ENV) or _read_id(path)
    run_id = given or _read_id(path) or uuid.uuid4().hex[:8]
    if _read_id(path) != run_id:
        save_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}")
        tmp.write_text(run_id)
        os.replace(tmp, path)
    os.environ[RUN_ID_ENV] = run_id
    return run_id


def carry_over_wandb_id(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> str | None:
    """Continuing another directory's checkpoint continues its W&B run: copy its run id into this
    run directory (where :func:`wandb_logger` looks) unless one is set already. Rank 0 only.
    Returns the id carried over."""
    loggers = cfg.get("logger") or {}
    wandb_nodes = [
        n
        for n in loggers.values()
        if isinstance(n, (dict, DictConfig)) and "wandb" in str(n.get("_target_", "")).lower()
    ]
    if ckpt_path is None or not wandb_nodes or any(n.get("id") for n in wandb_nodes):
        return None
    ckpt = Path(ckpt_path).resolve()
    if not is_launch_rank_zero() or ckpt.is_relative_to(run_dir.resolve()):
        return None
    if (run_dir / RUN_ID_FILE).exists():
        return None
    source = source_run_dir(ckpt)
    run_id = _read_id(source / RUN_ID_FILE)
    if run_id:
        shared_run_id(run_dir, run_id)
        log.info("continuing W&B run %s of %s", run_id, source)
    return run_id


# ---------------------------------------------------------------------------- the logger
def sweep_group_and_name() -> tuple[str | None, str | None]:
    """For a job of a Hydra multirun: the sweep (its directory's name) as the W&B group and the
    job's overrides (``hydra.job.override_dirname``) as its name; (None, None) otherwise."""
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    name = hc.job.override_dirname or f"job{hc.job.num}"
    return f"sweep-{Path(hc.sweep.dir).name}", name[:128]


def _init_run(init: dict[str, Any], mode: str, settings: Any) -> Any:
    """``wandb.init``; an online start that fails (server down, bad key, timeout) goes offline
    rather than ending the training run."""
    import wandb

    try:
        return wandb.init(mode=mode, settings=settings, **init)
    except Exception as e:
        if mode != "online":
            raise
        log.warning(
            "W&B could not start online (%s: %s); logging offline. Sync later with: "
            "wandb sync %s/wandb/offline-run-*",
            type(e).__name__,
            e,
            init["dir"],
        )
        return wandb.init(mode="offline", settings=settings, **init)


def wandb_logger(
    project: str = "ddpm",
    save_dir: str = ".",
    mode: str = "auto",
    id: str | None = None,  # noqa: A002 - W&B's name
    name: str | None = None,
    group: str | None = None,
    entity: str | None = None,
    tags: list[str] | None = None,
    job_type: str | None = None,
    notes: str | None = None,
    log_model: bool | str = False,
    system_metrics: bool = True,
    console: str = "auto",
    init_timeout: float = 90.0,
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` whose W&B run is started here (rank 0), never prompting.

    Args:
        mode: ``auto`` (online with credentials and a server that answers, else offline),
            ``online``, ``offline`` or ``disabled``; ``WANDB_MODE`` wins.
        name, group: default to the job's overrides and its sweep in a Hydra multirun.
        log_model: upload checkpoints as artifacts (``true``: at the end; ``all``: as written);
            online only (offline runs keep them on disk).
        system_metrics: W&B's CPU/GPU/memory charts. console: W&B's console capture
            (``auto``, ``wrap``, ``redirect``, ``off``).
        kwargs: further ``WandbLogger`` arguments (``prefix``, ``checkpoint_name``, ...).
    """
    resolved, reason = resolve_wandb_mode(mode) if is_launch_rank_zero() else ("offline", "")
    save = Path(save_dir)
    run_id = shared_run_id(save, id)
    sweep_group, sweep_name = sweep_group_and_name()
    init = {
        "project": project,
        "entity": entity,
        "name": name or sweep_name,
        "group": group or sweep_group,
        "tags": list(tags) if tags else None,
        "job_type": job_type,
        "notes": notes,
        "dir": str(save),
        "id": run_id,
        "resume": "allow",
        "reinit": "finish_previous",  # a run left open by an earlier job never absorbs this one
    }
    if log_model and resolved != "online":
        if is_launch_rank_zero():
            log.info(
                "W&B is not online: checkpoints stay on disk (log_model=%s ignored)", log_model
            )
        log_model = False
    common = {"project": project, "save_dir": str(save), "log_model": log_model, **kwargs}
    if not is_launch_rank_zero():  # Lightning gives the other ranks a dummy experiment
        return WandbLogger(id=run_id, name=init["name"], **common)

    import wandb

    settings = wandb.Settings(
        init_timeout=init_timeout, console=console, x_disable_stats=not system_metrics
    )
    run = _init_run(init, resolved, settings)
    # Lightning's own x-axis for its metrics (what WandbLogger sets up when it starts the run).
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    if not run.offline and not run.disabled:
        log.info("W&B run: %s", run.url)
    elif run.offline and resolved == "offline":
        log.info(
            "W&B is offline: %s. Sync later with: wandb sync %s/wandb/offline-run-*", reason, save
        )
    return WandbLogger(experiment=run, id=run.id, **common)


def log_hyperparameters(trainer: pl.Trainer, module: pl.LightningModule, config: dict) -> None:
    """Log the resolved run config and the parameter counts (``model/params/total``,
    ``trainable``, ``non_trainable``) to every logger of ``trainer``."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    hparams = {
        **config,
        "model/params/total": total,
        "model/params/trainable": trainable,
        "model/params/non_trainable": total - trainable,
    }
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)


def finish_wandb(trainer: pl.Trainer, exit_code: int, preempted: bool = False) -> None:
    """End this process's W&B run with the fit, so the next ``train()`` in the same process (a
    Hydra multirun, a test) starts its own run instead of logging into this one."""
    if not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return
    try:
        import wandb

        if wandb.run is not None:
            if preempted:
                wandb.run.mark_preempting()
            wandb.finish(exit_code=exit_code)
    except Exception as e:  # a logger must never turn a result into a crash
        log.warning("could not finish the W&B run: %s: %s", type(e).__name__, e)
