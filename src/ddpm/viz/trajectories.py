"""Several models side by side from the same seeds: the probability-flow ODE paths of 2-D models
(curved for DDPM and EDM, straighter for flow matching, straighter still after reflow), each
panel titled with its straightness S (Liu et al. 2023, eq. 8), and the samples of image models,
one row per model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.diffusion import Process
from ddpm.diffusion.reflow import Trajectory, seeded_noise, straightness, trajectory
from ddpm.viz.plots import FONTSIZE, cloud_limit, labelled_image_grid, new_figure, scatter

Net = Callable[..., Tensor]


def ode_trajectories(
    models: Mapping[str, tuple[Net, Process]],
    sampler: Callable[..., Any],
    num_samples: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """For each named (network, process): the paths of ``sampler`` from the same unit noises
    (:func:`~ddpm.diffusion.reflow.seeded_noise` of ``seed``; each process scales them by its
    prior std) and their mean straightness: ``{name: {"path": Trajectory, "straightness": S}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, (net, process) in models.items():
        z = seeded_noise((num_samples, 2), seed, 0).to(device)
        path = trajectory(net, process, z, sampler)
        s = straightness(path, process.t_max)
        out[name] = {"path": path, "straightness": float(s.mean())}
    return out


def _draw_paths(ax: Any, path: Trajectory, max_paths: int) -> None:
    """Each path as a line from its start (grey dot) to its sample (orange dot)."""
    xs = torch.cat([path.x, path.sample[None]])[:, :max_paths].numpy()  # (n + 1, P, 2)
    for p in range(xs.shape[1]):
        ax.plot(xs[:, p, 0], xs[:, p, 1], color="C0", alpha=0.35, linewidth=0.6)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=4, color="0.45", linewidths=0, zorder=3)
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=5, color="C1", linewidths=0, zorder=3)


def trajectories_figure(
    result: Mapping[str, Mapping[str, Any]],
    reference: Tensor | None = None,
    max_paths: int = 150,
    title: str = "",
    dpi: int = 100,
) -> Any:
    """One panel per model of :func:`ode_trajectories`: ``max_paths`` paths over the held-out
    data (``reference``, light grey), titled with the model's name and its straightness."""
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
        _draw_paths(ax, r["path"], max_paths)
        steps = len(r["path"].times)
        ax.set_title(f"{name}\nS = {r['straightness']:.4f} ({steps} steps)", fontsize=FONTSIZE + 1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=FONTSIZE - 1)
    fig.suptitle(
        title
        or "Probability-flow ODE paths from the same seeds (grey: start, orange: sample); "
        "S = ∫ E‖(Z₁ - Z₀) - Ż‖² (Liu et al. 2023)",
        fontsize=FONTSIZE + 2,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # room for the suptitle above the panels' titles
    return fig


def comparison_figure(
    samples: Mapping[str, Tensor],
    seeds: Sequence[int],
    title: str = "",
    denormalize: Any = None,
    dpi: int = 100,
) -> Any:
    """The same ``seeds`` through each model: one row of images per model
    (``{name: (len(seeds), C, H, W)}``), one column per seed."""
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
        col_labels=[f"seed {s}" for s in seeds],
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
    "trajectories_figure",
    "unique_labels",
]
