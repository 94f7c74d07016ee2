"""Networks: U-Net shapes, parameter counts, validation, autocast/channels_last; MLP; t-embedding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.nn import (
    PRESETS,
    MLPDenoiser,
    UNet,
    count_parameters,
    timestep_embedding,
    unet_preset,
)

SMALL = dict(
    image_size=8,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.1,
    num_head_channels=8,
    use_scale_shift_norm=True,
    resblock_updown=True,
    norm_groups=4,
)


def _unzero(model: nn.Module) -> nn.Module:
    """Re-initialise the zero-initialised layers so that outputs and gradients are non-trivial."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    return model


# --- timestep embedding ---------------------------------------------------------------------


def test_timestep_embedding_known_values():
    emb = timestep_embedding(torch.tensor([0, 1, 250]), 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # frequencies 10000^(-i/4), i = 0..3; sin half then cos half
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    for row, t in zip(emb, [0, 1, 250]):
        expected = torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)]).float()
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    assert emb[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    # odd dim: one trailing zero; float t is not rounded
    odd = timestep_embedding(torch.tensor([3.5]), 5)
    assert odd.shape == (1, 5) and odd[0, -1] == 0
    assert odd[0, 0].item() == pytest.approx(math.sin(3.5), abs=1e-6)
    with pytest.raises(ValueError, match="t must have shape"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_timestep_embedding_ddpm_variant():
    """freq_shift=1: ω_i = 10000^(-i/(half-1)) (DDPM's TF code); flip_sin_to_cos: cos half first."""
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8, freq_shift=1, flip_sin_to_cos=True)
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    args = t.double()[:, None] * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    torch.testing.assert_close(emb, expected, atol=2e-4, rtol=0)  # float32 args up to ~1e3
    with pytest.raises(ValueError, match="freq_shift"):
        timestep_embedding(t, 8, freq_shift=4)


# --- U-Net shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["tiny", "small"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_unet_output_shape(config, channels, batch):
    kwargs = dict(PRESETS["tiny"]) if config == "tiny" else dict(SMALL)
    model = UNet(**{**kwargs, "in_channels": channels})
    size = model.image_size
    x = torch.randn(batch, channels, size, size)
    for t in [
        torch.randint(0, 1000, (batch,)),  # long (B,)
        torch.rand(batch) * 999,  # float (B,)
        torch.tensor(17),  # 0-d tensor
        torch.tensor([5]),  # (1,)
        999,  # Python int
        0.5,  # Python float
    ]:
        out = model(x, t)
        assert out.shape == x.shape and out.dtype == x.dtype


def test_unet_learned_variance_channels():
    model = unet_preset("tiny", out_channels=6)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 6, 16, 16)


def test_unet_mnist_odd_resolution():
    """28 -> 14 -> 7: the down/up path must restore 28x28."""
    model = unet_preset("mnist", model_channels=16, norm_groups=8)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 28, 28), torch.tensor([3]))
    assert out.shape == (1, 1, 28, 28)


def test_unet_scalar_t_matches_batched_t():
    model = _unzero(unet_preset("tiny")).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 42), model(x, torch.full((3,), 42)))


def test_unet_forward_has_no_host_sync():
    """A forward on the meta device fails on any data-dependent op (.item(), nonzero, ...)."""
    with torch.device("meta"):
        model = unet_preset("tiny", out_channels=6)
        out = model(torch.empty(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 6, 16, 16)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [PRESETS["tiny"], SMALL])
def test_unet_gradients_reach_all_parameters(kwargs):
    torch.manual_seed(0)
    model = UNet(**{**kwargs, "dropout": 0.0})
    size = model.image_size
    x, t = torch.randn(4, 3, size, size), torch.randint(0, 1000, (4,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        loss = (model(x, t) - x).pow(2).mean()
        loss.backward()
        if step == 0:  # zero-init layers block most gradients at first, but all exist
            assert all(p.grad is not None for p in model.parameters())
        opt.step()
    # after a few steps the zero-init layers have moved and every parameter gets gradient
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead


# --- parameter counts -----------------------------------------------------------------------


def test_cifar10_preset_matches_ddpm_parameter_count():
    model = unet_preset("cifar10")
    n = count_parameters(model)
    assert abs(n - 35.7e6) <= 0.2e6, n  # DDPM paper: 35.7M
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 32, 32), torch.tensor([500]))
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 1e4, 3e5),
        ("digits", 5e5, 3e6),
        ("mnist", 1e6, 1e7),
        ("celeba64", 5e7, 1e8),
        ("lsun256", 113.5e6, 114.5e6),  # DDPM paper: 114M
    ],
)
def test_preset_sizes(name, low, high):
    with torch.device("meta"):  # no memory, no init cost
        model = unet_preset(name)
    assert low <= count_parameters(model) <= high
    assert set(PRESETS) == {
        *("cifar10", "cifar10_iddpm", "tiny", "digits", "mnist", "celeba64", "lsun256")
    }


def test_iddpm_preset_matches_improved_diffusion_parameter_count():
    with torch.device("meta"):
        model = unet_preset("cifar10_iddpm", out_channels=6)  # learned variances
    assert count_parameters(model) == 52_546_438  # improved-diffusion's UNetModel


def test_count_parameters_trainable_only():
    model = unet_preset("tiny")
    model.input_conv.requires_grad_(False)
    frozen = sum(p.numel() for p in model.input_conv.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(image_size=30), "image_size"),  # 30 not divisible by 2**3
        (dict(attention_resolutions=(12,)), "attention_resolutions"),
        (dict(model_channels=48), "norm_groups"),  # 32 groups do not divide 48
        (dict(num_heads=3), "num_heads"),
        (dict(num_head_channels=48), "num_head_channels"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
)
def test_unet_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field), torch.device("meta"):
        UNet(**kwargs)


def test_unet_absent_attention_resolution_lists_the_sizes():
    with pytest.raises(ValueError, match=r"\[32, 16, 8, 4\]"), torch.device("meta"):
        UNet(attention_resolutions=(16, 12))


def test_unet_preset_unknown_name():
    with pytest.raises(ValueError, match="cifar10"):
        unet_preset("imagenet")


@pytest.mark.parametrize(
    "shape, t, field",
    [
        ((2, 1, 16, 16), torch.zeros(2), "in_channels"),
        ((2, 3, 32, 32), torch.zeros(2), "image_size"),
        ((2, 3, 16, 8), torch.zeros(2), "image_size"),
        ((3, 16, 16), torch.zeros(2), "x must have shape"),
        ((2, 3, 16, 16), torch.zeros(3), "t must"),
        ((2, 3, 16, 16), torch.zeros(2, 1), "t must"),
    ],
)
def test_unet_bad_input_raises(shape, t, field):
    model = unet_preset("tiny")
    with pytest.raises(ValueError, match=field):
        model(torch.randn(shape), t)


# --- autocast and memory format -------------------------------------------------------------


def test_unet_bf16_autocast():
    torch.manual_seed(0)
    model = _unzero(unet_preset("tiny", num_heads=2)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    # and a training step works under autocast
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_group_norm_under_cpu_autocast_is_the_mixed_kernel_rounded_once():
    """Our GroupNorm upcasts bf16 input on CPU (the fast float32 kernel): same output dtype,
    layout and values as torch's mixed-dtype kernel, and gradients within bf16 rounding."""
    from ddpm.nn.unet import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(4, 16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(2, 16, 8, 8) * 3 + 1).bfloat16().to(memory_format=torch.channels_last)
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
        ref = nn.GroupNorm.forward(norm, x_ref)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=0, rtol=2**-7)  # at most one bf16 ulp apart
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0.05, rtol=0.02)
    # float32 input: exactly nn.GroupNorm
    y = torch.randn(2, 16, 8, 8)
    assert torch.equal(norm(y), nn.GroupNorm.forward(norm, y))


@pytest.mark.parametrize("kwargs", [PRESETS["tiny"], SMALL])
def test_unet_channels_last_matches_contiguous(kwargs):
    torch.manual_seed(0)
    model = _unzero(UNet(**kwargs)).eval()
    size = model.image_size
    x, t = torch.randn(3, 3, size, size), torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert ref.abs().mean() > 1e-3  # the comparison is not vacuous


# --- MLP denoiser ---------------------------------------------------------------------------


def test_mlp_denoiser_shapes():
    model = MLPDenoiser()
    x = torch.randn(5, 2)
    assert model(x, torch.randint(0, 1000, (5,))).shape == (5, 2)
    assert model(x, 3).shape == (5, 2)
    assert model(x, torch.tensor(3.5)).shape == (5, 2)
    assert MLPDenoiser(data_dim=3, out_dim=6, num_timesteps=50)(torch.randn(4, 3), 7).shape == (
        4,
        6,
    )
    with pytest.raises(ValueError, match="data_dim"):
        model(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="t must"):
        model(x, torch.zeros(4))
    with pytest.raises(ValueError, match="hidden_dim"):
        MLPDenoiser(hidden_dim=0)


def test_mlp_denoiser_fits_a_time_dependent_target():
    """Regress ε-like target x * cos(π t / 2T) + t/T: the t-embedding has to be used."""
    torch.manual_seed(0)
    T = 100
    model = MLPDenoiser(hidden_dim=64, num_layers=2, num_timesteps=T)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch():
        x, t = torch.randn(256, 2), torch.randint(0, T, (256,))
        return x, t, x * torch.cos(math.pi * t / (2 * T))[:, None] + (t / T)[:, None]

    x, t, y = batch()
    first = (model(x, t) - y).pow(2).mean().item()
    for _ in range(300):
        x, t, y = batch()
        loss = (model(x, t) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, t, y = batch()
    with torch.no_grad():
        final = (model(x, t) - y).pow(2).mean().item()
    assert final < 0.02 * first, (first, final)


# --- class conditioning ---------------------------------------------------------------------


def _unet_parameters_by_formula(
    in_channels: int = 3,
    out_channels: int | None = None,
    image_size: int = 32,
    model_channels: int = 128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks: int = 2,
    attention_resolutions=(16,),
    use_scale_shift_norm: bool = False,
    resblock_updown: bool = False,
    **_: object,
) -> int:
    """DDPM's U-Net (Ho et al. 2020, App. B) counted layer by layer, independently of the code."""

    def conv(cin, cout, k=3):
        return k * k * cin * cout + cout

    def lin(i, o):
        return i * o + o

    def res(cin, cout):
        e = 4 * model_channels
        skip = conv(cin, cout, 1) if cin != cout else 0
        return (
            2 * cin
            + conv(cin, cout)
            + lin(e, cout * (2 if use_scale_shift_norm else 1))
            + (2 * cout + conv(cout, cout) + skip)
        )

    def attn(c):
        return 2 * c + lin(c, 3 * c) + lin(c, c)

    def resample(c):
        return res(c, c) if resblock_updown else conv(c, c)

    ch = model_channels
    n = lin(ch, 4 * ch) + lin(4 * ch, 4 * ch) + conv(in_channels, ch)
    skips, levels = [ch], len(channel_mult)
    for level, mult in enumerate(channel_mult):
        size = image_size // 2**level
        for _ in range(num_res_blocks):
            n += res(ch, model_channels * mult)
            ch = model_channels * mult
            n += attn(ch) if size in attention_resolutions else 0
            skips.append(ch)
        if level < levels - 1:
            n += resample(ch)
            skips.append(ch)
    n += 2 * res(ch, ch) + attn(ch)
    for level, mult in reversed(list(enumerate(channel_mult))):
        size = image_size // 2**level
        for i in range(num_res_blocks + 1):
            n += res(ch + skips.pop(), model_channels * mult)
            ch = model_channels * mult
            n += attn(ch) if size in attention_resolutions else 0
            n += resample(ch) if level and i == num_res_blocks else 0
    return n + 2 * ch + conv(ch, out_channels or in_channels)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_unconditional_presets_keep_their_parameters(name):
    """num_classes=None is today's network (same count, same keys); K classes add (K+1) x 4ch."""
    with torch.device("meta"):
        plain, none, cond = (
            unet_preset(name, **kw) for kw in ({}, {"num_classes": 0}, {"num_classes": 10})
        )
    assert count_parameters(plain) == _unet_parameters_by_formula(**PRESETS[name])
    assert none.state_dict().keys() == plain.state_dict().keys()
    assert not any("label" in k for k in plain.state_dict())
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    emb = 4 * PRESETS[name]["model_channels"]
    assert count_parameters(cond) == count_parameters(plain) + 11 * emb


def test_parameter_formula_covers_scale_shift_and_resblock_updown():
    with torch.device("meta"):
        assert count_parameters(UNet(**SMALL)) == _unet_parameters_by_formula(**SMALL)


def test_conditional_unet_embeds_labels():
    torch.manual_seed(0)
    model = _unzero(unet_preset("tiny", num_classes=3)).eval()
    assert model.num_classes == model.null_class == 3
    x = torch.randn(1, 3, 16, 16).expand(4, -1, -1, -1)
    t = torch.full((4,), 500)
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1, 2, 3]))
        null = model(x, t)  # None = the null class for the whole batch
        single = model(x[:1], t[:1], torch.tensor([1]))
    for i in range(4):
        for j in range(i):
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)
    torch.testing.assert_close(null, out[3:].expand(4, -1, -1, -1))
    torch.testing.assert_close(single[0], out[1], atol=1e-5, rtol=1e-5)  # no cross-talk


def test_conditional_unet_trains_the_class_embedding_and_has_no_host_sync():
    torch.manual_seed(0)
    model = _unzero(UNet(**{**SMALL, "dropout": 0.0, "num_classes": 2}))
    x = torch.randn(3, 3, 8, 8)
    model(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])).square().mean().backward()
    assert model.label_emb.weight.grad[:3].abs().sum(1).gt(0).all()
    with torch.device("meta"):
        meta = unet_preset("tiny", num_classes=4)
        out = meta(torch.empty(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
        out = meta(torch.empty(2, 3, 16, 16), 0, torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("net", ["unet", "mlp"])
@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        (torch.tensor([0, 4]), r"\[0, 3\].*\[4\]"),
        (torch.tensor([-1, 0]), r"\[0, 3\].*\[-1\]"),
        (torch.tensor([0.0, 1.0]), "integers"),
        (torch.tensor([True, False]), "integers"),
        (torch.tensor([0, 1, 2]), r"shape \(2,\)"),
        ([0, 1], r"LongTensor of shape \(2,\)"),
    ],
)
def test_bad_class_labels_raise(net, labels, needle):
    model = unet_preset("tiny", num_classes=3) if net == "unet" else MLPDenoiser(num_classes=3)
    x = torch.randn(2, 3, 16, 16) if net == "unet" else torch.randn(2, 2)
    with pytest.raises(ValueError, match=needle):
        model(x, torch.tensor([1, 2]), labels)


@pytest.mark.parametrize("net", ["unet", "mlp"])
def test_labels_on_unconditional_network_and_bad_num_classes_raise(net):
    build = (lambda **kw: unet_preset("tiny", **kw)) if net == "unet" else MLPDenoiser
    x = torch.randn(2, 3, 16, 16) if net == "unet" else torch.randn(2, 2)
    with pytest.raises(ValueError, match="unconditional network.*num_classes=K"):
        build()(x, 1, torch.tensor([0, 1]))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            build(num_classes=bad)


def test_conditional_mlp():
    torch.manual_seed(0)
    plain, cond = MLPDenoiser(), MLPDenoiser(num_classes=8)
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    assert count_parameters(cond) == count_parameters(plain) + 9 * 128
    assert cond.null_class == 8 and plain.null_class is None
    x, t = torch.randn(1, 2).expand(9, 2), torch.full((9,), 10)
    with torch.no_grad():
        out = cond(x, t, torch.arange(9))
        torch.testing.assert_close(cond(x, t), out[8:].expand(9, 2))
    assert torch.cdist(out, out).add(torch.eye(9)).min() > 1e-3  # every label differs


# --- activation checkpointing ---------------------------------------------------------------


def _saved_bytes(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``model(x, t)``."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t).sum()
    return total


@pytest.mark.parametrize(
    "kwargs",
    [SMALL, {**PRESETS["celeba64"], "model_channels": 16, "image_size": 32, "norm_groups": 8}],
    ids=["small_updown_scale_shift", "celeba64_levels"],
)
def test_checkpointing_gives_the_same_gradients_with_less_saved_memory(kwargs):
    """model.checkpointing=true: same outputs and gradients (dropout masks replayed in the
    recomputation), and autograd keeps much less (only each level's inputs)."""
    assert kwargs["dropout"] > 0  # the recomputation must replay the dropout masks
    torch.manual_seed(0)
    plain = _unzero(UNet(**kwargs)).train()
    ckpt = UNet(**kwargs, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert set(ckpt.state_dict()) == set(plain.state_dict()) and "checkpointing" not in ckpt.config
    size = plain.image_size
    x, t = torch.randn(2, 3, size, size), torch.tensor([3, 700])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        out = model(x, t)
        out.pow(2).mean().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_plain, g_plain), (out_ckpt, g_ckpt) = grads
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max(g.abs().max() for g in g_plain.values()) > 0
    torch.manual_seed(1)
    saved_plain = _saved_bytes(plain, x, t)
    torch.manual_seed(1)
    saved_ckpt = _saved_bytes(ckpt, x, t)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    with torch.no_grad():  # no recomputation bookkeeping in inference
        torch.testing.assert_close(ckpt.eval()(x, t), plain.eval()(x, t), rtol=0, atol=0)
