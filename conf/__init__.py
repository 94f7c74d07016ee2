"""The configs as the package ``ddpm.conf`` once installed: Hydra finds a ``pkg://`` config
module by this file (setup.py ships conf/ there)."""
