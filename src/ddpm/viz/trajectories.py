"""Several models side by side from the same seeds: the probability-flow ODE paths of 2-D models
(curved for DDPM and EDM, straighter for flow matching, straighter still after reflow), each
panel titled with its straightness S (Liu et al. 2023, eq. 8), and the samples of image models,
one row per model. A class-conditional model's paths are drawn for the seeded labels reflow
draws (:func:`~ddpm.diffusion.reflow.seeded_labels`), coloured by class."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.diffusion import Process
from ddpm.diffusion.reflow import Trajectory, seeded_labels, seeded_noise, straightness, trajectory
from ddpm.utils.classes import num_classes_of, parse_class_labels
from ddpm.viz.plots import (
    FONTSIZE,
    class_colour,
    cloud_limit,
    labelled_image_grid,
    new_figure,
    scatter,
)

Net = Callable[..., Tensor]


def path_labels(
    n: int, num_classes: int, seed: int, classes: Sequence[int] | None = None
) -> Tensor:
    """The labels (n,) of a class-conditional model's paths: :func:`seeded_labels` of chunk 0
    (reflow's, so S matches its straightness), uniform over ``classes`` (all: ``None``)."""
    pool = (
        torch.arange(num_classes) if classes is None else parse_class_labels(classes, num_classes)
    )
    return pool[seeded_labels(n, len(pool), seed, 0)]


def ode_trajectories(
    models: Mapping[str, tuple[Net, Process]],
    sampler: Callable[..., Any],
    num_samples: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    classes: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """For each named (network, process): the paths of ``sampler`` from the same unit noises
    (:func:`~ddpm.diffusion.reflow.seeded_noise` of ``seed``; each process scales them by its
    prior std), for a class-conditional network with :func:`path_labels` (over ``classes``),
    and their mean straightness: ``{name: {"path": Trajectory, "straightness": S, "labels":
    (num_samples,) or None}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, (net, process) in models.items():
        k = num_classes_of(net)
        y = None if k is None else path_labels(num_samples, k, seed, classes)
        z = seeded_noise((num_samples, 2), seed, 0).to(device)
        path = trajectory(
            net, process, z, sampler, class_labels=None if y is None else y.to(device)
        )
        s = straightness(path, process.t_max)
        out[name] = {"path": path, "straightness": float(s.mean()), "labels": y}
    return out


def _draw_paths(ax: Any, path: Trajectory, max_paths: int, labels: Tensor | None) -> None:
    """Each path as a line from its start (grey dot) to its sample: blue and orange, or in the
    colour of its class (:func:`~ddpm.viz.plots.class_colour`, as in the guidance figure)."""
    xs = torch.cat([path.x, path.sample[None]])[:, :max_paths].numpy()  # (n + 1, P, 2)
    colours = (
        ["C0"] * xs.shape[1] if labels is None else [class_colour(y) for y in labels[:max_paths]]
    )
    ends = "C1" if labels is None else colours
    for p in range(xs.shape[1]):
        ax.plot(xs[:, p, 0], xs[:, p, 1], color=colours[p], alpha=0.35, linewidth=0.6)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=4, color="0.45", linewidths=0, zorder=3)
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=5, color=ends, linewidths=0, zorder=3)


def trajectories_figure(
    result: Mapping[str, Mapping[str, Any]],
    reference: Tensor | None = None,
    max_paths: int = 150,
    title: str = "",
    dpi: int = 100,
    class_names: Sequence[str] | None = None,
) -> Any:
    """One panel per model of :func:`ode_trajectories`: ``max_paths`` paths over the held-out
    data (``reference``, light grey), titled with the model's name and its straightness; a
    conditional model's coloured by class (legend: ``class_names``, else the class indices)."""
    names = list(result)
    clouds = [reference] if reference is not None else []
    clouds += [r["path"].sample for r in result.values()]
    lim = max(3.0, cloud_limit(*clouds))
    fig = new_figure(4.2 * len(names), 4.6, dpi)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        if reference is not None:
            scatter(ax, reference, lim=lim, color="0.7", size=2, alpha=0.5)
        r = result[name]
        _draw_paths(ax, r["path"], max_paths, r.get("labels"))
        steps = len(r["path"].times)
        ax.set_title(f"{name}\nS = {r['straightness']:.4f} ({steps} steps)", fontsize=FONTSIZE + 1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=FONTSIZE - 1)
    drawn: set[int] = set()
    for r in result.values():
        if r.get("labels") is not None:
            drawn.update(r["labels"][:max_paths].tolist())
    ends = "sample in its class's colour" if drawn else "orange: sample"
    fig.suptitle(
        title
        or f"Probability-flow ODE paths from the same seeds (grey: start, {ends}); "
        "S = ∫ E‖(Z₁ - Z₀) - Ż‖² (Liu et al. 2023)",
        fontsize=FONTSIZE + 2,
    )
    bottom = 0.0
    if drawn:  # one legend entry per class drawn, below the panels
        entries = [str(c) if class_names is None else str(class_names[c]) for c in sorted(drawn)]
        handles = [ax.plot([], [], color=class_colour(c), linewidth=1.5)[0] for c in sorted(drawn)]
        fig.legend(
            handles, entries, fontsize=FONTSIZE, loc="lower center", ncol=min(len(drawn), 10)
        )
        bottom = 0.07
    fig.tight_layout(rect=(0, bottom, 1, 0.94))  # room for the suptitle and the legend
    return fig


def comparison_figure(
    samples: Mapping[str, Tensor],
    seeds: Sequence[int],
    title: str = "",
    denormalize: Any = None,
    dpi: int = 100,
    classes: Sequence[str] | None = None,
) -> Any:
    """The same ``seeds`` through each model: one row of images per model
    (``{name: (len(seeds), C, H, W)}``), one column per seed (and its class, ``classes``, for
    class-conditional models)."""
    names = list(samples)
    counts = {int(x.shape[0]) for x in samples.values()}
    if counts != {len(seeds)}:
        raise ValueError(
            f"every model needs {len(seeds)} samples (one per seed), got {sorted(counts)}"
        )
    n = len(seeds)
    images = torch.cat([samples[k].float().cpu() for k in names])
    return labelled_image_grid(
        images,
        n,
        col_labels=[
            f"seed {s}" if classes is None else f"seed {s}\nclass {c}"
            for s, c in zip(seeds, classes or seeds, strict=True)
        ],
        row_labels=names,
        title=title,
        denormalize=denormalize,
        dpi=dpi,
    )


def model_label(config: Mapping[str, Any], global_step: int) -> str:
    """A model's name from its stored config: schedule, what the network predicts, step, and
    ``(reflow)`` for a reflowed one."""
    schedule = config.get("schedule", {}).get("name", "?")
    pred = config.get("objective", {}).get("prediction_type", "?")
    reflowed = " reflow" if (config.get("data") or {}).get("pairs") else ""
    return f"{schedule} / {pred}{reflowed}, step {global_step}"


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` with repeats numbered (``a``, ``a (2)``)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


__all__ = [
    "comparison_figure",
    "model_label",
    "ode_trajectories",
    "path_labels",
    "trajectories_figure",
    "unique_labels",
]
