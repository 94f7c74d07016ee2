"""`python src/evaluate.py [overrides]` in a checkout = `ddpm-evaluate` installed: see ddpm.cli.evaluate."""

from ddpm.cli import evaluate

if __name__ == "__main__":
    evaluate()
