"""The README.md model card of an exported pipeline folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["model_card"]


def model_card(
    run_config: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    unet: Mapping[str, Any],
    *,
    global_step: int,
    used_ema: bool,
    metrics: Mapping[str, float] | None = None,
    source: str = "",
) -> str:
    """The README.md of an exported pipeline folder: how to load it, what differs, the run."""
    classes = unet.get("num_class_embeds")
    learned = scheduler["variance_type"] == "learned_range"
    notes = [
        "- `DDIMPipeline(..., use_clipped_model_output=True)` is our DDIM: ε recomputed from the "
        "clipped x̂₀, as improved-diffusion does.",
        "- diffusers' DDIM steps from t to t - T // steps whatever `timestep_spacing` says "
        "(huggingface/diffusers#12633): with `linspace` its chain differs from ours; "
        "`leading` and `trailing` (steps dividing T) reproduce ours exactly.",
    ]
    if learned:
        notes.append(
            "- Learned variance (`learned_range`, improved DDPM eq. 15): the U-Net outputs "
            f"{unet['out_channels']} channels; `DDPMPipeline` uses them, `DDIMScheduler` does "
            "not split them, so `DDIMPipeline` cannot run this model."
        )
    if classes:
        notes.append(
            f"- Class conditional: {classes - 1} classes and the null class {classes - 1} "
            "(`num_class_embeds` = K + 1). `DDPMPipeline` / `DDIMPipeline` call the U-Net "
            "without `class_labels`, which diffusers refuses, and cannot express classifier-free "
            "guidance; run the scheduler loop yourself with `unet(x, t, class_labels=y)` and "
            "ε = ε(null) + s (ε(y) - ε(null))."
        )
    schedule = (
        "custom (`trained_betas`)"
        if scheduler.get("trained_betas") is not None
        else scheduler["beta_schedule"]
    )
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted((metrics or {}).items()))
    metrics_md = f"| metric | value |\n|---|---|\n{rows}" if rows else "(none recorded)"
    config_json = json.dumps(dict(run_config), indent=2, sort_keys=True, default=str)
    pipeline_call = (
        "DDPMPipeline.from_pretrained(folder)(batch_size=16).images"
        if not classes
        else "# see the notes: the pipelines do not pass class labels"
    )
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags:
- ddpm
- diffusion
---

# DDPM U-Net, exported from ddpm

{unet["sample_size"]}x{unet["sample_size"]}, {unet["in_channels"]} channel(s); trained for
{global_step} steps; {"EMA" if used_ema else "raw (non-EMA)"} weights. Exported from `{source}`.

```python
from diffusers import DDIMPipeline, DDPMPipeline

folder = "path/to/this/folder"
images = {pipeline_call}
```

## Process

T = {scheduler["num_train_timesteps"]}, beta schedule {schedule}, prediction type
`{scheduler["prediction_type"]}`, variance `{scheduler["variance_type"]}`, x̂₀ clipping
{scheduler["clip_sample"]}, timestep spacing `{scheduler["timestep_spacing"]}`.

## Notes

{chr(10).join(notes)}

## Metrics

{metrics_md}

## Training config

```json
{config_json}
```
"""
