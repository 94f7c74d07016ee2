"""Data-loading throughput (img/s) of ``ImageDataModule`` for 32x32 RGB images against the
training step's img/s, to show that loading is never the bottleneck.

The default source is the bundled digits converted to 32x32 RGB with random flips: the same
in-memory path (one uint8 tensor, one fancy-index + one batch transform per batch) as CIFAR-10,
MNIST and Fashion-MNIST, without a download. ``--name image_folder --root DIR`` measures the
file-backed path (PIL decoding in ``--num-workers`` processes). The training step's img/s is
read from ``bench/results/train.json`` (``train_throughput.py``) or measured here (2 steps of our
``cifar10`` U-Net, fp32).

    python bench/data_throughput.py
    python bench/data_throughput.py --name image_folder --root /data/celeba --num-workers 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Clock, machine, ours, table, write_json  # noqa: E402
from ddpm.data import ImageDataModule  # noqa: E402


def loader_img_s(dm: ImageDataModule, batches: int, device: torch.device) -> tuple[float, float]:
    """(img/s wall, img/s per CPU-second) over ``batches`` batches, moved to ``device``."""
    n = 0
    it = iter(dm.train_dataloader())
    next(it)  # workers started, first batch out
    with Clock(device) as c:
        while n < batches:
            try:
                x = next(it)
            except StopIteration:
                it = iter(dm.train_dataloader())
                continue
            x = x[0] if isinstance(x, (list, tuple)) else x
            x = x.to(device, non_blocking=True)
            n += 1
    return n * dm.per_device_batch_size / c.wall, n * dm.per_device_batch_size / c.cpu


def train_img_s(batch_size: int, device: torch.device) -> tuple[float, str]:
    path = RESULTS / "train.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
        best = max(r["img_s"] for r in rows if r["model"] == "ours")
        return best, f"{path.name} (ours, fastest precision)"
    net = ours().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    for i in range(3):
        if i == 1:
            clock = Clock(device).__enter__()
        (net(x, t) - x).pow(2).mean().backward()
        opt.step()
    clock.__exit__()
    return 2 * batch_size / clock.wall, "measured here (ours, fp32)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="digits", help="ImageDataModule name (default digits)")
    p.add_argument("--root", default="data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--train-batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/data.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    dm = ImageDataModule(
        name=args.name,
        root=args.root,
        image_size=args.image_size,
        channels=args.channels,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        random_flip=True,
    )
    dm.prepare_data()
    dm.setup("fit")
    wall, cpu = loader_img_s(dm, args.batches, device)
    train, source = train_img_s(args.train_batch_size, device)
    rows = [
        {
            "what": f"data: {args.name} {args.image_size}x{args.image_size}x{args.channels}, "
            f"batch {args.batch_size}, workers {dm.num_workers}",
            "img_s": wall,
            "img_per_cpu_s": cpu,
        },
        {"what": f"training step ({source})", "img_s": train, "img_per_cpu_s": ""},
    ]
    ratio = wall / train
    print(table(rows, ["what", "img_s", "img_per_cpu_s"]))
    print(
        f"data loading is {ratio:.0f}x faster than training: "
        f"{100 / ratio:.2f}% of a step's time if not overlapped"
    )
    payload = {"args": vars(args), "machine": machine(), "rows": rows, "ratio": ratio}
    print(f"wrote {write_json('data', payload, args.out)}")


if __name__ == "__main__":
    main()
