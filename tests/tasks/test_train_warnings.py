"""A resume continues in its own checkpoint directory: Lightning's "Checkpoint directory ...
exists and is not empty" is not shown there (a new run into a used directory is refused before
Lightning would say it: ddpm.run)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ddpm.tasks.train import train
from hydra_utils import TINY, compose_cfg

SHORT = [
    *TINY,
    "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.at_train_end=false",
    "~callbacks.forward_picture",
]
NOT_EMPTY = "exists and is not empty"


def _fit(overrides: list[str], tmp_path: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_cfg([*SHORT, *overrides], tmp_path))
    return [str(w.message) for w in caught]


def test_resume_does_not_warn_about_its_own_checkpoint_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert not [m for m in _fit(["trainer.max_steps=2"], tmp_path) if NOT_EMPTY in m]
    resumed = _fit(["trainer.max_steps=4", "ckpt_path=last", f"run_dir={run}"], tmp_path)
    assert not [m for m in resumed if NOT_EMPTY in m], resumed
    assert (run / "checkpoints" / "last.ckpt").is_file()
