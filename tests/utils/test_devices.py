"""``ddpm.utils.devices.run_device``: the one rule from ``accelerator`` / ``devices`` to the device
a process computes on (reflow's pairs, visualize), as Lightning's Trainer places a process."""

from __future__ import annotations

import pytest
import torch

from ddpm.errors import ConfigError
from ddpm.utils.devices import device_index, run_device

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID", "SLURM_JOB_NAME")  # fmt: skip
NO_ACCELERATOR = not torch.cuda.is_available() and not torch.backends.mps.is_available()


@pytest.fixture
def one_process(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in LAUNCH_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_cpu_is_the_cpu_whatever_the_devices(one_process: pytest.MonkeyPatch) -> None:
    assert run_device("cpu") == torch.device("cpu")
    one_process.setenv("LOCAL_RANK", "1")
    assert run_device("cpu", devices=[2, 3]) == torch.device("cpu")


@pytest.mark.skipif(not NO_ACCELERATOR, reason="a machine without CUDA or MPS")
def test_auto_without_an_accelerator_is_the_cpu(one_process: pytest.MonkeyPatch) -> None:
    assert run_device("auto", 1) == run_device(None) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "cuda:1"])
def test_a_missing_gpu_is_a_config_error_naming_the_setting(
    one_process: pytest.MonkeyPatch, accelerator: str
) -> None:
    if accelerator == "gpu" and torch.backends.mps.is_available():
        pytest.skip("gpu is MPS on this machine")
    with pytest.raises(ConfigError, match=f"trainer.accelerator={accelerator} asks for a CUDA"):
        run_device(accelerator, 1, setting="trainer.accelerator")


def test_an_unknown_accelerator_names_the_allowed_ones() -> None:
    with pytest.raises(
        ConfigError, match="trainer.accelerator must be auto, cpu, gpu, cuda or mps"
    ):
        run_device("tpu9", setting="trainer.accelerator")


def test_the_index_is_the_local_rank_or_its_listed_device(one_process: pytest.MonkeyPatch) -> None:
    """cuda:LOCAL_RANK for a rank of a launch, cuda:0 for one process; an explicit list maps the
    local rank to its entry (Lightning's parallel_devices[local_rank])."""
    assert device_index() == device_index(1) == device_index("auto") == 0
    assert device_index([3]) == device_index("3,") == 3
    one_process.setenv("RANK", "3")
    one_process.setenv("WORLD_SIZE", "4")
    one_process.setenv("LOCAL_RANK", "1")  # torchrun: the second process of the second node
    assert device_index(2) == 1
    assert device_index([4, 6]) == device_index("4,6") == 6
    with pytest.raises(ConfigError, match=r"devices=\[4\] lists no device for local rank 1"):
        device_index([4])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        one_process.delenv(var)
    one_process.setenv("SLURM_PROCID", "5")  # srun: SLURM_LOCALID is the local rank
    one_process.setenv("SLURM_NTASKS", "8")
    one_process.setenv("SLURM_LOCALID", "1")
    assert device_index() == 1
    one_process.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: one process
    assert device_index() == 0
