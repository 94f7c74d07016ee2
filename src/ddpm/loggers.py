"""Loggers, and W&B the way its users know it.

:func:`wandb_logger` (``logger=wandb``) starts the W&B run on global rank 0 when the logger is
built, with system metrics and console capture on (switchable), the run URL printed, a
multirun job grouped by its sweep and named by its overrides, W&B's own environment variables
(``WANDB_PROJECT``, ``WANDB_RUN_GROUP``, ...) winning over the config as in every W&B
integration, the best value of each validation metric as its summary, and checkpoints uploaded
as artifacts when asked for (``log_model``; offline runs stage them for ``wandb sync``). It
never prompts and never hangs: ``auto`` mode goes online only with credentials for the
configured server (``WANDB_BASE_URL`` / ``wandb login --host``) that answers, and falls back to
offline (printing the ``wandb sync`` command) whenever the online start fails. A resumed run
keeps its W&B run: only rank 0 writes ``<run dir>/wandb_run.json`` (id, project, entity,
group: what ``evaluate.py`` and ``sample.py`` log into); the other ranks read the id from the
environment rank 0 sets before Lightning starts them, or from that file.

The CSV logger appends to ``metrics.csv`` when a run resumes (Lightning's deletes it), and the
TensorBoard logger of a resumed run hides the events of the steps it redoes (``purge_step``).
"""

from __future__ import annotations

import csv
import json
import logging
import netrc
import os
import socket
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from ddpm.run.checkpoint_files import source_run_dir
from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)

RUN_FILE = "wandb_run.json"  # the run's W&B identity: id, project, entity, group
RUN_ID_ENV = "DDPM_WANDB_RUN_ID"  # set by rank 0 for the ranks Lightning starts after it
MODES = ("auto", "online", "offline", "disabled")
PROBE_TIMEOUT_S = 2.0
STEP_METRIC = "trainer/global_step"  # Lightning's x-axis of every metric
# W&B's own environment variables, which win over the config (as in W&B's other integrations)
ENV_SETTINGS = {
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "group": "WANDB_RUN_GROUP",
    "tags": "WANDB_TAGS",
    "job_type": "WANDB_JOB_TYPE",
    "name": "WANDB_NAME",
    "notes": "WANDB_NOTES",
    "dir": "WANDB_DIR",
    "id": "WANDB_RUN_ID",
}
# The summary of a validation / evaluation metric is its best value: higher is better for these,
# lower for losses (``loss*``), bounds in bits/dim (``*_bpd``) and these distances.
HIGHER_IS_BETTER = ("is", "precision", "recall")
LOWER_IS_BETTER = ("mse", "vb", "fid", "kid", "energy_distance", "mmd")


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


# ---------------------------------------------------------------------------- run identity
def read_identity(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``<run_dir>/wandb_run.json``: the run's W&B ``id``, and once its run started, the
    ``project``, ``entity`` and ``group`` W&B used ({} when the run has no W&B run)."""
    try:
        identity = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return identity if isinstance(identity, dict) and identity.get("id") else {}


def _write_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def shared_run_id(save_dir: Path, given: str | None = None) -> str | None:
    """This run's W&B id. Rank 0: ``given``, else the id in ``<save_dir>/wandb_run.json`` (a
    resumed run), else a new one; it writes the file and exports :data:`RUN_ID_ENV` for the
    ranks started after it. Other ranks never write: ``given``, the environment, or the file."""
    stored = read_identity(save_dir).get("id")
    if not is_launch_rank_zero():
        return given or os.environ.get(RUN_ID_ENV) or stored
    run_id = given or stored or uuid.uuid4().hex[:8]
    if stored != run_id:
        _write_identity(save_dir, {"id": run_id})
    os.environ[RUN_ID_ENV] = run_id
    return run_id


def record_identity(save_dir: Path, run: Any) -> None:
    """Write the started W&B run's ``id``, ``project``, ``entity`` and ``group`` to
    ``<save_dir>/wandb_run.json`` (rank 0): where evaluate.py and sample.py find the run."""
    identity = {
        "id": run.id,
        "project": run.project or None,
        "entity": run.entity or None,
        "group": run.group or None,
    }
    if read_identity(save_dir) != identity:
        _write_identity(save_dir, identity)


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
    if read_identity(run_dir):
        return None
    source = source_run_dir(ckpt)
    identity = read_identity(source)
    if identity:
        _write_identity(run_dir, identity)
        os.environ[RUN_ID_ENV] = identity["id"]
        log.info("continuing W&B run %s of %s", identity["id"], source)
    return identity.get("id")


# ---------------------------------------------------------------------------- summaries
def metric_goal(key: str) -> str | None:
    """``min`` or ``max``: how the best value of a validation or evaluation metric (``val/*``,
    ``eval/*``) is chosen for the run's summary; None for anything else (training curves,
    standard deviations, counts)."""
    section, _, name = key.rpartition("/")
    if section not in ("val", "eval") or name.endswith("_std"):
        return None
    if name in HIGHER_IS_BETTER:
        return "max"
    if name in LOWER_IS_BETTER or name.startswith("loss") or name.endswith("_bpd"):
        return "min"
    return None


def define_summaries(run: Any, keys: Any, defined: set[str]) -> None:
    """``define_metric`` each new key of ``keys`` that has a goal (:func:`metric_goal`), so its
    summary is the best value (W&B's summary is otherwise the last one logged). W&B's glob
    patterns take no summary, hence one definition per metric, made when it first appears."""
    for key in keys:
        if key in defined:
            continue
        defined.add(key)
        goal = metric_goal(key)
        if goal is not None:
            run.define_metric(key, step_metric=STEP_METRIC, step_sync=True, summary=goal)


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


def init_wandb_run(init: dict[str, Any], mode: str, settings: Any) -> Any:
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


def env_settings() -> dict[str, Any]:
    """The W&B settings a user set through W&B's own environment variables
    (:data:`ENV_SETTINGS`; ``WANDB_TAGS`` is comma-separated)."""
    out: dict[str, Any] = {}
    for key, var in ENV_SETTINGS.items():
        value = os.environ.get(var)
        if value:
            out[key] = (
                [t.strip() for t in value.split(",") if t.strip()] if key == "tags" else value
            )
    return out


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

    W&B's environment variables win over these arguments (:data:`ENV_SETTINGS`: e.g.
    ``WANDB_PROJECT``, ``WANDB_RUN_GROUP``, ``WANDB_RUN_ID``, ``WANDB_DIR``).

    Args:
        mode: ``auto`` (online with credentials and a server that answers, else offline),
            ``online``, ``offline`` or ``disabled``; ``WANDB_MODE`` wins.
        save_dir: the run directory (``wandb_run.json`` goes there, and W&B's files under
            ``wandb/`` unless ``WANDB_DIR`` says otherwise).
        name, group: default to the job's overrides and its sweep in a Hydra multirun.
        log_model: upload the checkpoints of every checkpoint callback as artifacts (``true``:
            at the end of the fit, also one stopped by a signal; ``all``: as written). Offline,
            W&B stages a copy of each for ``wandb sync``.
        system_metrics: W&B's CPU/GPU/memory charts. console: W&B's console capture
            (``auto``, ``wrap``, ``redirect``, ``off``).
        kwargs: further ``WandbLogger`` arguments (``prefix``, ``checkpoint_name``, ...).
    """
    if log_model not in (True, False, "all"):
        raise ValueError(f"logger.wandb.log_model must be true, false or all, got {log_model!r}")
    resolved, reason = resolve_wandb_mode(mode) if is_launch_rank_zero() else ("offline", "")
    save = Path(save_dir)
    env = env_settings()
    run_id = shared_run_id(save, env.get("id") or id)
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
        **env,
        "id": run_id,
        "resume": "allow",
        "reinit": "finish_previous",  # a run left open by an earlier job never absorbs this one
    }
    common = {"project": init["project"], "save_dir": str(save), "log_model": log_model, **kwargs}
    if not is_launch_rank_zero():  # Lightning gives the other ranks a dummy experiment
        return RunLogger(id=run_id, name=init["name"], **common)

    import wandb

    Path(init["dir"]).mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        init_timeout=init_timeout, console=console, x_disable_stats=not system_metrics
    )
    run = init_wandb_run(init, resolved, settings)
    # Lightning's own x-axis for its metrics (what WandbLogger sets up when it starts the run).
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
    if not run.disabled:
        record_identity(save, run)
    if not run.offline and not run.disabled:
        log.info("W&B run: %s", run.url)
    elif run.offline and resolved == "offline":
        log.info(
            "W&B is offline: %s. Sync later with: wandb sync %s/wandb/offline-run-*-%s%s",
            reason,
            init["dir"],
            run.id,
            " (the checkpoints logged as artifacts are staged for it)" if log_model else "",
        )
    return RunLogger(experiment=run, id=run.id, **common)


class RunLogger(WandbLogger):
    """Lightning's ``WandbLogger`` with the best value of each validation metric as its summary
    (:func:`define_summaries`) and every checkpoint callback's files as artifacts
    (:meth:`log_checkpoints`): the ``ModelCheckpoint``s' step and best files and ``last.ckpt``,
    also the one written when a signal stops the run (Lightning logs only on success, only the
    files of ``ModelCheckpoint``s that saved during the fit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._defined: set[str] = set()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._experiment is not None and not self._experiment.disabled:
            define_summaries(self._experiment, metrics, self._defined)
        super().log_metrics(metrics, step)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if self._log_model == "all":
            self._log_files(_callback_files(checkpoint_callback))

    def finalize(self, status: str) -> None:
        """Nothing here: :func:`finish_wandb` logs the checkpoints, after a stop signal too."""

    def log_checkpoints(self, trainer: pl.Trainer) -> None:
        """Log every checkpoint file of ``trainer``'s checkpoint callbacks that is new or was
        rewritten since it was last logged (rank 0)."""
        if not self._log_model or self._experiment is None or self._experiment.disabled:
            return
        files: dict[str, str] = {}
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                files.update(_callback_files(cb))
            elif getattr(cb, "last_saved_step", None) is not None and hasattr(cb, "last_path"):
                files[cb.last_path(trainer)] = ""  # PreemptionCheckpoint's last.ckpt
        self._log_files(files)

    def _log_files(self, files: dict[str, str]) -> None:
        """Log ``{path: "best" or ""}`` as versions of the artifact ``model-<run id>`` (the file
        is ``model.ckpt`` in it, as Lightning names it), aliased ``latest``, the file's stem
        (``last``, ``step_0000400``) and ``best`` for a best-by-metric file."""
        import wandb

        present = {p: tag for p, tag in files.items() if p and os.path.isfile(p)}
        for path in sorted(present, key=os.path.getmtime):
            mtime = os.path.getmtime(path)
            if self._logged_model_time.get(path, -1.0) >= mtime:
                continue
            name = self._checkpoint_name or f"model-{self.experiment.id}"
            metadata = {"original_filename": Path(path).name}
            artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
            artifact.add_file(path, name="model.ckpt", policy=self.add_file_policy)
            aliases = ["latest", Path(path).stem] + (["best"] if present[path] else [])
            self.experiment.log_artifact(artifact, aliases=aliases)
            self._logged_model_time[path] = mtime


def _callback_files(cb: ModelCheckpoint) -> dict[str, str]:
    """The files a ``ModelCheckpoint`` keeps: ``{path: "best"}`` for the best by its monitored
    metric (a metric, not the step), ``{path: ""}`` for the others."""
    files = dict.fromkeys([*cb.best_k_models, cb.last_model_path], "")
    if cb.best_model_path and cb.monitor not in (None, "step", "epoch"):
        files[cb.best_model_path] = "best"
    return files


class AppendingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that keeps the rows a run wrote before: a resumed run appends to
    its ``metrics.csv`` (Lightning's deletes the file when its directory is not empty). After a
    hard kill, the steps redone since the last checkpoint appear twice; the later rows are the
    ones of the continued run."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep ``metrics.csv`` and take its columns, so that new rows are appended to it."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            self.metrics_keys = list(next(csv.reader(f), []))


def continue_loggers(loggers: list[Any], resumed_step: int | None) -> None:
    """A launch that resumes from a checkpoint at ``resumed_step``: TensorBoard hides the events
    an earlier launch logged for the steps after it, which are redone (a hard kill after the
    checkpoint): ``SummaryWriter(purge_step=resumed_step)``, since Lightning logs optimizer step
    k + 1 at step k. Call before the loggers write anything."""
    if resumed_step is None:
        return
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger) and lg._experiment is None:
            lg._kwargs.setdefault("purge_step", int(resumed_step))


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
    """End this process's W&B run with the fit (after logging the checkpoints as artifacts when
    asked, also those of a fit a signal stopped), so the next ``train()`` in the same process (a
    Hydra multirun, a test) starts its own run instead of logging into this one."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    try:
        import wandb

        if exit_code == 0 and trainer.is_global_zero:
            for lg in loggers:
                if isinstance(lg, RunLogger):
                    lg.log_checkpoints(trainer)
        if wandb.run is not None:
            if preempted:
                wandb.run.mark_preempting()
            wandb.finish(exit_code=exit_code)
    except Exception as e:  # a logger must never turn a result into a crash
        log.warning("could not finish the W&B run: %s: %s", type(e).__name__, e)
