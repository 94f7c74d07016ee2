"""Equal wall-clock on the default task: our default digits recipe vs denoising-diffusion-pytorch.

Both train on the same 1617 training digits (16x16 grayscale) for the same wall-clock minutes on
this machine, then draw 64 samples (ours: the default DDIM-50 grid sampler and EMA weights;
theirs: their README recipe, ``sampling_timesteps=250`` DDIM and their EMA). Samples are scored
by a digit classifier (scikit-learn SVC trained on the training split, 8x8 average-pooled, the
sklearn digits example): mean top-class probability ("confidence"), a digits Inception-Score
analogue exp(E KL(p(y|x) || p(y))) (10 = confident and all classes equally often), and the
number of classes among the samples' predictions. Held-out real digits give the ceiling.

    python bench/peer_quality.py --minutes 5

Their recipe is their README's (Unet dim 64, mults 1-2-4-8, v-prediction, sigmoid schedule, batch
32 x 2 accumulation, lr 8e-5, EMA 0.995) with fp32 (no AMP on CPU), no FID (offline) and no
horizontal flips (digits are not mirror-symmetric; our digits config has none either).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ddpm.data import ImageDataModule  # noqa: E402
from ddpm.utils.images import save_grid  # noqa: E402


def to_features(images01: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [0, 1] -> (N, 64) in sklearn digits units (8x8, 0..16)."""
    return (F.avg_pool2d(images01.float(), 2).flatten(1) * 16.0).numpy()


def scores(clf, images01: torch.Tensor) -> dict[str, float]:
    p = clf.predict_proba(to_features(images01))
    py = p.mean(0, keepdims=True)
    kl = (p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(1)
    return {
        "confidence": round(float(p.max(1).mean()), 3),
        "digits_IS": round(float(np.exp(kl.mean())), 2),
        "classes": int(len(set(p.argmax(1).tolist()))),
    }


def train_ours(minutes: float, out: Path, n: int, env: dict[str, str]) -> tuple[torch.Tensor, int]:
    secs = int(minutes * 60)
    run = out / "ours"
    cmd = [
        sys.executable,
        "src/train.py",
        f"run_dir={run}",
        "logger=csv",
        "trainer.max_steps=-1",
        f"trainer.max_time=00:00:{secs // 60:02d}:{secs % 60:02d}",
        "trainer.enable_progress_bar=false",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    sample_dir = out / "ours_samples"
    cmd = [
        sys.executable,
        "src/sample.py",
        f"ckpt_path={ckpt}",
        f"num_samples={n}",
        f"batch_size={n}",
        f"run_dir={sample_dir}",
        "progress=false",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    arr = np.load(sample_dir / "samples.npz")["arr_0"]  # (N, H, W, C) uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0, step


def train_theirs(minutes: float, out: Path, folder: Path, n: int) -> tuple[torch.Tensor, int]:
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    torch.manual_seed(0)
    model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=False, channels=1)
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=1000, sampling_timesteps=250)
    trainer = Trainer(
        diffusion,
        str(folder),
        train_batch_size=32,
        train_lr=8e-5,
        train_num_steps=10**9,
        gradient_accumulate_every=2,
        ema_decay=0.995,
        amp=False,
        calculate_fid=False,
        augment_horizontal_flip=False,
        save_and_sample_every=10**9,
        results_folder=str(out / "theirs"),
    )
    deadline = time.time() + minutes * 60
    step = trainer.opt.step

    def timed_step(*args, **kwargs):
        step(*args, **kwargs)
        if time.time() >= deadline:  # the loop ends after this optimizer step
            trainer.train_num_steps = trainer.step + 1

    trainer.opt.step = timed_step
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        trainer.train()  # its tqdm bar would print a line per step
    ema = trainer.ema.ema_model.eval()
    torch.manual_seed(0)
    with torch.inference_mode():
        images = ema.sample(batch_size=n).cpu()
    return images.clamp(0, 1), trainer.step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from sklearn.svm import SVC

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = ROOT / "outputs" / "bench" / f"peer_quality_{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    dm = ImageDataModule("digits", root=None)
    train_u8 = dm.dataset("train").data  # (1617, 1, 16, 16) uint8
    val_u8 = dm.dataset("val").data
    clf = SVC(gamma=0.001, probability=True, random_state=0)
    clf.fit(to_features(train_u8 / 255.0), _labels(dm, "train"))
    acc = float((clf.predict(to_features(val_u8 / 255.0)) == _labels(dm, "val")).mean())

    rows = [{"model": "held-out real digits", "steps": "", **scores(clf, val_u8[:64] / 255.0)}]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    ours, ours_steps = train_ours(args.minutes, out, args.num_samples, env)
    rows.append({"model": "ddpm (ours, default recipe)", "steps": ours_steps, **scores(clf, ours)})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, img in enumerate(train_u8):
            Image.fromarray(img[0].numpy(), "L").save(folder / f"{i:05d}.png")
        theirs, their_steps = train_theirs(args.minutes, out, folder, args.num_samples)
    rows.append(
        {"model": "denoising-diffusion-pytorch", "steps": their_steps, **scores(clf, theirs)}
    )
    for name, x in (("ours", ours), ("theirs", theirs)):
        save_grid(x * 2 - 1, out / f"{name}.png", nrow=8)
    print(f"\n{args.minutes:g} min of training each; classifier accuracy on held-out: {acc:.3f}")
    print(f"grids: {out}/ours.png, {out}/theirs.png\n")
    print(table(rows, list(rows[0])))
    payload = {"machine": machine(), "minutes": args.minutes, "classifier_acc": acc, "rows": rows}
    print(write_json(f"peer_quality_{stamp}", payload, args.out))


def _labels(dm: ImageDataModule, split: str) -> np.ndarray:
    """Digit labels of the datamodule's split (same seeded split of sklearn's digits)."""
    from sklearn.datasets import load_digits

    from ddpm.data.datamodule import split_indices
    from ddpm.data.sources import load_digits_uint8, prepare

    target = load_digits().target
    train_idx, val_idx = split_indices(len(target), dm.val_split, dm.seed)
    idx = val_idx if split == "val" else train_idx
    images = prepare(load_digits_uint8(), dm.image_size, dm.channels)[idx]
    assert torch.equal(images, dm.dataset(split).data), "split differs from ImageDataModule's"
    return target[idx.numpy()]


if __name__ == "__main__":
    main()
