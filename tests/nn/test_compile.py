"""The GPU path, proven on the CPU: the network and the loss trace into one graph (no graph
breaks) for every U-Net preset under bf16 autocast, with and without activation checkpointing,
and ``sampler.compile=true`` samples what the eager sampler samples."""

from __future__ import annotations

import pytest
import torch

from ddpm.diffusion import DiffusionLoss, GaussianDiffusion
from ddpm.diffusion.samplers.configs import DDIMSampler
from ddpm.nn import PRESETS, unet_preset

# Every preset at a few channels (the graph does not depend on the width); the 64 and 256 px
# presets at 32 px, which keeps all their levels and attention at 16.
SMALL = {
    "cifar10": dict(model_channels=32),
    "cifar10_iddpm": dict(model_channels=32),
    "tiny": dict(),
    "digits": dict(),
    "mnist": dict(model_channels=32),
    "celeba64": dict(model_channels=32, image_size=32),
    "lsun256": dict(model_channels=32, image_size=32),
}
_SLOW = pytest.mark.slow  # 10-25 s of tracing each on a shared 2-core machine
CASES = [
    pytest.param(name, "simple", False, marks=[_SLOW] if name in ("celeba64", "lsun256") else [])
    for name in PRESETS
]
CASES += [
    pytest.param("cifar10", "hybrid", False, marks=_SLOW),
    pytest.param("celeba64", "simple", True, marks=_SLOW),
    pytest.param("lsun256", "simple", True),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_every_preset_is_covered():
    assert set(SMALL) == set(PRESETS)


@pytest.mark.parametrize(("preset", "loss_type", "checkpointing"), CASES)
def test_network_and_loss_trace_without_graph_breaks(preset, loss_type, checkpointing):
    """``torch._dynamo.explain`` of the training loss (q_sample, network, target, MSE and, for
    the hybrid loss, the bound) under bf16 autocast: one graph, zero breaks."""
    learned = loss_type == "hybrid"
    channels = PRESETS[preset]["in_channels"]
    net = unet_preset(
        preset,
        **SMALL[preset],
        out_channels=2 * channels if learned else channels,
        use_scale_shift_norm=learned,
        checkpointing=checkpointing,
    ).train()
    diffusion = GaussianDiffusion(
        num_timesteps=1000, variance_type="learned_range" if learned else "fixed_large"
    )
    loss_fn = DiffusionLoss(loss_type)
    size = net.image_size

    def loss(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(net, diffusion, x0, t, noise)["loss"].mean()

    x0 = torch.rand(2, channels, size, size) * 2 - 1
    t, noise = torch.tensor([0, 999]), torch.randn(2, channels, size, size)
    explanation = torch._dynamo.explain(loss)(x0, t, noise)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # an inductor compile: minutes on a shared CPU
def test_compiled_sampler_samples_what_the_eager_one_samples():
    """``sampler.compile=true``: the same samples as eager, the model compiled once per model."""
    torch.manual_seed(0)
    net = unet_preset("tiny").eval()
    for p in net.out_conv.parameters():  # not the zero-init output: a non-trivial network
        torch.nn.init.normal_(p, std=0.02)
    diffusion = GaussianDiffusion(num_timesteps=100)
    eager, compiled = DDIMSampler(steps=3), DDIMSampler(steps=3, compile=True)
    assert "compile" not in compiled.options()
    noise = torch.randn(2, 3, 16, 16)
    ref = eager(net, diffusion, None, noise=noise)
    out = compiled(net, diffusion, None, noise=noise)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert compiled.compiled(net) is compiled.compiled(net)  # built once, then reused
    with pytest.raises(ValueError, match="compile must be true or false"):
        DDIMSampler(compile="yes")


def test_model_checkpointing_from_the_command_line(tmp_path):
    """``model.checkpointing=true`` composes and trains; the network checkpoints its levels."""
    from ddpm.module import DiffusionModule
    from ddpm.tasks.train import train
    from hydra_utils import TINY, compose_cfg

    cfg = compose_cfg([*TINY, "model.checkpointing=true", "debug=fdr"], tmp_path)
    assert DiffusionModule.from_config(cfg).net.checkpointing
    metrics = train(cfg)
    assert metrics["global_step"] == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
