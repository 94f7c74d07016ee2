"""Exact resume at every stop point: for a split k + (N - k) of an N-step run, the resumed run's
weights, EMA weights, post-hoc EMA profiles and snapshot files, optimizer and LR-schedule state,
loop and loader position, importance-sampler history and global RNG streams equal the
uninterrupted run's (to 1e-6 in fp32).

One uninterrupted run per recipe writes a checkpoint at every step and fingerprints the global RNG
streams after every step; each split resumes once, either from a run that stopped at k (by
``max_steps`` or ``max_time``) or from the straight run's step-k checkpoint, and is compared at N.
The network is a micro U-Net on 8x8 digits with the default recipe's shape: batch 128, so 12
batches an epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli_utils import run_cli
from ddpm.checkpoint import POSTHOC_EMA_KEY
from ddpm.tasks.train import train
from ddpm.utils.posthoc_ema import read_snapshot
from hydra_utils import MICRO, compose_cfg
from run_utils import load_ckpt, max_diff

EVERY_STEP = [
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.save_top_k=-1",
]
RECIPES = {
    # default recipe shape; splits at and between epoch boundaries and cadences
    "default": ([], 36),
    # importance sampling of t (loss_second_moment) with gradient accumulation: 4 steps an epoch
    "vlb_accumulate": (["objective=vlb", "trainer.accumulate_grad_batches=3"], 10),
    "hybrid": (["objective=hybrid"], 8),
    # the continuous processes: EDM's ln σ ~ N(-1.2, 1.2²) and flow matching's t ~ U(0, 1) draws,
    # validation and sample grids (Euler on σ / t) between steps
    "edm": (["objective=edm"], 8),
    "flow_matching": (["objective=flow_matching"], 8),
    # class-conditional: labels in the batches, label dropout from the step's noise stream
    "conditional": (["data.conditional=true", "p_uncond=0.3"], 14),
}


def assert_same_training_state(a: dict, b: dict) -> None:
    """Everything a resumed run continues from, to 1e-6."""
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    assert max_diff(a["state_dict"], b["state_dict"]) < 1e-6
    assert max_diff(a["ema_state_dict"], b["ema_state_dict"]) < 1e-6
    assert a["ema_state"] == b["ema_state"]
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys()
    for k in oa:  # Adam moments and step counts
        assert max_diff(oa[k], ob[k]) < 1e-6, k
    assert a["lr_schedulers"] == b["lr_schedulers"]
    la, lb = (c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (a, b))
    assert la == lb  # the loader's position: seed, epoch, batches
    if "ddpm_t_sampler" in a:
        assert max_diff(a["ddpm_t_sampler"], b["ddpm_t_sampler"]) == 0.0
    pa, pb = a[POSTHOC_EMA_KEY], b[POSTHOC_EMA_KEY]
    assert pa["snapshots"] and pa["snapshots"] == pb["snapshots"]
    assert pa["num_updates"] == pb["num_updates"] == a["global_step"]
    for x, y in zip(pa["profiles"], pb["profiles"], strict=True):
        assert max_diff(x, y) < 1e-6


def assert_same_snapshots(a: Path, b: Path) -> None:
    """Every post-hoc EMA snapshot file of run ``a`` is in run ``b``, with the same weights (a
    run resumed in a new directory copied the earlier ones and wrote the later ones)."""
    files = sorted(p.name for p in (a / "ema_snapshots").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (b / "ema_snapshots").glob("*.safetensors"))
    for name in files:
        (sa, ia), (sb, ib) = (read_snapshot(r / "ema_snapshots" / name) for r in (a, b))
        assert ia == ib
        for x, y in zip(sa, sb, strict=True):
            assert max_diff(x, y) < 1e-6


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted run per recipe (run lazily), with a checkpoint at every step."""
    runs: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in runs:
            extra, n = RECIPES[recipe]
            root = tmp_path_factory.mktemp(f"straight_{recipe}")
            train(compose_cfg([*MICRO, *extra, *EVERY_STEP, f"trainer.max_steps={n}"], root))
            runs[recipe] = root / "run"
        return runs[recipe]

    return get  # type: ignore[return-value]


SPLITS = [
    ("default", "stop", 20),  # the default recipe's 20 / 40 shape: batch 8 of epoch 1
    ("default", "stop", 12),  # an epoch boundary
    ("default", "max_time", 3),  # trainer.max_time ran out
    ("default", "ckpt", 7),  # a sample-grid step, mid-epoch
    ("default", "ckpt", 24),  # an epoch boundary
    ("default", "ckpt", 25),  # a validation step, right after a boundary
    ("vlb_accumulate", "stop", 5),  # mid-epoch, 15 batches in
    ("vlb_accumulate", "ckpt", 4),  # an epoch boundary
    ("hybrid", "stop", 5),
    ("edm", "stop", 5),  # mid-epoch, after a validation and a sample grid
    ("flow_matching", "stop", 5),
    ("flow_matching", "ckpt", 3),
    ("conditional", "stop", 5),
    ("conditional", "ckpt", 12),  # an epoch boundary
]


@pytest.mark.parametrize(("recipe", "how", "k"), SPLITS, ids=[f"{r}-{h}-{k}" for r, h, k in SPLITS])
def test_resumed_run_equals_the_straight_run(
    recipe: str, how: str, k: int, straight: Any, tmp_path: Path
) -> None:
    extra, n = RECIPES[recipe]
    common = [*MICRO, *extra]
    reference = straight(recipe)
    run = tmp_path / "run"
    vouch = []  # a resume instantiates only classes the command names itself (or ours)
    if how == "ckpt":  # from the straight run's step-k checkpoint, in a new directory
        resume = [
            *common,
            f"trainer.max_steps={n}",
            f"ckpt_path={reference}/checkpoints/step_{k:07d}.ckpt",
        ]
    else:
        stop = [f"trainer.max_steps={k}"]
        if how == "max_time":
            stop = [
                "trainer.max_steps=-1",
                "trainer.max_time=00:00:00:01",
                "+callbacks.sleep._target_=run_utils.SleepAtStep",
                f"+callbacks.sleep.step={k}",
                "+callbacks.sleep.seconds=1.5",
            ]
            vouch = ["+callbacks.sleep._target_=run_utils.SleepAtStep"]
        stopped = train(compose_cfg([*common, *stop], tmp_path))
        k = int(stopped["global_step"])
        assert 0 < k < n and load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == k
        resume = [
            *common,
            f"trainer.max_steps={n}",
            "trainer.max_time=null",
            "ckpt_path=last",
            f"run_dir={run}",
            *vouch,
        ]
    assert train(compose_cfg(resume, tmp_path))["global_step"] == n
    assert_same_training_state(
        load_ckpt(reference / "checkpoints" / "last.ckpt"),
        load_ckpt(run / "checkpoints" / "last.ckpt"),
    )
    assert_same_snapshots(reference, run)
    ref_rng = json.loads((reference / "rng.json").read_text())
    got_rng = json.loads((run / "rng.json").read_text())
    resumed_steps = [str(s) for s in range(k + 1, n + 1)]
    assert [got_rng[s] for s in resumed_steps] == [ref_rng[s] for s in resumed_steps]


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(600)  # three 2-process runs: 292 s in a full suite on a busy 2-core machine
def test_ddp_mid_epoch_resume_equals_the_straight_run(tmp_path: Path) -> None:
    """Two CPU processes (gloo): stopped mid-epoch (step 8 = batch 2 of epoch 1 of 6-batch epochs
    per rank), resumed, equal to the straight run; the ranks shard the (seed, epoch) permutation."""
    common = [
        *(
            o
            for o in MICRO
            if not o.startswith(("trainer.enable", "data.batch_size", "+callbacks.probe"))
        ),
        "data.batch_size=256",  # 128 per rank: 6 batches an epoch
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.enable_progress_bar=false",
    ]

    def cli(args: list[str]) -> None:
        res = run_cli(args, tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]

    a, b = tmp_path / "a", tmp_path / "b"
    cli([*common, "trainer.max_steps=14", f"run_dir={a}"])
    cli([*common, "trainer.max_steps=8", f"run_dir={b}"])
    loader = load_ckpt(b / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]["state_dict"]
    assert (
        loader["combined_loader"][0]["epoch"] == 1 and loader["combined_loader"][0]["batches"] == 2
    )
    cli([*common, "trainer.max_steps=14", "ckpt_path=last", f"run_dir={b}"])
    ca, cb = load_ckpt(a / "checkpoints" / "last.ckpt"), load_ckpt(b / "checkpoints" / "last.ckpt")
    assert ca["global_step"] == cb["global_step"] == 14
    assert_same_training_state(ca, cb)
