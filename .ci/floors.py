"""Print `name==floor` for the dependencies whose lower bounds `make test-floors` verifies: the
`>=` bound pyproject.toml gives each of them (one home for the floors: pyproject.toml)."""

import re
import sys
from pathlib import Path

VERIFIED = ("torch", "torchvision", "pytorch-lightning", "wandb", "torch-fidelity")

text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
floors = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)[^"]*?>=\s*([0-9][^,"]*)', text, re.M))
missing = [name for name in VERIFIED if name not in floors]
if missing:
    sys.exit(f"pyproject.toml gives no >= bound for {', '.join(missing)}")
print(" ".join(f"{name}=={floors[name]}" for name in VERIFIED))
