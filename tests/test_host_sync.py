"""The training step does not wait for the device: no op of our code in it reads a tensor's
value on the host (``.item()``, ``bool(t)``, ``nonzero``, ``.tolist()``, ...), which on a GPU
would block the CPU until the queued kernels finish, except the non-finite guard's one read per
optimizer step. A real Trainer run with the default callbacks; steps after the first are
profiled with Python stacks, and every synchronising op or call is traced to its caller."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile

from ddpm.module import DiffusionModule
from hydra_utils import TINY, compose_cfg

# ATen ops that copy a value to the host (CUDA: a blocking device synchronisation).
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::equal",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
}
# Tensor methods that read values on the host without an ATen op on the CPU (``.tolist()`` of
# a CUDA tensor copies it to the host first); the profiler records them as Python calls.
SYNC_METHODS = tuple(f"<built-in method {m} of Tensor object" for m in ("tolist", "numpy", "cpu"))
OUR_CODE = "ddpm/"  # the profiler names Python frames by path from the import root


class ProfileSteps(pl.Callback):
    """Profile (with Python stacks) from the start of batch ``first`` to the end of batch
    ``last``, the other callbacks' batch hooks included (this one runs after them)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.prof: profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.prof = profile(activities=[ProfilerActivity.CPU], with_stack=True)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last and self.prof is not None:
            self.prof.__exit__(None, None, None)


def _callers(evt) -> list[str]:
    """The Python frames (profiler ``python_function`` events) around ``evt``, innermost first."""
    frames = []
    while evt is not None:
        if ".py(" in evt.name:
            frames.append(evt.name)
        evt = evt.cpu_parent
    return frames


def _syncs(prof: profile) -> list[list[str]]:
    return [
        _callers(evt)
        for evt in prof.events()
        if evt.name in SYNC_OPS or evt.name.startswith(SYNC_METHODS)
    ]


def _ours(syncs: list[list[str]]) -> list[str]:
    """The innermost frame of our code of each sync that our code caused."""
    return [
        next(f for f in frames if f.startswith(OUR_CODE))
        for frames in syncs
        if any(f.startswith(OUR_CODE) for f in frames)
    ]


def test_training_step_has_no_host_sync(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.max_steps=3",
            "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=0",
        ],
        tmp_path,
    )
    module = DiffusionModule.from_config(cfg)
    probe = ProfileSteps(first=1, last=2)
    callbacks = [cb for cb in instantiate(cfg.callbacks).values() if cb is not None]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[*callbacks, probe],
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert probe.prof is not None and trainer.global_step == 3
    names = {evt.name for evt in probe.prof.events()}
    assert "aten::convolution_backward" in names  # the profile covers forward and backward
    syncs = _syncs(probe.prof)
    assert all(frames for frames in syncs)  # every sync is traced to Python code
    ours = _ours(syncs)
    # The non-finite guard's skip decision is the one documented host read per optimizer step
    # (ddpm/callbacks/nonfinite.py); nothing else of ours may read on the host.
    guard = [f for f in ours if f.startswith("ddpm/callbacks/nonfinite.py")]
    others = [f for f in ours if f not in guard]
    assert not others, "\n".join(others)
    assert len(guard) == 2, guard  # one per profiled step
