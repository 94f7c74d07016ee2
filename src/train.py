"""`python src/train.py [overrides]` in a checkout = `ddpm-train` installed: see ddpm.cli.train."""

from ddpm.cli import train

if __name__ == "__main__":
    train()
