"""Building blocks shared by the UNet and the VAE.

Attention (self or cross, via F.scaled_dot_product_attention), the GEGLU feed-forward, the spatial transformer,
the ResNet block with an optional time projection, and the 2x down/up samplers. Attribute names are exactly the
diffusers ones (`to_q`, `ff.net.0.proj`, `time_emb_proj`, `conv_shortcut`, ...) so that `UNet2DConditionModel`
and `AutoencoderKL` state dicts load with `strict=True` and no renaming table. `config_from_dict` reads every
dataclass config (UNet, VAE, audio encoder, SyncNet) from a JSON file or a checkpoint.
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def config_from_dict(cls, d: dict):
    """A dataclass config from a dict (diffusers' config.json, or one saved in our checkpoints): keys the dataclass
    does not have are ignored, JSON lists become (nested) tuples."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in d.items() if k in known})


# Conv2d on the CPU runs as one matrix multiply when it has at most this many output positions (B x H x W) and at
# least this many weights (the full UNet's 8x8 / 16x16 levels at small batch; never the tiny preset's narrow convs)
GEMM_MAX_POSITIONS = 256
GEMM_MIN_WEIGHTS = 1 << 20


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict names) that, on the CPU, runs small maps as one matrix multiply.

    The UNet's 8x8 and 16x16 levels at small batch have 1280-wide 3x3 convs with few output positions. oneDNN then
    spends most of its time re-laying out the 59 MB weight on every call: unfold + GEMM on the weight as stored is
    about 3x faster there (measured on 2 cores, batch 1). Large maps and narrow layers keep the oneDNN path, which
    wins there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        (k, _), (s, _), (p, _) = self.kernel_size, self.stride, self.padding
        Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        if (x.device.type != "cpu" or B * Ho * Wo > GEMM_MAX_POSITIONS or self.weight.numel() < GEMM_MIN_WEIGHTS
                or self.groups != 1 or self.dilation[0] != 1):
            return super().forward(x)
        w = self.weight  # (O, C, k, k); a channels-last weight is (O, k, k, C) in memory: use it as that, uncopied
        channels_last = not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        cols = F.unfold(x, k, padding=p, stride=s)  # (B, C*k*k, L), rows ordered (C, kh, kw)
        if channels_last:
            w = w.permute(0, 2, 3, 1)
            cols = cols.view(B, C, k * k, -1).transpose(1, 2)  # rows ordered (kh, kw, C) like the weight
        cols = cols.reshape(B, C * k * k, -1).transpose(0, 1).reshape(C * k * k, -1)  # (C*k*k, B*L)
        out = w.reshape(self.out_channels, -1) @ cols  # (O, B*L)
        if self.bias is not None:
            out = out + self.bias[:, None]
        out = out.view(self.out_channels, B, Ho, Wo).transpose(0, 1)  # (B, O, Ho, Wo)
        x_cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if x_cl else torch.contiguous_format)  # as x


class Attention(nn.Module):
    """Multi-head attention over tokens. Self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, N, C), context (B, M, Cc) -> (B, N, C)
        context = x if context is None else context
        B, N, C = x.shape
        h = self.heads
        q = self.to_q(x).view(B, N, h, C // h).transpose(1, 2)
        k = self.to_k(context).view(B, -1, h, C // h).transpose(1, 2)
        v = self.to_v(context).view(B, -1, h, C // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.to_out[0](out)


class SpatialSelfAttention(Attention):
    """The VAE's mid-block attention: GroupNorm, single-head self-attention over pixels, residual add."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__(dim, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        tokens = self.group_norm(x).view(B, C, H * W).transpose(1, 2)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class GEGLU(nn.Module):
    """Linear to 2x the hidden width, split into (value, gate); value * GELU(gate)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the audio tokens, and GEGLU feed-forward (diffusers' BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, HW, C), context (B, T, Cc)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm, 1x1 conv in, one transformer block over the H*W tokens, 1x1 conv out, residual add."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim)])
        self.proj_out = Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, (+ time bias), GN-SiLU-conv, with a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float, temb_ch: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # (B, Cin, H, W), temb (B or 1, Ct) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE encoder pads (0, 1, 0, 1) and the conv pads 0."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
