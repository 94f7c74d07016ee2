"""`python src/reflow.py teacher=CKPT [overrides]` in a checkout = `ddpm-reflow` installed: see ddpm.cli.reflow."""

from ddpm.cli import reflow

if __name__ == "__main__":
    reflow()
