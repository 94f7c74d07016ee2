"""A residual MLP denoiser for 2-D toy data (swiss roll, moons, Gaussian mixtures)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.nn.embeddings import ConditionedNet, class_embedding, timestep_mlp

__all__ = ["MLPDenoiser"]


class _ResidualBlock(nn.Module):
    """``h + Linear(SiLU(Linear(SiLU(h)) + proj(emb)))``: pre-activation, timestep added inside."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.emb_proj = nn.Linear(hidden_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        r = self.fc1(F.silu(h)) + self.emb_proj(emb)
        return h + self.fc2(F.silu(r))


class MLPDenoiser(ConditionedNet):
    """``forward(x (B, data_dim), t (B,), class_labels=None) -> (B, out_dim)`` for 2-D toy data.

    t -> sinusoidal(time_embed_dim) -> Linear -> SiLU -> Linear -> SiLU (emb, hidden_dim);
    x -> Linear -> ``num_layers`` residual blocks (each adds a projection of emb) -> SiLU ->
    Linear. ``t`` is rescaled by ``1000 / num_timesteps`` before the sinusoidal embedding, so
    the embedding spans the same frequencies for any number of diffusion steps T; ``None`` feeds
    ``t`` as is (a process without timesteps, e.g. EDM's c_noise).
    ``out_dim=None`` means ``data_dim`` (pass ``2 * data_dim`` for a learned variance).
    ``num_classes=K`` adds a learned class embedding (K + 1, label K the null class) to the
    time MLP's output, as the U-Net does.
    """

    def __init__(
        self,
        data_dim: int = 2,
        out_dim: int | None = None,
        hidden_dim: int = 128,
        num_layers: int = 3,
        time_embed_dim: int = 64,
        num_timesteps: int | None = 1000,
        num_classes: int | None = None,
    ) -> None:
        out_dim = data_dim if out_dim is None else out_dim
        for name, value in [
            ("data_dim", data_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
            ("time_embed_dim", time_embed_dim),
            ("num_timesteps", 1 if num_timesteps is None else num_timesteps),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        super().__init__(num_classes, None if num_timesteps is None else 1000.0 / num_timesteps)
        self.data_dim = data_dim
        self.out_dim = out_dim
        self.time_embed_dim = time_embed_dim
        self.num_timesteps = num_timesteps

        self.time_embed = timestep_mlp(time_embed_dim, hidden_dim)
        self.label_emb = class_embedding(num_classes, hidden_dim)
        self.input = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim) for _ in range(num_layers))
        self.output = nn.Linear(hidden_dim, out_dim)

    def forward(
        self, x: Tensor, t: Tensor | int | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """``x`` (B, data_dim), ``t`` (B,) or scalar, ``class_labels`` (B,) or None
        -> (B, out_dim)."""
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(
                f"x must have shape (B, data_dim) = (B, {self.data_dim}), "
                f"got shape {tuple(x.shape)}"
            )
        emb = self.embed(x, t, class_labels)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(h))
