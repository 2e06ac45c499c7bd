"""lipsync: a minimal, readable pure-PyTorch reimplementation of MuseTalk real-time lip-sync."""

from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, FaceVAE, VAEConfig
from .weights import CheckpointError, load_unet, load_vae

__all__ = ["UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "FaceVAE", "CheckpointError", "load_unet", "load_vae"]
