"""A resume continues the run with the run's own config.

The config a checkpoint was trained with is stored in it (the resolved config, under
:data:`ddpm.checkpoint.CONFIG_KEY`).
:func:`restore_run_config` rebuilds the resumed launch's config from it: every setting comes from
the run, except those the resume command sets explicitly *and* that may change mid-run (when to
stop, cadences, logging, paths, devices: :func:`may_change`). A command that sets anything else to
a different value (network, schedule, T, objective, optimizer, data, seed, EMA, ...) is refused
with the list of differences, unless it says ``resume_overrides=force``. A network whose weights do
not fit the checkpoint is refused in any case (:func:`check_weights_fit`), and a finished run says
how to extend it (:func:`check_not_finished`).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.checkpoint import CheckpointError, check_stored_config, shipped_targets
from ddpm.errors import ConfigError
from ddpm.run import resume_command
from ddpm.utils.config_tree import to_plain

log = logging.getLogger(__name__)

RESUME_OVERRIDES = ("refuse", "force")

# Settings a resume may change: when to stop, how often to validate, checkpoint, log and draw
# pictures, where files go, how the work is spread over devices. Prefixes of dotted paths.
_MAY_CHANGE = (
    "trainer.max_steps",
    "lr_scheduler.total_steps",  # the schedule's length: by default the run's (max_steps)
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.min_steps",
    "trainer.min_epochs",
    "trainer.log_every_n_steps",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.num_sanity_val_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.profiler",
    "trainer.default_root_dir",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.sync_batchnorm",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "data.val_batch_size",
    "data.max_val_samples",
    "data.verify_images",
    "data.cache_dir",
    "logger",
    "paths",
    "sampler",
    "tags",
    "task_name",
    "num_threads",
    "compile",
    "model.checkpointing",
    "optimized_metric",
    "run_dir",
    "ckpt_path",
    "resume_overrides",
)
# Always taken from the launch: where it runs and what it resumes.
_LAUNCH_KEYS = ("paths", "run_dir", "ckpt_path", "resume_overrides")
_GLOBAL = ""  # the prefix of every path
_MISSING = object()
# ${a.b}, also inside ${resolver:${a.b},...}; and ${oc.select:a.b,default}
_REF = re.compile(r"\$\{(?:oc\.select:)?([A-Za-z_][\w.]*)[},]")
# a whole value that is another setting: ${a.b}, ${oc.select:a.b,default}
_WHOLE_REF = re.compile(r"\$\{(?:oc\.select:)?([A-Za-z_][\w.]*)(?:,[^${}]*)?\}")


def may_change(path: str) -> bool:
    """Whether a resume may change the setting at dotted ``path`` (callbacks' settings may, except
    the EMA's, which is part of the training state)."""
    if path == "callbacks.ema" or path.startswith("callbacks.ema."):
        return False
    if path.startswith("callbacks."):
        return True
    return any(path == p or path.startswith(p + ".") for p in _MAY_CHANGE)


def _under(path: str, prefixes: set[str]) -> bool:
    return any(p == _GLOBAL or path == p or path.startswith(p + ".") for p in prefixes)


def _leaves(node: Any, path: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    return {path: node}


def touched_paths(cfg: DictConfig, overrides: list[str], choices: dict[str, Any]) -> set[str]:
    """Dotted paths the command line sets: its ``key=value`` overrides, the packages of the config
    groups it picks (a group of the global package, like ``experiment``, touches everything), and
    every setting that interpolates one of those (``${sampler}``, ``${schedule.num_timesteps}``)."""
    touched = set(_LAUNCH_KEYS)
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if o.is_hydra_override() or key.startswith("hydra"):
            continue
        if key in choices:  # a config group
            path = key.replace("/", ".")
            here = OmegaConf.select(cfg, path, default=_MISSING) is not _MISSING
            touched.add(path if here else _GLOBAL)
        else:
            touched.add(key)
    raw = _leaves(OmegaConf.to_container(cfg, resolve=False))
    raw.pop("hydra", None)
    raw = {p: v for p, v in raw.items() if not p.startswith("hydra.")}
    grew = True
    while grew:
        grew = False
        for path, value in raw.items():
            if not isinstance(value, str) or _under(path, touched):
                continue
            if any(
                _under(ref, touched) or any(t.startswith(ref + ".") for t in touched)
                for ref in _REF.findall(value)
            ):
                touched.add(path)
                grew = True
    return touched


def merge_run_config(
    current: dict, stored: dict, touched: set[str], force: bool
) -> tuple[dict, list[str]]:
    """The resumed config (plain data) and the differences a non-forced resume refuses."""
    differences: list[str] = []

    def shown(value: Any) -> str:
        return "(not set)" if value is _MISSING else repr(value)

    def merge(cur: Any, sto: Any, path: str) -> Any:
        touched_here = path != _GLOBAL and _under(path, touched)
        if touched_here and may_change(path):
            return cur
        if isinstance(cur, dict) and isinstance(sto, dict):
            # Below the root an untouched node is the run's as a whole: keys that only the
            # command's defaults have (another group's, e.g. linear's beta_start) stay out.
            extra = [k for k in cur if k not in sto] if touched_here or path == _GLOBAL else []
            out = {}
            for k in [*sto, *extra]:
                v = merge(cur.get(k, _MISSING), sto.get(k, _MISSING), f"{path}.{k}" if path else k)
                if v is not _MISSING:
                    out[k] = v
            return out
        if touched_here and cur != sto:
            differences.append(f"{path}: {shown(sto)} (the run) -> {shown(cur)} (this command)")
            return cur if force else sto
        return sto if sto is not _MISSING else cur

    return merge(current, stored, ""), differences


def restore_run_config(cfg: DictConfig, stored: dict, source: str) -> DictConfig:
    """The config of a launch that resumes the run whose resolved config is ``stored`` (from the
    checkpoint ``source``): the run's settings, plus what the command may and did change.
    :class:`ConfigError` lists the settings the command would change that define the run."""
    mode = cfg.get("resume_overrides", "refuse")
    if mode not in RESUME_OVERRIDES:
        raise ConfigError(f"resume_overrides must be one of {list(RESUME_OVERRIDES)}, got {mode!r}")
    overrides: list[str] = []
    choices: dict[str, Any] = {}
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        choices = dict(HydraConfig.get().runtime.choices)
    touched = touched_paths(cfg, overrides, choices)
    _take_recorded_classes(cfg, stored)
    merged, differences = merge_run_config(to_plain(cfg), stored, touched, mode == "force")
    _follow_references(cfg, merged, touched)
    if differences and mode != "force":
        raise ConfigError(
            f"this command would change settings of the run it resumes ({source}):\n  - "
            + "\n  - ".join(differences)
            + "\nA resume continues the run with its own config (stored in the checkpoint); it "
            "may change only when to stop, cadences, logging, paths and devices. Drop these "
            "overrides, or pass resume_overrides=force to change them anyway (e.g. to fine-tune "
            "with another schedule)."
        )
    if differences:
        log.warning("resume_overrides=force: changing the run's\n  %s", "\n  ".join(differences))
    _warn_devices(stored, merged)
    _schedule_follows_the_run(stored, merged)
    return OmegaConf.create(merged)


def _schedule_follows_the_run(stored: dict, merged: dict) -> None:
    """A decaying LR schedule that ended where the run ended (``lr_scheduler.total_steps`` equal
    to the run's ``trainer.max_steps``, the default ``${trainer.max_steps}``) ends where the
    resumed run ends: a resume that changes ``trainer.max_steps`` (e.g. extends a finished run)
    and does not set ``lr_scheduler.total_steps`` itself decays over the new length, continued
    from the stored step (:class:`ddpm.lr_schedules.StepSchedule`), instead of staying at the
    old schedule's floor (an LR of 0 by default)."""
    old_total = (stored.get("lr_scheduler") or {}).get("total_steps")
    schedule = merged.get("lr_scheduler") or {}
    old_max = (stored.get("trainer") or {}).get("max_steps")
    new_max = (merged.get("trainer") or {}).get("max_steps")
    if (
        old_total is None
        or old_total != old_max
        or schedule.get("total_steps") != old_total
        or not isinstance(new_max, int)
        or new_max <= 0
        or new_max == old_max
    ):
        return
    schedule["total_steps"] = new_max
    log.warning(
        "trainer.max_steps %s -> %s: the LR schedule (%s) ended at the run's end and is rebuilt "
        "to end at the new one (lr_scheduler.total_steps=%s): from the resumed step on, the LR "
        "is what a %s-step schedule gives there",
        old_max,
        new_max,
        schedule.get("_target_"),
        new_max,
        new_max,
    )


def _follow_references(cfg: DictConfig, merged: dict, touched: set[str]) -> None:
    """A setting that the command's config gives as another one (``sampler: ${sampler}`` of the
    sample grid, ``${oc.select:a.b,default}``) and that the command touched through it takes the
    resumed value of that one: ``sampler.steps=50`` on a resume changes the steps of the run's
    own sampler, in the callbacks too, instead of handing them the command's default sampler."""
    raw = _leaves(OmegaConf.to_container(cfg, resolve=False))
    for path, value in raw.items():
        found = _WHOLE_REF.fullmatch(value) if isinstance(value, str) else None
        if found is None or path.startswith("hydra") or not _under(path, touched):
            continue
        source = _select(merged, found.group(1))
        *parents, key = path.split(".")
        holder = merged
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if source is not _MISSING and isinstance(holder, dict) and key in holder:
            holder[key] = copy.deepcopy(source)


def _select(config: dict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _take_recorded_classes(cfg: DictConfig, stored: dict) -> None:
    """A conditional run's recorded classes (``data.num_classes`` / ``data.class_names``, which
    the model config reads) are facts of its data, not settings: the command's config takes them
    before the comparison (the datamodule checks them against the data at start-up)."""
    data = stored.get("data") or {}
    if data.get("num_classes") is None or not OmegaConf.select(cfg, "data.conditional"):
        return
    with open_dict(cfg):
        cfg.data.num_classes = data["num_classes"]
        cfg.data.class_names = data.get("class_names")


def _world(config: dict) -> Any:
    trainer = config.get("trainer", {}) or {}
    return trainer.get("devices"), trainer.get("num_nodes", 1)


def _warn_devices(stored: dict, merged: dict) -> None:
    if _world(stored) != _world(merged):
        (d0, n0), (d1, n1) = _world(stored), _world(merged)
        log.warning(
            "resuming on devices=%s x num_nodes=%s (the run used devices=%s x num_nodes=%s): "
            "training continues from the checkpoint, but the data shards of each device and "
            "therefore the data order and noise from here on differ from an uninterrupted run",
            d1,
            n1,
            d0,
            n0,
        )


def run_finished(cfg: DictConfig, ckpt: dict) -> bool:
    """Whether the checkpoint ``ckpt`` already reached ``cfg``'s ``trainer.max_steps``."""
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    return isinstance(max_steps, int) and 0 < max_steps <= int(ckpt.get("global_step", 0))


def check_not_finished(cfg: DictConfig, ckpt: dict, run_dir: Path) -> None:
    """Refuse to 'resume' a run that already reached ``trainer.max_steps``; say how to extend it."""
    step = int(ckpt.get("global_step", 0))
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if run_finished(cfg, ckpt):
        schedule = OmegaConf.select(cfg, "lr_scheduler", default=None)
        decays = OmegaConf.is_dict(schedule) and schedule.get("total_steps") == max_steps
        longer = 2 * step
        raise ConfigError(
            f"the run in {run_dir} already finished: its checkpoint is at global step {step} and "
            f"trainer.max_steps={max_steps}. To train it longer: "
            f"{resume_command(run_dir, f'trainer.max_steps={longer}')}"
            + (
                f"\nIts LR schedule decays to the end of the run (lr_scheduler.total_steps="
                f"{max_steps}), so it is rebuilt over the new length: from step {step} the LR is "
                f"{_lr_factor(schedule, step, longer):.3g} x optimizer.lr (what a {longer}-step "
                f"schedule has at step {step}; it ended at "
                f"{_lr_factor(schedule, step, max_steps):.3g} x) and decays again to "
                f"{_lr_factor(schedule, longer, longer):.3g} x at step {longer}."
                if decays
                else ""
            )
        )


def _lr_factor(schedule: DictConfig, step: int, total_steps: int) -> float:
    """The LR multiplier at optimizer ``step`` of the ``lr_scheduler`` node over
    ``total_steps``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    node = OmegaConf.merge(schedule, {"total_steps": total_steps})
    return float(instantiate(node)(optimizer=optimizer).factor(step))


def check_weights_fit(module: Any, ckpt: dict, source: str) -> None:
    """Refuse, naming the settings to look at, a network whose parameters do not fit the
    checkpoint's (instead of Lightning's raw size-mismatch error)."""
    have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    problems = [
        f"{k}: {saved[k]} in the checkpoint, {have[k]} here"
        for k in saved.keys() & have.keys()
        if saved[k] != have[k]
    ]
    problems += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - have.keys())]
    problems += [f"{k}: not in the checkpoint" for k in sorted(have.keys() - saved.keys())]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ConfigError(
            f"the network built from this config does not fit the weights in {source} (model / "
            "objective settings differ from the run's):\n  - " + "\n  - ".join(shown)
        )


def check_resumable_config(stored: dict, cfg: DictConfig, source: str) -> None:
    """A resume instantiates the stored run config (callbacks, loggers, optimizer ... too), so a
    checkpoint is data, never code: every ``_target_`` in it must be one of our loadable classes,
    one that the project's configs name anywhere (:func:`ddpm.checkpoint.shipped_targets`), or
    the one this command composes at the same place (the user's own config vouches for it).
    :class:`ConfigError` otherwise."""
    shipped = set().union(*shipped_targets().values())

    def allowed(target: str, path: str) -> bool:
        here = OmegaConf.select(cfg, f"{path}._target_", default=None, throw_on_missing=False)
        return target in shipped or target == here

    try:
        check_stored_config(stored, source, sections=None, allowed=allowed)
    except CheckpointError as e:
        raise ConfigError(
            f"{e} If it is a class of your own (e.g. a callback the run added with "
            "+callbacks.NAME._target_=...), name it on this command too to vouch for it."
        ) from None
