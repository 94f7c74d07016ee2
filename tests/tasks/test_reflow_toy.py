"""Reflow (Liu et al. 2023, Alg. 1) of a tiny class-conditional flow-matching teacher on the eight
Gaussians (label k = the k-th component; x = ODE(z | y)). Conditional teachers: reflowed end to end
with classifier-free guidance, the pairs carry seeded uniform labels and lie in their class's
component, the student is conditional (labelled coupled batches, label dropout) and samples for given
classes, an interrupted generation continues with the same pairs, pairs and data must agree on
labels. Pairs across ranks: processes started at once (torchrun's RANK / WORLD_SIZE) share the
chunks and write the pairs one process writes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor

from cli_utils import cli_env
from ddpm.checkpoint import load_model
from ddpm.data import ImageDataModule, ToyDataModule
from ddpm.data.pairs import CoupledBatch, load_pairs, save_pairs
from ddpm.diffusion.reflow import coupled_pairs, mean_straightness, seeded_chunk
from ddpm.diffusion.samplers import EulerSampler
from ddpm.errors import ConfigError, DataError
from ddpm.module import DiffusionModule
from ddpm.tasks.reflow import PairsTimeout, make_pairs, reflow
from ddpm.tasks.sample import sample
from ddpm.tasks.train import train
from ddpm.utils.distributed import external_launch
from hydra_utils import SRC_DIR, TESTS_DIR, compose_cfg
from run_utils import load_ckpt

K = 8  # eight_gaussians: one class per component
TOY = [
    "data=eight_gaussians",
    "model=mlp",
    "model.hidden_dim=64",
    "data.conditional=true",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.n_train=4096",
    "data.n_val=256",
    "data.batch_size=256",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_steps=1000",
    "callbacks.sample_grid.num_samples=64",
    "callbacks.sample_grid.batch_size=64",
    "callbacks.playground.num_samples=64",
    "~callbacks.posthoc_ema",
    "lr_scheduler.warmup_steps=0",
    "optimizer.lr=3e-3",
    "num_threads=1",
    "sampler=euler",
    "sampler.steps=10",
]
REFLOW = [
    "reflow.num_pairs=512",
    "reflow.batch_size=256",
    "reflow.eval_samples=256",
    "reflow.sampler.steps=20",
    "reflow.sampler.guidance_scale=2.0",
]
STEPS = 30


def component(x: Tensor) -> Tensor:
    """The eight Gaussians' component (= class) nearest to each point: its angle in 1/8 turns."""
    angle = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    return (angle / (math.pi / 4)).round().long() % K


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cond_teacher")
    flow = ["objective=flow_matching", "schedule=rectified_flow", "trainer.max_steps=100"]
    train(compose_cfg([*TOY, *flow], root))
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def reflowed(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cond_reflowed")
    overrides = [*TOY, *REFLOW, f"teacher={teacher}", f"trainer.max_steps={STEPS}"]
    reflow(compose_cfg(overrides, root, config_name="reflow"))
    return root / "run"


def test_pairs_carry_seeded_uniform_labels_and_lie_in_their_class(
    teacher: Path, reflowed: Path
) -> None:
    out = reflowed / "reflow"
    pairs = load_pairs(out / "pairs.pt", (2,), K)
    assert pairs.labels is not None and len(pairs) == 512
    counts = torch.bincount(pairs.labels, minlength=K).double()
    chi2 = float(((counts - 64) ** 2 / 64).sum())
    assert chi2 < 24.3, counts  # uniform over the 8 classes: chi-square (7 dof) p > 0.001
    assert (component(pairs.x0) == pairs.labels).float().mean() > 0.95
    # chunk i is the teacher's guided ODE of the noise and labels seeded by (seed, i)
    request = json.loads((out / "request.json").read_text())
    assert request["sampler"]["guidance_scale"] == 2.0
    t = load_model(teacher)
    z, y = seeded_chunk(256, (2,), K, 0, 1)
    assert torch.equal(z, pairs.noise[256:]) and torch.equal(y, pairs.labels[256:])
    sampler = instantiate(request["sampler"])
    x, _, _ = coupled_pairs(t.net, t.diffusion, z[:64], sampler, class_labels=y[:64])
    torch.testing.assert_close(x, pairs.x0[256:320], atol=1e-5, rtol=1e-5)
    plain = instantiate({**request["sampler"], "guidance_scale": 1.0})
    x1, _, _ = coupled_pairs(t.net, t.diffusion, z[:64], plain, class_labels=y[:64])
    assert (x1 - pairs.x0[256:320]).abs().max() > 1e-3  # the pairs were drawn with guidance
    # straightness is measured on labelled paths, seeded like the pairs: with the pairs' seed,
    # on the pairs' own paths
    report = json.loads((out / "straightness.json").read_text())
    on_pairs = mean_straightness(t.net, t.diffusion, sampler, (2,), 512, 0, 256)
    assert on_pairs == pytest.approx(report["pairs"], rel=1e-9)
    expected = mean_straightness(t.net, t.diffusion, sampler, (2,), 256, 1, 256)
    assert report["teacher"] == pytest.approx(expected, rel=1e-6)
    assert report["global_step"] == STEPS
    student = load_model(reflowed / "checkpoints" / "last.ckpt")  # val/straightness at the end
    expected = mean_straightness(student.net, student.diffusion, sampler, (2,), 256, 1, 256)
    assert report["student"] == pytest.approx(expected, rel=1e-6)


def test_student_is_conditional_and_samples_for_given_classes(
    reflowed: Path, tmp_path: Path
) -> None:
    ckpt = reflowed / "checkpoints" / "last.ckpt"
    stored = load_ckpt(ckpt)["ddpm_config"]
    assert stored["data"]["conditional"] and stored["data"]["num_classes"] == K
    assert stored["model"]["num_classes"] == K and stored["p_uncond"] == 0.1
    assert stored["data"]["pairs"] == str(reflowed / "reflow" / "pairs.pt")
    # a labelled coupled batch reaches the loss as a labelled batch does: (x0, labels)
    module = DiffusionModule.load_from_checkpoint(ckpt)
    x, z, y = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 3, 5, 7])
    x0, labels = module._split_batch(CoupledBatch(x, y, z))
    assert x0 is x and labels is y
    with pytest.raises(ValueError, match="carry no labels"):
        module._split_batch(CoupledBatch(x, None, z))
    given = [1, 1, 4, 6] * 16
    cfg = [f"ckpt_path={ckpt}", "accelerator=cpu", "progress=false", "sampler=euler"]
    cfg += ["sampler.steps=4", "sampler.guidance_scale=2.0", f"class_labels={given}"]
    out = np.load(sample(compose_cfg(cfg, tmp_path, "sample")))
    assert out["arr_1"].tolist() == given
    points = torch.from_numpy(out["arr_0"]).float().reshape(-1, 2)
    assert (component(points) == torch.tensor(given)).float().mean() > 0.9


def test_a_changed_guidance_scale_is_refused(teacher: Path, reflowed: Path, tmp_path: Path) -> None:
    """The pairs' request records the sampler's guidance scale: another one in the same run
    directory is refused like any other changed setting, before anything is overwritten."""
    shutil.copytree(reflowed / "reflow", tmp_path / "run" / "reflow")
    before = (tmp_path / "run" / "reflow" / "pairs.pt").read_bytes()
    again = [*TOY, *REFLOW, f"teacher={teacher}", "reflow.sampler.guidance_scale=1.0"]
    with pytest.raises(ConfigError, match="other settings"):
        reflow(compose_cfg(again, tmp_path, config_name="reflow"))
    assert (tmp_path / "run" / "reflow" / "pairs.pt").read_bytes() == before


class StopAfter:
    """A sampler that is "killed" (raises) when called for the ``n + 1``-th time."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler, self.left = sampler, n

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.sampler(*args, **kwargs)


def test_interrupted_conditional_generation_continues_with_the_same_pairs(
    teacher: Path, tmp_path: Path
) -> None:
    loaded = load_model(teacher)
    sampler = EulerSampler(steps=5, clip_denoised=False, guidance_scale=1.5)
    request = {"teacher": str(teacher), "num_pairs": 250, "batch_size": 100, "seed": 3,
               "sampler": {"steps": 5, "guidance_scale": 1.5}}  # fmt: skip
    whole = make_pairs(loaded, sampler, tmp_path / "a", request)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        make_pairs(loaded, StopAfter(sampler, 2), out, request)
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["00000.pt", "00001.pt"]
    again = make_pairs(loaded, StopAfter(sampler, 1), out, request)  # the last chunk only
    a, b = (load_pairs(d / "pairs.pt", (2,), K) for d in (tmp_path / "a", out))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise)
    assert a.labels is not None and torch.equal(a.labels, b.labels)
    assert again == pytest.approx(whole, rel=1e-12)
    assert not (out / "chunks").exists()


def test_a_rank_that_waits_too_long_names_the_missing_chunks(teacher: Path, tmp_path: Path) -> None:
    """Rank 0 of 2 whose partner died stops after the timeout, naming chunk 1 and rank 1, and
    keeps its chunks; rank 1 alone stops waiting for pairs.pt; the resumed rank 0 makes none
    again, and the pairs are one process's."""
    loaded = load_model(teacher)
    sampler = EulerSampler(steps=3, clip_denoised=False)
    request = {"teacher": str(teacher), "num_pairs": 250, "batch_size": 100, "seed": 2,
               "sampler": {"steps": 3}}  # fmt: skip
    out = tmp_path / "run" / "reflow"
    missing = r"chunks \[1\] of 3 are missing \(made by ranks \[1\] of 2\)"
    resume = rf"run_dir={tmp_path / 'run'} ckpt_path=auto \(the 2 chunks made are kept\)"
    with pytest.raises(PairsTimeout, match=f"wait_timeout_s=0.2 s.*{missing}.*{resume}"):
        make_pairs(loaded, sampler, out, request, rank=0, world=2, timeout_s=0.2)
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["00000.pt", "00002.pt"]
    with pytest.raises(PairsTimeout, match="every chunk is made, but rank 0 wrote no pairs.pt"):
        make_pairs(loaded, sampler, out, request, rank=1, world=2, timeout_s=0.2)
    again = make_pairs(loaded, StopAfter(sampler, 0), out, request, rank=0, world=2, timeout_s=0)
    whole = make_pairs(loaded, sampler, tmp_path / "one", request)
    a, b = (load_pairs(d / "pairs.pt", (2,), K) for d in (tmp_path / "one", out))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise)
    assert a.labels is not None and torch.equal(a.labels, b.labels)
    assert again == pytest.approx(whole, rel=1e-12)


@pytest.mark.timeout(60)  # without the bound, the rank waits forever
def test_reflow_wait_timeout_s_bounds_a_ranks_wait(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of a torchrun launch whose rank 0 never comes makes its chunk, then stops after
    reflow.wait_timeout_s, naming the chunk rank 0 was to make."""
    for var, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(var, value)
    overrides = [*TOY, f"teacher={teacher}", "reflow.num_pairs=200", "reflow.batch_size=100",
                 "reflow.sampler.steps=2", "reflow.wait_timeout_s=0.5", "trainer.accelerator=cpu"]  # fmt: skip
    cfg = compose_cfg(overrides, tmp_path, config_name="reflow")
    with pytest.raises(PairsTimeout, match=r"chunks \[0\] of 2 are missing \(made by ranks \[0\]"):
        reflow(cfg)
    assert [p.name for p in (tmp_path / "run" / "reflow" / "chunks").iterdir()] == ["00001.pt"]
    bad = compose_cfg([*overrides, "reflow.wait_timeout_s=-1"], tmp_path / "bad", "reflow")
    with pytest.raises(ConfigError, match="reflow.wait_timeout_s must be seconds >= 0 or null"):
        reflow(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_pairs_are_made_where_the_run_trains(teacher: Path, tmp_path: Path) -> None:
    """The teacher runs on the trainer's device: trainer.accelerator=gpu without a GPU is refused
    before any pair is made, naming the setting."""
    overrides = [*TOY, f"teacher={teacher}", "reflow.num_pairs=100", "trainer.accelerator=gpu"]
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu asks for a CUDA GPU"):
        reflow(compose_cfg(overrides, tmp_path, config_name="reflow"))
    assert not (tmp_path / "run" / "reflow").exists()


def test_pairs_and_data_must_agree_on_labels(tmp_path: Path) -> None:
    x, z = torch.randn(64, 2), torch.randn(64, 2)
    labelled, plain, bad = tmp_path / "y.pt", tmp_path / "n.pt", tmp_path / "bad.pt"
    y = torch.arange(64) % K
    save_pairs(labelled, x, z, y)
    save_pairs(plain, x, z)
    save_pairs(bad, x, z, y + 1)  # label 8 of 8 classes
    with pytest.raises(DataError, match="holds no class labels.*data.conditional=true"):
        load_pairs(plain, (2,), K)
    with pytest.raises(DataError, match="holds class labels.*data.conditional=true"):
        load_pairs(labelled, (2,), None)
    with pytest.raises(DataError, match=r"outside \[0, 8\)"):
        load_pairs(bad, (2,), K)
    common = dict(n_train=256, n_val=64, batch_size=16)
    dm = ToyDataModule("eight_gaussians", conditional=True, pairs=labelled, **common)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, CoupledBatch) and batch.labels is not None
    for xi, yi, zi in zip(batch.x0, batch.labels, batch.noise):  # each x with its own y and z
        i = int((x == xi).all(1).nonzero())
        assert int(yi) == int(y[i]) and torch.equal(zi, z[i])
    val = next(iter(dm.val_dataloader()))  # validation stays on the labelled data
    assert isinstance(val, (list, tuple)) and val[1].dtype == torch.long
    unlabelled = ToyDataModule("eight_gaussians", conditional=True, pairs=plain, **common)
    unlabelled.setup()
    with pytest.raises(DataError, match="holds no class labels"):
        unlabelled.train_dataloader()
    uncond = ToyDataModule("eight_gaussians", pairs=plain, **common)
    uncond.setup()
    assert next(iter(uncond.train_dataloader())).labels is None  # unconditional pairs as before


# one rank of a launch that starts them all at once, making its share of the pairs
RANK_SCRIPT = """
import json, logging, sys
from pathlib import Path
from hydra.utils import instantiate
from ddpm.checkpoint import load_model
from ddpm.tasks.reflow import make_pairs
from ddpm.utils.distributed import external_launch
logging.basicConfig(level=logging.INFO, format="%(message)s")
teacher, out, request = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
rank, world = external_launch()
print(make_pairs(load_model(teacher), instantiate(request["sampler"]), out, request, rank, world))
"""


@pytest.mark.ddp
def test_ranks_started_at_once_share_the_chunks(teacher: Path, tmp_path: Path) -> None:
    """Two processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): rank r makes
    chunks i = r (mod 2), rank 0 writes pairs.pt, and the pairs are one process's, bit for bit."""
    sampler = {"_target_": "ddpm.diffusion.samplers.EulerSampler", "steps": 5,
               "clip_denoised": False, "guidance_scale": 1.5}  # fmt: skip
    request = {"teacher": str(teacher), "num_pairs": 350, "batch_size": 100, "seed": 5,
               "sampler": sampler}  # fmt: skip
    out = tmp_path / "ranks" / "reflow"
    out.mkdir(parents=True)
    path = f"{SRC_DIR}{os.pathsep}{TESTS_DIR}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(teacher), str(out), json.dumps(request)],
            cwd=tmp_path,
            env=cli_env(
                tmp_path,
                {"PYTHONPATH": path, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
            ),  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    made = [
        {line for line in err.splitlines() if line.startswith("reflow pairs")} for _, err in results
    ]
    assert made[0] == {"reflow pairs: chunk 1/4 (100 pairs)", "reflow pairs: chunk 3/4 (100 pairs)"}
    assert made[1] == {"reflow pairs: chunk 2/4 (100 pairs)", "reflow pairs: chunk 4/4 (50 pairs)"}
    alone = make_pairs(load_model(teacher), instantiate(sampler), tmp_path / "one", request)
    a, b = (load_pairs(d / "pairs.pt", (2,), K) for d in (tmp_path / "one", out))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise)
    assert a.labels is not None and torch.equal(a.labels, b.labels)
    assert [float(stdout) for stdout, _ in results] == [alone, alone]
    assert not (out / "chunks").exists()


def test_external_launch_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_JOB_NAME"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    assert external_launch() is None  # one process
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert external_launch() is None  # a rank Lightning's launcher starts at fit
    monkeypatch.setenv("RANK", "1")
    assert external_launch() == (1, 2)  # torchrun
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "reflow")
    assert external_launch() == (3, 4)  # srun
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert external_launch() is None  # a shell in an allocation: one process


@pytest.mark.ddp
@pytest.mark.slow
def test_torchrun_reflow_on_two_cpu_ranks(teacher: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 src/reflow.py`` (gloo): each rank makes its chunks, rank 0
    the pairs file (one process's pairs), then both train the student with DDP."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    overrides = [*TOY, *REFLOW, f"teacher={teacher}", "reflow.num_pairs=400"]
    overrides += ["reflow.batch_size=100", "trainer.max_steps=6", "trainer.accelerator=cpu"]
    overrides += ["trainer.devices=2", "trainer.strategy=ddp", f"run_dir={run}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node=2", f"--log-dir={logs}", "--redirects=3"]
    r = subprocess.run(
        [*torchrun, str(SRC_DIR / "reflow.py"), *overrides],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = {rank: next(logs.glob(f"*/attempt_0/{rank}/stdout.log")).read_text() for rank in (0, 1)}
    assert r.returncode == 0, (r.stderr + out[0] + out[1])[-4000:]
    for rank, chunks in ((0, "13"), (1, "24")):
        made = [line for line in out[rank].splitlines() if "reflow pairs: chunk" in line]
        assert [line.split("chunk ")[1][0] for line in made] == list(chunks), made
    request = json.loads((run / "reflow" / "request.json").read_text())
    alone = make_pairs(load_model(teacher), instantiate(request["sampler"]), tmp_path, request)
    a, b = (load_pairs(d / "pairs.pt", (2,), K) for d in (tmp_path, run / "reflow"))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.labels, b.labels)
    report = json.loads((run / "reflow" / "straightness.json").read_text())
    assert report["pairs"] == pytest.approx(alone) and report["global_step"] == 6
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_image_pairs_are_not_flipped(tmp_path: Path) -> None:
    """data.random_flip (CIFAR-10's default) leaves coupled pairs alone: flipping x = ODE(z)
    without z would break the coupling."""
    x, z = torch.randn(32, 1, 16, 16), torch.randn(32, 1, 16, 16)
    save_pairs(tmp_path / "p.pt", x, z)
    dm = ImageDataModule(
        "digits", root=None, batch_size=32, random_flip=True, pairs=tmp_path / "p.pt"
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    order = [int((x == xi).flatten(1).all(1).nonzero()) for xi in batch.x0]  # unflipped
    assert sorted(order) == list(range(32)) and torch.equal(batch.noise, z[order])
