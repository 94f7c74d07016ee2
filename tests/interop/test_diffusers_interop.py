"""diffusers interop: our U-Net <-> UNet2DModel (weights, outputs), our process <-> DDPMScheduler,
export to a pipeline folder diffusers loads alone, import of diffusers folders, and refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ddpm.checkpoint import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.interop.diffusers import (
    InteropError,
    diffusion_from_scheduler_config,
    from_diffusers_unet,
    scheduler_config,
    to_diffusers_unet,
    unet_from_pretrained,
    unet_to_diffusers_config,
)
from ddpm.nn import PRESETS, MLPDenoiser, UNet, count_parameters
from hydra_utils import TINY, compose_cfg

diffusers = pytest.importorskip("diffusers")

# improved DDPM's CIFAR-10 U-Net (Nichol & Dhariwal 2021): scale-shift norm, 3 blocks, 4 heads
IDDPM = PRESETS["cifar10_iddpm"]
# every option at once on a small net: BigGAN resampling, scale-shift, heads by width, classes
SMALL = dict(
    in_channels=3,
    image_size=8,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8, 4),
    num_head_channels=8,
    use_scale_shift_norm=True,
    resblock_updown=True,
    norm_groups=4,
    num_classes=3,
)
# google/ddpm-cifar10-32 (DDPM's released CIFAR-10 model ported to diffusers), config.json
GOOGLE_DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
)


def _random_unet(kw: dict) -> UNet:
    """Our U-Net with random weights everywhere (its zero-initialised output layers would make
    the comparison vacuous), drawn fast: fan-in scaled normals, norms around 1."""
    with torch.device("meta"):
        net = UNet(**kw)
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                mean = 1.0 if name.endswith("weight") else 0.0
                p.copy_(mean + 0.1 * torch.randn(p.shape, generator=g))
    return net


def _same_outputs(ours: UNet, theirs: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, ours.in_channels, ours.image_size, ours.image_size)
    t = torch.tensor([617])
    y = None if ours.num_classes is None else torch.tensor([1])
    with torch.no_grad():
        a, b = ours.eval()(x, t, y), theirs.eval()(x, t, class_labels=y).sample
    assert a.abs().mean() > 0.1  # not vacuous
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [PRESETS["cifar10"], PRESETS["digits"], PRESETS["mnist"], PRESETS["celeba64"], IDDPM, SMALL],
    ids=["cifar10", "digits", "mnist", "celeba64", "iddpm_scale_shift", "small_all_options"],
)
def test_round_trip_is_bit_identical_and_outputs_match(kw: dict) -> None:
    ours = _random_unet(kw)
    theirs = to_diffusers_unet(ours)
    assert count_parameters(theirs) == count_parameters(ours)
    back = from_diffusers_unet(theirs)
    assert list(back.state_dict()) == list(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    _same_outputs(ours, theirs)


def test_ddpm_release_config_imports_exactly() -> None:
    """google/ddpm-cifar10-32's UNet2DModel (TF 'SAME' padding, eps 1e-6, freq_shift 1)."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**GOOGLE_DDPM_CIFAR10)
    ours = from_diffusers_unet(theirs)
    assert ours.config["norm_eps"] == 1e-6 and ours.config["downsample_padding"] == 0
    assert {k: ours.config[k] for k in PRESETS["cifar10"] if k != "dropout"} == {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in PRESETS["cifar10"].items()
        if k != "dropout"
    }
    _same_outputs(ours, theirs)  # its own zero-free init


@pytest.mark.parametrize(
    "kw",
    [
        dict(schedule="linear"),
        dict(schedule="linear", num_timesteps=100, prediction_type="v_prediction"),
        dict(schedule="cosine", num_timesteps=4000, variance_type="learned_range"),
        dict(schedule="scaled_linear", prediction_type="sample", variance_type="fixed_small"),
        dict(schedule="sigmoid"),
        dict(schedule="cosine", rescale_zero_terminal_snr=True, prediction_type="v_prediction"),
    ],
)
def test_scheduler_config_is_our_process_both_ways(kw: dict) -> None:
    ours = GaussianDiffusion(**kw)
    config = scheduler_config(ours, clip_sample=False, timestep_spacing="trailing")
    named = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
    if kw == dict(schedule="linear"):  # DDPM's, as google/ddpm-cifar10-32's scheduler says it
        assert (config["beta_start"], config["beta_end"]) == (1e-4, 0.02)
    if kw["schedule"] in named and not kw.get("rescale_zero_terminal_snr"):
        assert config["beta_schedule"] == named[kw["schedule"]] and "trained_betas" not in config
    else:
        assert len(config["trained_betas"]) == ours.num_timesteps
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        theirs = cls.from_config(config)
        ac = theirs.alphas_cumprod.double().numpy()
        np.testing.assert_allclose(ac, ours.alphas_cumprod_f64.numpy(), atol=1e-6, rtol=0)
        assert theirs.config.prediction_type == ours.prediction_type
        assert not theirs.config.clip_sample and theirs.config.timestep_spacing == "trailing"
    assert diffusers.DDPMScheduler.from_config(config).variance_type == ours.variance_type
    node, hints = diffusion_from_scheduler_config(json.loads(json.dumps(config)))
    back = GaussianDiffusion(**{k: v for k, v in node.items() if k != "_target_"})
    np.testing.assert_allclose(back.alphas_cumprod_f64, ours.alphas_cumprod_f64, atol=1e-9)
    assert (back.prediction_type, back.variance_type) == (ours.prediction_type, ours.variance_type)
    assert hints == {"clip_denoised": False, "spacing": "trailing"}


def _our_checkpoint(path: Path, net: UNet, spacing: str, **diffusion) -> Path:
    """One of our exported checkpoints (``ddpm-net-v1``) holding ``net`` and its run config."""
    from ddpm.tasks.export import write_safetensors

    config = {
        "model": {"_target_": "ddpm.nn.UNet", **net.config},
        "diffusion": {"_target_": "ddpm.diffusion.GaussianDiffusion", **diffusion},
        "data": {"channels": net.in_channels, "image_size": net.image_size},
        "sampler": {
            "_target_": "ddpm.diffusion.samplers.DDIMSampler",
            "steps": 20,
            "spacing": spacing,
            "clip_denoised": True,
        },
    }
    return write_safetensors(path, net.state_dict(), config, global_step=7, ema=True)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_exported_pipeline_samples_like_our_sampler(tmp_path: Path, spacing: str) -> None:
    """DDIMPipeline on the exported folder == sample.py's code path on the checkpoint, 20 DDIM
    steps from the same seeds; then the folder imports back to the same weights and process."""
    from ddpm.tasks.export import export
    from ddpm.tasks.sample import build_sampler, generate

    ckpt = _our_checkpoint(tmp_path / "model.safetensors", _random_unet(PRESETS["tiny"]), spacing)
    out = tmp_path / "pipeline"
    export(compose_cfg([f"ckpt_path={ckpt}", "format=diffusers", f"out={out}"], tmp_path, "export"))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors"} <= files
    assert not any(f.endswith(".bin") for f in files)
    card = (out / "README.md").read_text()
    assert "7 steps" in card.replace("\n", " ") and '"spacing": "' + spacing in card

    loaded = load_model(ckpt)
    seeds = [3, 4, 5]
    ours = generate(loaded, build_sampler(None, loaded), seeds, 3, torch.device("cpu"))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        batch_size=3,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=20,
        eta=0.0,
        use_clipped_model_output=True,
        output_type="np",
    ).images
    assert 0.05 < np.abs(theirs - 0.5).mean()  # images, not a constant
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    ddpm = diffusers.DDPMPipeline.from_pretrained(out)
    ddpm.set_progress_bar_config(disable=True)
    assert ddpm(num_inference_steps=3, output_type="np").images.shape == (1, 16, 16, 3)

    # import: the folder -> our checkpoint again
    back = tmp_path / "imported.safetensors"
    export(compose_cfg([f"ckpt_path={out}", f"out={back}"], tmp_path, "export"))
    imported = load_model(back)
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(imported.net.state_dict()[k], v), k
    np.testing.assert_allclose(
        imported.diffusion.alphas_cumprod_f64, loaded.diffusion.alphas_cumprod_f64, atol=1e-12
    )
    assert imported.config["sampler"]["spacing"] == spacing


def test_learned_variance_and_class_conditional_exports(tmp_path: Path) -> None:
    """learned_range runs in DDPMPipeline (2C outputs split by DDPMScheduler); a conditional
    U-Net exports with K + 1 class embeddings; the model card says what the pipelines cannot."""
    from ddpm.tasks.export import export

    learned = _random_unet(dict(PRESETS["tiny"], out_channels=6))
    ckpt = _our_checkpoint(
        tmp_path / "learned.safetensors", learned, "uniform", variance_type="learned_range"
    )
    out = tmp_path / "learned"
    export(compose_cfg([f"ckpt_path={ckpt}", "format=diffusers", f"out={out}"], tmp_path, "export"))
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.variance_type == "learned_range"
    images = pipe(num_inference_steps=3, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert "cannot run this model" in (out / "README.md").read_text()

    cond = _random_unet(dict(PRESETS["tiny"], num_classes=4))
    ckpt = _our_checkpoint(tmp_path / "cond.safetensors", cond, "uniform")
    out = tmp_path / "cond"
    export(compose_cfg([f"ckpt_path={ckpt}", "format=diffusers", f"out={out}"], tmp_path, "export"))
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet")
    assert unet.config.num_class_embeds == 5 and unet.config.class_embed_type is None
    _same_outputs(cond, unet)
    card = (out / "README.md").read_text().replace("\n", " ")
    assert "4 classes and the null class 4" in card and "guidance" in card


def test_import_train_export_load_in_diffusers(tmp_path: Path) -> None:
    """A random UNet2DModel (diffusers' own defaults: cos-first embedding, 8-channel heads) is
    fine-tuned here with model=diffusers, exported, and loads in diffusers with the new weights."""
    from ddpm.tasks.export import export
    from ddpm.tasks.train import train

    torch.manual_seed(0)
    source = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    source.save_pretrained(tmp_path / "source")
    assert unet_from_pretrained(str(tmp_path / "source")).training  # dropout on in fine-tuning
    cfg = compose_cfg(
        [
            *TINY,
            "model=diffusers",
            f"model.path={tmp_path / 'source'}",
            "trainer.max_steps=3",
            "trainer.val_check_interval=1000",
            "callbacks.sample_grid.at_train_end=false",
            "callbacks.sample_grid.every_n_steps=1000",
            "callbacks.ema.decay=0.5",
        ],
        tmp_path,
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    loaded = load_model(ckpt)
    assert loaded.config["model"]["_target_"] == "ddpm.interop.diffusers.unet_from_pretrained"
    out = tmp_path / "exported"
    export(compose_cfg([f"ckpt_path={ckpt}", "format=diffusers", f"out={out}"], tmp_path, "export"))
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet")
    assert unet.config.flip_sin_to_cos and unet.config.attention_head_dim == 8
    moved = 0.0
    for (name, new), old in zip(unet.state_dict().items(), source.state_dict().values()):
        assert new.shape == old.shape, name
        moved = max(moved, (new - old).abs().max().item())
    assert 0 < moved < 0.1  # trained from the folder's weights, a few small steps
    _same_outputs(loaded.net, unet)  # and it is still the same function


def test_refusals_name_what_does_not_map(tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="MLPDenoiser has no diffusers counterpart"):
        to_diffusers_unet(MLPDenoiser())
    with pytest.raises(InteropError, match="variance_type='learned'"):
        scheduler_config(GaussianDiffusion(variance_type="learned"))
    with pytest.raises(InteropError, match=r"channel_mult=\[2, 2\].*must be 1"):
        unet_to_diffusers_config(dict(PRESETS["tiny"], channel_mult=(2, 2)))
    with pytest.raises(InteropError, match="num_heads=4.*num_head_channels"):  # 16 vs 32 channels
        unet_to_diffusers_config(dict(PRESETS["tiny"], attention_resolutions=(16, 8), num_heads=4))
    with pytest.raises(InteropError, match="beta_schedule='sigmoid'.*GeoDiff"):
        diffusion_from_scheduler_config({"num_train_timesteps": 10, "beta_schedule": "sigmoid"})
    with pytest.raises(InteropError, match="variance_type='learned'"):
        diffusion_from_scheduler_config({"num_train_timesteps": 10, "variance_type": "learned"})
    # a scheduler that describes no process is refused at import, not in the imported file
    with pytest.raises(InteropError, match="num_train_timesteps=0: .*no diffusion process"):
        diffusion_from_scheduler_config({"num_train_timesteps": 0})
    with pytest.raises(InteropError, match="no usable process: betas must lie in"):
        diffusion_from_scheduler_config({"num_train_timesteps": 10, "beta_end": 2.0})
    bad = diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),  # attention down only
        norm_num_groups=4,
        time_embedding_type="fourier",
        class_embed_type="timestep",
        attention_head_dim=8,
    )
    with pytest.raises(InteropError) as e:
        from_diffusers_unet(bad)
    for needle in ("time_embedding_type='fourier'", "class_embed_type='timestep'", "level 1"):
        assert needle in str(e.value)
    with pytest.raises(FileNotFoundError, match="diffusers folder not found"):
        unet_from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(InteropError, match="neither a diffusers pipeline folder"):
        unet_from_pretrained(str(tmp_path))
    small = diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(InteropError, match="image_size: the folder has 8, the run needs 16"):
        unet_from_pretrained(str(tmp_path / "small"), in_channels=3, image_size=16)
    cond = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    )  # fmt: skip
    cond.save_pretrained(tmp_path / "cond")
    with pytest.raises(InteropError, match="UNet2DConditionModel does not map"):
        unet_from_pretrained(str(tmp_path / "cond"))


def test_missing_diffusers_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=r"pip install 'ddpm-lightning\[diffusers\]'"):
        to_diffusers_unet(UNet(**PRESETS["tiny"]))


def test_export_config_and_import_need_a_pipeline_folder(tmp_path: Path) -> None:
    from ddpm.checkpoint import CheckpointError
    from ddpm.tasks.export import export

    diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(tmp_path / "unet_only")  # fmt: skip
    cfg = compose_cfg([f"ckpt_path={tmp_path / 'unet_only'}"], tmp_path, "export")
    with pytest.raises(CheckpointError, match="scheduler_config.json not found.*model=diffusers"):
        export(cfg)
    with pytest.raises(ValueError, match="format must be one of"):
        export(OmegaConf.merge(cfg, {"format": "onnx"}))
    with pytest.raises(ValueError, match="is a folder.*format=ddpm"):
        export(OmegaConf.merge(cfg, {"format": "diffusers"}))
