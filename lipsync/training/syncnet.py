"""SyncNet: scores whether T lower-half face frames and an audio span are in sync; the sync losses and the offset
search built on it (docs/musetalk.md §7).

Architecture after LatentSync's `stable_syncnet` (<https://github.com/bytedance/LatentSync>, used frozen by MuseTalk
v1.5), reading our whisper-style log-mel instead of LatentSync's Wav2Lip mel. We train it ourselves: no pretrained
weights can be downloaded here.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lipsync.blocks import config_from_dict


@dataclass
class SyncNetConfig:
    n_frames: int = 16  # T video frames per window (25 fps)
    crop_size: int = 256  # S: the visual input is the lower half of an S x S crop, (S/2, S)
    n_mels: int = 80
    mel_per_frame: int = 4  # 100 mel frames/s / 25 video frames/s; other rates resample to 25 fps (or 100 / fps)
    visual_channels: tuple = (64, 128, 256, 256, 512, 1024, 2048, 2048)
    visual_factors: tuple = ((1, 2), 2, 2, 2, 2, 2, 2, 2)  # (h, w) or int stride per stage; 1 = no downsample
    audio_channels: tuple = (32, 64, 128, 256, 512, 1024, 2048)
    audio_factors: tuple = (2, 2, 2, 1, 2, 2, 2)  # (80, 64) at T = 16: 40x32, 20x16, 10x8, 10x8, 5x4, 2x2, 1x1
    visual_stem: int = 1  # stride of conv_in; the tiny preset uses 2 to stay fast on CPU
    audio_stem: int = 1
    norm_groups: int = 32

    @property
    def embed_dim(self) -> int:
        return self.visual_channels[-1]

    @property
    def mel_frames(self) -> int:
        return self.n_frames * self.mel_per_frame

    @classmethod
    def tiny(cls) -> "SyncNetConfig":
        """5 frames of 32x64 lower halves of 64x64 crops, mel (80, 20), 128-d embeddings; 1.0 M params.
        Visual 32x64 -> 16x32 (stride-2 stem) -> 16x16 -> 8 -> 4 -> 2 -> 1.
        Audio 80x20 -> 40x10 (stride-2 stem) -> 20x5 -> 10x5 -> 5x2 -> 2x1 -> 1x1."""
        return cls(
            n_frames=5, crop_size=64,
            visual_channels=(8, 16, 32, 64, 128), visual_factors=((1, 2), 2, 2, 2, 2), visual_stem=2,
            audio_channels=(8, 16, 32, 64, 128), audio_factors=(2, (2, 1), 2, 2, (2, 1)), audio_stem=2,
            norm_groups=4,
        )


def _pair(f) -> tuple[int, int]:
    return (f, f) if isinstance(f, int) else tuple(f)


def _down_size(n: int, k: int) -> int:
    """Length after `StridedConv` with stride k (pad 0 before / 1 after, kernel 3); k = 1 keeps n."""
    return n if k == 1 else (n - 2) // k + 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class StridedConv(nn.Module):
    """3x3 conv with stride (kh, kw); a strided axis is zero-padded (0, 1), an unstrided one (1, 1)."""

    def __init__(self, channels: int, factor):
        super().__init__()
        kh, kw = _pair(factor)
        self.pad = (1, 1) if kw == 1 else (0, 1)
        self.pad += (1, 1) if kh == 1 else (0, 1)
        self.conv = nn.Conv2d(channels, channels, 3, stride=(kh, kw))

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class Tower(nn.Module):
    """(B, C_in, H, W) -> (B, channels[-1]): conv_in, then per stage a ResNet block and an optional strided 3x3
    downsample, then GroupNorm + ReLU; the given strides must bring H x W down to exactly 1 x 1."""

    def __init__(self, in_channels: int, size: tuple[int, int], channels, factors, groups: int, stem=1):
        super().__init__()
        assert len(channels) == len(factors), "one downsample factor per stage"
        sh, sw = _pair(stem)
        h, w = -(-size[0] // sh), -(-size[1] // sw)
        for kh, kw in map(_pair, factors):
            h, w = _down_size(h, kh), _down_size(w, kw)
        if (h, w) != (1, 1):
            raise ValueError(f"tower input {size} ends at {h}x{w}, not 1x1: adjust the stem and downsample factors")
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, stride=(sh, sw), padding=1)
        blocks, c = [], channels[0]
        for cout, f in zip(channels, factors):
            blocks.append(ResBlock(c, cout, groups))
            if _pair(f) != (1, 1):
                blocks.append(StridedConv(cout, f))
            c = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(groups, c, eps=1e-6)

    def forward(self, x):
        x = self.blocks(self.conv_in(x))  # (B, C_in, H, W) -> (B, D, 1, 1)
        return F.relu(self.norm_out(x)).flatten(1)


class SyncNet(nn.Module):
    """Two towers to L2-normalised embeddings, visual (B, 3T, S/2, S) -> (B, D) and audio (B, 1, 80, 4T) -> (B, D);
    the score is their cosine similarity, in [0, 1] because of the towers' final ReLU."""

    def __init__(self, config: SyncNetConfig):
        super().__init__()
        self.config = c = config
        self.visual = Tower(3 * c.n_frames, (c.crop_size // 2, c.crop_size), c.visual_channels,
                            c.visual_factors, c.norm_groups, c.visual_stem)
        self.audio = Tower(1, (c.n_mels, c.mel_frames), c.audio_channels, c.audio_factors, c.norm_groups,
                           c.audio_stem)
        assert c.visual_channels[-1] == c.audio_channels[-1], "both towers must end at the embedding size"

    def embed_visual(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, S/2, S) lower halves in [-1, 1] -> (B, D) unit vectors."""
        c = self.config
        expected = (c.n_frames, 3, c.crop_size // 2, c.crop_size)
        if tuple(frames.shape[1:]) != expected:
            raise ValueError(f"frames must be (B, {expected}), got {tuple(frames.shape)}")
        x = frames.reshape(frames.shape[0], -1, *expected[2:])  # (B, T, 3, h, w) -> (B, 3T, h, w)
        return F.normalize(self.visual(x), dim=-1)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, 4T) -> (B, D) unit vectors. The mel is `lipsync.melspec.log_mel(wave, dynamic_floor=False)`
        at 100 frames/s (LatentSync reads a Wav2Lip mel, 80 x 52 for 16 frames): at 25 fps video frame f owns mel
        frames [4f, 4f + 4), and T frames from f0 pair with mel[:, 4 f0 : 4 (f0 + T)]."""
        c = self.config
        if tuple(mel.shape[1:]) != (c.n_mels, c.mel_frames):
            raise ValueError(f"mel must be (B, {c.n_mels}, {c.mel_frames}), got {tuple(mel.shape)}")
        return F.normalize(self.audio(mel.unsqueeze(1)), dim=-1)

    def forward(self, frames: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B,) in [0, 1] between each frames window and its mel window."""
        return (self.embed_visual(frames) * self.embed_audio(mel)).sum(-1)


def syncnet_from_entry(entry, where: str) -> SyncNet:
    """A checkpoint's SyncNet in eval mode, frozen: {"config": dict, "state": state dict} (train.py's layout) or a bare
    state dict (then the tiny or default preset whose shapes fit)."""
    if isinstance(entry, dict) and "state" in entry and "config" in entry:
        net = SyncNet(config_from_dict(SyncNetConfig, entry["config"]))
        net.load_state_dict(entry["state"])
        return net.eval().requires_grad_(False)
    for cfg in (SyncNetConfig.tiny(), SyncNetConfig()):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in SyncNet(cfg).state_dict().items()}
        if shapes.keys() == entry.keys() and all(shapes[k] == entry[k].shape for k in shapes):
            net = SyncNet(cfg)
            net.load_state_dict(entry)
            return net.eval().requires_grad_(False)
    raise ValueError(f"{where}: SyncNet weights fit neither the tiny nor the default config and carry no config")


def load_syncnet(path: str) -> SyncNet | None:
    """SyncNet from a lipsync.pt (its "syncnet" entry) or a syncnet.final.pt; None when the file holds none."""
    entry = read_syncnet_entry(path)
    return None if entry is None else syncnet_from_entry(entry, path)


def read_syncnet_entry(path: str) -> dict | None:
    """The SyncNet entry as stored, {"config", "state"} or a bare state dict, of a lipsync.pt (its "syncnet" entry)
    or a syncnet.final.pt; None when the file holds none."""
    if not os.path.isfile(path):
        raise ValueError(f"SyncNet file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    return obj.get("syncnet") if "format" in obj else obj


def lower_half(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3, S, S) -> (..., 3, S/2, S): the rows the UNet inpaints."""
    return frames[..., frames.shape[-2] // 2:, :]


# ----------------------------------------------------------------------------- losses


def _bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F.binary_cross_entropy in float32 outside autocast (which refuses it); p is clamped to [0, 1]."""
    with torch.autocast(p.device.type, enabled=False):
        return F.binary_cross_entropy(p.float().clamp(0, 1), y.float())


def sync_loss(syncnet: SyncNet, frames_lower: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    """MuseTalk's generator sync term: BCE(clamp(cos, 0, 1), 1) = mean(-log cos). Freeze syncnet yourself
    (`requires_grad_(False)`); gradients still flow to frames_lower (B, T, 3, S/2, S)."""
    cos = syncnet(frames_lower, mel)
    return _bce(cos, torch.ones_like(cos))


def syncnet_bce(syncnet: SyncNet, frames: torch.Tensor, mel: torch.Tensor, labels: torch.Tensor,
                return_cos: bool = False):
    """SyncNet training objective (LatentSync): BCE between cos and labels (kB,), 1 = in sync, 0 = shifted.
    frames (B, T, 3, S/2, S) are embedded once; mel (kB, 80, 4T) may hold k windows per clip: row j pairs with
    frames[j % B] (the layout `sync_pairs` returns). return_cos=True also returns the detached cosines (kB,),
    e.g. for accuracy = ((cos > 0.5) == labels).mean(), without a second forward pass.

    The learning rate matters. Tiny preset on synthetic clips, batch 32, AdamW betas (0.5, 0.999), 500 steps: lr 1e-4
    and 3e-4 reach ~0.8 held-out pair accuracy and find the true offset on every held-out clip; lr 1e-3 swings the
    mean cosine from batch to batch and collapses within ~10 steps to a constant cos = 0.5 (loss 0.693) it never
    leaves."""
    v, a = syncnet.embed_visual(frames), syncnet.embed_audio(mel)
    k, rem = divmod(a.shape[0], v.shape[0])
    if rem:
        raise ValueError(f"mel batch {a.shape[0]} is not a multiple of frames batch {v.shape[0]}")
    cos = (v.repeat(k, 1) * a).sum(-1)
    loss = _bce(cos, labels)
    return (loss, cos.detach()) if return_cos else loss


def sync_pairs(frames: torch.Tensor, mel: torch.Tensor, n_frames: int, mel_per_frame: int = 4,
               min_shift: int = 2, generator: torch.Generator | None = None):
    """Positive and negative pairs from one batch.

    frames (B, T, 3, S/2, S); mel (B, 80, m*(T + 2c)) covers the T frames plus c frames of context on each side
    (c = 0 is allowed). Positives pair frames with the centre mel window. Negatives pair the same frames with the
    same clip's mel shifted by k frames, min_shift <= |k| <= c, k uniform; when c < min_shift they use the next
    sample's centre window instead (batch roll, needs B >= 2).
    Returns frames (B, ...) unchanged, mel (2B, 80, m*T) = [positives; negatives], labels (2B,) = [1]*B + [0]*B,
    ready for `syncnet_bce(syncnet, *sync_pairs(...))`.
    """
    B, m, T = frames.shape[0], mel_per_frame, n_frames
    ctx, rem = divmod(mel.shape[-1] // m - T, 2)
    if mel.shape[-1] % m or ctx < 0 or rem:
        raise ValueError(f"mel length {mel.shape[-1]} is not {m}*(T + 2c) for T={T}")
    pos = mel[..., m * ctx:m * (ctx + T)]
    if ctx >= min_shift:
        mag = torch.randint(min_shift, ctx + 1, (B,), generator=generator)
        sign = torch.randint(0, 2, (B,), generator=generator) * 2 - 1
        start = m * (ctx + sign * mag)  # (B,) first mel frame of each negative window
        idx = start[:, None] + torch.arange(m * T)  # (B, mT)
        neg = mel.gather(-1, idx[:, None, :].expand(-1, mel.shape[1], -1).to(mel.device))
    else:
        if B < 2:
            raise ValueError("batch-roll negatives need B >= 2 (or give mel context >= min_shift)")
        neg = pos.roll(1, dims=0)
    labels = torch.cat([torch.ones(B), torch.zeros(B)]).to(frames.device)
    return frames, torch.cat([pos, neg]), labels


# ----------------------------------------------------------------------------- evaluation


@dataclass
class SyncOffsets:
    offsets: torch.Tensor  # (2K+1,) audio shift in video frames, -K..K
    dists: torch.Tensor  # (2K+1,) mean L2 distance between unit embeddings at each offset
    best_offset: int  # argmin; positive = audio lags video (frame f's sound sits at frame f + offset)
    min_dist: float  # LSE-D-like: distance at best_offset
    confidence: float  # LSE-C-like: median(dists) - min_dist


@torch.no_grad()
def sync_offsets(syncnet: SyncNet, frames: torch.Tensor, mel: torch.Tensor, max_offset: int = 15,
                 batch_size: int = 64) -> SyncOffsets:
    """Slide the clip's audio against its video (SyncNet-eval style).

    frames (N, 3, S/2, S) lower halves of the whole clip in [-1, 1]; mel (80, >= m*N) its log-mel. Every window of
    T frames starting at i is embedded, as is every mel window starting at frame j; the distance at offset o is the
    mean over all valid i of |v_i - a_{i+o}| (unit embeddings, so 0..2). Offsets are limited to the windows present.
    Distances are not on the scale of the original SyncNet's LSE-D/LSE-C; compare them only between our own models.
    """
    c = syncnet.config
    T, m, N = c.n_frames, c.mel_per_frame, frames.shape[0]
    W = N - T + 1
    if W < 1 or mel.shape[-1] < m * N:
        raise ValueError(f"need >= {T} frames and mel >= {m}*N frames, got {N} and {mel.shape[-1]}")
    device = next(syncnet.parameters(), torch.empty(0)).device
    vis, aud = [], []
    for s in range(0, W, batch_size):
        idx = torch.arange(s, min(s + batch_size, W))
        vis.append(syncnet.embed_visual(torch.stack([frames[i:i + T] for i in idx]).to(device)))
        aud.append(syncnet.embed_audio(torch.stack([mel[:, m * i:m * (i + T)] for i in idx]).to(device)))
    v, a = torch.cat(vis).float().cpu(), torch.cat(aud).float().cpu()  # (W, D) each
    K = min(max_offset, W - 1)
    offsets = torch.arange(-K, K + 1)
    dists = torch.stack([(v[max(0, -o):W - max(0, o)] - a[max(0, o):W - max(0, -o)]).norm(dim=-1).mean()
                         for o in offsets.tolist()])
    best = int(dists.argmin())
    return SyncOffsets(offsets, dists, int(offsets[best]), float(dists[best]),
                       float(dists.median() - dists[best]))
