"""Sampling throughput (img/s): our DDIM (50 steps) and DPM-Solver++(2M) (20 steps) loops against
diffusers' ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` loops at equal step counts.

Three pipelines per sampler, timed in interleaved rounds in one process (medians):
``ours``: our U-Net + our sampler (``ddpm.diffusion.samplers``); ``diffusers``: diffusers'
``UNet2DModel`` (same DDPM CIFAR-10 architecture) + its scheduler loop under ``inference_mode``
(what ``DDPMPipeline``/``DDIMPipeline`` do); ``ours_net+diffusers_loop``: our U-Net driven by the
diffusers scheduler loop, which separates the network's speed from the sampler loop's. Both clip
x̂₀ to [-1, 1] (diffusers: ``clip_sample`` / static thresholding at 1).

    python bench/sample_throughput.py                       # CPU defaults
    python bench/sample_throughput.py --device cuda --batch-size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Clock, diffusers_unet, machine, median, ours, table, write_json  # noqa: E402
from ddpm.diffusion import GaussianDiffusion  # noqa: E402
from ddpm.diffusion.samplers import ddim_sample, dpm_solver_sample  # noqa: E402


def diffusers_loop(net, scheduler, steps: int, noise: torch.Tensor):
    @torch.inference_mode()
    def run() -> torch.Tensor:
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t), t, x).prev_sample
        return x

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dpm-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sample.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    device = torch.device(args.device)
    torch.manual_seed(0)
    our_net = ours(args.image_size, args.channels).to(device).eval()
    their_net = diffusers_unet(args.image_size, args.channels).to(device).eval()
    diffusion = GaussianDiffusion(schedule="linear", num_timesteps=1000).to(device)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    betas = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ddim = DDIMScheduler(**betas, clip_sample=True, timestep_spacing="linspace")
    dpm = DPMSolverMultistepScheduler(
        **betas,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=True,
        sample_max_value=1.0,
        timestep_spacing="linspace",
    )
    runs = {
        ("ddim", args.ddim_steps, "ours"): lambda: ddim_sample(
            our_net, diffusion, None, steps=args.ddim_steps, noise=noise
        ),
        ("ddim", args.ddim_steps, "diffusers"): diffusers_loop(
            their_net, ddim, args.ddim_steps, noise
        ),
        ("ddim", args.ddim_steps, "ours_net+diffusers_loop"): diffusers_loop(
            our_net, ddim, args.ddim_steps, noise
        ),
        ("dpm_solver++", args.dpm_steps, "ours"): lambda: dpm_solver_sample(
            our_net, diffusion, None, steps=args.dpm_steps, noise=noise
        ),
        ("dpm_solver++", args.dpm_steps, "diffusers"): diffusers_loop(
            their_net, dpm, args.dpm_steps, noise
        ),
        ("dpm_solver++", args.dpm_steps, "ours_net+diffusers_loop"): diffusers_loop(
            our_net, dpm, args.dpm_steps, noise
        ),
    }
    with torch.inference_mode():  # warm-up: one network call each
        t = torch.full((args.batch_size,), 500, device=device)
        our_net(noise, t)
        their_net(noise, t)
    times = {k: {"wall": [], "cpu": []} for k in runs}
    keys = list(runs)
    for r in range(args.repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            with Clock(device) as c:
                runs[key]()
            times[key]["wall"].append(c.wall)
            times[key]["cpu"].append(c.cpu)
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    threads = torch.get_num_threads()
    rows = []
    for (sampler, steps, pipeline), d in times.items():
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "pipeline": pipeline,
                "img_s": args.batch_size / median(d["wall"]),
                "img_per_cpu_s": args.batch_size / median(d["cpu"]) * threads,
                "wall_s_all": d["wall"],
                "cpu_s_all": d["cpu"],
            }
        )
    for row in rows:
        ref = next(
            r for r in rows if r["sampler"] == row["sampler"] and r["pipeline"] == "diffusers"
        )
        row["x_diffusers"] = row["img_s"] / ref["img_s"]
        row["x_diffusers_cpu"] = row["img_per_cpu_s"] / ref["img_per_cpu_s"]
    print(
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}x{args.channels}, fp32, "
        f"{args.repeats} rounds, device {device}, threads {threads}"
    )
    print(
        table(
            rows,
            [
                "sampler",
                "steps",
                "pipeline",
                "img_s",
                "x_diffusers",
                "img_per_cpu_s",
                "x_diffusers_cpu",
            ],
        )
    )
    path = write_json("sample", {"args": vars(args), "machine": machine(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
