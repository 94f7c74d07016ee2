"""Classifier-free guidance on digits: how often a sample is the digit it was asked for.

For a class-conditional digits checkpoint (``python src/train.py experiment=digits_cfg``), the
same seeds are drawn for balanced classes (sample i for digit i % 10) at each guidance scale s
(diffusers' convention ε̃ = ε_∅ + s (ε_y - ε_∅): s = 0 is the unconditional branch, s = 1 plain
conditional sampling) and scored by the repo's digit classifier (``digits_classifier.py``):
``accuracy`` is the fraction classified as the requested digit (``worst_digit_accuracy``: that
of the digit it is lowest for), ``confidence`` the classifier's mean top probability and
``frechet`` the Fréchet distance to the held-out digits in its feature space, which also counts
lost diversity: guidance trades diversity for fidelity (Ho & Salimans 2022, Fig. 1). Prints a
Markdown table and writes a JSON.

    python src/train.py experiment=digits_cfg run_dir=outputs/digits_cfg
    python bench/guidance_accuracy.py --ckpt outputs/digits_cfg/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json  # noqa: E402
from ddpm.checkpoint import load_model  # noqa: E402
from ddpm.diffusion import DPMSolverSampler  # noqa: E402
from ddpm.tasks.sample import generate  # noqa: E402
from ddpm.utils.classes import balanced_labels, num_classes_of  # noqa: E402
from digits_classifier import DigitsClassifier  # noqa: E402

SCALES = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint of experiment=digits_cfg")
    p.add_argument("--num-samples", type=int, default=500, help="balanced over the 10 digits")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) SDE steps")
    p.add_argument("--first-seed", type=int, default=0, help="sample i uses seed first-seed + i")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    loaded = load_model(args.ckpt, use_ema=True, device=device)
    if num_classes_of(loaded.net) != 10:
        raise SystemExit(
            f"{args.ckpt}: not a class-conditional digits checkpoint (python src/train.py "
            "experiment=digits_cfg)"
        )
    clf = DigitsClassifier.fit()
    print(f"classifier accuracy on the held-out digits: {clf.accuracy:.3f}", flush=True)
    labels = balanced_labels(range(args.num_samples), 10)
    seeds = list(range(args.first_seed, args.first_seed + args.num_samples))
    rows = []
    for s in args.scales:
        sampler = DPMSolverSampler(
            steps=args.steps, algorithm_type="sde-dpmsolver++", guidance_scale=s
        )
        t0 = time.perf_counter()
        x = generate(loaded, sampler, seeds, args.batch_size, device, class_labels=labels)
        images = (x + 1.0) / 2.0
        predicted = clf.proba(images).argmax(1)
        scores = clf.scores(images, frechet=True)
        row = {
            "guidance_scale": s,
            "accuracy": round(float((predicted == labels.numpy()).mean()), 3),
            "worst_digit_accuracy": round(
                min(float((predicted[labels.numpy() == k] == k).mean()) for k in range(10)), 3
            ),
            "confidence": scores["confidence"],
            "frechet": scores["frechet"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(table([row], list(row)).splitlines()[-1], flush=True)
    cols = ["guidance_scale", "accuracy", "worst_digit_accuracy", "confidence", "frechet"]
    print(
        f"\n{args.num_samples} samples per row (digit i % 10 for seed {args.first_seed} + i), "
        f"DPM-Solver++(2M) SDE {args.steps} steps, EMA weights, checkpoint step "
        f"{loaded.global_step}\n"
    )
    print(table(rows, cols))
    payload = {
        "machine": machine(),
        "ckpt": str(args.ckpt),
        "global_step": loaded.global_step,
        "num_samples": args.num_samples,
        "steps": args.steps,
        "classifier_acc": clf.accuracy,
        "rows": rows,
    }
    print(write_json(f"guidance_accuracy_{time.strftime('%Y-%m-%d_%H-%M-%S')}", payload, args.out))


if __name__ == "__main__":
    main()
