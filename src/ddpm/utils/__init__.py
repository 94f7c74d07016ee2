"""Small helpers shared across the package (no Lightning or Hydra imports)."""
