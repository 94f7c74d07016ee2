"""`python src/visualize.py [overrides]` in a checkout = `ddpm-visualize` installed: see ddpm.cli.visualize."""

from ddpm.cli import visualize

if __name__ == "__main__":
    visualize()
