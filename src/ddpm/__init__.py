"""ddpm: denoising diffusion probabilistic models with PyTorch Lightning + Hydra."""

import warnings

__version__ = "0.1.0"

# Lightning 2.6's CombinedLoader builds torch's deprecated LeafSpec on every fit and evaluation
# (Lightning issue #21326, fixed upstream after the versions we support): one FutureWarning per
# run that no user setting avoids. Only that message from that Lightning module is hidden.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"pytorch_lightning\.utilities\._pytree",
)
