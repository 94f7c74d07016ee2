"""``evaluate(cfg)``: FID, IS, KID and precision/recall of generated images against reference
images, and a checkpoint's NLL in bits/dim on its test split; writes and prints ``metrics.json``.

What is scored: ``samples=`` (a sample ``.npz`` as improved-diffusion and ``sample.py`` write it,
or a folder of images; no checkpoint needed), else ``num_samples`` images sampled here from
``ckpt_path`` (sample i from seed ``seed + i``). Against ``ref=``: a sample ``.npz``, a folder,
or ``NAME[-SPLIT]`` of a data config (``cifar10-train``); default with a checkpoint: its training
data, ``train`` split (the FID protocol). ``devices=N`` splits sampling, feature extraction and
the NLL over N processes, with the same numbers as one (per-sample seeds).

When the extractor's weights cannot be had: with nothing else to report, the error names the file
and ``metrics.weights_path``; next to an NLL, the sample metrics are skipped, with a warning, and
``metrics.json`` records what was skipped and why under ``skipped``.

The inputs are checked before any process is started; progress is a bar on a terminal and plain
lines in log files. The scores go to the W&B run of the training run they came from (``tracker``,
:mod:`ddpm.task_tracking`; for ``samples=``, the checkpoint named in the ``sample_info.json``
``sample.py`` wrote next to it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import LoadedModel, load_model, read_checkpoint
from ddpm.diffusion.nll import nll_sums
from ddpm.errors import ConfigError
from ddpm.metrics import (
    DatasetImages,
    ImageSource,
    SampleMetrics,
    Scores,
    WeightsUnavailableError,
    open_images,
)
from ddpm.metrics.distances import distribution_distances
from ddpm.task_tracking import check_tracker, start_task_run
from ddpm.tasks.common import launch_dir, output_dir, write_json
from ddpm.tasks.sample import (
    INFO_FILE,
    build_sampler,
    generate,
    generate_batches,
    launch,
    sample_labels,
)
from ddpm.utils.classes import num_classes_of, with_labels
from ddpm.utils.config_tree import print_config_tree, to_plain
from ddpm.utils.distributed import all_reduce_sum, rank_and_world, rank_zero_first, shard
from ddpm.utils.images import to_uint8
from ddpm.utils.progress import progress_iter
from ddpm.utils.seeding import PerSampleGenerator

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NLL_KEYS = ("test/nll_bpd", "test/nll_prior_bpd", "test/nll_decoder_bpd", "test/nll_vb_bpd")


def build_datamodule(data: dict[str, Any], cfg: DictConfig, **overrides: Any) -> Any:
    """A data module from a data config (``data_root`` overrides its root), un-augmented; data
    is read on first use."""
    data = dict(data)
    if cfg.get("data_root"):
        data["root"] = str(cfg.data_root)
    if "random_flip" in data:
        data["random_flip"] = False
    data.update(overrides)
    return instantiate(OmegaConf.create(data))


# ---------------------------------------------------------------------------------- reference
@contextlib.contextmanager
def _hydra() -> Iterator[Any]:
    """Hydra's config loader (this app's, or one over its config directory when called outside
    ``@hydra.main``, e.g. from tests)."""
    gh = GlobalHydra.instance()
    if gh.is_initialized():
        yield gh.config_loader()
        return
    sources = HydraConfig.get().runtime.config_sources
    conf = next(s.path for s in sources if s.provider == "main" and s.schema == "file")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def data_config(name: str, cfg: DictConfig) -> dict[str, Any] | None:
    """``conf/data/<name>.yaml`` resolved with this run's ``paths``; None if there is none."""
    with _hydra() as loader:
        if name not in loader.get_group_options("data"):
            return None
        node = compose(config_name=f"data/{name}")
    paths = OmegaConf.to_container(cfg.paths, resolve=False)
    merged = OmegaConf.merge(OmegaConf.create({"paths": paths}), node)
    return OmegaConf.to_container(merged.data, resolve=True)  # type: ignore[return-value]


def _ref_help() -> str:
    with _hydra() as loader:
        names = ", ".join(loader.get_group_options("data"))
    return (
        "ref= must be a sample .npz (arr_0 uint8 (N, H, W, C)), a folder of images, or "
        f"NAME[-SPLIT] with NAME a data config ({names}) and SPLIT one of {', '.join(SPLITS)} "
        "(default train), e.g. ref=cifar10-train"
    )


def reference_source(
    cfg: DictConfig, loaded: LoadedModel | None, image_shape: tuple[int, ...]
) -> ImageSource:
    """The reference images of ``cfg.ref`` (default: the checkpoint's data, training split), at
    the resolution of the scored images."""
    ref = cfg.get("ref")
    c, h, w = image_shape
    if ref is None:
        if loaded is None:
            raise ConfigError(f"samples= needs a reference to score against: {_ref_help()}")
        data, split = dict(loaded.config["data"]), "train"
    elif Path(str(ref)).exists():
        source = open_images(str(ref))
        if source.image_shape[1:] != (h, w):
            raise ValueError(
                f"ref={ref} holds {source.image_shape[1]}x{source.image_shape[2]} images, the "
                f"scored ones are {h}x{w}: FID compares sets at one resolution"
            )
        return source
    else:
        name, _, split = str(ref).rpartition("-")
        if split not in SPLITS:
            name, split = str(ref), "train"
        data = data_config(name, cfg)  # type: ignore[assignment]
        if data is None:
            raise ConfigError(f"ref={ref}: no such file, folder or data config. {_ref_help()}")
    if "image_size" not in data:
        raise ConfigError(f"ref={ref}: the data config {data.get('name')!r} holds no images")
    dm = build_datamodule(data, cfg, image_size=w, channels=c)
    images = rank_zero_first(lambda: dm.dataset(split))  # a download happens once
    return DatasetImages(images, key=dm.data_key_for(split), num_workers=int(dm.num_workers))


# ---------------------------------------------------------------------------------- NLL
def nll_bpd(
    loaded: LoadedModel,
    dm: Any,
    nll: DictConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, float]:
    """Mean bits/dim over the first ``nll.num_images`` test images: DDPM's variational bound and
    its parts (``nll.bound``; discrete processes) and the probability-flow ODE likelihood
    (``nll.ode``; every process, uniformly dequantised; by default only where there is no
    bound), side by side. Image i draws its noise,
    dequantisation and probes from seed ``seed + i``; each process does its block. Collective."""
    if dm.normalization != "minus_one_one":
        warnings.warn(
            f"data normalization is {dm.normalization!r}; the bits/dim bound assumes 8-bit "
            "images scaled to [-1, 1] (minus_one_one)",
            stacklevel=2,
        )
    bound = bool(nll.bound) and loaded.diffusion.discrete
    use_ode = not bound if nll.ode.enabled is None else bool(nll.ode.enabled)
    ode = {k: v for k, v in to_plain(nll.ode).items() if k != "enabled"} if use_ode else None
    if not bound and ode is None:
        return {}
    source = DatasetImages(
        rank_zero_first(lambda: dm.dataset("test")), key="", limit=nll.num_images
    )
    # a class-conditional network: the bound on -log p(x | y) with each image's label
    conditional = num_classes_of(loaded.net) is not None and getattr(dm, "conditional", False)
    labels = dm.labels("test") if conditional else None
    if len(source) == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    block = shard(len(source))
    sums = torch.zeros(7, dtype=torch.float64)  # total, prior, decoder, vb; ode, nfe; images
    i = block.start
    batches = progress_iter(
        source.batches(block.start, block.stop, batch_size),
        total=len(block),
        desc="NLL" if rank_and_world()[1] == 1 else "NLL (rank 0)",
        enabled=progress,
        unit="images",
        size=len,
        lines=True,
    )
    for u8 in batches:
        x = dm.normalizer(u8).to(device)
        seeds = [seed + j for j in range(i, i + len(u8))]
        y = None if labels is None else labels[i : i + len(u8)]
        net = with_labels(loaded.net, y, device)
        sums[:6] += nll_sums(
            net,
            loaded.diffusion,
            x,
            bound=bound,
            ode=ode,
            generator=lambda seeds=seeds: PerSampleGenerator(seeds, device=device),
        ).cpu()
        sums[6] += float(len(u8))
        i += len(u8)
    sums = all_reduce_sum(sums)
    n = float(sums[6])
    results: dict[str, float] = {"test/nll_num_images": n}
    if bound:
        results.update(zip(NLL_KEYS, (sums[:4] / n).tolist()))
    if ode is not None:
        results["test/nll_ode_bpd"] = float(sums[4] / n)
        results["test/nll_ode_nfe"] = float(sums[5] / n)
    return results


def point_cloud_metrics(
    loaded: LoadedModel, dm: Any, cfg: DictConfig, device: torch.device
) -> dict[str, float]:
    """Energy distance and MMD between samples and the test points (2-D playground)."""
    ref = torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in dm.test_dataloader()])
    n = min(len(ref), int(cfg.num_samples))
    sampler = build_sampler(cfg.get("sampler"), loaded)
    seeds = [int(cfg.seed) + i for i in range(n)]
    labels = sample_labels(loaded, n)  # a conditional model: balanced over its classes
    x = generate(loaded, sampler, seeds, int(cfg.batch_size), device, class_labels=labels)
    return {f"test/{k}": v for k, v in distribution_distances(x, ref[:n]).items()}


# ---------------------------------------------------------------------------------- FID & co
def _add_sampled(
    cfg: DictConfig,
    loaded: LoadedModel,
    dm: Any,
    metrics: SampleMetrics,
    scores: Scores,
    fabric: Any,
) -> None:
    """Add the features of this rank's block of ``num_samples`` samples drawn from the
    checkpoint to ``scores``, batch by batch."""
    n = int(cfg.num_samples)
    sampler = build_sampler(cfg.get("sampler"), loaded)
    block = shard(n)
    seeds = [int(cfg.seed) + i for i in block]
    labels = sample_labels(loaded, n)  # a conditional model: balanced over its classes
    mine = None if labels is None else labels[block.start : block.stop]
    bs = int(cfg.batch_size)
    batches = generate_batches(loaded, sampler, seeds, bs, fabric.device, class_labels=mine)
    with fabric.autocast():
        for x in progress_iter(
            batches,
            total=len(seeds),
            desc="sampling" if fabric.world_size == 1 else "sampling (rank 0)",
            enabled=bool(cfg.progress) and fabric.is_global_zero,
            unit="images",
            size=len,
            lines=True,
        ):
            scores.add(metrics.extract(to_uint8(x, dm.denormalize)))


def sample_metrics(
    cfg: DictConfig,
    loaded: LoadedModel | None,
    dm: Any,
    fabric: Any,
    results: dict[str, Any],
    skipped: dict[str, str],
) -> None:
    """FID, IS, KID, precision/recall of ``samples=`` or of samples from the checkpoint."""
    options = OmegaConf.to_container(cfg.metrics, resolve=True)
    assert isinstance(options, dict)
    options.pop("enabled", None)
    metrics = SampleMetrics(**options)
    progress = bool(cfg.progress) and fabric.is_global_zero
    source = open_images(cfg.samples) if cfg.get("samples") else None
    if source is None and int(cfg.num_samples) < fabric.world_size:
        raise ValueError(
            f"num_samples={cfg.num_samples} is fewer than the {fabric.world_size} devices"
        )
    try:
        metrics.load(fabric.device)
    except WeightsUnavailableError as e:
        if not any(k.startswith("test/") for k in results):  # nothing else to report
            raise
        names = metrics.selected
        warnings.warn(
            f"evaluate.py skips {', '.join(names)} (the rest is in metrics.json): {e}",
            stacklevel=2,
        )
        skipped.update(dict.fromkeys(names, str(e)))
        return
    shape = source.image_shape if source is not None else tuple(loaded.sample_shape)  # type: ignore[union-attr]
    ref = reference_source(cfg, loaded, shape)
    t0 = time.time()
    ref_features = metrics.reference(ref, progress=progress)
    scores = metrics.scores()
    scores.add_reference(ref_features)
    if source is not None:
        if len(source) < fabric.world_size:
            raise ValueError(f"{cfg.samples} holds {len(source)} images, fewer than the devices")
        scores.add(metrics.extract_source(source, progress=progress))
    else:
        assert loaded is not None
        _add_sampled(cfg, loaded, dm, metrics, scores, fabric)
    results.update(scores.compute())
    skipped.update(scores.skipped)
    results["num_samples"] = len(source) if source is not None else int(cfg.num_samples)
    results["num_reference"] = len(ref)
    results["extractor"] = metrics.extractor
    results["reference_features"] = metrics.reference_source
    results["metrics_seconds"] = time.time() - t0


# ---------------------------------------------------------------------------------- task
def check_request(cfg: DictConfig) -> None:
    """Every input checked before any process is started (a bad one fails once, not once per
    device): something to score, a readable sample file whose labels match its images, a
    readable checkpoint, the tracker setting."""
    if not cfg.get("samples") and not cfg.get("ckpt_path"):
        raise ConfigError(
            "nothing to evaluate: give samples=PATH.npz (or a folder of images) with ref=..., "
            "and/or ckpt_path=PATH (sampled here; also its NLL)"
        )
    if cfg.get("ema_sigma_rel") is not None and not cfg.get("ckpt_path"):
        raise ConfigError("ema_sigma_rel chooses the EMA of ckpt_path=...; no ckpt_path is given")
    if cfg.get("samples"):
        try:
            open_images(cfg.samples)
        except (ValueError, OSError) as e:
            raise ConfigError(f"samples={cfg.samples}: {e}") from None
    check_tracker(cfg.get("tracker"))
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)


def scored_checkpoint(cfg: DictConfig) -> tuple[str | None, int]:
    """The checkpoint the scored images came from and its step: ``ckpt_path``, or the one
    ``sample.py`` recorded next to a ``samples=`` file; (None, 0) when unknown."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path), 0
    info = Path(str(cfg.samples)).parent / INFO_FILE
    try:
        recorded = json.loads(info.read_text())
        return str(recorded["ckpt_path"]), int(recorded.get("global_step", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluate task; returns what it writes to ``metrics.json``."""
    check_request(cfg)
    fabric = launch(cfg)
    out = output_dir(cfg)
    if fabric.is_global_zero:
        print_config_tree(cfg, launch_dir(out))
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    loaded = dm = None
    images = True
    if cfg.get("ckpt_path"):
        loaded = load_model(
            cfg.ckpt_path,
            use_ema=bool(cfg.use_ema),
            sigma_rel=cfg.get("ema_sigma_rel"),
            device=fabric.device,
        )
        results["global_step"] = loaded.global_step
        dm = build_datamodule(loaded.config["data"], cfg)
        images = len(loaded.sample_shape) == 3
        if not images:  # 2-D toy data: continuous, so no bits/dim; distances
            results.update(point_cloud_metrics(loaded, dm, cfg, fabric.device))
        elif cfg.nll.enabled:
            t0 = time.time()
            results.update(
                nll_bpd(
                    loaded,
                    dm,
                    cfg.nll,
                    int(cfg.batch_size),
                    int(cfg.seed),
                    fabric.device,
                    progress=bool(cfg.progress) and fabric.is_global_zero,
                )
            )
            results["test/nll_seconds"] = time.time() - t0
    if cfg.metrics.enabled and images:
        sample_metrics(cfg, loaded, dm, fabric, results, skipped)
    if skipped:
        results["skipped"] = skipped
    if rank_and_world()[0] == 0:
        write_json(out / "metrics.json", results)
        print(json.dumps(results, indent=2, sort_keys=True))
        print(Path(out) / "metrics.json")
        ckpt, step = scored_checkpoint(cfg)
        run = start_task_run(
            cfg.get("tracker"),
            "evaluate",
            ckpt,
            results.get("global_step", step),
            to_plain(cfg),
            out,
        )
        if run is not None:
            run.log(
                {k: v for k, v in results.items() if not k.endswith(("_seconds", "global_step"))}
            )
            run.finish()
    fabric.barrier()
    return results
