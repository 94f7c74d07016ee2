"""The GPU path, proven on the CPU: the network and the loss trace into one graph (no graph
breaks) for every U-Net preset under bf16 autocast, with and without activation checkpointing;
``compile=true`` trains what eager training trains and ``sampler.compile=true`` samples what the
eager sampler samples."""

from __future__ import annotations

import functools

import pytest
import torch

from ddpm.diffusion import DiffusionLoss, GaussianDiffusion
from ddpm.diffusion.samplers.configs import DDIMSampler
from ddpm.module import DiffusionModule
from ddpm.nn import PRESETS, unet_preset
from fit_utils import T, TinyEpsNet, fit, image_loader

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


@pytest.mark.slow  # an inductor compile of forward and backward: ~20-60 s on a shared CPU
def test_compile_true_trains_what_eager_trains():
    """``compile=true`` (``DiffusionModule(compile=True)``): a real Lightning fit through the
    compiled network reaches the eager fit's weights to float tolerance (SGD, so the weights
    are linear in the gradients; inductor only reorders float sums), and it did compile."""
    weights = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        net = TinyEpsNet()  # conv, embedding, SiLU, conv: seconds to compile, not minutes
        module = DiffusionModule(
            net=net,
            diffusion=GaussianDiffusion(num_timesteps=T),
            loss=DiffusionLoss("simple"),
            optimizer=functools.partial(torch.optim.SGD, lr=0.05),
            compile=compiled,
        )
        init = {k: v.clone() for k, v in net.state_dict().items()}
        fit(module, image_loader(), [], steps=3)
        weights[compiled] = {k: v.clone() for k, v in module.net.state_dict().items()}
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    trained = [k for k, _ in net.named_parameters()]
    assert all(not torch.equal(weights[False][k], init[k]) for k in trained)
    for name, eager in weights[False].items():
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-4, atol=1e-5, msg=name)
