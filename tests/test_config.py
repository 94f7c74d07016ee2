"""Every option of every config group composes and instantiates; start-up validation is clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.config import validate_train_config
from ddpm.diffusion import (
    DiffusionLoss,
    GaussianDiffusion,
    LossSecondMomentTimestepSampler,
    UniformTimestepSampler,
)
from ddpm.errors import ConfigError
from ddpm.module import DiffusionModule
from ddpm.run.checkpoint_files import resolve_ckpt_path
from ddpm.tasks.common import instantiate_dict
from fit_utils import TinyEpsNet
from hydra_utils import CONF_DIR, TINY, compose_cfg

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_are_not_empty() -> None:
    for group in [
        "data",
        "model",
        "schedule",
        "objective",
        "sampler",
        "optimizer",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
        "debug",
    ]:
        assert options(group), group


@pytest.mark.parametrize("name", options("schedule"))
def test_schedule_options_build_a_diffusion(name: str, tmp_path: Path) -> None:
    # a continuous process with the objective that trains on it (DDPM's ε cannot on rectified flow)
    objective = {"edm": "edm", "edm_vp": "edm", "rectified_flow": "flow_matching"}.get(name)
    extra = [f"objective={objective}"] if objective else []
    cfg = compose_cfg([*extra, f"schedule={name}"], tmp_path)
    diffusion = instantiate(cfg.diffusion)
    assert diffusion.num_timesteps == cfg.schedule.num_timesteps
    assert diffusion.schedule == name


@pytest.mark.parametrize("name", options("objective"))
def test_objective_options_build_a_module(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"objective={name}", "model=tiny"], tmp_path)
    module = DiffusionModule.from_config(cfg)
    # the network outputs what the process reads (2C channels for a learned variance)
    assert module.net.out_channels == module.diffusion.model_output_channels(cfg.data.channels)
    learned = name in ("hybrid", "vlb")
    assert module.net.out_channels == cfg.data.channels * (2 if learned else 1)


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name: str, tmp_path: Path) -> None:
    overrides = [f"model={name}"]
    if name == "mlp":
        overrides.append("data=swiss_roll")
    elif name in ("cifar10",):
        overrides.append("data=cifar10")
    elif name == "mnist":
        overrides.append("data=mnist")
    elif name == "celeba64":
        overrides.append("data=celeba")
    elif name == "lsun256":
        overrides += [
            "data=image_folder",
            "data.root=/nonexistent",
            "data.image_size=256",
            "data.channels=3",
        ]
    cfg = compose_cfg(overrides, tmp_path)
    if name == "diffusers":  # needs a diffusers folder (tests/interop/test_diffusers_interop.py)
        with pytest.raises(ConfigError, match="model.path is required"):
            validate_train_config(cfg)
        return
    validate_train_config(cfg)
    net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name: str, tmp_path: Path) -> None:
    overrides = [f"data={name}"]
    if name == "image_folder":
        overrides.append(f"data.root={tmp_path}")
    if name == "hf":  # loaded at setup (tests/data/test_hf_data.py)
        overrides.append(f"data.path={tmp_path}")
    cfg = compose_cfg(overrides, tmp_path)
    dm = instantiate(cfg.data)
    assert dm.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("name", options("sampler"))
def test_sampler_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"sampler={name}"], tmp_path)
    sampler = instantiate(cfg.sampler)
    assert sampler.steps == cfg.sampler.steps and sampler.clip_denoised is True


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"trainer={name}"], tmp_path)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if name in ("default", "cpu"):
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
        assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"callbacks={name}"], tmp_path)
    callbacks = instantiate_dict(cfg.callbacks)
    built = [k for k, v in (cfg.callbacks or {}).items() if "_target_" in v]
    assert len(callbacks) == len(built)
    assert all(isinstance(cb, pl.Callback) for cb in callbacks)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"logger={name}"], tmp_path)
    loggers = instantiate_dict(cfg.logger)
    assert len(loggers) == len(cfg.logger or {})


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose_and_build(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"experiment={name}"], tmp_path)
    validate_train_config(cfg)
    assert cfg.task_name == name
    DiffusionModule.from_config(cfg)  # network + diffusion + loss from the recipe


def test_cifar10_ddpm_recipe_matches_the_paper(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=cifar10_ddpm"], tmp_path)
    assert cfg.schedule.name == "linear" and cfg.schedule.num_timesteps == 1000
    assert cfg.objective.prediction_type == "epsilon"
    assert cfg.objective.variance_type == "fixed_large"
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 2e-4
    assert cfg.lr_scheduler.warmup_steps == 5000
    assert cfg.data.batch_size == 128 and cfg.data.random_flip
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.model.dropout == 0.1
    assert cfg.callbacks.ema.decay == 0.9999


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"debug={name}"], tmp_path)
    assert cfg.task_name == "debug"


def test_optuna_search_composes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(["hparams_search=optuna"], tmp_path)
    assert cfg.hydra.sweeper.direction == "minimize"


def test_unet_options_are_the_code_presets(tmp_path: Path) -> None:
    """Every U-Net option of conf/model is ddpm.nn.PRESETS[name] (the one source), wired to the
    data: composing ``model=<name>`` on data of the preset's size gives exactly its kwargs."""
    from ddpm.nn import PRESETS

    unets = [n for n in options("model") if "preset/" in (CONF / "model" / f"{n}.yaml").read_text()]
    assert sorted(unets) == sorted(PRESETS)
    for name, preset in PRESETS.items():
        cfg = compose_cfg(
            [
                f"model={name}",
                "data=image_folder",
                f"data.root={tmp_path}",
                f"data.image_size={preset['image_size']}",
                f"data.channels={preset['in_channels']}",
            ],
            tmp_path,
        )
        model = OmegaConf.to_container(cfg.model, resolve=True)
        assert model["_target_"] == "ddpm.nn.UNet"
        assert {k: model[k] for k in preset} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()
        }, name
    # a preset key is a plain override
    cfg = compose_cfg(["model=celeba64", "model.dropout=0.3"], tmp_path)
    assert cfg.model.dropout == 0.3 and cfg.model.channel_mult == [1, 2, 2, 2, 4]


def test_objectives_share_the_loss_defaults(tmp_path: Path) -> None:
    cfg = compose_cfg(["objective=v_prediction"], tmp_path)
    assert cfg.objective.loss.min_snr_gamma == 5.0 and cfg.objective.loss.loss_type == "simple"
    assert cfg.objective.loss.lambda_vlb == 0.001
    assert type(DiffusionModule.from_config(cfg).timestep_sampler) is UniformTimestepSampler
    cfg = compose_cfg(["objective=vlb", "schedule.num_timesteps=40"], tmp_path)
    assert cfg.objective.loss.loss_type == "vlb"
    sampler = DiffusionModule.from_config(
        cfg
    ).timestep_sampler  # improved DDPM's importance sampling of t
    assert type(sampler) is LossSecondMomentTimestepSampler and sampler.num_timesteps == 40


def test_timestep_sampler_of_another_T_is_refused() -> None:
    net = TinyEpsNet()
    diffusion, loss = GaussianDiffusion(num_timesteps=50), DiffusionLoss("simple")
    with pytest.raises(ValueError, match=r"20 timesteps, the process has T=50"):
        DiffusionModule(net, diffusion, loss, torch.optim.Adam, None, UniformTimestepSampler(20))
    module = DiffusionModule(net, diffusion, loss, torch.optim.Adam)  # default: uniform over T
    assert type(module.timestep_sampler) is UniformTimestepSampler
    assert module.timestep_sampler.num_timesteps == 50


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-1e-4"], "optimizer.lr"),
        (["schedule.num_timesteps=0"], "num_timesteps"),
        (
            ["data.batch_size=10", "trainer.devices=4", "trainer.accelerator=cpu"],
            r"batch_size 10 is not divisible by the 4 devices.*trainer.devices=4",
        ),
        (["data.image_size=18"], r"model \(ddpm.nn.UNet\): image_size=18 must be divisible"),
        (["model.channel_mult=[1,2,2,2,2,2]"], r"image_size=16 must be divisible .*=32"),
        (["model.in_channels=3"], r"model.in_channels=3 is derived from the data.channels"),
        (["objective=hybrid", "objective.loss.loss_type=simple"], "objective: "),
        (["schedule.num_timesteps=abc"], r"diffusion \(ddpm.diffusion.GaussianDiffusion\)"),
        (["model.attention_resolutions=[5]"], "attention_resolutions"),
        (["data=image_folder"], "data.root"),
        # T has one override path: the diffusion and the network read schedule.num_timesteps
        (["diffusion.num_timesteps=500"], r"set schedule\.num_timesteps=500 instead"),
        (["model=mlp", "data=swiss_roll", "model.num_timesteps=9"], r"schedule\.num_timesteps=9"),
        (["objective.timestep_sampler.num_timesteps=9"], r"set schedule\.num_timesteps=9"),
        (["diffusion.prediction_type=sample"], r"set objective\.prediction_type=sample"),
    ],
)
def test_bad_config_gives_one_clear_message(
    overrides: list[str], needle: str, tmp_path: Path
) -> None:
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=needle):
        validate_train_config(cfg)


def test_num_timesteps_reaches_the_process_and_the_network(tmp_path: Path) -> None:
    cfg = compose_cfg(["model=mlp", "data=swiss_roll", "schedule.num_timesteps=37"], tmp_path)
    validate_train_config(cfg)
    module = DiffusionModule.from_config(cfg)
    assert module.diffusion.num_timesteps == 37 and module.net.num_timesteps == 37


def test_unknown_key_is_rejected_by_hydra(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(
        ConfigCompositionException, match="Could not override 'optimizer.lerning_rate'"
    ):
        compose_cfg(["optimizer.lerning_rate=1e-3"], tmp_path)


def test_resume_that_finds_nothing_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_dir"):
        resolve_ckpt_path("last", None)
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_ckpt_path("last", str(tmp_path))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), None)
    assert resolve_ckpt_path(None, None) is None


def test_tiny_overrides_compose(tmp_path: Path) -> None:
    cfg = compose_cfg(TINY, tmp_path)
    validate_train_config(cfg)
    assert cfg.paths.output_dir == str(tmp_path / "run")


def test_slurm_launcher_composes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg(["hydra/launcher=slurm", "trainer.devices=4"], tmp_path)
    assert cfg.hydra.launcher.gpus_per_node == 4
    assert "SlurmLauncher" in cfg.hydra.launcher._target_


@pytest.mark.parametrize(("data", "clip"), [({"clip_denoised": False}, False), ({}, True)])
def test_a_sampler_chosen_at_sampling_time_clips_as_in_training(
    data: dict, clip: bool, tmp_path: Path
) -> None:
    """``sample.py sampler=ddim`` on a checkpoint: the sampler group's data-dependent default
    (no clipping of x̂₀ for unbounded 2-D data) resolves against the run's own data."""
    import torch

    from ddpm.checkpoint import LoadedModel
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.tasks.sample import build_sampler

    cfg = compose_cfg(["sampler=ddim", "sampler.steps=10"], tmp_path, config_name="sample")
    loaded = LoadedModel(
        net=torch.nn.Identity(),
        diffusion=GaussianDiffusion(num_timesteps=50),
        config={"data": data},
        used_ema=False,
        global_step=0,
    )
    assert build_sampler(cfg.sampler, loaded).clip_denoised is clip
    cfg = compose_cfg(["sampler=ddim", "sampler.clip_denoised=true"], tmp_path, "sample")
    assert build_sampler(cfg.sampler, loaded).clip_denoised is True  # the command decides


def test_compose_from_a_notebook_needs_one_import(tmp_path: Path) -> None:
    """The README's notebook recipe in a fresh interpreter: ``import ddpm.hydra_setup`` and Hydra's
    compose API give a config that resolves whole and builds the module."""
    import os
    import subprocess
    import sys

    from hydra_utils import SRC_DIR

    script = f"""
import ddpm.hydra_setup
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

with initialize_config_dir(config_dir={CONF_DIR!r}, version_base="1.3"):
    cfg = compose("train", overrides=["model=tiny", "objective=hybrid",
                                      "paths.output_dir={tmp_path}", "paths.root_dir={tmp_path}"])
OmegaConf.to_container(cfg, resolve=True)
from ddpm.config import validate_train_config
from ddpm.diffusion import (
    DiffusionLoss,
    GaussianDiffusion,
    LossSecondMomentTimestepSampler,
    UniformTimestepSampler,
)
from ddpm.module import DiffusionModule
from ddpm.module import DiffusionModule
validate_train_config(cfg)
print(DiffusionModule.from_config(cfg).net.out_channels)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(SRC_DIR)},  # this checkout's package
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "2"  # digits: 1 channel, doubled by the learned variance


def test_debug_mode_overrides_a_local_config(tmp_path: Path) -> None:
    """``debug`` comes last in the defaults (after ``optional local``): a machine's local file
    cannot turn debug mode's short run into a long one."""
    local = tmp_path / "extra" / "local"
    local.mkdir(parents=True)
    (local / "default.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: 777\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'extra'}]"
    assert compose_cfg([searchpath], tmp_path).trainer.max_steps == 777  # the local file is read
    cfg = compose_cfg([searchpath, "debug=default"], tmp_path)
    assert cfg.trainer.max_steps == 20 and cfg.task_name == "debug"


def test_every_sampler_the_run_uses_fits_its_process_at_start_up(tmp_path: Path) -> None:
    """What would only fail at the first sample grid (step 400) or FID fails before any work,
    naming the settings: more sampler steps than T (the default sampler's 20 with T=10 or 1), a
    callback's own default sampler, guidance without class labels."""
    cosine = [*TINY, "schedule=cosine"]  # the linear schedule refuses T=10 itself (β > 1)
    grid = r"sampler, callbacks.sample_grid.sampler, callbacks.playground.sampler"
    for T in (10, 1):
        cfg = compose_cfg([*cosine, f"schedule.num_timesteps={T}"], tmp_path)
        with pytest.raises(ConfigError, match=rf"{grid} \(.*DPMSolverSampler\).*steps=20 exceeds"):
            validate_train_config(cfg)
    fid = ["callbacks=[default,fid]", "callbacks.fid.sampler=null"]  # null: DDIM, 50 steps
    few = [*cosine, "schedule.num_timesteps=30", "sampler=ddim", "sampler.steps=5", *fid]
    with pytest.raises(ConfigError, match=r"callbacks.fid.sampler \(the default .*steps=50") as e:
        validate_train_config(compose_cfg(few, tmp_path))
    assert "callbacks.sample_grid" not in str(e.value)
    with pytest.raises(ConfigError, match="guidance_scale=3 needs class_labels"):
        validate_train_config(compose_cfg([*TINY, "sampler.guidance_scale=3"], tmp_path))
    validate_train_config(
        compose_cfg([*TINY, "data.conditional=true", "sampler.guidance_scale=3"], tmp_path)
    )
