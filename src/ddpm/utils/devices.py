"""Where a network lives."""

from __future__ import annotations

from typing import Any

import torch


def model_device(model: Any, default: torch.device | str = "cpu") -> torch.device:
    """Device of ``model``'s first parameter or buffer (``default`` if it has none, or if it is
    a plain function)."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device(default)
