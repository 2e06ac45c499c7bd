"""AutoencoderKL (the sd-vae-ft-mse design) and the face I/O MuseTalk builds on it.

256x256 RGB in [-1, 1] -> diagonal Gaussian over a (4, 32, 32) latent -> 256x256 RGB. Module names equal diffusers'
AutoencoderKL so sd-vae-ft-mse loads with strict=True (legacy attention names are mapped by lipsync.weights).
`AutoencoderKL.encode` / `decode` work on raw latents. The UNet's latents are scaled: raw x `scaling_factor`
(0.18215 for sd-vae-ft-mse). `FaceVAE`, a weightless helper over the same AutoencoderKL, is the one place that scale
is applied (encode: x scale, decode: / scale), together with MuseTalk's other conventions: lower half masked to -1,
posterior mean, UNet input = cat([masked, reference]) (docs/musetalk.md §3).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import Downsample, ResnetBlock, SpatialSelfAttention, Upsample


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    sample_size: int = 256  # the crop size S the VAE was trained on

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """CPU preset: 64x64 crops -> (4, 16, 16) latents (two downsamplings); narrow at full resolution, where the
        convolutions cost most."""
        return cls(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups, eps)])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, eps), ResnetBlock(ch, ch, groups, eps)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class CoderBlock(nn.Module):
    """A stack of resnets and an optional resampler (diffusers' DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_ch, out_ch, layers, groups, eps, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups, eps) for j in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)])
        if resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])
        self.resample = resample

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            CoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, eps, None if i == n - 1 else "down")
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, eps)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        # (B, 3, H, W) -> (B, 2*latent, H/f, W/f)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g, eps = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.norm_eps
        n = len(rev)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, eps)
        self.up_blocks = nn.ModuleList([
            CoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, eps, None if i == n - 1 else "up")
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=eps)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        # (B, latent, h, w) -> (B, 3, h*f, w*f)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = self.config = config or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs follow the weights' memory format: channels-last convolutions are much faster on CPU."""
        if self.quant_conv.weight.is_contiguous(memory_format=torch.channels_last):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        # (B, 3, H, W) in [-1, 1] -> posterior over raw (unscaled) latents (B, 4, H/f, W/f), f = config.downscale;
        # the UNet's latents are these x config.scaling_factor: FaceVAE.encode
        return DiagonalGaussian(self.quant_conv(self.encoder(self._layout(x))).contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # raw latents (B, 4, h, w) -> (B, 3, fh, fw), roughly [-1, 1], not clamped; the UNet's (scaled) latents go
        # through FaceVAE.decode, which divides by config.scaling_factor first
        return self.decoder(self.post_quant_conv(self._layout(z))).contiguous()


def to_model_images(crops) -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB (numpy or tensor) -> float (B, 3, S, S) in [-1, 1]. Float tensors pass through."""
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(crops)
    if crops.dtype == torch.uint8:
        crops = crops.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return crops


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in about [-1, 1] -> float32 (B, 3, S, S) in [0, 255] (clamped), on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).cpu()


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> uint8 (B, S, S, 3) RGB numpy."""
    return to_uint8_pixels(to_pixels(images))


def to_uint8_pixels(pixels: torch.Tensor) -> np.ndarray:
    """float (B, 3, S, S) in [0, 255] (to_pixels) -> uint8 (B, S, S, 3) RGB numpy, rounded."""
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def mask_lower_half(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> the same with rows >= S//2 set to -1 (black), as MuseTalk masks the mouth."""
    masked = images.clone()
    masked[..., images.shape[-2] // 2:, :] = -1.0
    return masked


class FaceVAE(nn.Module):
    """MuseTalk's face I/O over an AutoencoderKL, on the UNet's *scaled* latents: raw latents x scaling_factor.

    A helper with no weights of its own: `self.vae` is the AutoencoderKL it was given (LipSync.vae and
    LipSync.face.vae are one module). It is the one place the latent scale goes in and comes out: `encode` multiplies
    the posterior mean by `scale` (vae.config.scaling_factor, read when the FaceVAE is made), `decode` divides by it
    before vae.decode. So face.decode(z) == vae.decode(z / scale): the UNet's latents go to this decode, raw latents
    to vae.decode. (As a submodule holding that AutoencoderKL, it makes a LipSync's state_dict list the VAE's tensors
    twice, under vae. and face.vae., the same tensors: the stage checkpoints train.py --resume reads hold both.)
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.scaling_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # (B, 3, S, S) in [-1, 1] -> scaled latents (B, 4, s, s) = posterior mean (deterministic) x scale
        return self.vae.encode(images).mean * self.scale

    def unet_input(self, crops, references=None) -> torch.Tensor:
        """Crops (and references; default = the crops themselves, as at inference) -> (B, 8, s, s) = [masked, ref]."""
        p = next(self.vae.parameters())
        x = to_model_images(crops).to(p.device, p.dtype)
        ref = x if references is None else to_model_images(references).to(p.device, p.dtype)
        both = self.encode(torch.cat([mask_lower_half(x), ref]))
        masked, ref = both.chunk(2)
        return torch.cat([masked, ref], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # scaled latents (B, 4, s, s), e.g. the UNet's output -> raw (/ scale) -> images (B, 3, S, S) in about [-1, 1]
        return self.vae.decode(latents / self.scale)
