"""Picture callbacks: the sample grid (PNG layout, batch-size invariance, denoising strip, 2-D data,
loggers, stop signals), the forward-process and loss-by-t pictures."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddpm.callbacks.ema import EMA
from ddpm.callbacks.forward_picture import ForwardProcessPicture
from ddpm.callbacks.loss_by_t import LossByTPicture
from ddpm.callbacks.playground import Playground
from ddpm.callbacks.sample_grid import SampleGrid, sample_with_seeds
from ddpm.diffusion import GaussianDiffusion
from ddpm.diffusion.samplers import DDIMSampler, DDPMSampler
from ddpm.utils.images import read_png, to_uint8
from ddpm.viz.reverse import denoising_trajectory, strip_timesteps
from fit_utils import SIZE, TinyEpsNet, fit, image_loader, make_module


class TinyMLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 32, num_timesteps: int = 50) -> None:
        super().__init__()
        self.T = num_timesteps
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, (t.float() / self.T)[:, None]], dim=1))


def point_loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g)), batch_size=16)


def grid_side(n_per_row: int, image: int = SIZE, padding: int = 2) -> int:
    return n_per_row * (image + padding) + padding


@pytest.mark.parametrize(
    "sampler", [DDIMSampler(steps=10), DDPMSampler(steps=10)], ids=["ddim", "ddpm"]
)
def test_grid_png_is_the_same_for_any_batch_size(sampler, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make_module(TinyEpsNet(dropout=0.5))
    a = SampleGrid(
        sampler,
        every_n_steps=4,
        num_samples=16,
        batch_size=16,
        seed=7,
        output_dir=str(tmp_path / "a"),
        at_train_end=False,
    )
    b = SampleGrid(
        sampler,
        every_n_steps=4,
        num_samples=16,
        batch_size=5,
        seed=7,
        output_dir=str(tmp_path / "b"),
        at_train_end=False,
    )
    fit(module, image_loader(), [EMA(decay=0.9), a, b], steps=4)
    pa, pb = tmp_path / "a" / "step_0000004.png", tmp_path / "b" / "step_0000004.png"
    assert pa.is_file() and pb.is_file()
    img_a, img_b = read_png(pa), read_png(pb)
    # 16 samples -> 4 x 4 grid of 42 px, enlarged 13x (nearest) to at least 512 px
    k = math.ceil(512 / grid_side(4))
    assert img_a.shape == (k * grid_side(4), k * grid_side(4), 3)
    assert np.array_equal(img_a, img_b)
    assert img_a.std() > 0
    small = img_a[::k, ::k]  # every pixel is a k x k block
    assert np.array_equal(np.repeat(np.repeat(small, k, 0), k, 1), img_a)
    # denoising strip: 2 seeds x (x_t row, x0 row), ~8 timesteps as columns, labelled
    strip = read_png(tmp_path / "a" / "denoise_step_0000004.png")
    assert strip.shape[1] >= 512 and strip.shape[0] > 4 * SIZE
    assert a.saved == [pa, tmp_path / "a" / "denoise_step_0000004.png"]


def test_same_seeds_same_samples_across_batch_sizes_and_model_modes() -> None:
    torch.manual_seed(0)
    net, diffusion = TinyEpsNet(dropout=0.5).eval(), GaussianDiffusion(num_timesteps=50)
    sampler = DDPMSampler(steps=10)
    x16 = sample_with_seeds(sampler, net, diffusion, (1, SIZE, SIZE), range(16), 16)
    x3 = sample_with_seeds(sampler, net, diffusion, (1, SIZE, SIZE), range(16), 3)
    assert torch.equal(to_uint8(x16), to_uint8(x3))
    other = sample_with_seeds(sampler, net, diffusion, (1, SIZE, SIZE), range(16, 32), 16)
    assert not torch.equal(x16, other)


def test_denoising_trajectory_frames() -> None:
    torch.manual_seed(0)
    net, diffusion = TinyEpsNet(dropout=0.5).eval(), GaussianDiffusion(num_timesteps=50)
    assert strip_timesteps(50, 8) == [49, 42, 35, 28, 21, 14, 7, 0]
    traj = denoising_trajectory(
        DDIMSampler(steps=50), net, diffusion, (1, SIZE, SIZE), [0, 1], num_frames=8
    )
    assert traj["timesteps"].tolist() == [49, 42, 35, 28, 21, 14, 7, 0]
    assert traj["x_t"].shape == traj["pred_xstart"].shape == (8, 2, 1, SIZE, SIZE)
    # the last frame's x0 prediction is DDIM's output
    torch.testing.assert_close(traj["pred_xstart"][-1], traj["samples"])


def test_train_mode_restored_and_raw_net_sampling(tmp_path: Path) -> None:
    class CheckTrainMode(pl.Callback):
        def __init__(self) -> None:
            self.modes: list[bool] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.modes.append(pl_module.net.training)

    check = CheckTrainMode()
    cb = SampleGrid(
        DDIMSampler(steps=5),
        every_n_steps=2,
        num_samples=4,
        batch_size=4,
        use_ema=False,
        output_dir=str(tmp_path),
        strip_seeds=[],
    )
    fit(make_module(TinyEpsNet(dropout=0.5)), image_loader(), [cb, check], steps=5)
    assert all(check.modes) and len(check.modes) == 5
    names = sorted(p.name for p in tmp_path.iterdir())
    # steps 2 and 4, and the end of training (step 5); no strip
    assert names == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]


def test_two_dimensional_data_gives_scatter_plots(tmp_path: Path) -> None:
    cb = SampleGrid(
        DDIMSampler(steps=10),
        every_n_steps=3,
        num_samples=64,
        batch_size=32,
        output_dir=str(tmp_path),
        at_train_end=False,
    )
    fit(make_module(TinyMLP()), point_loader(), [EMA(decay=0.9), cb], steps=3)
    for name in ("step_0000003.png", "denoise_step_0000003.png"):
        img = read_png(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0


def test_loggers_receive_the_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version="")
    csv = CSVLogger(str(tmp_path / "csv"), name="", version="")
    cb = SampleGrid(
        DDIMSampler(steps=5), every_n_steps=2, num_samples=4, batch_size=4, at_train_end=False
    )
    fit(
        make_module(TinyEpsNet(dropout=0.5)),
        image_loader(),
        [EMA(), cb],
        steps=2,
        logger=[tb, csv],
        default_root_dir=str(tmp_path),
    )
    assert (tmp_path / "samples" / "step_0000002.png").is_file()  # default output dir
    tb.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"samples/grid", "samples/denoising"} <= set(acc.Tags()["images"])


def test_image_runs_get_forward_and_loss_by_t_pictures(tmp_path: Path) -> None:
    """The visualize task's pictures during training, each its own callback: the forward process
    once, the per-t bound terms at every cadence step, logged as images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddpm.data import ImageDataModule

    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version="")
    grid = SampleGrid(
        DDIMSampler(steps=5),
        every_n_steps=2,
        num_samples=4,
        batch_size=4,
        at_train_end=False,
        strip_seeds=[],
    )
    forward = ForwardProcessPicture(every_n_steps=2, at_train_end=False)
    by_t = LossByTPicture(every_n_steps=2, at_train_end=False, num_samples=4)
    playground = Playground(every_n_steps=2, at_train_end=False)  # 2-D data only: nothing here
    dm = ImageDataModule("digits", batch_size=8, val_batch_size=8)
    fit(
        make_module(TinyEpsNet(dropout=0.5)),
        dm,
        [EMA(), grid, forward, by_t, playground],
        steps=4,
        logger=[tb],
        default_root_dir=tmp_path,
    )
    out = tmp_path / "samples"
    assert [p.name for p in grid.saved] == ["step_0000002.png", "step_0000004.png"]
    assert forward.saved == [out / "forward.png"]
    assert [p.name for p in by_t.saved] == [
        "loss_by_t_step_0000002.png",
        "loss_by_t_step_0000004.png",
    ]
    assert playground.saved == []
    assert all(p.is_file() and p.parent == out for p in grid.saved + forward.saved + by_t.saved)
    assert read_png(out / "forward.png").std() > 0
    tb.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"samples/grid", "samples/forward", "samples/loss_by_t"} <= set(acc.Tags()["images"])
    with pytest.raises(ValueError, match="num_samples"):
        LossByTPicture(num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        ForwardProcessPicture(num_samples=-1)


def test_fast_dev_run_skips_sampling(tmp_path: Path) -> None:
    cb = SampleGrid(
        DDIMSampler(steps=5),
        every_n_steps=1,
        num_samples=4,
        batch_size=4,
        output_dir=str(tmp_path / "s"),
    )
    pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        callbacks=[EMA(), cb],
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(make_module(TinyEpsNet(dropout=0.5)), image_loader(), image_loader())
    assert cb.saved == [] and not (tmp_path / "s").exists()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        SampleGrid(num_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        SampleGrid(batch_size=-1)


def test_end_of_training_grid_reports_progress_and_stops_between_batches_on_a_signal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop signal during the end-of-training grid (here: during its first batch) ends it
    before the next batch; the run's final checkpoint is kept. Each batch is announced."""
    from ddpm.callbacks.preemption import PreemptionCheckpoint, TrainingInterrupted

    pre = PreemptionCheckpoint(dirpath=tmp_path / "ckpt")
    inner, calls = DDIMSampler(steps=3), []

    def sampler(*args, **kwargs):
        calls.append(len(calls))
        out = inner(*args, **kwargs)
        if len(calls) == 2:
            pre.request()  # what Ctrl-C / SIGTERM does
        return out

    cb = SampleGrid(
        sampler, every_n_steps=None, num_samples=8, batch_size=2, output_dir=str(tmp_path / "s")
    )
    caplog.set_level("INFO", logger="ddpm.callbacks.sample_grid")
    with pytest.raises(TrainingInterrupted):  # the run then stops at once (exit 128 + signal)
        fit(
            make_module(TinyEpsNet(dropout=0.5)),
            image_loader(),
            [EMA(), cb, pre],
            steps=3,
            enable_checkpointing=True,
        )
    assert len(calls) == 2 and cb.saved == []  # 2 of 4 batches, no grid, no strip
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    text = caplog.text
    assert "8 samples in 4 batch(es) of 2" in text and "batch 2/4 done" in text
    assert "stopped on a signal" in text and "batch 3/4" not in text


def test_every_run_ends_with_a_grid_sized_to_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run shorter than the grid cadence (a smoke test) still ends with a grid: the samples, the
    steps and the strip cut to take about a tenth of the run, and the log says so."""
    cb = SampleGrid(
        DDIMSampler(steps=40),
        every_n_steps=10,
        num_samples=64,
        batch_size=16,
        output_dir=str(tmp_path),
    )
    caplog.set_level("INFO", logger="ddpm.callbacks.sample_grid")
    fit(make_module(TinyEpsNet(dropout=0.5)), image_loader(), [cb], steps=3)
    assert cb.saved == [tmp_path / "step_0000003.png"]  # the grid, no strip
    (line,) = [r.getMessage() for r in caplog.records if "end of training:" in r.getMessage()]
    n, steps = (int(v) for v in re.findall(r"(\d+) samples x (\d+) steps", line)[0])
    assert n < 64 and "instead of 64 x 40" in line and "no strip" in line, line
    grid = read_png(cb.saved[0])
    side = math.ceil(math.sqrt(n))
    assert grid.shape[1] >= grid_side(side) and steps >= 2
