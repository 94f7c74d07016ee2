"""Reflow end to end (Liu et al. 2023, Alg. 1): a flow-matching teacher trained on the swiss roll
through Hydra and a real Trainer, reflowed by ``ddpm.tasks.reflow`` (pairs, then a training run
from the teacher's weights); its paths get straighter, it samples in one Euler step through
``src/sample.py``, the run resumes exactly, and non-flow teachers are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from cli_utils import run_cli
from ddpm.checkpoint import load_model
from ddpm.data import ToyDataModule
from ddpm.data.pairs import load_pairs
from ddpm.diffusion.reflow import coupled_pairs
from ddpm.errors import ConfigError
from ddpm.metrics.distances import energy_distance
from ddpm.tasks.reflow import make_pairs, reflow
from ddpm.tasks.train import train
from hydra_utils import SRC_DIR, compose_cfg
from run_utils import load_ckpt, max_diff

pytestmark = pytest.mark.slow

FAST = [
    "experiment=swiss_roll",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.n_train=20000",
    "data.n_val=1000",
    "data.batch_size=512",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_steps=100",
    "callbacks.sample_grid.num_samples=200",
    "callbacks.sample_grid.batch_size=200",
    "callbacks.playground.num_samples=200",
    "~callbacks.posthoc_ema",
]
FLOW = ["objective=flow_matching", "schedule=rectified_flow", "sampler=euler"]
REFLOW = [
    "sampler=euler",  # the sample grids' (experiment=swiss_roll's ddpm cannot sample a flow)
    "reflow.num_pairs=4000",
    "reflow.batch_size=2000",
    "reflow.eval_samples=1000",
    "reflow.sampler.steps=50",
    "optimizer.lr=1e-3",
]
STEPS = 200


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    train(compose_cfg([*FAST, *FLOW, "trainer.max_steps=600"], root))
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def reflowed(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reflowed")
    overrides = [*FAST, *REFLOW, f"teacher={teacher}", f"trainer.max_steps={STEPS}"]
    reflow(compose_cfg(overrides, root, config_name="reflow"))
    return root / "run"


def test_reflow_straightens_the_paths(teacher: Path, reflowed: Path) -> None:
    report = json.loads((reflowed / "reflow" / "straightness.json").read_text())
    assert report["teacher"] > 0.05  # the teacher's paths are curved
    assert report["student"] < 0.5 * report["teacher"], report
    pairs = load_pairs(reflowed / "reflow" / "pairs.pt", (2,))
    assert len(pairs) == 4000
    assert not (reflowed / "reflow" / "chunks").exists()
    ckpt = load_ckpt(reflowed / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS
    stored = ckpt["ddpm_config"]
    assert stored["data"]["pairs"] == str(reflowed / "reflow" / "pairs.pt")
    assert stored["init_from"] == str(teacher)
    # the run started from the teacher: the pairs are what the teacher's ODE makes of the noise
    t = load_model(teacher)
    sampler = instantiate(stored["reflow"]["sampler"])
    x, _, _ = coupled_pairs(t.net, t.diffusion, pairs.noise[:100], sampler)
    torch.testing.assert_close(x, pairs.x0[:100], atol=1e-4, rtol=1e-4)


def _one_step_distance(run_dir: Path, ckpt: Path, steps: int, out: Path) -> float:
    """Energy distance of ``src/sample.py`` Euler samples with ``steps`` steps to the data."""
    r = run_cli(
        [
            f"ckpt_path={ckpt}",
            "sampler=euler",
            f"sampler.steps={steps}",
            "num_samples=1000",
            "batch_size=1000",
            "progress=false",
            f"run_dir={out}",
        ],
        run_dir,
        script=str(SRC_DIR / "sample.py"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    x = torch.from_numpy(np.load(out / "samples.npz")["arr_0"]).float().reshape(-1, 2)
    dm = load_model(ckpt).config["data"]
    ref = ToyDataModule(**{k: v for k, v in dm.items() if k not in ("_target_", "pairs")})
    return energy_distance(x, ref.dataset("val").data[:1000])


def test_few_step_sampling_after_reflow(teacher: Path, reflowed: Path, tmp_path: Path) -> None:
    student = reflowed / "checkpoints" / "last.ckpt"
    d = {
        (who, steps): _one_step_distance(tmp_path, ckpt, steps, tmp_path / f"{who}{steps}")
        for who, ckpt in (("teacher", teacher), ("student", student))
        for steps in (1, 4)
    }
    assert d[("student", 1)] < 0.5 * d[("teacher", 1)], d
    assert d[("student", 4)] < d[("teacher", 4)], d


def test_reflow_run_resumes_exactly(teacher: Path, reflowed: Path, tmp_path: Path) -> None:
    """Stopped at step 80 and resumed (same command, run_dir + ckpt_path=auto), the run ends
    where the uninterrupted one did: weights, EMA, optimizer, loader position."""
    run = tmp_path / "run"
    base = [*FAST, *REFLOW, f"teacher={teacher}"]
    reflow(compose_cfg([*base, "trainer.max_steps=80"], tmp_path, config_name="reflow"))
    resume = [*base, f"trainer.max_steps={STEPS}", f"run_dir={run}", "ckpt_path=auto"]
    metrics = reflow(compose_cfg(resume, tmp_path, config_name="reflow"))
    assert metrics["global_step"] == STEPS
    a = load_ckpt(reflowed / "checkpoints" / "last.ckpt")
    b = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    assert max_diff(a["state_dict"], b["state_dict"]) < 1e-6
    assert max_diff(a["ema_state_dict"], b["ema_state_dict"]) < 1e-6
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in oa:
        assert max_diff(oa[k], ob[k]) < 1e-6, k
    la, lb = (c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (a, b))
    assert la == lb


def test_pair_generation_continues_where_it_stopped(teacher: Path, tmp_path: Path) -> None:
    """A generation killed after its first chunk continues with the same pairs."""
    loaded = load_model(teacher)
    sampler = instantiate({"_target_": "ddpm.diffusion.samplers.EulerSampler", "steps": 10,
                           "clip_denoised": False})  # fmt: skip
    request = {"teacher": str(teacher), "num_pairs": 300, "batch_size": 100, "seed": 3,
               "sampler": {"steps": 10}}  # fmt: skip
    whole = make_pairs(loaded, sampler, tmp_path / "a", request)
    out = tmp_path / "b"
    out.mkdir()
    (out / "chunks").mkdir()
    # the first chunk, then "killed": a chunk file and the request only
    make_pairs(loaded, sampler, tmp_path / "c", {**request, "num_pairs": 100})
    c = torch.load(tmp_path / "c" / "pairs.pt", weights_only=True)
    torch.save({"x0": c["x0"], "noise": c["noise"], "straightness_sum": c["straightness"] * 100},
               out / "chunks" / "00000.pt")  # fmt: skip
    (out / "request.json").write_text(json.dumps(request))
    again = make_pairs(loaded, sampler, out, request)
    a, b = (load_pairs(d / "pairs.pt", (2,)) for d in (tmp_path / "a", out))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise)
    assert again == pytest.approx(whole)
    with pytest.raises(ConfigError, match="other settings"):
        make_pairs(loaded, sampler, out, {**request, "seed": 4})


def test_non_flow_teacher_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ddpm"
    train(compose_cfg([*FAST, "trainer.max_steps=2", "~callbacks.playground"], root))
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="objective=flow_matching schedule=rectified_flow"):
        reflow(compose_cfg([*FAST, f"teacher={ckpt}"], tmp_path / "r", config_name="reflow"))
