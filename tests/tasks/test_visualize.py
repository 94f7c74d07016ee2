"""``src/visualize.py`` / ``ddpm.tasks.visualize``: every ``what=`` writes its PNGs, and the data
behind the pictures is right (forward closed form, one curve per schedule, bound terms, exact
interpolation ends with the oracle denoiser)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_utils import run_cli
from ddpm.checkpoint import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.diffusion.reflow import mean_straightness, seeded_labels, seeded_noise, straightness
from ddpm.diffusion.samplers import EulerSampler
from ddpm.tasks.train import train
from ddpm.tasks.visualize import visualize
from ddpm.utils.images import read_png
from ddpm.viz import interpolate, make_diffusions, schedule_curves, schedule_figure, slerp
from hydra_utils import SRC_DIR, compose_cfg
from oracles import GaussianOracle

VISUALIZE = str(SRC_DIR / "visualize.py")


def run(overrides: list[str], tmp_path: Path) -> dict:
    return visualize(compose_cfg(overrides, tmp_path, config_name="visualize"))


def assert_pngs(result: dict, names: list[str]) -> None:
    assert sorted(p.name for p in result["paths"]) == sorted(names)
    for p in result["paths"]:
        img = read_png(p)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0, p


# ------------------------------------------------------------------------------------ forward
def test_forward_grid_is_the_closed_form(tmp_path: Path) -> None:
    n = 1000
    res = run(
        [
            "what=forward",
            "data=digits",
            "schedules=[linear,cosine]",
            "forward.split=train",
            f"forward.num_samples={n}",
            "forward.show_images=4",
        ],
        tmp_path,
    )
    assert_pngs(res, ["forward.png", "schedules.png"])
    ts = res["timesteps"]
    assert ts == [0, 50, 100, 250, 500, 750, 1000]
    x0, eps = res["x0"], res["noise"]
    assert x0.shape == (n, 1, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    # the data behind the picture is the held-out batch itself at t = 0 ...
    from ddpm.data import ImageDataModule

    dm = ImageDataModule(name="digits", image_size=16, channels=1)
    expected = next(iter(dm.reference_dataloader("train", batch_size=n, max_samples=n)))
    for name in ("linear", "cosine"):
        x_t = res["x_t"][name]
        assert x_t.shape == (len(ts), n, 1, 16, 16)
        assert torch.equal(x_t[0], expected)
        # ... √ᾱ x0 + √(1-ᾱ) ε in between (ᾱ after t forward steps) ...
        d = res["diffusions"][name]
        for k, t in enumerate(ts[1:], start=1):
            ac = float(d.alphas_cumprod_f64[t - 1])
            torch.testing.assert_close(
                x_t[k], math.sqrt(ac) * x0 + math.sqrt(1 - ac) * eps, atol=1e-5, rtol=0
            )
        # ... and N(0, I) at t = T: per-pixel mean ≈ 0, variance ≈ 1 across the batch
        x_T = x_t[-1].flatten(1)
        mean, var = x_T.mean(0), x_T.var(0)
        se = 1 / math.sqrt(n)
        # (√ᾱ_T x0 leaves a bias of ~0.004 under the linear schedule: ᾱ_T = 4e-5)
        assert mean.abs().max() < 5 * se and abs(float(mean.mean())) < 0.015
        assert (var - 1).abs().max() < 5 * math.sqrt(2) * se
        assert abs(float(var.mean()) - 1) < 0.02
    # the two schedules are noised with the same ε but differ in between
    assert not torch.allclose(res["x_t"]["linear"][3], res["x_t"]["cosine"][3])
    assert res["alphas_cumprod"]["cosine"][3] > res["alphas_cumprod"]["linear"][3]


def test_schedule_plot_has_one_curve_per_schedule(tmp_path: Path) -> None:
    diffusions = make_diffusions(["linear", "cosine", "sigmoid"], 200)
    fig = schedule_figure(diffusions)
    axes = fig.get_axes()
    assert len(axes) == 3
    keys = ("alphas_cumprod", "betas", "log_snr")
    for ax, key in zip(axes, keys, strict=True):
        lines = ax.get_lines()
        assert len(lines) == 3
        assert [ln.get_label().split(" ")[0] for ln in lines] == ["linear", "cosine", "sigmoid"]
        for ln, d in zip(lines, diffusions.values(), strict=True):
            curves = schedule_curves(d)
            np.testing.assert_allclose(ln.get_xdata(), curves["t"] / 200)
            np.testing.assert_allclose(ln.get_ydata(), curves[key])
        assert ax.get_legend() is not None and ax.get_xlabel() and ax.get_ylabel()
    # ᾱ decreases, β increases, log SNR decreases
    c = schedule_curves(diffusions["cosine"])
    assert np.all(np.diff(c["alphas_cumprod"]) < 0) and np.all(np.diff(c["log_snr"]) < 0)
    # the task's figure: two schedules -> two curves per panel
    res = run(
        [
            "what=forward",
            "data=digits",
            "schedules=[linear,cosine]",
            "num_timesteps=100",
            "forward.num_samples=2",
        ],
        tmp_path,
    )
    for ax in res["figures"]["schedules"].get_axes():
        assert len(ax.get_lines()) == 2


def test_forward_point_cloud_and_zero_terminal_snr(tmp_path: Path) -> None:
    res = run(
        [
            "what=forward",
            "data=swiss_roll",
            "num_timesteps=200",
            "schedules=[cosine,{name:linear,rescale_zero_terminal_snr:true}]",
            "forward.num_samples=500",
            "forward.timesteps=[0,20,200]",
        ],
        tmp_path,
    )
    assert_pngs(res, ["forward.png", "schedules.png"])
    assert list(res["x_t"]) == ["cosine", "linear+zero-SNR"]
    x_t = res["x_t"]["linear+zero-SNR"]
    assert x_t.shape == (3, 500, 2)
    assert torch.equal(x_t[0], res["x0"])
    assert torch.equal(x_t[-1], res["noise"])  # ᾱ_T = 0: pure noise


def test_forward_without_data_uses_the_training_default(tmp_path: Path) -> None:
    """The README's first picture, as written: no data= and no checkpoint -> train.py's digits."""
    res = run(["what=forward", "schedules=[linear,cosine]", "forward.num_samples=2"], tmp_path)
    assert res["x0"].shape == (2, 1, 16, 16)
    assert_pngs(res, ["forward.png", "schedules.png"])


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="what must be one of"):
        run(["what=nope"], tmp_path)
    with pytest.raises(ValueError, match=r"timesteps must .* \[0, T=100\]"):
        run(
            ["what=forward", "data=digits", "num_timesteps=100", "forward.timesteps=[0,101]"],
            tmp_path,
        )
    with pytest.raises(ValueError, match="checkpoint"):
        run(["what=reverse"], tmp_path)


# ------------------------------------------------------------------------------------ reverse
@pytest.mark.parametrize(
    "sampler",
    [
        ["sampler=ddpm"],
        ["sampler=ddim", "sampler.steps=10"],
        ["sampler=dpm_solver", "sampler.steps=5"],
    ],
    ids=["ddpm", "ddim", "dpm_solver"],
)
def test_reverse_strip_for_every_sampler(
    sampler: list[str], tiny_ckpt: Path, tmp_path: Path
) -> None:
    res = run(
        [
            "what=reverse",
            f"ckpt_path={tiny_ckpt}",
            *sampler,
            "reverse.seeds=[3,5]",
            "reverse.num_frames=4",
        ],
        tmp_path,
    )
    assert_pngs(res, ["reverse.png"])
    ts = res["timesteps"].tolist()
    assert ts == sorted(ts, reverse=True) and len(ts) >= 3
    assert res["x_t"].shape == res["pred_xstart"].shape == (len(ts), 2, 1, 16, 16)
    # the last frame is the last step: its x̂₀ is the sample
    torch.testing.assert_close(res["pred_xstart"][-1], res["samples"])
    # rows: x_t and x̂₀ per seed, columns: the recorded steps
    ax = res["figures"]["reverse"].get_axes()[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "seed 3: x_t",
        "seed 3: x̂₀",
        "seed 5: x_t",
        "seed 5: x̂₀",
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"t={t}" for t in ts]


def test_reverse_at_chosen_steps(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = run(
        [
            "what=reverse",
            f"ckpt_path={tiny_ckpt}",
            "sampler=ddpm",
            "reverse.seeds=[0]",
            "reverse.timesteps=[49,30,10,0]",
        ],
        tmp_path,
    )
    assert res["timesteps"].tolist() == [49, 30, 10, 0]


def test_accelerator_names_the_device(tiny_ckpt: Path, tmp_path: Path) -> None:
    args = ["what=reverse", f"ckpt_path={tiny_ckpt}", "sampler=ddim", "sampler.steps=2"]
    args.append("reverse.seeds=[0]")
    res = run([*args, "accelerator=cpu"], tmp_path / "cpu")
    assert res["x_t"].shape[1] == 1 and res["paths"][0].is_file()
    with pytest.raises(ValueError, match="accelerator must be auto, cpu, gpu"):
        run([*args, "accelerator=tpu9"], tmp_path / "bad")


def test_num_samples_counts_images_and_points(tmp_path: Path) -> None:
    """num_samples is the one name (images or points); null: 8 images or 2000 points."""
    res = run(["what=forward", "forward.num_samples=2"], tmp_path / "img")
    assert res["x0"].shape == (2, 1, 16, 16)
    res = run(["what=forward", "data=two_moons"], tmp_path / "pts")
    assert res["x0"].shape == (2000, 2)
    res = run(["what=forward", "data=two_moons", "forward.num_samples=50"], tmp_path / "p")
    assert res["x0"].shape == (50, 2)
    with pytest.raises(ValueError, match="forward.num_samples must be an integer >= 1"):
        run(["what=forward", "forward.num_samples=0"], tmp_path / "bad")


# ------------------------------------------------------------------------------------ loss_by_t
def test_loss_by_t_terms_add_up(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = run(["what=loss_by_t", f"ckpt_path={tiny_ckpt}", "loss_by_t.num_samples=4"], tmp_path)
    assert_pngs(res, ["loss_by_t.png"])
    assert (tmp_path / "run" / "loss_by_t.json").is_file()
    vb, mse = res["vb"], res["mse"]
    assert vb.shape == mse.shape == (50,)
    assert np.all(np.isfinite(vb)) and np.all(vb[1:] >= 0) and np.all(mse > 0)
    # L = L_T + Σ L_t + L_0
    assert res["total_bpd"] == pytest.approx(res["prior_bpd"] + vb.sum(), rel=1e-6)
    assert res["rate"][0] == pytest.approx(res["total_bpd"], rel=1e-6)
    # the figure plots exactly these numbers
    ax1, ax2, _ = res["figures"]["loss_by_t"].get_axes()
    np.testing.assert_allclose(ax1.get_lines()[0].get_ydata(), np.maximum(vb[1:], 1e-12))
    np.testing.assert_allclose(ax2.get_lines()[0].get_ydata(), mse)


# ------------------------------------------------------------------------------------ interpolate
def test_interpolate_task(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = run(
        [
            "what=interpolate",
            f"ckpt_path={tiny_ckpt}",
            "interpolate.num_frames=5",
            "interpolate.steps=10",
            "interpolate.fixed_point_iters=0",
        ],
        tmp_path,
    )
    assert_pngs(res, ["interpolate.png"])
    assert res["decoded"].shape == (5, 1, 16, 16)
    assert res["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert torch.isfinite(res["latents"]).all()


def test_slerp() -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    # equal norms stay on the sphere all the way (linear interpolation would shrink them)
    z1 = z1 / z1.norm(dim=1, keepdim=True) * z0.norm(dim=1, keepdim=True)
    mid = slerp(z0, z1, 0.5)
    torch.testing.assert_close(mid.norm(dim=1), z0.norm(dim=1))
    assert ((z0 + z1) / 2).norm(dim=1).lt(0.9 * z0.norm(dim=1)).all()
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0)  # parallel: falls back to lerp


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_interpolation_ends_reproduce_inputs_with_oracle(prediction_type: str) -> None:
    # (cosine's ᾱ_T ≈ 0 makes the last inversion step barely contractive: ~3e-3 there)
    diffusion = GaussianDiffusion(
        schedule="linear", num_timesteps=200, prediction_type=prediction_type
    )
    oracle = GaussianOracle(diffusion, mean=0.2, std=0.5, data_shape=(1, 6, 6))
    x = oracle.sample_data(2, torch.Generator().manual_seed(0))
    res = interpolate(oracle, diffusion, x[0], x[1], num_frames=5, steps=50, fixed_point_iters=3)
    err_a, err_b = res["reconstruction_error"]
    assert err_a < 1e-3 and err_b < 1e-3, res["reconstruction_error"]
    torch.testing.assert_close(res["decoded"][0], x[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(res["decoded"][-1], x[1], atol=1e-3, rtol=0)
    # without fixed-point iterations the plain inversion is off by O(1/steps)
    plain = interpolate(oracle, diffusion, x[0], x[1], num_frames=2, steps=50, fixed_point_iters=0)
    assert max(plain["reconstruction_error"]) > 10 * max(err_a, err_b)
    # in between: neither input
    mid = res["decoded"][2]
    assert (mid - x[0]).abs().max() > 0.1 and (mid - x[1]).abs().max() > 0.1


def test_playground_needs_a_2d_model(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D model"):
        run(["what=playground", f"ckpt_path={tiny_ckpt}"], tmp_path)


# ------------------------------------------------------------------------------------ CLI
def test_cli_writes_pngs(tmp_path: Path) -> None:
    res = run_cli(
        [
            "what=forward",
            "data=digits",
            "schedules=[linear,cosine]",
            "forward.num_samples=3",
            f"paths.root_dir={tmp_path}",
        ],
        tmp_path,
        script=VISUALIZE,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [Path(ln) for ln in res.stdout.splitlines() if ln.endswith(".png") and " " not in ln]
    assert sorted(p.name for p in printed) == ["forward.png", "schedules.png"]
    assert all(p.is_file() for p in printed)


# ------------------------------------------------------------------------------ trajectories
POINTS = [
    "experiment=swiss_roll",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.n_train=2000",
    "data.n_val=200",
    "data.batch_size=256",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "callbacks.sample_grid.every_n_steps=3",  # the grid and the playground on every process
    "callbacks.sample_grid.num_samples=50",
    "callbacks.sample_grid.batch_size=50",
    "callbacks.playground.num_samples=50",
    "~callbacks.posthoc_ema",
]
OBJECTIVES = {
    "ddpm": [],
    "edm": ["objective=edm", "schedule=edm", "sampler=heun", "sampler.steps=4"],
    "flow": ["objective=flow_matching", "schedule=rectified_flow", "sampler=euler"],
}


@pytest.fixture(scope="module")
def points_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few steps of the 2-D MLP under each objective, trained through ``train(cfg)``."""
    out = {}
    for name, extra in OBJECTIVES.items():
        root = tmp_path_factory.mktemp(name)
        train(compose_cfg([*POINTS, *extra], root))
        out[name] = root / "run" / "checkpoints" / "last.ckpt"
    return out


@pytest.mark.slow  # trains three 2-D models
def test_trajectories_side_by_side(
    points_ckpts: dict[str, Path], tiny_ckpt: Path, tmp_path: Path
) -> None:
    paths = ",".join(str(p) for p in points_ckpts.values())
    result = run(
        [
            "what=trajectories",
            f"ckpt_paths=[{paths}]",
            "labels=[DDPM,EDM,flow]",
            "trajectories.num_samples=64",
            "trajectories.sampler.steps=12",
        ],
        tmp_path,
    )
    assert_pngs(result, ["trajectories.png"])
    res = result["result"]
    assert list(res) == ["DDPM", "EDM", "flow"]
    for name, ckpt in zip(res, points_ckpts.values(), strict=True):
        r = res[name]
        path = r["path"]
        assert path.x.shape == (12, 64, 2)
        # the same seeds: the same unit noise, started at each process's prior std
        torch.testing.assert_close(path.noise, res["flow"]["path"].noise)
        m = load_model(ckpt)
        std = m.diffusion.prior_std(m.diffusion.t_max)
        torch.testing.assert_close(path.start, std * path.noise)
        assert r["straightness"] == pytest.approx(
            float(straightness(path, m.diffusion.t_max).mean())
        )
    record = json.loads((tmp_path / "run" / "trajectories.json").read_text())
    assert record["models"]["flow"]["straightness"] == pytest.approx(res["flow"]["straightness"])
    with pytest.raises(ValueError, match="2-D models"):
        run(["what=trajectories", f"ckpt_paths=[{points_ckpts['flow']},{tiny_ckpt}]"], tmp_path)


@pytest.fixture(scope="module")
def conditional_flow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few steps of a class-conditional 2-D flow model (eight Gaussians, label = component)."""
    root = tmp_path_factory.mktemp("cond_flow")
    extra = ["data=eight_gaussians", "data.conditional=true", "trainer.max_steps=4"]
    train(compose_cfg([*POINTS, *OBJECTIVES["flow"], *extra], root))
    return root / "run" / "checkpoints" / "last.ckpt"


def test_conditional_trajectories_are_drawn_for_reflows_labels(
    conditional_flow: Path, tmp_path: Path
) -> None:
    """A class-conditional model's paths go with the seeded labels reflow draws (uniform over its
    classes, or over trajectories.classes): its S is the reflow straightness of those paths."""
    n, steps = 64, 6
    args = ["what=trajectories", f"ckpt_paths=[{conditional_flow}]", "labels=[cond]",
            f"trajectories.num_samples={n}", f"trajectories.sampler.steps={steps}"]  # fmt: skip
    result = run(args, tmp_path / "all")
    assert_pngs(result, ["trajectories.png"])
    r = result["result"]["cond"]
    assert torch.equal(r["labels"], seeded_labels(n, 8, 0, 0))
    m = load_model(conditional_flow)
    sampler = EulerSampler(steps=steps, clip_denoised=False)
    expected = mean_straightness(m.net, m.diffusion, sampler, (2,), n, 0, n)
    assert r["straightness"] == pytest.approx(expected, rel=1e-6)
    z = seeded_noise((n, 2), 0, 0)
    x = sampler(m.net, m.diffusion, (n, 2), noise=z, class_labels=r["labels"])
    torch.testing.assert_close(r["path"].sample, x)  # the paths end at the labelled samples
    record = json.loads((tmp_path / "all" / "run" / "trajectories.json").read_text())
    assert record["models"]["cond"]["classes"] == list(range(8))
    only = run([*args, "trajectories.classes=[2,5]"], tmp_path / "two")["result"]["cond"]
    assert torch.equal(only["labels"], torch.tensor([2, 5])[seeded_labels(n, 2, 0, 0)])
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 8\)"):
        run([*args, "trajectories.classes=[8]"], tmp_path / "bad")


def test_compare_rows_are_the_same_seeds(tiny_ckpt: Path, tmp_path: Path) -> None:
    result = run(
        [
            "what=compare",
            f"ckpt_paths=[{tiny_ckpt},{tiny_ckpt}]",
            "compare.seeds=[0,1,2]",
            "sampler=euler",
            "sampler.steps=3",
        ],
        tmp_path,
    )
    assert_pngs(result, ["compare.png"])
    rows = list(result["samples"].values())
    assert len(rows) == 2 and rows[0].shape[0] == 3 and rows[0].ndim == 4
    torch.testing.assert_close(rows[0], rows[1])  # one model, the same seeds: the same images
    assert not torch.allclose(rows[0][0], rows[0][1])
