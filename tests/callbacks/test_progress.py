"""Training progress in optimizer steps: a step/max_steps bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar

from ddpm.callbacks.progress import ProgressLines, StepProgressBar, training_progress
from fit_utils import image_loader, make_module


def _fit(callbacks: list, steps: int, tmp_path: Path, bar: bool = True) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(make_module(), image_loader(16))  # 2 batches an epoch
    return trainer


def test_log_files_get_a_plain_line_every_n_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    progress = training_progress(every_n_steps=2)
    assert isinstance(progress, ProgressLines)  # pytest's stdout is not a terminal
    caplog.set_level("INFO", logger="ddpm.callbacks.progress")
    _fit([progress], 5, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "ddpm.callbacks.progress"]
    assert [ln.split(" |")[0] for ln in lines] == [
        "step 2/5 (40%)",
        "step 4/5 (80%)",
        "step 5/5 (100%)",
    ]
    assert all(
        re.search(r"train/loss [\d.e+-]+ \| [\d.e+]+ img/s \| elapsed 0:00:\d\d", ln)
        for ln in lines
    )
    assert all(re.search(r"ETA 0:00:\d\d$", ln) for ln in lines)


def test_terminal_bar_counts_steps_of_max_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _fit([StepProgressBar()], 5, tmp_path)  # 3 epochs of 2 batches, max_epochs=-1
    out = capsys.readouterr().out
    assert "5/5" in out and "Training (epoch 2)" in out
    assert "/-2" not in out and "2/2" not in out  # no per-epoch count, no "Epoch 2/-2"


def test_disabled_progress_is_accepted_by_lightning(tmp_path: Path) -> None:
    progress = training_progress(enabled=False)
    assert not isinstance(progress, ProgressBar)
    _fit([progress], 1, tmp_path, bar=False)  # Lightning refuses a bar with the bar disabled
    with pytest.raises(ValueError, match="every_n_steps"):
        training_progress(every_n_steps=0)


class SlowSteps(pl.Callback):
    """Every optimizer step takes at least 0.2 s (the slowness under test)."""

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(0.2)


def test_terminal_bar_after_a_resume_has_its_total_and_this_launch_s_speed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Resumed at step 30 of 34 with steps of >= 0.2 s: the bar shows 31/34 .. 34/34 from the
    first step (never a missing total), at most 5 steps/s, and an ETA at that speed (tqdm's
    own rate would count the 30 earlier steps as done in no time)."""
    first = _fit([], 30, tmp_path, bar=False)
    ckpt = tmp_path / "step30.ckpt"
    first.save_checkpoint(ckpt)
    capsys.readouterr()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=34,
        max_epochs=-1,
        callbacks=[SlowSteps(), StepProgressBar()],  # the sleep before the bar counts the step
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(make_module(), image_loader(16), ckpt_path=ckpt)
    out = capsys.readouterr().out
    shown = re.findall(r"(\d+)/(\d+|\?) \[", out)
    steps = [int(n) for n, _ in shown]
    assert steps == sorted(steps) and sorted(set(steps)) == [30, 31, 32, 33, 34], out[-2000:]
    assert "Epoch" not in out and ": :" not in out, out[-2000:]
    assert {total for _, total in shown} == {"34"}, out[-2000:]
    speeds = [float(v) for v in re.findall(r"speed=([\d.]+) steps/s", out)]
    assert speeds and max(speeds) <= 5.0, speeds
    eta = re.findall(r"ETA=(\d+):(\d\d):(\d\d)", out)
    assert ("0", "00", "00") in eta  # at the end, none left
