"""Samplers: DDPM ancestral (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021) and its inversion
(η = 0: Euler on the probability-flow ODE), DPM-Solver++ multistep 2M/3M and its SDE variant
(Lu et al. 2022), UniPC (Zhao et al. 2023) and EDM's Heun sampler (Karras et al. 2022), each on
every process of the family (:mod:`ddpm.diffusion.process`: DDPM's discrete chain, EDM's
process, rectified flow), all with classifier-free guidance and Song et al. 2021's Langevin
corrector.

Every sampler is a stateless function ``sample(net, process, shape, **options)`` of the
network ``net(x, τ) -> output`` (τ a (B,) tensor of the network's time input: DDPM's integer
timesteps, or the process's τ(t)), a process and a shape. The keyword options they share
(below) are listed once, in :class:`SampleCall`, and each function takes them as ``**common``.
Inside, a sampler builds its grid (times, α, σ, the parameterisation's coefficients and τ per
step: ``_core.grid``), and ``SampleCall.start`` gives the loop x at the first time, EDM's
denoiser x̂₀ = D(x_t) at step k (``run.denoise(x, k)``), the corrector (``run.correct``) and
the intermediates (``run.record``). Which sampler is exact where: every one is written in α, σ
and λ = log(α/σ) only, and the network output is converted by the parameterisation's affine
maps, so any network samples with any sampler on its own process; only learned variances are
DDPM-chain-only (``ddpm`` sampler). Shared conventions:

* ``generator``: a :class:`~ddpm.utils.seeding.PerSampleGenerator` (sample i depends only on its
  seed, whatever the batch size), a ``torch.Generator`` or None (global RNG). ``noise`` gives
  the unit-variance noise of x_T directly (then ``shape`` may be None); x_T is it times the
  process's prior std (1 but on EDM's VE process, √(σ_max² + 1)).
* ``clip_denoised``: x̂₀ is clipped to [-1, 1] and ε̂ recomputed from the clipped x̂₀, exactly as
  :meth:`GaussianDiffusion.model_predictions` (thresholding in diffusers' terms).
* ``device`` defaults to the device of the network's parameters (CPU for plain callables).
  Network outputs are cast to float32 and all sampler math runs in float32; the per-step
  schedule coefficients are computed once per call in float64 and kept as Python floats, so the loop
  has no host syncs and little Python work besides the network call.
* ``corrector="langevin"`` (``snr`` r, ``corrector_steps`` n): Song et al. 2021's
  predictor-corrector sampling, n Langevin steps with the network's score -ε̂/σ at each grid
  time before the predictor's step there (after UniC's correction for UniPC); n more network
  calls per step (``Run.correct``).
* Runs under ``torch.inference_mode()``: the returned tensors are inference tensors.
* ``return_intermediates``: False (default) returns only the final samples. Otherwise the
  sampler returns ``(samples, intermediates)`` where ``intermediates`` is a dict with
  ``timesteps`` (K,: the network's integer timesteps on DDPM's chain, float64 process times on a
  continuous process), ``x_t`` and ``pred_xstart`` (float32
  tensors (K, *shape) on the CPU), in sampling order. ``True`` records every step, an int
  ``k >= 1`` every k-th step (the first and the last always included), a sequence of timesteps
  records the steps whose timestep is nearest to each of them. ``x_t`` is the sampler's state at
  that timestep (the network input; for :func:`ddim_invert` the latent just reached) and
  ``pred_xstart`` the x̂₀ predicted there.
* Timestep grids and their ``spacing`` names: :mod:`ddpm.diffusion.samplers.timesteps` (one
  table, with diffusers' names).

Classifier-free guidance (Ho & Salimans 2022), diffusers' convention: ``class_labels`` (a
LongTensor (B,)) and ``guidance_scale`` s give ε̃ = ε_∅ + s (ε_y - ε_∅), with ε_y the output
for the labels and ε_∅ for the network's null class (``net.null_class``). s = 1 is plain
conditional sampling (one forward with the labels), s = 0 unconditional (one forward with the
null class); any other s makes one batched forward of [labels; null] per step. The mix is
taken in the network's own output space: ε, x₀ and v are affine in one another at a fixed x_t
and t, so guiding x₀ or v is guiding ε. With a learned variance only the mean channels are
mixed and the conditional variance channels are kept (as GLIDE). The mix comes before any
clipping of x̂₀. Without ``class_labels`` the network is called as ``net(x_t, t)``
(unconditional networks need no ``class_labels`` argument) and s must be 1.
"""

from ddpm.diffusion.samplers._core import SampleCall
from ddpm.diffusion.samplers.configs import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    HeunSampler,
    Sampler,
    UniPCSampler,
)
from ddpm.diffusion.samplers.ddim import ddim_coefficients, ddim_invert, ddim_sample
from ddpm.diffusion.samplers.ddpm import ddpm_sample, posterior_coefficients
from ddpm.diffusion.samplers.dpm_solver import dpm_solver_coefficients, dpm_solver_sample
from ddpm.diffusion.samplers.heun import heun_sample
from ddpm.diffusion.samplers.seeded import sample_batches
from ddpm.diffusion.samplers.timesteps import (
    DPM_SPACINGS,
    STEP_SPACINGS,
    dpm_solver_timesteps,
    karras_timesteps,
    step_timesteps,
)
from ddpm.diffusion.samplers.unipc import unipc_coefficients, unipc_sample

__all__ = [
    "DPM_SPACINGS",
    "STEP_SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EulerSampler",
    "HeunSampler",
    "SampleCall",
    "Sampler",
    "UniPCSampler",
    "ddim_coefficients",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_coefficients",
    "dpm_solver_sample",
    "dpm_solver_timesteps",
    "heun_sample",
    "karras_timesteps",
    "posterior_coefficients",
    "sample_batches",
    "step_timesteps",
    "unipc_coefficients",
    "unipc_sample",
]
