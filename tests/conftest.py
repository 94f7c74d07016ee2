"""Shared test set-up: offline W&B, tests/ on sys.path (for `oracles`, `hydra_utils`, ...)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
sys.path.insert(0, str(Path(__file__).parent))
