"""Equal wall-clock on the default task: our default digits recipe vs denoising-diffusion-pytorch.

Both train on the same 1617 training digits (16x16 grayscale) for the same wall-clock minutes on
this machine, then draw 64 samples (ours: the default grid sampler and EMA weights;
theirs: their README recipe, ``sampling_timesteps=250`` DDIM and their EMA). Samples are scored
by the repo's digit classifier (``digits_classifier.py``): mean top-class probability
("confidence"), a digits Inception-Score analogue and the number of classes among the
samples' predictions. Held-out real digits give the ceiling.

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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402
from ddpm.data import ImageDataModule  # noqa: E402
from ddpm.utils.images import save_grid  # noqa: E402
from digits_classifier import ROOT, DigitsClassifier  # noqa: E402


def train_ours(
    minutes: float, out: Path, n: int, env: dict[str, str], accelerator: str = "auto"
) -> tuple[torch.Tensor, int]:
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
        f"trainer.accelerator={accelerator}",
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
        f"accelerator={accelerator}",
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
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | auto for our runs (theirs: accelerate's own choice, a GPU if any)",
    )
    args = p.parse_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = ROOT / "outputs" / "bench" / f"peer_quality_{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    clf = DigitsClassifier.fit()
    acc = clf.accuracy
    rows = [{"model": "held-out real digits", "steps": "", **clf.scores(clf.held_out01[:64])}]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    accelerator = "gpu" if args.device == "cuda" else args.device
    ours, ours_steps = train_ours(args.minutes, out, args.num_samples, env, accelerator)
    rows.append({"model": "ddpm (ours, default recipe)", "steps": ours_steps, **clf.scores(ours)})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train_u8 = ImageDataModule("digits", root=None).dataset("train").data
        for i, img in enumerate(train_u8):
            Image.fromarray(img[0].numpy(), "L").save(folder / f"{i:05d}.png")
        theirs, their_steps = train_theirs(args.minutes, out, folder, args.num_samples)
    rows.append(
        {"model": "denoising-diffusion-pytorch", "steps": their_steps, **clf.scores(theirs)}
    )
    for name, x in (("ours", ours), ("theirs", theirs)):
        save_grid(x * 2 - 1, out / f"{name}.png", nrow=8)
    print(f"\n{args.minutes:g} min of training each; classifier accuracy on held-out: {acc:.3f}")
    print(f"grids: {out}/ours.png, {out}/theirs.png\n")
    print(table(rows, list(rows[0])))
    payload = {"machine": machine(), "minutes": args.minutes, "classifier_acc": acc, "rows": rows}
    print(write_json(f"peer_quality_{stamp}", payload, args.out))


if __name__ == "__main__":
    main()
