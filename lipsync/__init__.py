"""lipsync: a minimal, readable pure-PyTorch reimplementation of MuseTalk real-time lip-sync.

The modules directly in this package are the product: everything `python infer.py` needs. They import nothing from
the two layers above them: `lipsync.training` (datasets, losses, SyncNet, training steps, clip preparation) and
`lipsync.tools` (evaluation, metrics and test-data generators).
"""

from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, FaceVAE, VAEConfig
from .weights import CheckpointError, load_unet, load_vae

__all__ = ["UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "FaceVAE", "CheckpointError", "load_unet", "load_vae"]
