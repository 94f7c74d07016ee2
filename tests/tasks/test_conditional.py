"""Class-conditional training end to end: labelled data, label dropout, a real conditional run,
sampling for given classes (grids one row per class, ``samples.npz`` ``arr_1``), and the clear
errors of unlabelled data or bad labels. The guidance math itself: tests/diffusion/test_guidance.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor

from cli_utils import run_cli
from ddpm.data import ImageDataModule, ToyDataModule
from ddpm.data.datamodule import split_indices
from ddpm.data.datasets import check_labels
from ddpm.data.sources import load_digits_labels, load_digits_uint8
from ddpm.data.transforms import prepare
from ddpm.errors import ConfigError, DataError
from ddpm.module import DiffusionModule
from ddpm.tasks.sample import sample
from ddpm.tasks.train import train
from ddpm.utils.classes import balanced_labels, class_rows, parse_class_labels
from ddpm.utils.images import read_png
from ddpm.utils.seeding import seeded_generator
from hydra_utils import CLI_TINY, TINY, compose_cfg

CONDITIONAL = [*TINY, "data.conditional=true"]


def _u8(x: Tensor) -> Tensor:
    return ((x + 1.0) * 127.5).round().to(torch.uint8)


# -- data ------------------------------------------------------------------------------------------


def test_digits_batches_carry_each_image_s_own_digit() -> None:
    dm = ImageDataModule("digits", root=None, batch_size=64, conditional=True)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names == [str(d) for d in range(10)]
    target = load_digits_labels()
    train_idx, val_idx = split_indices(len(target), 0.1, 0)
    assert torch.equal(dm.labels("train"), target[train_idx])
    assert torch.equal(dm.labels("val"), target[val_idx])
    images = prepare(load_digits_uint8(), 16, 1)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (64, 1, 16, 16) and y.dtype == torch.long and y.shape == (64,)
        for img, label in zip(_u8(x), y):  # the digits of every image with these pixels
            same = (images == img).flatten(1).all(1)
            assert int(label) in target[same].tolist()
    plain = ImageDataModule("digits", root=None, batch_size=64)
    plain.setup()
    assert isinstance(next(iter(plain.train_dataloader())), Tensor)  # unconditional unchanged


def test_toy_classes_are_the_mixture_components() -> None:
    dm = ToyDataModule("eight_gaussians", n_train=2000, n_val=200, batch_size=500, conditional=True)
    dm.setup()
    assert dm.num_classes == 8
    x, y = next(iter(dm.train_dataloader()))
    angle = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    assert ((angle / (math.pi / 4)).round() % 8 == y).float().mean() > 0.99
    moons = ToyDataModule("two_moons", n_train=1000, n_val=100, batch_size=100, conditional=True)
    moons.setup()
    assert moons.num_classes == 2 and moons.labels("train").float().mean() == 0.5
    plain = ToyDataModule("eight_gaussians", n_train=2000, n_val=200, batch_size=500)
    plain.setup()
    assert torch.equal(plain.dataset("train").data, dm.dataset("train").data)  # same points


def _folder(root: Path, layout: dict[str, int]) -> Path:
    """PNG files: ``layout`` maps a sub-folder ("" = root) to a count; brightness = folder index."""
    for k, (sub, n) in enumerate(sorted(layout.items())):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((8, 8, 3), 40 * k + 20, dtype=np.uint8)
            Image.fromarray(pixels).save(root / sub / f"{i}.png")
    return root


def test_image_folder_classes_are_its_sub_folders(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets", {"cat": 6, "dog": 6, "emu": 6})
    dm = ImageDataModule(
        "image_folder", root=root, image_size=8, batch_size=4, conditional=True, val_split=0.25
    )
    dm.setup()
    assert dm.class_names == ["cat", "dog", "emu"]
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for x, y in loader:
            brightness = _u8(x)[:, 0, 0, 0].long()
            assert torch.equal((brightness - 20) // 40, y)


def test_unlabelled_data_and_bad_labels_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'swiss_roll' has no class labels"):
        ToyDataModule("swiss_roll", conditional=True).setup()
    with pytest.raises(ValueError, match="'celeba' has no class labels"):
        ImageDataModule("celeba", root=tmp_path, conditional=True).setup()
    flat = _folder(tmp_path / "flat", {"": 4})
    with pytest.raises(ValueError, match="'image_folder' has no class labels"):
        ImageDataModule("image_folder", root=flat, image_size=8, conditional=True).setup()
    stray = _folder(tmp_path / "stray", {"a": 3, "b": 3})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(stray / "loose.png")
    with pytest.raises(ValueError, match="in no class folder.*loose.png"):
        ImageDataModule("image_folder", root=stray, image_size=8, conditional=True).setup()
    holes = _folder(tmp_path / "holes", {"a": 3, "b": 3})
    (holes / "c").mkdir()  # a class folder without images: not a class never seen
    (holes / "d").mkdir()
    (holes / "d" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="2 of them hold no image files: c, d"):
        ImageDataModule("image_folder", root=holes, image_size=8, conditional=True).setup()
    with pytest.raises(ValueError, match="recorded with 9 classes"):
        ImageDataModule("digits", root=None, conditional=True, num_classes=9).setup()
    with pytest.raises(ValueError, match=r"2 label\(s\) outside \[0, 10\)"):
        check_labels(torch.tensor([0, 3, 10, -1]), 10, "data")
    with pytest.raises(ValueError, match="class_labels must lie in"):
        parse_class_labels([3, 10], 10)
    with pytest.raises(ValueError, match="network is unconditional"):
        parse_class_labels([3], None)


def test_start_up_refuses_mismatched_conditioning(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no class labels"):
        train(
            compose_cfg([*TINY, "data=swiss_roll", "model=mlp", "data.conditional=true"], tmp_path)
        )
    with pytest.raises(ConfigError, match="set data.conditional=true"):
        train(compose_cfg([*TINY, "model.num_classes=10"], tmp_path))


# -- training --------------------------------------------------------------------------------------


def test_label_dropout_rate_null_class_and_seeding(tmp_path: Path) -> None:
    """Ho & Salimans (2022), Alg. 1: each label becomes the null class K with probability
    p_uncond, drawn from the step's seeded generator (so a resume redraws the same drops)."""
    cfg = compose_cfg([*CONDITIONAL, "+data.num_classes=10", "p_uncond=0.25"], tmp_path)
    module = DiffusionModule.from_config(cfg)
    assert module.p_uncond == 0.25 and module.net.null_class == 10
    labels = torch.arange(100_000) % 10
    a = module.drop_labels(labels, seeded_generator(7))
    dropped = a == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.005
    assert torch.equal(a[~dropped], labels[~dropped])
    assert torch.equal(a, module.drop_labels(labels, seeded_generator(7)))
    assert not torch.equal(a, module.drop_labels(labels, seeded_generator(8)))
    module.p_uncond = 0.0
    assert torch.equal(module.drop_labels(labels, seeded_generator(7)), labels)
    with pytest.raises(ValueError, match="p_uncond must be a probability"):
        DiffusionModule.from_config(
            compose_cfg([*CONDITIONAL, "+data.num_classes=10", "p_uncond=1.5"], tmp_path)
        )


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional digits run (real Hydra config, real Trainer), guided grids."""
    tmp = tmp_path_factory.mktemp("cond")
    cfg = compose_cfg(
        [
            *CONDITIONAL,
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "callbacks.sample_grid.every_n_steps=6",
            "callbacks.sample_grid.num_samples=20",
            "callbacks.sample_grid.batch_size=20",
            "~callbacks.forward_picture",
            "sampler=ddim",
            "sampler.steps=3",
            "sampler.guidance_scale=2.0",
            "callbacks=[default,nll]",  # the bound on -log p(x | y), with the images' labels
            "callbacks.nll.every_n_steps=6",
            "callbacks.nll.num_images=4",
            "callbacks.nll.batch_size=4",
        ],
        tmp,
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 6 and math.isfinite(metrics["val/loss"])
    assert math.isfinite(metrics["val/nll_bpd"])
    return tmp / "run"


def test_conditional_run_records_classes_and_draws_one_row_per_class(cond_ckpt: Path) -> None:
    ckpt = torch.load(cond_ckpt / "checkpoints" / "last.ckpt", weights_only=True)
    stored = ckpt["ddpm_config"]
    assert stored["data"]["num_classes"] == 10 and stored["model"]["num_classes"] == 10
    assert stored["data"]["class_names"] == [str(d) for d in range(10)]
    assert stored["p_uncond"] == 0.1
    assert ckpt["state_dict"]["net.label_emb.weight"].shape[0] == 11  # K + the null class
    grid = read_png(cond_ckpt / "samples" / "step_0000006.png")
    labels, per_row = class_rows(20, 10)
    assert per_row == 2 and labels.tolist() == [k for k in range(10) for _ in range(2)]
    rows, cols = 10, 2  # 16 px images, 2 px padding
    assert grid.shape[0] / grid.shape[1] == pytest.approx(
        (rows * 18 + 2) / (cols * 18 + 2), rel=0.02
    )


def test_sample_for_given_classes_writes_arr_1(cond_ckpt: Path, tmp_path: Path) -> None:
    ckpt = cond_ckpt / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "accelerator=cpu", "progress=false", "sampler=ddim"]
    common += ["sampler.steps=3", "sampler.guidance_scale=2.0"]
    given = sample(compose_cfg([*common, "class_labels=[3,3,7]"], tmp_path / "a", "sample"))
    data = np.load(given)
    assert data["arr_0"].shape == (3, 16, 16, 1) and data["arr_1"].tolist() == [3, 3, 7]
    info = json.loads((given.parent / "sample_info.json").read_text())
    assert info["class_labels"] == [3, 3, 7] and info["guidance_scale"] == 2.0
    again = sample(
        compose_cfg([*common, "class_labels=[3,3,7]", "guidance_scale=1"], tmp_path / "e", "sample")
    )
    assert json.loads((again.parent / "sample_info.json").read_text())["guidance_scale"] == 1.0
    assert not np.array_equal(np.load(again)["arr_0"], data["arr_0"])  # s = 1 draws others
    balanced = sample(compose_cfg([*common, "num_samples=12"], tmp_path / "b", "sample"))
    assert np.load(balanced)["arr_1"].tolist() == balanced_labels(range(12), 10).tolist()
    other = sample(compose_cfg([*common, "class_labels=[5,5,7]"], tmp_path / "d", "sample"))
    images = np.load(other)["arr_0"]  # same seeds: another class gives another image
    assert not np.array_equal(images[0], data["arr_0"][0])
    np.testing.assert_array_equal(images[2], data["arr_0"][2])
    with pytest.raises(ValueError, match="class_labels must lie in"):
        sample(compose_cfg([*common, "class_labels=[10]"], tmp_path / "c", "sample"))


def test_conditional_toy_run_with_guided_playground(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            *CONDITIONAL,
            "data=eight_gaussians",
            "model=mlp",
            "data.n_train=256",
            "data.n_val=64",
            "data.batch_size=64",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "callbacks.sample_grid.every_n_steps=3",
            "callbacks.sample_grid.num_samples=64",
            "callbacks.sample_grid.batch_size=64",
            "sampler=ddim",
            "sampler.steps=3",
            "sampler.guidance_scale=3.0",
        ],
        tmp_path,
    )
    train(cfg)
    assert cfg.data.num_classes == 8 and cfg.model.num_classes == 8
    assert (tmp_path / "run" / "samples" / "reverse_step_0000003.png").is_file()
    from ddpm.tasks.evaluate import evaluate  # its samples: balanced classes, the run's guidance

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    overrides = ["accelerator=cpu", "progress=false", f"ckpt_path={ckpt}", "num_samples=64"]
    metrics = evaluate(compose_cfg(overrides, tmp_path / "e", config_name="evaluate"))
    assert math.isfinite(metrics["test/energy_distance"])


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_get_each_image_with_its_label(tmp_path: Path) -> None:
    """Two CPU processes (gloo): every example of every rank's batches carries its own digit,
    and both ranks train the same conditional network."""
    dump = tmp_path / "ranks"
    res = run_cli(
        [
            *CLI_TINY,
            "data.conditional=true",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_steps=4",
            "trainer.limit_val_batches=0",
            "callbacks.sample_grid.every_n_steps=100",
            "logger=none",
            "+callbacks.labels._target_=ddp_probe.LabelProbe",
            f"+callbacks.labels.out_dir={dump}",
            "+callbacks.rank_dump._target_=ddp_probe.RankWeightDump",
            f"+callbacks.rank_dump.out_dir={dump}",
        ],
        tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    for rank in (0, 1):
        probe = json.loads((dump / f"labels_rank{rank}.json").read_text())
        assert probe["checked"] == 4 * 8 and probe["wrong"] == 0, probe  # 16 a batch, 8 a rank
        assert len(probe["seen"]) > 1
    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert "net.label_emb.weight" in w0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_cifar10_cfg_recipe_is_ddpm_s_unet_with_a_class_embedding(tmp_path: Path) -> None:
    from omegaconf import open_dict

    cfg = compose_cfg(["experiment=cifar10_cfg"], tmp_path)
    ddpm = compose_cfg(["experiment=cifar10_ddpm"], tmp_path)
    assert cfg.data.conditional and cfg.p_uncond == 0.1 and cfg.sampler.guidance_scale == 1.3
    assert cfg.trainer.max_steps == ddpm.trainer.max_steps == 800_000
    with open_dict(cfg):
        cfg.data.num_classes = 10  # what train() records from the data
    net = instantiate(cfg.model)
    plain = sum(p.numel() for p in instantiate(ddpm.model).parameters())
    assert sum(p.numel() for p in net.parameters()) == plain + 11 * 512  # (K + 1) x 4 x 128
    assert net.null_class == 10


def test_evaluate_nll_with_labels_independent_of_batching(cond_ckpt: Path, tmp_path: Path) -> None:
    from ddpm.tasks.evaluate import evaluate

    common = [
        f"ckpt_path={cond_ckpt / 'checkpoints' / 'last.ckpt'}",
        "accelerator=cpu",
        "progress=false",
        "nll.num_images=6",
        "metrics.enabled=false",
    ]
    a = evaluate(compose_cfg([*common, "batch_size=6"], tmp_path / "a", "evaluate"))
    b = evaluate(compose_cfg([*common, "batch_size=4"], tmp_path / "b", "evaluate"))
    assert math.isfinite(a["test/nll_bpd"])
    assert b["test/nll_bpd"] == pytest.approx(a["test/nll_bpd"], rel=1e-6)  # image i, label i


def test_visualize_guidance_same_seeds_at_every_scale(cond_ckpt: Path, tmp_path: Path) -> None:
    from ddpm.tasks.visualize import visualize

    cfg = compose_cfg(
        [
            f"ckpt_path={cond_ckpt / 'checkpoints' / 'last.ckpt'}",
            "what=guidance",
            "accelerator=cpu",
            "sampler=ddim",
            "sampler.steps=3",
            "guidance.scales=[0,1,3]",
            "guidance.seeds=[0,1]",
            "guidance.classes=[2,5]",
        ],
        tmp_path,
        config_name="visualize",
    )
    out = visualize(cfg)
    x = out["samples"]  # (scale, class x seed, C, H, W): [2/seed 0, 2/seed 1, 5/seed 0, 5/seed 1]
    assert x.shape == (3, 4, 1, 16, 16) and out["paths"][0].name == "guidance.png"
    assert torch.equal(x[0, 0], x[0, 2])  # s = 0: the null class, whatever the class asked for
    assert not torch.equal(x[2, 0], x[2, 2])  # s = 3: the class changes the image
    assert not torch.equal(x[1, 0], x[1, 1])  # another seed, another image


def test_visualize_reverse_with_the_run_s_guided_sampler(cond_ckpt: Path, tmp_path: Path) -> None:
    from ddpm.tasks.visualize import visualize

    ckpt = cond_ckpt / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(
        [f"ckpt_path={ckpt}", "what=reverse", "accelerator=cpu", "reverse.seeds=[0,1]"],
        tmp_path,
        config_name="visualize",
    )
    out = visualize(cfg)  # the stored sampler guides (s = 2): seed i is drawn for class i mod K
    assert out["sampler"].guidance_scale == 2.0 and out["samples"].shape == (2, 1, 16, 16)


def test_image_folder_run_records_its_class_names(tmp_path: Path) -> None:
    """The class names of an image folder go into the run config (and checkpoint); resuming on a
    folder whose classes changed is refused."""
    root = _folder(tmp_path / "pets", {"cat": 8, "dog": 8, "emu": 8})
    small = [
        *(o for o in CONDITIONAL if not o.startswith("data.batch_size")),
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=8",
        "data.channels=1",
        "data.batch_size=8",
        "data.val_split=0.25",
        "data.num_workers=0",
        "model.channel_mult=[1]",
        "model.attention_resolutions=[]",
        "model.norm_groups=4",
        "model.model_channels=8",
        "callbacks.sample_grid.every_n_steps=100",
    ]
    train(compose_cfg([*small, "trainer.max_steps=2"], tmp_path))
    run = tmp_path / "run"
    stored = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["ddpm_config"]
    assert stored["data"]["class_names"] == ["cat", "dog", "emu"]
    assert stored["model"]["num_classes"] == 3
    _folder(root, {"fox": 1})
    resume = [*small, "trainer.max_steps=4", "ckpt_path=last", f"run_dir={run}"]
    with pytest.raises(ValueError, match="recorded with 3 classes"):
        train(compose_cfg(resume, tmp_path))


def test_visualize_compare_draws_each_seed_for_its_class(
    cond_ckpt: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    """what=compare: a conditional model's column i is class i mod K, or compare.class_labels[i]
    (named above the column); an unconditional model beside it ignores the labels."""
    from ddpm.tasks.visualize import visualize

    ckpt = cond_ckpt / "checkpoints" / "last.ckpt"
    common = [f"ckpt_paths=[{ckpt},{tiny_ckpt}]", "labels=[cond,plain]", "what=compare",
              "accelerator=cpu", "sampler=ddim", "sampler.steps=3", "compare.seeds=[0,1,2]"]  # fmt: skip

    def run(extra: list[str], name: str) -> dict:
        return visualize(compose_cfg([*common, *extra], tmp_path / name, config_name="visualize"))

    balanced, given = run([], "balanced"), run(["compare.class_labels=[7,7,1]"], "given")
    assert list(balanced["class_labels"]) == ["cond"]  # the unconditional model draws no classes
    assert balanced["class_labels"]["cond"].tolist() == [0, 1, 2]
    assert given["class_labels"]["cond"].tolist() == [7, 7, 1]
    (cond_a, plain_a), (cond_b, plain_b) = (r["samples"].values() for r in (balanced, given))
    assert torch.equal(plain_a, plain_b) and not torch.equal(cond_a[0], cond_b[0])
    other = next(iter(run(["compare.class_labels=[3,1,5]"], "other")["samples"].values()))
    assert torch.equal(cond_a[1], other[1])  # seed 1 for class 1 both times
    with pytest.raises(ValueError, match=r"compare.class_labels: one class per seed .* got \[1\]"):
        run(["compare.class_labels=[1]"], "bad")
