"""Our tiny audio encoder: log-mel (100 frames/s) -> stacked hidden states at 50 steps/s, trained with the UNet.

Purely convolutional, so every output step sees a fixed, local stretch of mel: a stride-2 patch embedding (step s
reads mel frames [2s, 2s + 2)) and ConvNeXt-style blocks (depthwise conv, LayerNorm over channels, pointwise MLP),
each widening the view by kernel // 2 steps per side. `context` is that total reach: encoding a mel span with
`context` extra steps on both sides reproduces, in its interior, the features of encoding the whole file. The
output contract matches WhisperEncoder: (B, L, T, dim) with L = blocks + 1 (the last state after a final LayerNorm).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .melspec import log_mel


@dataclass
class MelEncoderConfig:
    n_mels: int = 80
    dim: int = 384  # = the UNet's cross_attention_dim
    blocks: int = 4  # L = blocks + 1 hidden states -> 10 steps x 5 = 50 tokens per frame at 25 fps
    kernel: int = 3  # depthwise kernel, odd
    ffn_mult: int = 2

    @classmethod
    def tiny(cls):
        return cls(dim=128)


class ConvBlock(nn.Module):
    def __init__(self, dim, kernel, ffn_mult):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_mult * dim)
        self.fc2 = nn.Linear(ffn_mult * dim, dim)

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        y = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(F.gelu(self.fc1(self.norm(y))))


class MelEncoder(nn.Module):
    """log-mel (B, 80, 2T) -> (B, L, T, dim); an odd trailing mel frame is ignored."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or MelEncoderConfig()
        assert cfg.kernel % 2 == 1, "kernel must be odd"
        self.dim, self.n_states = cfg.dim, cfg.blocks + 1
        self.context = cfg.blocks * (cfg.kernel // 2)
        self.stem = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=2, stride=2)
        self.blocks = nn.ModuleList(ConvBlock(cfg.dim, cfg.kernel, cfg.ffn_mult) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, mel):
        if mel.shape[-1] < 2:  # under 20 ms of audio: no complete step
            return mel.new_zeros(mel.shape[0], self.n_states, 0, self.dim)
        x = self.stem(mel).transpose(1, 2)  # (B, 80, 2T) -> (B, T, dim)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        states[-1] = self.norm(x)
        return torch.stack(states, dim=1)  # (B, L, T, dim)

    def encode(self, wave):
        """16 kHz wave (samples,) -> (1, L, samples // 320, dim), from log_mel(dynamic_floor=False)."""
        p = next(self.parameters())
        return self(log_mel(torch.as_tensor(wave), dynamic_floor=False)[None].to(p.device, p.dtype))
