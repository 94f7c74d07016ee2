"""Checkpoints are data, never code: crafted files (pickle payloads, ``_target_`` injection in the
stored config and in safetensors metadata, truncated and empty files) are refused with our own
message, and nothing they carry ever runs."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ddpm.checkpoint import (
    BUILT_SECTIONS,
    CONF_DIR,
    CONFIG_KEY,
    CheckpointError,
    build_from_config,
    check_stored_config,
    is_loadable,
    load_model,
    open_checkpoint,
    shipped_targets,
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


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_network_process_sampler_and_data_a_config_names_loads(
    stored: dict, tmp_path: Path
) -> None:
    """The stored config of a run with any shipped model / data / sampler / objective passes the
    check a load makes (composed for real: ``data=hf`` included), and nothing else does."""
    toy = {"swiss_roll", "two_moons", "eight_gaussians"}
    left = {g: _options(g) for g in ("data", "model", "sampler", "objective")}
    while any(left.values()):  # each option once, a few groups per composition
        picks = {
            g: (names or ["ddpm" if g == "sampler" else _options(g)[0]])[0]
            for g, names in left.items()
        }
        if picks["data"] in toy:
            picks["model"] = "mlp"  # the U-Nets take images
        overrides = [f"{g}={name}" for g, name in picks.items()]
        config = to_plain(compose_cfg([*TINY, *overrides], tmp_path))
        check_stored_config(config, " ".join(overrides))  # model.path, data.path: '???'
        for g, name in picks.items():
            if name in left[g]:
                left[g].remove(name)
    # public builders of our modules that no config names, or a class in another section
    for section, target in [
        ("model", "ddpm.interop.diffusers.to_diffusers_unet"),
        ("model", "ddpm.interop.diffusers.load_unet"),
        ("sampler", "ddpm.diffusion.samplers.sample_batches"),
        ("data", "ddpm.nn.UNet"),
        ("diffusion", "ddpm.data.ImageDataModule"),
    ]:
        assert not is_loadable(target, section), target
        config = copy.deepcopy(stored["config"])
        config[section] = {"_target_": target}
        with pytest.raises(CheckpointError, match=f"{section}._target_"):
            check_stored_config(config, "crafted.ckpt")
    assert {"ddpm.nn.UNet", "ddpm.data.ImageDataModule"} <= {
        t for s in BUILT_SECTIONS for t in shipped_targets().get(s, ())
    }


def test_the_allow_list_is_read_from_the_config_files(tmp_path: Path) -> None:
    """A config group option added to conf/ makes its class loadable, in its section only; a
    ``# @package _global_`` file counts under the keys it writes."""
    conf = tmp_path / "conf"
    (conf / "sampler").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "sampler" / "euler.yaml").write_text("_target_: my_lab.EulerSampler\nsteps: 10\n")
    (conf / "experiment" / "x.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: unet\n"
        "model:\n  _target_: my_lab.Net\n  inner: {_target_: my_lab.Block}\n"
    )
    found = shipped_targets(conf)
    assert found == {
        "sampler": frozenset({"my_lab.EulerSampler"}),
        "model": frozenset({"my_lab.Net", "my_lab.Block"}),
    }


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
    from ddpm.run.resume import check_resumable_config

    shipped = set().union(*shipped_targets().values())
    assert {"ddpm.callbacks.ema.EMA", "torch.optim.Adam"} <= shipped
    cfg = compose_cfg([*TINY, "logger=tensorboard"], tmp_path)
    check_resumable_config(to_plain(cfg), cfg, "genuine.ckpt")  # every shipped group's targets
    custom = copy.deepcopy(stored["config"])
    custom["callbacks"]["mine"] = {"_target_": "my_lab.MyCallback"}
    with pytest.raises(ConfigError, match="my_lab.MyCallback"):
        check_resumable_config(custom, compose_cfg(TINY, tmp_path), "other.ckpt")
    mine = compose_cfg([*TINY, "+callbacks.mine._target_=my_lab.MyCallback"], tmp_path)
    check_resumable_config(custom, mine, "own.ckpt")  # the command composes it itself


class _System:
    """A pickle payload that runs a shell command when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refusals_name_what_the_file_holds(tmp_path: Path) -> None:
    """A payload is named as torch words it (``posix.system``: torch 2.6+'s "unsupported GLOBAL
    ... whose module is blocked", 2.4+'s "GLOBAL ... was not an allowed global", older "Unsupported
    class ..."); random bytes or a plain pickle are not a checkpoint, and nothing in them runs."""
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _System()}, evil)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(evil)
    assert f"Python object {os.system.__module__}.system" in str(info.value)
    assert "could run code" in str(info.value)
    for name, data in [("random.ckpt", os.urandom(4096)), ("plain.ckpt", pickle.dumps([1, 2]))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
            open_checkpoint(tmp_path / name)
        assert "Python object" not in str(info.value) and "run code" not in str(info.value)
    from ddpm.checkpoint import _refused_global

    for wording in (
        "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",
        "Unsupported global: GLOBAL posix.system was not an allowed global by default.",
        "Unsupported class posix.system",
    ):
        assert _refused_global(wording) == "posix.system", wording
    assert _refused_global("WeightsUnpickler error: Unsupported operand 149") is None
