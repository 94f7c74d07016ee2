"""The papers' recipes as shipped: improved-diffusion's CIFAR-10 U-Net and timestep rescaling,
DDPM's LR warm-up from 0 and constant EMA, the LR-schedule group, and every experiment taking real
steps under every precision with ``trainer=gpu`` (on the CPU, tiny shapes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ddpm.callbacks.ema import EMA
from ddpm.lr_schedules import LinearWarmup, linear_warmup, warmup_cosine, warmup_linear
from ddpm.module import DiffusionModule
from ddpm.nn.unet import count_parameters
from ddpm.tasks.train import train
from hydra_utils import compose_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# ---------------------------------------------------------------- improved-diffusion's U-Net
def iddpm_unet_parameters(
    in_channels: int,
    model_channels: int,
    out_channels: int,
    num_res_blocks: int,
    attention_ds: tuple[int, ...],
    channel_mult: tuple[int, ...],
    use_scale_shift_norm: bool,
) -> int:
    """Parameters of improved-diffusion's ``UNetModel`` (unet.py), counted layer by layer along
    its constructor: conv_nd / linear / GroupNorm32 sizes, ResBlock(in_layers, emb_layers,
    out_layers, skip_connection), AttentionBlock(norm, qkv, proj_out), Downsample / Upsample
    convs; ``attention_ds`` are downsample rates, as its ``attention_resolutions``."""

    def conv(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k + c_out

    def norm(c: int) -> int:
        return 2 * c

    def linear(a: int, b: int) -> int:
        return a * b + b

    emb = 4 * model_channels

    def res(c_in: int, c_out: int) -> int:
        skip = 0 if c_in == c_out else conv(c_in, c_out, 1)
        emb_out = 2 * c_out if use_scale_shift_norm else c_out
        return (
            norm(c_in) + conv(c_in, c_out, 3) + linear(emb, emb_out) + norm(c_out)
            + conv(c_out, c_out, 3) + skip
        )  # fmt: skip

    def attn(c: int) -> int:
        return norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = linear(model_channels, emb) + linear(emb, emb) + conv(in_channels, model_channels, 3)
    chans, ch, ds = [model_channels], model_channels, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            total += res(ch, mult * model_channels)
            ch = mult * model_channels
            total += attn(ch) if ds in attention_ds else 0
            chans.append(ch)
        if level != len(channel_mult) - 1:
            total += conv(ch, ch, 3)  # Downsample(use_conv=True)
            chans.append(ch)
            ds *= 2
    total += res(ch, ch) + attn(ch) + res(ch, ch)
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            total += res(ch + chans.pop(), model_channels * mult)
            ch = model_channels * mult
            total += attn(ch) if ds in attention_ds else 0
            if level and i == num_res_blocks:
                total += conv(ch, ch, 3)  # Upsample(use_conv=True)
                ds //= 2
    return total + norm(ch) + conv(model_channels, out_channels, 3)


def test_iddpm_cifar10_unet_has_improved_diffusions_parameter_count(tmp_path: Path) -> None:
    """experiment=cifar10_iddpm builds improved-diffusion's CIFAR-10 model: create_model(32, 128,
    3, learn_sigma=True, attention_resolutions="16,8", num_heads=4, use_scale_shift_norm=True,
    dropout=0.3), 52,546,438 parameters (its checkpoint is named "cifar10_uncond_50M")."""
    cfg = compose_cfg(["experiment=cifar10_iddpm"], tmp_path)
    with torch.device("meta"):  # shapes only: no 52M-parameter initialisation
        net = instantiate(cfg.model)
    want = iddpm_unet_parameters(3, 128, 6, 3, (2, 4), (1, 2, 2, 2), True)
    assert want == 52_546_438  # the number quoted in conf/model/cifar10_iddpm.yaml
    assert count_parameters(net) == want
    assert net.config["num_heads"] == 4 and net.config["dropout"] == 0.3
    # the DDPM model through the same formula: the paper's 35.7M
    with torch.device("meta"):
        ddpm = instantiate(compose_cfg(["experiment=cifar10_ddpm"], tmp_path).model)
    assert count_parameters(ddpm) == iddpm_unet_parameters(3, 128, 3, 2, (2,), (1, 2, 2, 2), False)
    assert round(count_parameters(ddpm) / 1e5) == 357


def test_iddpm_recipe_settings_and_rescaled_timesteps(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=cifar10_iddpm"], tmp_path)
    assert (cfg.schedule.name, cfg.schedule.num_timesteps) == ("cosine", 4000)
    assert cfg.objective.variance_type == "learned_range"
    assert cfg.objective.loss.loss_type == "hybrid" and cfg.objective.loss.lambda_vlb == 0.001
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.0
    assert cfg.lr_scheduler.warmup_steps == 0 and cfg.data.batch_size == 128
    assert cfg.callbacks.ema.decay == 0.9999 and cfg.callbacks.ema.warmup is False
    assert cfg.trainer.gradient_clip_val is None and cfg.data.random_flip is False
    # the network sees t * 1000 / T: at T=4000, t=2000 embeds like t=500 of an unscaled net
    net = instantiate(cfg.model, model_channels=32, num_res_blocks=1, dropout=0.0).eval()
    plain = instantiate(
        cfg.model, model_channels=32, num_res_blocks=1, dropout=0.0, num_timesteps=None
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised convs would hide the timestep's effect
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        plain.load_state_dict(net.state_dict())
        x = torch.randn(2, 3, 32, 32, generator=g)
        t = torch.tensor([2000, 3999])
        torch.testing.assert_close(net(x, t), plain(x, t * 0.25))
        assert (net(x, t) - plain(x, t)).abs().max() > 1e-3


def test_edm_and_rectified_flow_recipes(tmp_path: Path) -> None:
    """experiment=cifar10_edm: EDM's process, preconditioning, σ sampling and Heun-18 on a
    53.6M U-Net (EDM's DDPM++: 55.7M); experiment=cifar10_rectified_flow: flow matching."""
    cfg = compose_cfg(["experiment=cifar10_edm"], tmp_path)
    edm = instantiate(cfg.diffusion)
    assert type(edm).__name__ == "EDMProcess" and edm.prediction_type == "edm"
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.002, 80.0, 0.5)
    assert (cfg.objective.timestep_sampler.p_mean, cfg.objective.timestep_sampler.p_std) == (
        -1.2,
        1.2,
    )
    assert cfg.sampler.steps == 18 and cfg.sampler._target_.endswith("HeunSampler")
    assert sum(p.numel() for p in instantiate(cfg.model).parameters()) == 53_634_563
    assert cfg.data.batch_size == 512 and cfg.callbacks.ema.half_life_kimg == 500
    cfg = compose_cfg(["experiment=cifar10_rectified_flow"], tmp_path)
    rf = instantiate(cfg.diffusion)
    assert type(rf).__name__ == "RectifiedFlow" and rf.prediction_type == "velocity"
    assert cfg.sampler._target_.endswith("EulerSampler")


def test_ddpm_recipe_warms_up_from_zero_and_keeps_ema_constant(tmp_path: Path) -> None:
    """DDPM: lr · min(step / 5000, 1), the first update at lr 0; EMA β = 0.9999 at every update
    (TF's ExponentialMovingAverage without num_updates)."""
    cfg = compose_cfg(["experiment=cifar10_ddpm"], tmp_path)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    sched = instantiate(cfg.lr_scheduler)(optimizer=opt)
    lrs = []
    for _ in range(5002):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(2e-4 / 5000, rel=1e-12)
    assert lrs[2500] == pytest.approx(1e-4, rel=1e-12)
    assert lrs[5000] == lrs[5001] == pytest.approx(2e-4, rel=1e-12)
    ema = instantiate(cfg.callbacks.ema)
    assert isinstance(ema, EMA)
    assert [ema.decay_at(n) for n in (1, 2, 10, 3000)] == [0.9999] * 4


# ---------------------------------------------------------------- LR schedules
def _lrs(make, steps: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_decaying_schedules_follow_their_closed_forms(kind: str, warmup: int) -> None:
    total, lr, ratio = 20, 0.5, 0.1
    fn = warmup_cosine if kind == "cosine" else warmup_linear
    got = _lrs(lambda o: fn(o, warmup, total, ratio), total + 3, lr)
    lo = ratio * lr
    for k, value in enumerate(got):
        if k < warmup:
            want = lr * k / warmup
        else:
            s = min(k - warmup, total - warmup) / (total - warmup)
            shape = (1 + math.cos(math.pi * s)) / 2 if kind == "cosine" else 1 - s
            want = lo + (lr - lo) * shape
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), (k, value, want)


def test_schedule_state_resumes_exactly() -> None:
    """A scheduler restored from its state_dict (as from a checkpoint) continues the same LRs."""
    full = _lrs(lambda o: warmup_cosine(o, 3, 12), 12)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 3, 12)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    # Lightning's order on resume: configure_optimizers, then the optimizer's and the
    # scheduler's states
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine(opt2, 3, 12)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    rest = []
    for _ in range(7):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(full[5:], rel=1e-12)


def test_schedule_errors_name_the_setting() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="lr_scheduler.total_steps.*max_steps=-1"):
        warmup_cosine(opt, 10, None)
    with pytest.raises(ValueError, match="total_steps=10 must exceed lr_scheduler.warmup_steps=10"):
        warmup_linear(opt, 10, 10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine(opt, 0, 10, 1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(-1)
    assert isinstance(linear_warmup(opt, 0), torch.optim.lr_scheduler.LambdaLR)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_lr_scheduler_group_builds_from_the_config(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"lr_scheduler={name}", "trainer.max_steps=300"], tmp_path)
    module = DiffusionModule.from_config(cfg)
    opt_cfg = module.configure_optimizers()
    lrs = []
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    for _ in range(300):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = cfg.optimizer.lr
    assert lrs[0] == 0.0 and lrs[100] == pytest.approx(peak)  # 100 warm-up steps from 0
    assert lrs[-1] == pytest.approx(peak) if name == "constant" else lrs[-1] < 0.01 * peak


# ---------------------------------------------------------------- every recipe x precision
TINY_RECIPE = [
    "trainer=gpu",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=none",
    # checkpoints and pictures are not at stake here (sampling runs outside autocast)
    "~callbacks.model_checkpoint",
    "~callbacks.preemption",
    "~callbacks.sample_grid",
]
# image recipes on 16x16 digits with a narrow network of the same layout
TINY_IMAGES = [
    "data=digits",
    "data.batch_size=4",
    "model.model_channels=32",
    "model.num_res_blocks=1",
]


def _cpu_fp16_autocast() -> str | None:
    """Why float16 autocast cannot run on the test machine's CPU, or None when it can."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)).sum()
        torch.amp.GradScaler("cpu")
    except (RuntimeError, AttributeError) as e:  # pragma: no cover - depends on the CPU build
        return f"float16 autocast / GradScaler is not supported by this CPU build: {e}"
    return None


def _fp16_on_cpu(cfg: DictConfig) -> None:
    """``precision='16-mixed'`` on a CPU silently becomes bf16 in Lightning; give the Trainer the
    plugin a GPU run gets instead (fp16 autocast + a GradScaler), so the scaler path runs."""
    with open_dict(cfg):
        cfg.trainer.precision = None
        cfg.trainer.plugins = [
            {
                "_target_": "pytorch_lightning.plugins.precision.MixedPrecision",
                "precision": "16-mixed",
                "device": "cpu",
                "scaler": {"_target_": "torch.amp.GradScaler", "device": "cpu"},
            }
        ]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_recipe_takes_steps_under_every_precision(
    experiment: str | None, precision: str, tmp_path: Path
) -> None:
    """trainer=gpu x each shipped experiment x precision starts, clips gradients (fused Adam),
    steps, validates and samples (the bf16 line of the README failed here before)."""
    if precision == "16-mixed" and (why := _cpu_fp16_autocast()):
        pytest.skip(why)
    overrides = [*TINY_RECIPE, f"trainer.precision={precision}"]
    if experiment is not None:
        overrides.append(f"experiment={experiment}")
    if experiment is None or experiment.startswith("cifar10"):
        overrides += TINY_IMAGES
    cfg = compose_cfg(overrides, tmp_path)
    assert cfg.trainer.precision == precision
    if precision == "16-mixed":
        _fp16_on_cpu(cfg)
    metrics = train(cfg)
    assert metrics["global_step"] == 2
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
