"""Checkpoints are data, never code: crafted files (pickle payloads, ``_target_`` injection in the
stored config and in safetensors metadata, truncated and empty files) are refused with our own
message, and nothing they carry ever runs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ddpm.checkpoint import (
    CONFIG_KEY,
    LOADABLE_MODULES,
    CheckpointError,
    build_from_config,
    is_loadable,
    load_model,
)
from ddpm.errors import ConfigError
from ddpm.run.checkpoint_files import checkpoint_info, resolve_ckpt_path
from ddpm.tasks.train import train
from ddpm.utils.config_tree import to_plain
from hydra_utils import TINY, compose_cfg

TORCH_HINT = ("weights_only` set to `False", "Re-running", "add_safe_globals")


class _CreatesFile:
    """A real pickle payload: unpickling it opens (creates) ``path`` for writing."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A genuine stored config and the matching network weights (tiny U-Net)."""
    tmp = tmp_path_factory.mktemp("stored")
    config = to_plain(compose_cfg(TINY, tmp))
    net, _ = build_from_config(config)
    return {"config": config, "weights": net.state_dict()}


def _write_ckpt(path: Path, config: dict, weights: dict, **extra) -> Path:
    sd = {f"net.{k}": v for k, v in weights.items()}
    torch.save({CONFIG_KEY: config, "state_dict": sd, "global_step": 3, **extra}, path)
    return path


def _write_export(path: Path, config: dict, weights: dict) -> Path:
    meta = {CONFIG_KEY: json.dumps(config), "global_step": "3"}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata=meta)
    return path


def test_genuine_files_load(stored: dict, tmp_path: Path) -> None:
    for path in (
        _write_ckpt(tmp_path / "ok.ckpt", stored["config"], stored["weights"]),
        _write_export(tmp_path / "ok.safetensors", stored["config"], stored["weights"]),
    ):
        loaded = load_model(path, use_ema=False)
        assert loaded.global_step == 3
        for k, v in loaded.net.state_dict().items():
            assert torch.equal(v, stored["weights"][k]), k


def test_a_pickle_payload_never_runs(stored: dict, tmp_path: Path) -> None:
    # The payload is live: an unguarded torch.load runs it.
    probe = tmp_path / "probe.ckpt"
    torch.save({"x": _CreatesFile(tmp_path / "probe_ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_ran").exists()

    marker = tmp_path / "pwned"
    evil = _write_ckpt(
        tmp_path / "evil.ckpt", stored["config"], stored["weights"], payload=_CreatesFile(marker)
    )
    errors = []
    for load in (load_model, checkpoint_info, lambda p: resolve_ckpt_path(str(p), None)):
        with pytest.raises((CheckpointError, ConfigError)) as info:
            load(evil)
        errors.append(str(info.value))
    cfg = compose_cfg([*TINY, f"ckpt_path={evil}", "trainer.max_steps=1"], tmp_path)
    with pytest.raises(ConfigError) as info:  # training resume
        train(cfg)
    errors.append(str(info.value))
    assert not marker.exists()
    for msg in errors:
        assert "io.open" in msg and "could run code" in msg, msg
        assert not any(hint in msg for hint in TORCH_HINT), msg


@pytest.mark.parametrize("kind", ["empty", "truncated"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_and_empty_files_fail_clearly(
    kind: str, suffix: str, stored: dict, tmp_path: Path
) -> None:
    good = tmp_path / f"good{suffix}"
    write = _write_ckpt if suffix == ".ckpt" else _write_export
    data = write(good, stored["config"], stored["weights"]).read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"" if kind == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="empty|truncated") as info:
        load_model(bad)
    assert str(bad) in str(info.value)
    if suffix == ".ckpt":
        with pytest.raises(ConfigError, match="empty|truncated"):
            resolve_ckpt_path(str(bad), None)


def _savetxt(marker: Path, **extra) -> dict:
    return {"_target_": "numpy.savetxt", "fname": str(marker), "X": [[1.0]], **extra}


INJECTIONS = {
    # where the payload goes in the stored config -> the key path the refusal names
    "model": (lambda c, p: c.__setitem__("model", _savetxt(p)), "model._target_"),
    "nested": (
        lambda c, p: c["model"].__setitem__("extra", {"inner": _savetxt(p)}),
        "model.extra.inner._target_",
    ),
    "partial": (
        lambda c, p: c["diffusion"].__setitem__("fn", _savetxt(p, _partial_=True)),
        "diffusion.fn._target_",
    ),
    "list": (
        lambda c, p: c["model"].__setitem__("channel_mult", [1, _savetxt(p)]),
        "model.channel_mult[1]._target_",
    ),
    "sampler": (lambda c, p: c.__setitem__("sampler", _savetxt(p)), "sampler._target_"),
    "data": (lambda c, p: c["data"].__setitem__("_target_", "os.system"), "data._target_"),
    "interpolation": (
        lambda c, p: c["model"].__setitem__(
            "extra", "${oc.create:{_target_: numpy.savetxt, fname: " + str(p) + ", X: [[1]]}}"
        ),
        "model.extra",
    ),
}


@pytest.mark.parametrize("where", list(INJECTIONS))
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_target_injection_is_refused(where: str, suffix: str, stored: dict, tmp_path: Path) -> None:
    inject, key = INJECTIONS[where]
    marker = tmp_path / "pwned.txt"
    config = copy.deepcopy(stored["config"])
    inject(config, marker)
    write = _write_ckpt if suffix == ".ckpt" else _write_export
    path = write(tmp_path / f"crafted{suffix}", config, stored["weights"])
    with pytest.raises(CheckpointError, match="refused") as info:
        load_model(path)
    assert key in str(info.value)
    assert not marker.exists()


def test_the_injected_config_would_write_a_file(tmp_path: Path) -> None:
    """What the refusal prevents: Hydra builds whatever a config names."""
    instantiate(OmegaConf.create(_savetxt(tmp_path / "a.txt")))
    node = OmegaConf.create({"x": "${oc.create:{_target_: numpy.savetxt, fname: b, X: [[1]]}}"})
    assert OmegaConf.is_dict(node.x) and node.x._target_ == "numpy.savetxt"
    assert (tmp_path / "a.txt").exists()


def test_allowed_modules_admit_their_own_public_builders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fake_interop.py").write_text(
        "from os import system\n"
        "from numpy import savetxt\n"
        "class UNet2DModel:\n    pass\n"
        "def build_unet(**kw):\n    return kw\n"
        "def _private():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("ddpm.checkpoint.LOADABLE_MODULES", {*LOADABLE_MODULES, "fake_interop"})
    assert is_loadable("fake_interop.UNet2DModel") and is_loadable("fake_interop.build_unet")
    for name in ("system", "savetxt", "_private", "missing", "UNet2DModel.__init__"):
        assert not is_loadable(f"fake_interop.{name}"), name
    assert is_loadable("ddpm.nn.UNet") and not is_loadable("ddpm.nn.unet.torch")
    assert is_loadable("ddpm.diffusion.samplers.DDIMSampler")
    for name in ("np", "torch", "math", "Model", "Generator", "_Sampler"):
        assert not is_loadable(f"ddpm.diffusion.samplers.{name}"), name
    assert not is_loadable("ddpm.interop.diffusers.os")
    sys.modules.pop("fake_interop", None)


RESUME_INJECTIONS = {
    # a resume instantiates the whole stored run config, not only the sections load_model builds
    "callback": (
        lambda c, p: c["callbacks"].__setitem__("evil", _savetxt(p)),
        "callbacks.evil._target_",
    ),
    "optimizer": (
        lambda c, p: c["optimizer"].__setitem__("_target_", "numpy.savetxt"),
        "optimizer._target_",
    ),
    "logger": (lambda c, p: c.__setitem__("logger", {"x": _savetxt(p)}), "logger.x._target_"),
    "interpolation": (
        lambda c, p: c["trainer"].__setitem__(
            "default_root_dir", "${oc.create:{_target_: numpy.savetxt, fname: x, X: [[1]]}}"
        ),
        "trainer.default_root_dir",
    ),
}


@pytest.mark.parametrize("where", list(RESUME_INJECTIONS))
def test_resume_refuses_targets_injected_anywhere_in_the_run_config(
    where: str, stored: dict, tmp_path: Path
) -> None:
    inject, key = RESUME_INJECTIONS[where]
    marker = tmp_path / "pwned.txt"
    config = copy.deepcopy(stored["config"])
    inject(config, marker)
    path = _write_ckpt(tmp_path / "crafted.ckpt", config, stored["weights"])
    cfg = compose_cfg([*TINY, f"ckpt_path={path}", "trainer.max_steps=5"], tmp_path)
    with pytest.raises(ConfigError, match="refused") as info:
        train(cfg)
    assert key in str(info.value)
    assert not marker.exists()


def test_resume_accepts_the_targets_a_genuine_run_config_names(
    stored: dict, tmp_path: Path
) -> None:
    from ddpm.run.resume import check_resumable_config, shipped_targets

    assert {"ddpm.callbacks.ema.EMA", "torch.optim.Adam"} <= shipped_targets()
    cfg = compose_cfg([*TINY, "logger=tensorboard"], tmp_path)
    check_resumable_config(to_plain(cfg), cfg, "genuine.ckpt")  # every shipped group's targets
    custom = copy.deepcopy(stored["config"])
    custom["callbacks"]["mine"] = {"_target_": "my_lab.MyCallback"}
    with pytest.raises(ConfigError, match="my_lab.MyCallback"):
        check_resumable_config(custom, compose_cfg(TINY, tmp_path), "other.ckpt")
    mine = compose_cfg([*TINY, "+callbacks.mine._target_=my_lab.MyCallback"], tmp_path)
    check_resumable_config(custom, mine, "own.ckpt")  # the command composes it itself
