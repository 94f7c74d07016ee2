"""Shared test set-up: offline W&B, one torch thread. (tests/ is importable through pyproject's
pythonpath: `oracles`, `hydra_utils`, `fit_utils`.)

One intra-op thread: the tests use small tensors, where a second thread mostly waits, and on a
busy 2-core machine two threads per process made some tests 10-25x slower. Subprocess runs
(CLI, DDP) get OMP_NUM_THREADS=1 from the environment set here.
"""

import os
import signal

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def default_sigint():
    """SIGINT handled as in a user's Python process (KeyboardInterrupt), also in a pytest-xdist
    worker, which ignores SIGINT; restored afterwards."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
