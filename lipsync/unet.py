"""The MuseTalk UNet: Stable Diffusion 1.x's UNet2DConditionModel with 8 input channels and 384-dim audio context.

Input: the masked current frame's latent and the reference frame's latent, concatenated (B, 8, 32, 32). Context:
audio tokens (B, 50, 384). It runs once per frame at timestep 0 and predicts the current frame's latent (B, 4, 32, 32).
Module names equal diffusers' so MuseTalk's `unet.pth` / `pytorch_model.bin` loads with strict=True.
Config defaults: MuseTalk's musetalk.json (docs/musetalk.md §1).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .blocks import Downsample, ResnetBlock, Transformer2D, Upsample, config_from_dict


@dataclass
class UNetConfig:
    in_channels: int = 8
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple = 8  # diffusers' legacy name: this is the number of heads per level
    cross_attention_dim: int = 384
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel config, ignoring unrelated keys; reject what we don't implement."""
        cfg = config_from_dict(cls, d)
        heads = d.get("num_attention_heads")
        if heads is not None:
            cfg.attention_head_dim = tuple(heads) if isinstance(heads, list) else heads
        unsupported = {
            "use_linear_projection": False, "only_cross_attention": False, "upcast_attention": False,
            "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
            "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "center_input_sample": False,
            "dual_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1,
        }
        for key, ok in unsupported.items():
            if d.get(key, ok) != ok:
                raise ValueError(f"UNet config: {key}={d[key]!r} is not supported (only {ok!r})")
        if cfg.act_fn != "silu" or cfg.mid_block_scale_factor != 1:
            raise ValueError("UNet config: only act_fn='silu' and mid_block_scale_factor=1 are supported")
        return cfg

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """CPU preset used by `train.py --preset tiny`: same architecture, 16x16 latents, 128-dim audio tokens,
        32-dim attention heads (tiny heads make CPU attention slow)."""
        return cls(block_out_channels=(32, 64, 128, 128), layers_per_block=1, attention_head_dim=(1, 2, 4, 4),
                   cross_attention_dim=128, norm_num_groups=8)

    def heads(self, level: int) -> int:
        h = self.attention_head_dim
        return h[level] if isinstance(h, tuple) else h


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim), laid out [cos, sin] when flipped (diffusers' Timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNetBlock(nn.Module):
    """One level of the UNet: `layers` resnets, each optionally followed by a spatial transformer, then a resampler.

    On the way down each resnet reads the previous output; on the way up each resnet also reads one skip tensor
    (`skip_channels[j]` wide) popped from the down path.
    """

    def __init__(self, in_ch, out_ch, temb_ch, layers, cross, heads, cfg: UNetConfig, resample=None,
                 skip_channels=None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        skips = skip_channels or [0] * layers
        self.resnets = nn.ModuleList(
            [ResnetBlock((in_ch if j == 0 else out_ch) + skips[j], out_ch, g, eps, temb_ch) for j in range(layers)])
        if cross:
            self.attentions = nn.ModuleList(
                [Transformer2D(out_ch, heads, cfg.cross_attention_dim, g) for _ in range(layers)])
        else:
            self.attentions = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)])
        if resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])
        self.resample = resample

    def forward(self, x, temb, context, skips=None):
        outputs = []
        for j, resnet in enumerate(self.resnets):
            if skips is not None:  # the last skip pushed on the way down is the first one read on the way up
                x = torch.cat([x, skips[-1 - j]], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            outputs.append(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
            outputs.append(x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x, outputs


class CrossAttnMidBlock(nn.Module):
    """resnet -> spatial transformer -> resnet at the lowest resolution."""

    def __init__(self, ch, temb_ch, heads, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.attentions = nn.ModuleList([Transformer2D(ch, heads, cfg.cross_attention_dim, g)])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, g, eps, temb_ch), ResnetBlock(ch, ch, g, eps, temb_ch)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        ch = cfg.block_out_channels
        n = len(ch)
        temb_ch = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)

        self.down_blocks = nn.ModuleList()
        skip_widths = [ch[0]]
        for i, kind in enumerate(cfg.down_block_types):
            last = i == n - 1
            block = UNetBlock(ch[max(i - 1, 0)], ch[i], temb_ch, cfg.layers_per_block, kind.startswith("CrossAttn"),
                              cfg.heads(i), cfg, resample=None if last else "down")
            self.down_blocks.append(block)
            skip_widths += [ch[i]] * (cfg.layers_per_block + (0 if last else 1))

        self.mid_block = CrossAttnMidBlock(ch[-1], temb_ch, cfg.heads(n - 1), cfg)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        for i, kind in enumerate(cfg.up_block_types):
            skips = [skip_widths.pop() for _ in range(cfg.layers_per_block + 1)]
            block = UNetBlock(rev[max(i - 1, 0)], rev[i], temb_ch, cfg.layers_per_block + 1,
                              kind.startswith("CrossAttn"), cfg.heads(n - 1 - i), cfg,
                              resample=None if i == n - 1 else "up", skip_channels=skips)
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # recompute each block in backward (saves memory when training)

    def time_embed(self, timestep, batch: int, device) -> torch.Tensor:
        """Timestep(s) -> (B, 4 C0). A single timestep (MuseTalk always passes t = 0) is embedded once and broadcast
        over the batch when no gradient flows; training embeds it per sample. (Caching the t = 0 embedding saved
        nothing measurable: two small matmuls, ~0.5 ms against a UNet forward of 36 ms+.)"""
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        if t.numel() == 1 and torch.is_grad_enabled():
            t = t.expand(batch)
        cfg = self.config
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.time_embedding(emb.to(self.conv_in.weight.dtype))

    def _checkpointed(self, block, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # sample (B, 8, H, W), encoder_hidden_states (B, T, 384) -> (B, 4, H, W); H, W divisible by 2**(levels-1)
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            sample = sample.contiguous(memory_format=torch.channels_last)  # match channels-last weights (faster on CPU)
        temb = self.time_embed(timestep, sample.shape[0], sample.device)
        context = encoder_hidden_states
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, outs = self._checkpointed(block, x, temb, context)
            skips += outs
        x = self._checkpointed(self.mid_block, x, temb, context)  # (B, C3, H/8, W/8)
        for block in self.up_blocks:
            n = len(block.resnets)
            x, _ = self._checkpointed(block, x, temb, context, skips[-n:])
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))
