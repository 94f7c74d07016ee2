"""``visualize(cfg)``: pictures of diffusion written as PNGs to the run directory.

``what``:

* ``forward``: one batch of real data at x_t for several t, per schedule side by side
  (``forward.png``), and ᾱ_t, β_t, log SNR(t) of every schedule (``schedules.png``).
* ``reverse`` (checkpoint): x_t and the network's x̂₀ along the reverse trajectory of any sampler,
  one strip per seed (``reverse.png``).
* ``loss_by_t`` (checkpoint): the bound's terms L_t and the ε-MSE per timestep on held-out data,
  and the rate-distortion curve (``loss_by_t.png``, numbers in ``loss_by_t.json``).
* ``interpolate`` (checkpoint): DDIM inversion of two held-out inputs, slerp of their latents,
  decoding (``interpolate.png``).
* ``guidance`` (class-conditional checkpoint): the same seeds for each class at several
  classifier-free guidance scales, one panel per scale (rows = classes, columns = seeds;
  ``guidance.png``).
* ``playground`` (2-D checkpoint): forward cloud, reverse trajectories, score field, generated vs
  true data with energy distance / MMD for every sampler (``playground_*.png``,
  ``playground.json``).
* ``trajectories`` (2-D checkpoints, ``ckpt_paths=[a,b]``): the probability-flow ODE paths of the
  same seeds through each model, side by side, each titled with its straightness S
  (``trajectories.png``, ``trajectories.json``): DDPM / EDM / flow matching, before / after reflow.
  A class-conditional model's paths go with reflow's seeded labels (uniform over its classes or
  ``trajectories.classes``), coloured by class.
* ``compare`` (image checkpoints, ``ckpt_paths=[a,b]``): the same seeds through each model's
  sampler, one row per model (``compare.png``); a class-conditional model draws column i for
  class i mod K, or ``compare.class_labels[i]``.

Returns a dict with ``paths`` (the PNGs written), ``figures`` (matplotlib Figures) and the data
behind them (tensors / arrays), so tests check numbers, not pixels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, LoadedModel, load_model
from ddpm.contracts import HasReferenceLoader, require
from ddpm.project import command
from ddpm.tasks.common import output_dir, write_json
from ddpm.tasks.sample import build_sampler, generate, requested_labels, sample_labels
from ddpm.utils.classes import num_classes_of, parse_class_labels
from ddpm.utils.devices import run_device
from ddpm.viz import (
    denoising_trajectory,
    forward_diffusion,
    forward_figure,
    forward_timesteps,
    guidance_figure,
    guidance_sweep,
    interpolate,
    interpolation_figure,
    loss_by_t_figure,
    loss_by_timestep,
    make_diffusions,
    playground_figures,
    playground_report,
    reverse_figure,
    sampler_label,
    save_figure,
    schedule_figure,
)
from ddpm.viz.trajectories import (
    comparison_figure,
    model_label,
    ode_trajectories,
    trajectories_figure,
    unique_labels,
)

log = logging.getLogger(__name__)

WHATS = (
    "forward",
    "reverse",
    "loss_by_t",
    "interpolate",
    "guidance",
    "playground",
    "trajectories",
    "compare",
)
NEEDS_CHECKPOINT = WHATS[1:]


# ------------------------------------------------------------------------------------ plumbing
def _device(cfg: DictConfig) -> torch.device:
    """The device of ``accelerator`` (:func:`~ddpm.utils.devices.run_device`)."""
    return run_device(cfg.get("accelerator", "auto"))


def _class_names(loaded: LoadedModel) -> list[str]:
    """A class-conditional model's class names as its run recorded them (``data.class_names``),
    else the class indices."""
    names = loaded.config.get("data", {}).get("class_names")
    return [str(c) for c in (names or range(num_classes_of(loaded.net)))]


def _num_samples(cfg: DictConfig, section: str, default: int | None = None) -> int:
    """``<section>.num_samples`` (images or 2-D points; null: ``default``)."""
    n = cfg[section].get("num_samples")
    n = default if n is None else n
    if n is None or isinstance(n, bool) or int(n) < 1:
        raise ValueError(f"{section}.num_samples must be an integer >= 1, got {n!r}")
    return int(n)


def _load(cfg: DictConfig, device: torch.device) -> LoadedModel:
    if not cfg.get("ckpt_path"):
        raise CheckpointError(
            f"what={cfg.what} needs a checkpoint: {command('visualize')} what={cfg.what} "
            "ckpt_path=PATH"
        )
    return load_model(cfg.ckpt_path, use_ema=bool(cfg.get("use_ema", True)), device=device)


def build_datamodule(cfg: DictConfig, loaded: LoadedModel | None) -> Any:
    """``cfg.data`` when given (``data=...``), else the checkpoint's data config, else
    ``cfg.default_data`` (train.py's default data set)."""
    if cfg.get("data") is not None:
        node = OmegaConf.to_container(cfg.data, resolve=True)
    elif loaded is not None:
        node = dict(loaded.config["data"])
        if cfg.get("data_root") and "root" in node:
            node["root"] = str(cfg.data_root)
    elif cfg.get("default_data") is not None:
        node = OmegaConf.to_container(cfg.default_data, resolve=True)
    else:
        raise ValueError(
            f"what={cfg.what} needs data: give data=<name> (e.g. data=digits or "
            "data=swiss_roll) or ckpt_path=PATH (its data is used)"
        )
    if "random_flip" in node:
        node["random_flip"] = False
    return instantiate(OmegaConf.create(node))


def held_out(dm: Any, split: str, n: int) -> torch.Tensor:
    """The first ``n`` samples of ``split``, normalised as in training, never augmented."""
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    dm = require(dm, HasReferenceLoader, "held-out samples (visualize)")
    loader = dm.reference_dataloader(split, batch_size=n, max_samples=n)
    batch = next(iter(loader))
    return (batch[0] if isinstance(batch, (list, tuple)) else batch).float()


def _denormalizer(dm: Any) -> Any:
    """Model space -> [0, 1] for images; None means (x + 1) / 2."""
    if dm is None or getattr(dm, "normalization", "minus_one_one") == "minus_one_one":
        return None
    return dm.denormalize


def _image_denormalizer(cfg: DictConfig, loaded: LoadedModel) -> Any:
    data = loaded.config.get("data", {})
    if data.get("normalization", "minus_one_one") == "minus_one_one":
        return None
    return _denormalizer(build_datamodule(cfg, loaded))


def _cap_steps(node: Any, T: int) -> Any:
    """A sampler config with ``steps`` capped at what the model's T allows."""
    node = OmegaConf.create(
        OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    )
    steps = node.get("steps")
    if steps is not None:
        limit = T - 1 if "DPMSolver" in str(node.get("_target_", "")) else T
        node.steps = max(1, min(int(steps), limit))
    return node


def _save(fig: Any, path: Path, paths: list[Path]) -> None:
    paths.append(save_figure(fig, path))
    log.debug("wrote %s", path)


# ------------------------------------------------------------------------------------ what=...
def run_forward(cfg: DictConfig, out: Path) -> dict[str, Any]:
    loaded = None
    if cfg.get("data") is None and cfg.get("ckpt_path"):
        loaded = load_model(cfg.ckpt_path, use_ema=bool(cfg.get("use_ema", True)))
    dm = build_datamodule(cfg, loaded)
    schedules = (
        OmegaConf.to_container(cfg.schedules, resolve=True)
        if OmegaConf.is_config(cfg.schedules)
        else cfg.schedules
    )
    diffusions = make_diffusions(schedules, int(cfg.num_timesteps))
    T = min(d.num_timesteps for d in diffusions.values())
    ts = forward_timesteps(T, cfg.forward.timesteps)
    is_points = len(getattr(dm, "sample_shape", ())) == 1
    n = _num_samples(cfg, "forward", 2000 if is_points else 8)
    x0 = held_out(dm, cfg.forward.split, n)
    g = torch.Generator().manual_seed(int(cfg.seed))
    result = forward_diffusion(x0, diffusions, ts, generator=g)
    figs = {
        "forward": forward_figure(
            result, int(cfg.forward.show_images), _denormalizer(dm), dpi=int(cfg.dpi)
        ),
        "schedules": schedule_figure(diffusions, dpi=int(cfg.dpi)),
    }
    paths: list[Path] = []
    _save(figs["forward"], out / "forward.png", paths)
    _save(figs["schedules"], out / "schedules.png", paths)
    return {**result, "diffusions": diffusions, "figures": figs, "paths": paths}


def run_reverse(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    loaded = _load(cfg, device)
    sampler = build_sampler(cfg.get("sampler"), loaded)
    shape = loaded.sample_shape
    if len(shape) == 1:
        seeds = list(range(int(cfg.seed), int(cfg.seed) + _num_samples(cfg, "reverse")))
    else:
        seeds = [int(s) for s in cfg.reverse.seeds]
    if not seeds:
        raise ValueError("reverse.seeds must name at least one seed")
    ts = cfg.reverse.timesteps
    traj = denoising_trajectory(
        sampler,
        loaded.net,
        loaded.diffusion,
        shape,
        seeds,
        timesteps=None if ts is None else [int(t) for t in ts],
        num_frames=int(cfg.reverse.num_frames),
        device=device,
        class_labels=sample_labels(loaded, len(seeds)),  # conditional: seed i, class i mod K
    )
    denorm = _image_denormalizer(cfg, loaded) if len(shape) > 1 else None
    title = f"Reverse trajectory: {sampler_label(sampler)}, T={loaded.diffusion.num_timesteps}"
    fig = reverse_figure(traj, seeds if len(shape) > 1 else [], title, denorm, dpi=int(cfg.dpi))
    paths: list[Path] = []
    _save(fig, out / "reverse.png", paths)
    return {**traj, "seeds": seeds, "sampler": sampler, "figures": {"reverse": fig}, "paths": paths}


def run_guidance(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    loaded = _load(cfg, device)
    k = num_classes_of(loaded.net)
    if k is None:
        raise ValueError(
            "what=guidance needs a class-conditional checkpoint (trained with "
            "data.conditional=true, e.g. experiment=digits_cfg)"
        )
    g = cfg.guidance
    classes = (
        list(range(k)) if g.classes is None else parse_class_labels(list(g.classes), k).tolist()
    )
    shape = loaded.sample_shape
    if len(shape) == 1:
        seeds = list(range(int(cfg.seed), int(cfg.seed) + _num_samples(cfg, "guidance")))
    else:
        seeds = [int(s) for s in g.seeds]
    scales = [float(s) for s in g.scales]
    if not seeds or not scales:
        raise ValueError("guidance.seeds and guidance.scales must not be empty")
    sampler = build_sampler(cfg.get("sampler"), loaded)
    samples = guidance_sweep(
        sampler, loaded.net, loaded.diffusion, shape, classes, seeds, scales, device
    )
    names = _class_names(loaded)
    title = f"Classifier-free guidance: {sampler_label(sampler)}"
    denorm = _image_denormalizer(cfg, loaded) if len(shape) > 1 else None
    fig = guidance_figure(
        samples,
        scales,
        [str(names[c]) for c in classes],
        seeds,
        denorm,
        title=title,
        dpi=int(cfg.dpi),
    )
    paths: list[Path] = []
    _save(fig, out / "guidance.png", paths)
    return {
        "samples": samples,
        "classes": classes,
        "seeds": seeds,
        "scales": scales,
        "figures": {"guidance": fig},
        "paths": paths,
    }


def run_loss_by_t(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    loaded = _load(cfg, device)
    dm = build_datamodule(cfg, loaded)
    x0 = held_out(dm, cfg.loss_by_t.split, _num_samples(cfg, "loss_by_t")).to(device)
    g = torch.Generator().manual_seed(int(cfg.seed))
    result = loss_by_timestep(
        loaded.net,
        loaded.diffusion,
        x0,
        clip_denoised=bool(cfg.loss_by_t.clip_denoised),
        generator=g,
        progress=bool(cfg.progress),
    )
    title = (
        f"Variational bound by timestep: {result['num_images']} held-out samples "
        f"({cfg.loss_by_t.split}), step {loaded.global_step}"
    )
    if x0.ndim == 2:
        title += " (L_0 assumes 8-bit data in [-1, 1])"
    fig = loss_by_t_figure(result, title, dpi=int(cfg.dpi))
    paths: list[Path] = []
    _save(fig, out / "loss_by_t.png", paths)
    write_json(
        out / "loss_by_t.json",
        {
            k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in result.items()
            if k != "per_image"
        },
    )
    return {**result, "figures": {"loss_by_t": fig}, "paths": paths}


def run_interpolate(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    loaded = _load(cfg, device)
    dm = build_datamodule(cfg, loaded)
    pair = [int(i) for i in cfg.interpolate.pair]
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(f"interpolate.pair must be two indices >= 0, got {pair}")
    data = held_out(dm, cfg.interpolate.split, max(pair) + 1)
    if data.shape[0] <= max(pair):
        raise ValueError(
            f"interpolate.pair={pair}: the {cfg.interpolate.split} split has only "
            f"{data.shape[0]} samples"
        )
    T = loaded.diffusion.num_timesteps
    result = interpolate(
        loaded.net,
        loaded.diffusion,
        data[pair[0]],
        data[pair[1]],
        num_frames=int(cfg.interpolate.num_frames),
        steps=max(1, min(int(cfg.interpolate.steps), T)),
        spacing=str(cfg.interpolate.spacing),
        fixed_point_iters=int(cfg.interpolate.fixed_point_iters),
        clip_denoised=bool(cfg.interpolate.clip_denoised),
        device=device,
    )
    reference = held_out(dm, cfg.interpolate.split, 1000) if data.ndim == 2 else None
    denorm = _denormalizer(dm) if data.ndim > 2 else None
    fig = interpolation_figure(result, denormalize=denorm, reference=reference, dpi=int(cfg.dpi))
    paths: list[Path] = []
    _save(fig, out / "interpolate.png", paths)
    return {**result, "pair": pair, "figures": {"interpolate": fig}, "paths": paths}


def run_playground(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    loaded = _load(cfg, device)
    if loaded.sample_shape != (2,):
        raise ValueError(
            f"what=playground needs a 2-D model (data=swiss_roll/two_moons/eight_gaussians "
            f"model=mlp), this checkpoint makes samples of shape {loaded.sample_shape}"
        )
    dm = build_datamodule(cfg, loaded)
    n = _num_samples(cfg, "playground")
    reference = held_out(dm, "val", n)
    second = held_out(dm, "train", reference.shape[0])
    T = loaded.diffusion.num_timesteps
    samplers = {
        name: instantiate(_cap_steps(node, T))
        for name, node in (cfg.playground.samplers or {}).items()
        if node is not None
    }
    st = cfg.playground.score_timesteps
    report = playground_report(
        loaded.net,
        loaded.diffusion,
        reference,
        samplers,
        second_reference=second,
        num_samples=n,
        seed=int(cfg.seed),
        frames=int(cfg.playground.frames),
        score_timesteps=None if st is None else [float(t) for t in st],
        grid_size=int(cfg.playground.grid_size),
        device=device,
    )
    figs = playground_figures(report, dpi=int(cfg.dpi))
    paths: list[Path] = []
    for name, fig in figs.items():
        _save(fig, out / f"playground_{name}.png", paths)
    metrics = {
        "distances": report["distances"],
        "samplers": report["sampler_labels"],
        "num_points": int(reference.shape[0]),
        "global_step": loaded.global_step,
        "ckpt_path": str(cfg.ckpt_path),
    }
    write_json(out / "playground.json", metrics)
    print(json.dumps(report["distances"], indent=2))
    return {**report, "figures": figs, "paths": paths}


def _load_all(cfg: DictConfig, device: torch.device) -> dict[str, LoadedModel]:
    """The checkpoints of ``ckpt_paths`` (or the one ``ckpt_path``) by label (``labels``, else
    :func:`~ddpm.viz.trajectories.model_label`)."""
    paths = list(cfg.get("ckpt_paths") or ([cfg.ckpt_path] if cfg.get("ckpt_path") else []))
    if not paths:
        raise CheckpointError(
            f"what={cfg.what} needs checkpoints: {command('visualize')} what={cfg.what} "
            "'ckpt_paths=[A,B]'"
        )
    use_ema = bool(cfg.get("use_ema", True))
    loaded = [load_model(p, use_ema=use_ema, device=device) for p in paths]
    labels = list(cfg.get("labels") or [])
    if labels and len(labels) != len(paths):
        raise ValueError(f"labels: {len(labels)} given for {len(paths)} ckpt_paths")
    labels = labels or [model_label(m.config, m.global_step) for m in loaded]
    return dict(zip(unique_labels([str(x) for x in labels]), loaded, strict=True))


def run_trajectories(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    models = _load_all(cfg, device)
    for name, m in models.items():
        if m.sample_shape != (2,):
            raise ValueError(
                f"what=trajectories needs 2-D models; {name} makes samples of shape "
                f"{m.sample_shape} (images: what=compare)"
            )
    conditional = [m for m in models.values() if num_classes_of(m.net) is not None]
    classes = requested_labels(cfg.trajectories.get("classes"))
    if classes is not None and not conditional:
        raise ValueError(
            "trajectories.classes needs a class-conditional checkpoint (trained with "
            "data.conditional=true); these are all unconditional"
        )
    sampler = instantiate(cfg.trajectories.sampler)
    n = _num_samples(cfg, "trajectories")
    result = ode_trajectories(
        {k: (m.net, m.diffusion) for k, m in models.items()},
        sampler,
        n,
        int(cfg.seed),
        device,
        classes=classes,
    )
    reference = held_out(build_datamodule(cfg, next(iter(models.values()))), "val", n)
    names = _class_names(conditional[0]) if conditional else None
    fig = trajectories_figure(
        result, reference, int(cfg.trajectories.max_paths), dpi=int(cfg.dpi), class_names=names
    )
    paths: list[Path] = []
    _save(fig, out / "trajectories.png", paths)
    record = {
        k: {
            "straightness": r["straightness"],
            "steps": len(r["path"].times),
            "classes": None if r["labels"] is None else sorted(set(r["labels"].tolist())),
        }
        for k, r in result.items()
    }
    write_json(out / "trajectories.json", {"models": record, "sampler": sampler_label(sampler)})
    print(json.dumps(record, indent=2))
    return {"result": result, "figures": {"trajectories": fig}, "paths": paths}


def run_compare(cfg: DictConfig, out: Path) -> dict[str, Any]:
    device = _device(cfg)
    models = _load_all(cfg, device)
    seeds = [int(s) for s in cfg.compare.seeds]
    if not seeds:
        raise ValueError("compare.seeds must name at least one seed")
    samples, first = {}, next(iter(models.values()))
    if len(first.sample_shape) != 3:
        raise ValueError("what=compare draws images; for 2-D models use what=trajectories")
    given = requested_labels(cfg.compare.get("class_labels"))
    conditional = {k: m for k, m in models.items() if num_classes_of(m.net) is not None}
    if given is not None and (len(given) != len(seeds) or not conditional):
        raise ValueError(
            f"compare.class_labels: one class per seed of compare.seeds ({len(seeds)}) for the "
            f"class-conditional checkpoints ({len(conditional)} of {len(models)}), got {given}"
        )
    drawn = {}  # the classes of the conditional models' columns
    for name, m in models.items():
        if m.sample_shape != first.sample_shape:
            raise ValueError(
                f"what=compare needs models of one sample shape: {name} makes "
                f"{m.sample_shape}, the first {first.sample_shape}"
            )
        sampler = build_sampler(cfg.get("sampler"), m)
        labels = sample_labels(m, len(seeds), given if name in conditional else None)
        if labels is not None:
            drawn[name] = labels
        samples[f"{name}\n{sampler_label(sampler)}"] = generate(
            m, sampler, seeds, len(seeds), device, class_labels=labels
        )
    fig = comparison_figure(
        samples,
        seeds,
        "The same seeds through each model",
        _image_denormalizer(cfg, first),
        dpi=int(cfg.dpi),
        classes=_column_classes(drawn, conditional),
    )
    paths: list[Path] = []
    _save(fig, out / "compare.png", paths)
    return {
        "samples": samples,
        "seeds": seeds,
        "class_labels": drawn,
        "figures": {"compare": fig},
        "paths": paths,
    }


def _column_classes(
    drawn: dict[str, torch.Tensor], models: dict[str, LoadedModel]
) -> list[str] | None:
    """The class names of compare's columns when every conditional model drew the same classes
    (None when none is conditional or they differ)."""
    rows = list(drawn.values())
    if not rows or any(not torch.equal(rows[0], r) for r in rows[1:]):
        return None
    names = _class_names(next(iter(models.values())))
    return [names[c] for c in rows[0].tolist()]


RUNNERS = {
    "forward": run_forward,
    "reverse": run_reverse,
    "loss_by_t": run_loss_by_t,
    "interpolate": run_interpolate,
    "guidance": run_guidance,
    "playground": run_playground,
    "trajectories": run_trajectories,
    "compare": run_compare,
}


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Run the picture ``cfg.what``; returns its data, figures and PNG paths (see module doc)."""
    what = cfg.get("what")
    if what not in RUNNERS:
        raise ValueError(f"what must be one of {WHATS}, got {what!r}")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result = RUNNERS[what](cfg, out)
    for p in result["paths"]:
        print(p)
    return result
