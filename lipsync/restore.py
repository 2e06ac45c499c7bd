"""Mouth restorer: a small learned 2x upscaler for the generated face crop (ours; MuseTalk has none).

The generator draws the face at S px (128 for our models) and the paste scales it 2-4x onto a 480-720p face, so the
lips and teeth it pastes are soft: a 128 px crop holds less than half of a 720p mouth's detail, and the VAE keeps
less still. The restorer maps the decoded crop (3, S, S) to (3, 2S, 2S): the crop scaled up bilinearly plus a learned
residual, computed at S px and moved to 2S by a sub-pixel convolution (ESPCN: Shi et al., "Real-Time Single Image
and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016).

It is trained self-supervised (`train.py --stage restorer`, lipsync.training.restorer): real face crops at 2S px are
the targets, and the input is the face the generator itself draws for that frame at S px (or the real crop through
its VAE). The last convolution starts at zero, so an untrained restorer is exactly the bilinear upscale. blend.paste uses the restored face only around the mouth; everywhere else the source frame's
own detail is kept. Where the video lends its own mouth texture (lipsync.texture), the paste takes from the restored
face only what the crop can hold.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_UPSCALE = 1.25  # pipeline.render restores a face only when the paste scales it up more than this (box > 1.25 S)


@dataclass
class RestorerConfig:
    channels: int = 32  # feature width at S px
    blocks: int = 4  # residual blocks (two 3x3 convolutions each)
    scale: int = 2  # output side / input side


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class Restorer(nn.Module):
    def __init__(self, cfg: RestorerConfig = RestorerConfig()):
        super().__init__()
        self.cfg = cfg
        c, r = cfg.channels, cfg.scale
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(c) for _ in range(cfg.blocks)])
        self.tail = nn.Conv2d(c, 3 * r * r, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # untrained = the bilinear upscale
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Faces (B, 3, S, S) in about [-1, 1] -> (B, 3, rS, rS)."""
        r = self.cfg.scale
        up = F.interpolate(x, scale_factor=r, mode="bilinear", align_corners=False)  # (B, 3, rS, rS)
        h = self.head(x)  # (B, c, S, S)
        h = F.relu(h + self.body(h))
        return up + F.pixel_shuffle(self.tail(h), r)  # (B, 3 r^2, S, S) -> (B, 3, rS, rS)
