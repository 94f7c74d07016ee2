"""sample.py and evaluate.py results in W&B: into the training run they came from (the same run,
resumed by its id, keys under eval/ at the checkpoint's step) or a run of their own in its group;
read back from the offline run files with W&B's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpm.loggers import read_identity
from ddpm.tasks.evaluate import evaluate
from ddpm.tasks.sample import sample
from ddpm.tasks.train import train
from hydra_utils import TINY, compose_cfg
from wandb_utils import history, offline_runs, records, run_record, summary

RANDOMCONV = ["metrics.extractor=randomconv", "metrics.kid_subset_size=4", "metrics.isc_splits=2"]


@pytest.mark.slow
def test_sample_and_evaluate_log_into_the_training_run_or_their_own(tmp_path: Path) -> None:
    train(
        compose_cfg(
            [
                *TINY,
                "logger=wandb",
                "logger.wandb.system_metrics=false",
                "logger.wandb.console=off",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "callbacks.model_checkpoint.every_n_train_steps=2",
                "callbacks.sample_grid.every_n_steps=100",
                "callbacks.sample_grid.at_train_end=false",
            ],
            tmp_path / "t",
        )
    )
    identity = read_identity(tmp_path / "t" / "run")
    ckpt = tmp_path / "t" / "run" / "checkpoints" / "last.ckpt"
    common = ["accelerator=cpu", "progress=false"]
    npz = sample(
        compose_cfg(
            [f"ckpt_path={ckpt}", *common, "sampler=ddim", "sampler.steps=2", "num_samples=8"],
            tmp_path / "s",
            config_name="sample",
        )
    )
    # a sample file: its scores go to the run of the checkpoint sample.py recorded beside it
    scores = evaluate(
        compose_cfg(
            [f"samples={npz}", f"ref={npz}", *common, *RANDOMCONV],
            tmp_path / "e",
            config_name="evaluate",
        )
    )
    own = evaluate(
        compose_cfg(
            [f"ckpt_path={ckpt}", *common, "nll.num_images=2", "batch_size=2"]
            + ["metrics.enabled=false", "tracker.run=own"],
            tmp_path / "o",
            config_name="evaluate",
        )
    )

    assert (tmp_path / "e" / "run" / "config_tree.log").is_file()  # what evaluate.py ran with
    (grid_part,) = offline_runs(tmp_path / "s", identity["id"])
    (rows,) = history(records(grid_part))
    assert rows["trainer/global_step"] == 2 and rows["eval/samples._type"] == "image-file"
    (score_part,) = offline_runs(tmp_path / "e", identity["id"])
    recs = records(score_part)
    assert run_record(recs)["project"] == identity["project"]
    (rows,) = history(recs)
    assert rows["trainer/global_step"] == 2
    for key in ("fid", "is", "kid", "precision", "recall"):
        assert rows[f"eval/{key}"] == pytest.approx(scores[key]), key
    best = summary(recs)
    assert best["eval/fid"] == {"min": pytest.approx(scores["fid"])}
    assert best["eval/is"] == {"max": pytest.approx(scores["is"])}
    (own_part,) = offline_runs(tmp_path / "o")
    recs = records(own_part)
    meta = run_record(recs)
    assert meta["run_id"] != identity["id"] and meta["job_type"] == "evaluate"
    assert meta["run_group"] == identity["id"]  # the training run had no group: its id
    (rows,) = history(recs)
    assert rows["eval/nll_bpd"] == pytest.approx(own["test/nll_bpd"])
    assert rows["trainer/global_step"] == 2
