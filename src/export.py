"""`python src/export.py [overrides]` in a checkout = `ddpm-export` installed: see ddpm.cli.export."""

from ddpm.cli import export

if __name__ == "__main__":
    export()
