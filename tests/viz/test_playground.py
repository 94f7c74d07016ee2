"""The 2-D playground: a small MLP trained on the swiss roll through the real ``train(cfg)`` gets
far closer to the data than the Gaussian it starts from, with every sampler; the distances and the
score field are right on cases with known answers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, RectifiedFlow
from ddpm.diffusion.samplers import EulerSampler
from ddpm.metrics.distances import energy_distance, mmd
from ddpm.tasks.visualize import visualize
from ddpm.viz import playground_figures, playground_report, score_field
from hydra_utils import compose_cfg
from oracles import GaussianOracle

SAMPLERS = ("ddpm", "ddim", "dpm_solver")


@pytest.fixture(scope="module")
def swiss_roll_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiment=swiss_roll (MLP, T=200) for 800 steps at lr 3e-3 on one CPU thread (~20 s)."""
    from ddpm.tasks.train import train

    tmp = tmp_path_factory.mktemp("swiss")
    cfg = compose_cfg(
        [
            "experiment=swiss_roll",
            "logger=none",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "trainer.max_steps=800",
            "optimizer.lr=3e-3",
            "trainer.limit_val_batches=0",
            "callbacks.sample_grid.every_n_steps=0",
            "callbacks.sample_grid.at_train_end=false",
        ],
        tmp,
    )
    t0 = time.time()
    train(cfg)
    print(f"swiss roll: 800 steps in {time.time() - t0:.1f} s")
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_playground_beats_the_gaussian_with_every_sampler(
    swiss_roll_ckpt: Path, tmp_path: Path
) -> None:
    res = visualize(
        compose_cfg(
            [
                "what=playground",
                f"ckpt_path={swiss_roll_ckpt}",
                "playground.num_samples=2000",
                "playground.grid_size=11",
            ],
            tmp_path,
            config_name="visualize",
        )
    )
    names = sorted(p.name for p in res["paths"])
    assert names == [f"playground_{n}.png" for n in ("forward", "reverse", "samples", "score")]
    dist = res["distances"]
    print(json.dumps(dist, indent=1))
    assert set(dist) == {*SAMPLERS, "gaussian", "data"}
    gauss = dist["gaussian"]
    assert gauss["energy_distance"] > 0.01  # N(0, I) is visibly not a swiss roll
    for name in SAMPLERS:
        assert dist[name]["energy_distance"] < 0.3 * gauss["energy_distance"], (name, dist)
        assert dist[name]["mmd"] < 0.4 * gauss["mmd"], (name, dist)
    # the estimator's noise floor (two samples of the data) is far below the Gaussian's
    assert abs(dist["data"]["energy_distance"]) < 0.15 * gauss["energy_distance"]
    saved = json.loads((tmp_path / "run" / "playground.json").read_text())
    assert saved["distances"]["ddim"]["energy_distance"] == pytest.approx(
        dist["ddim"]["energy_distance"]
    )

    # the data behind the figures: a trajectory per sampler, ending in its samples
    for name in SAMPLERS:
        traj = res["trajectories"][name]
        assert traj["x_t"].shape[1:] == (2000, 2)
        torch.testing.assert_close(traj["pred_xstart"][-1], res["samples"][name])
    score_axes = [ax for ax in res["figures"]["score"].get_axes() if ax.get_title()]
    assert len(score_axes) == len(res["scores"]) == 5
    for ax in score_axes:
        assert any(type(c).__name__ == "Quiver" for c in ax.collections)
    assert len(res["figures"]["reverse"].get_axes()) % len(SAMPLERS) == 0


def test_score_field_is_the_true_score_for_the_oracle() -> None:
    diffusion = GaussianDiffusion(schedule="cosine", num_timesteps=100)
    mu, s = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.4
    oracle = GaussianOracle(diffusion, mean=mu, std=s, dim=2)
    for t in (0, 30, 99):
        field = score_field(oracle, diffusion, t, lim=2.0, grid_size=5)
        x = field["points"].double()
        assert x.shape == (25, 2) and float(x.min()) == -2.0 and float(x.max()) == 2.0
        ac = float(diffusion.alphas_cumprod_f64[t])
        # x_t ~ N(√ᾱ μ, (ᾱ s² + 1 - ᾱ) I): ∇ log p = -(x - √ᾱ μ) / (ᾱ s² + 1 - ᾱ)
        true = -(x - math.sqrt(ac) * mu) / (ac * s**2 + 1 - ac)
        torch.testing.assert_close(field["score"].double(), true, rtol=1e-4, atol=1e-4)


def _folded_normal_mean(mu: float, sigma: float) -> float:
    """E|Z| for Z ~ N(mu, sigma²)."""
    phi = 0.5 * (1 + math.erf(-mu / (sigma * math.sqrt(2))))
    return sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2)) + mu * (1 - 2 * phi)


def test_energy_distance_and_mmd() -> None:
    g = torch.Generator().manual_seed(0)
    n = 2000
    x, x2 = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    y = torch.randn(n, 1, generator=g) + 1.0
    # closed form in 1-D: E(N(0,1), N(1,1)) = 2 E|N(1, 2)| - 2 E|N(0, 2)| ≈ 0.542; one
    # estimate at n = 2000 has a standard deviation of ~0.035, the mean of four ~0.018
    expected = 2 * _folded_normal_mean(1.0, math.sqrt(2)) - 2 * _folded_normal_mean(
        0.0, math.sqrt(2)
    )
    estimates = [energy_distance(x, y)] + [
        energy_distance(torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g) + 1.0)
        for _ in range(3)
    ]
    assert sum(estimates) / 4 == pytest.approx(expected, abs=0.07)
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), abs=1e-9)
    assert abs(energy_distance(x, x2)) < 0.01
    assert mmd(x, y) > 0.1 and abs(mmd(x, x2)) < 0.01
    # a shifted copy is farther the larger the shift
    assert energy_distance(x, x + 0.5) < energy_distance(x, x + 1.0) < energy_distance(x, x + 2.0)
    with pytest.raises(ValueError, match="same D"):
        energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="finite"):
        mmd(torch.full((5, 2), float("nan")), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, y, bandwidths=[])


def test_training_logs_playground_pictures_and_distance(tmp_path) -> None:
    """The playground callback draws its pictures during 2-D training and logs the distances."""
    import json

    from ddpm.tasks.train import train
    from hydra_utils import compose_cfg

    cfg = compose_cfg(
        [
            "experiment=swiss_roll",
            "logger=none",
            "trainer.max_steps=30",
            "trainer.enable_progress_bar=false",
            "trainer.val_check_interval=30",
            "callbacks.sample_grid.every_n_steps=30",
            "callbacks.sample_grid.num_samples=300",
            "callbacks.playground.num_samples=300",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    samples = tmp_path / "run" / "samples"
    assert (samples / "score_step_0000030.png").is_file()
    assert (samples / "reverse_step_0000030.png").is_file()
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["val/energy_distance"] == pytest.approx(metrics["val/energy_distance"])


class FlowGaussianOracle(torch.nn.Module):
    """The exact network of rectified flow (τ = 1000 t) for data N(μ, s² I): x̂₀ = E[x₀ | x_t] =
    μ + (1-t) s² (x_t - (1-t) μ)/r² with r² = (1-t)² s² + t², ε̂ = (x_t - (1-t) x̂₀)/t; it
    outputs the velocity ε̂ - x̂₀ or x̂₀."""

    def __init__(self, mu: torch.Tensor, s: float, prediction_type: str) -> None:
        super().__init__()
        self.mu, self.s, self.prediction_type = mu, s, prediction_type

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        t = (tau.double() / 1000).reshape(-1, 1)
        x = x.double()
        r2 = (1 - t) ** 2 * self.s**2 + t**2
        x0 = self.mu + (1 - t) * self.s**2 * (x - (1 - t) * self.mu) / r2
        out = x0 if self.prediction_type == "sample" else (x - (1 - t) * x0) / t - x0
        return out.float()


@pytest.mark.parametrize("prediction_type", ["velocity", "sample"])
def test_score_field_on_rectified_flow_is_the_true_score(prediction_type: str) -> None:
    """On a continuous process the score is -ε̂/σ_t at process time t: rectified flow's
    x_t ~ N((1-t) μ, ((1-t)² s² + t²) I) for data N(μ, s² I)."""
    flow = RectifiedFlow(num_timesteps=1000, prediction_type=prediction_type)
    mu, s = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.4
    oracle = FlowGaussianOracle(mu, s, prediction_type)
    for t in (0.05, 0.5, 0.95):
        field = score_field(oracle, flow, t, lim=2.0, grid_size=5)
        x = field["points"].double()
        true = -(x - (1 - t) * mu) / ((1 - t) ** 2 * s**2 + t**2)
        torch.testing.assert_close(field["score"].double(), true, rtol=1e-4, atol=1e-4)


def test_playground_report_on_a_continuous_process() -> None:
    """The playground of a flow model: distances, trajectories at process times and the score
    field; no forward picture (DDPM's chain only)."""
    flow = RectifiedFlow(num_timesteps=1000)
    oracle = FlowGaussianOracle(torch.zeros(2, dtype=torch.float64), 1.0, "velocity")
    ref = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    report = playground_report(
        oracle, flow, ref, {"euler": EulerSampler(steps=8, clip_denoised=False)}, frames=4
    )
    assert report["forward"] is None
    assert sorted(report["scores"]) == [0.01, 0.05, 0.15, 0.4, 0.8]
    times = report["trajectories"]["euler"]["timesteps"].tolist()
    assert times[0] == pytest.approx(1.0) and len(times) == 4
    d = report["distances"]
    assert d["euler"]["energy_distance"] < 0.02  # the exact network samples N(0, I)
    assert set(playground_figures(report)) == {"reverse", "score", "samples"}
