"""`python src/sample.py [overrides]` in a checkout = `ddpm-sample` installed: see ddpm.cli.sample."""

from ddpm.cli import sample

if __name__ == "__main__":
    sample()
