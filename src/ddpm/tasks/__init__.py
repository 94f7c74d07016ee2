"""Plain task functions (``train(cfg)``, ``sample(cfg)``, ...) behind the thin Hydra scripts."""
