"""The composed config as a tree at start-up, kept in the run directory (rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpm.tasks.train import train
from ddpm.utils.config_tree import TREE_FILE, print_config_tree
from hydra_utils import TINY, compose_cfg


def test_config_tree_is_printed_and_written_by_rank_zero_only(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_cfg([*TINY, "optimizer.lr=0.00042"], tmp_path)
    print_config_tree(cfg, tmp_path / "a")
    text = (tmp_path / "a" / TREE_FILE).read_text()
    assert "lr: 0.00042" in capsys.readouterr().out  # on screen too
    branches = [line.split("── ")[1] for line in text.splitlines() if line[:4] in ("├── ", "└── ")]
    assert branches[:3] == ["data", "model", "schedule"] and "hydra" not in branches
    assert "lr: 0.00042" in text and f"output_dir: {tmp_path / 'run'}" in text  # resolved
    assert all(line == line.rstrip() for line in text.splitlines())
    monkeypatch.setenv("LOCAL_RANK", "1")
    print_config_tree(cfg, tmp_path / "b")
    assert not (tmp_path / "b").exists() and capsys.readouterr().out == ""


def test_train_writes_the_tree_into_the_run_directory(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "trainer.max_steps=1", "callbacks=none"], tmp_path)
    train(cfg)
    assert "└── (top level)" in (tmp_path / "run" / TREE_FILE).read_text()
