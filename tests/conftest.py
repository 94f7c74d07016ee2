"""Shared test set-up: offline W&B, one torch thread, the fixtures several directories use.

Layout: one directory per package of ``src/ddpm`` (tests of a top-level module stay here); the
helpers live next to this file and are importable from every test (pyproject's pythonpath) and
from subprocess runs (``cli_utils.cli_env``):

- ``hydra_utils``: ``compose_cfg``, the ``TINY`` / ``CLI_TINY`` / ``MICRO`` overrides, repo paths;
- ``fit_utils``: tiny networks and modules, ``digits()``, real Lightning fits;
- ``cli_utils``: ``run_cli`` / ``start_cli`` (``src/*.py`` in a subprocess), ``wait_for``;
- ``run_utils``: callbacks that stop, slow, break or record a run; ``load_ckpt``, ``max_diff``;
- ``oracles``: exact denoisers; ``ddp_probe``: what each DDP rank saw and trained;
- ``wandb_utils``: what an offline W&B run recorded, read with W&B's own reader.

One intra-op thread, set here once for every test: the tests use small tensors, where a second
thread mostly waits, and on a busy 2-core machine two threads per process made some tests 10-25x
slower (measured). Subprocess runs (CLI, DDP) get OMP_NUM_THREADS=1 from the environment set here.
"""

import os
import signal
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# pytest's detailed assertion messages also in the helpers' asserts
pytest.register_assert_rewrite("cli_utils", "fit_utils", "oracles", "run_utils")

import torch  # noqa: E402

from ddpm.tasks.train import train  # noqa: E402
from hydra_utils import TINY, compose_cfg  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def default_sigint():
    """SIGINT handled as in a user's Python process (KeyboardInterrupt), also in a pytest-xdist
    worker, which ignores SIGINT; restored afterwards."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 4-step tiny U-Net on digits (T=50) trained through the real
    ``train(cfg)``, with ``sampler.steps=5`` in its config."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.sample_grid.every_n_steps=100",
            "sampler.steps=5",
        ],
        tmp,
    )
    train(cfg)
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt
