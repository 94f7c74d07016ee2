"""Where the bits go: the terms of the variational bound per timestep on held-out data.

    L = L_T + Σ_{t=1}^{T-1} L_t + L_0   (DDPM eq. 5, written with 0-indexed model timesteps)

with L_T = KL(q(x_T|x₀) ‖ N(0, I)) (the prior term), L_t = KL(q(x_t|x_{t+1}, x₀) ‖
p_θ(x_t|x_{t+1})) at model timestep t ≥ 1 and L_0 = -log p_θ(x₀|x₁) the discretized-Gaussian
decoder (8-bit data in [-1, 1]). ``calc_bpd_loop``'s ``vb[:, t]`` is exactly L_t (``vb[:, 0]``
= L_0), in bits/dim. Alongside: the ε-MSE per t and DDPM's rate-distortion curve (§4.3, Fig. 5):
rate = bits sent down to step t (L_T + Σ_{s≥t} L_s), distortion = RMSE of x̂₀ on the 0..255 scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion import GaussianDiffusion, calc_bpd_loop
from ddpm.viz.plots import FONTSIZE, new_figure


@torch.no_grad()
def loss_by_timestep(
    net: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    x0: Tensor,
    *,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Batch means of the bound's terms per model timestep (T network calls per batch).

    Returns numpy arrays ``vb`` (T,) (``vb[0]`` = L_0, ``vb[t]`` = L_t, bits/dim), ``mse`` (T,)
    (ε-MSE), ``xstart_mse`` (T,), ``rate`` (T,) (L_T + Σ_{s≥t} L_s), ``distortion`` (T,) (RMSE
    of x̂₀ in 0..255 units), floats ``prior_bpd`` (L_T) and ``total_bpd``, and the per-image
    tensors of :func:`calc_bpd_loop` under ``per_image``.
    """
    out = calc_bpd_loop(
        net, diffusion, x0, clip_denoised=clip_denoised, generator=generator, progress=progress
    )
    vb = out["vb"].double().mean(0).cpu().numpy()
    prior = float(out["prior_bpd"].double().mean())
    xstart_mse = out["xstart_mse"].double().mean(0).cpu().numpy()
    rate = prior + np.cumsum(vb[::-1])[::-1]
    return {
        "vb": vb,
        "mse": out["mse"].double().mean(0).cpu().numpy(),
        "xstart_mse": xstart_mse,
        "rate": rate,
        # [-1, 1] -> [0, 255]: RMSE scales by 127.5
        "distortion": np.sqrt(xstart_mse) * 127.5,
        "prior_bpd": prior,
        "total_bpd": float(out["total_bpd"].double().mean()),
        "num_images": int(x0.shape[0]),
        "per_image": out,
    }


def loss_by_t_figure(result: dict[str, Any], title: str = "", dpi: int = 100) -> Any:
    """Three panels: L_t per t (log scale, with L_0 and L_T marked), ε-MSE per t, and the
    rate-distortion curve."""
    vb, mse = result["vb"], result["mse"]
    T = len(vb)
    t = np.arange(T)
    total = max(result["total_bpd"], 1e-30)
    fig = new_figure(15.0, 4.2, dpi)
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, i + 1) for i in range(3))

    ax1.plot(t[1:], np.maximum(vb[1:], 1e-12), color="C0", label="L_t = KL(q(x_t|x_t+1,x₀) ‖ p_θ)")
    ax1.scatter(
        [0],
        [max(vb[0], 1e-12)],
        color="C3",
        zorder=3,
        label=f"L_0 decoder = {vb[0]:.3g} ({100 * vb[0] / total:.0f}% of the bound)",
    )
    ax1.scatter(
        [T],
        [max(result["prior_bpd"], 1e-12)],
        color="C2",
        marker="s",
        zorder=3,
        label=f"L_T prior = {result['prior_bpd']:.2g}",
    )
    ax1.set_yscale("log")
    ax1.set_xlabel("model timestep t (0 = least noise)", fontsize=FONTSIZE + 1)
    ax1.set_ylabel("bits/dim", fontsize=FONTSIZE + 1)
    ax1.set_title(
        f"Bound terms per t (total {result['total_bpd']:.3f} bits/dim)", fontsize=FONTSIZE + 2
    )
    ax1.legend(fontsize=FONTSIZE)

    ax2.plot(t, mse, color="C1", label="‖ε - ε̂‖² (per dim)")
    ax2.set_yscale("log")
    ax2.set_xlabel("model timestep t", fontsize=FONTSIZE + 1)
    ax2.set_ylabel("MSE", fontsize=FONTSIZE + 1)
    ax2.set_title("ε-prediction MSE per t", fontsize=FONTSIZE + 2)
    ax2.legend(fontsize=FONTSIZE)

    ax3.plot(
        result["rate"],
        result["distortion"],
        color="C4",
        marker=".",
        markersize=3,
        label="step t: rate L_T + Σ_{s≥t} L_s",
    )
    ax3.set_xlabel("rate (bits/dim sent down to step t)", fontsize=FONTSIZE + 1)
    ax3.set_ylabel("distortion: RMSE of x̂₀ (0..255 scale)", fontsize=FONTSIZE + 1)
    ax3.set_title("Rate-distortion (DDPM §4.3)", fontsize=FONTSIZE + 2)
    ax3.legend(fontsize=FONTSIZE)
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=FONTSIZE)
    fig.suptitle(
        title or f"Variational bound by timestep ({result['num_images']} held-out samples)",
        fontsize=FONTSIZE + 3,
    )
    fig.tight_layout()
    return fig
