"""SyncNet towers, losses, pair building and offset search (lipsync/syncnet.py)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipsync.training.syncnet import (SyncNet, SyncNetConfig, lower_half, sync_loss, sync_offsets, sync_pairs,
                             syncnet_bce)


def toy_clip(signal: torch.Tensor, shift: int = 0, size: int = 64, noise: float = 0.05, seed: int = 0):
    """Frames whose lower-half brightness follows `signal` (N,) and a mel (80, 4N) whose energy follows the same
    signal delayed by `shift` frames (audio of frame f sits at frame f + shift)."""
    g = torch.Generator().manual_seed(seed)
    N = signal.shape[0]
    frames = torch.rand(N, 3, size, size, generator=g) * 0.2 - 0.6
    frames[:, :, size // 2:] += signal.view(N, 1, 1, 1)
    audio = torch.roll(signal, shift)
    mel = audio.repeat_interleave(4).view(1, -1) * torch.linspace(0.5, 1.5, 80).view(80, 1) - 1
    mel = mel + noise * torch.randn(80, 4 * N, generator=g)
    return frames, mel


def smooth_signal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 4, generator=g)
    return F.avg_pool1d(x.view(1, 1, -1), 5, 1).view(-1).clamp(-1, 1)


def test_default_config_has_latentsync_tower_sizes():
    c = SyncNetConfig()
    assert (3 * c.n_frames, c.crop_size // 2, c.crop_size) == (48, 128, 256)
    assert (c.n_mels, c.mel_frames) == (80, 64) and c.embed_dim == 2048
    assert SyncNetConfig.tiny().embed_dim == 128


def test_tiny_syncnet_embeddings_are_unit_vectors_and_cosine_in_unit_interval():
    torch.manual_seed(0)
    net = SyncNet(SyncNetConfig.tiny())
    frames, mel = torch.randn(3, 5, 3, 32, 64), torch.randn(3, 80, 20)
    v, a = net.embed_visual(frames), net.embed_audio(mel)
    assert v.shape == a.shape == (3, 128)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    cos = net(frames, mel)
    assert cos.shape == (3,) and (cos >= 0).all() and (cos <= 1 + 1e-6).all()
    torch.testing.assert_close(cos, F.cosine_similarity(v, a))


def test_wrong_input_shapes_raise():
    net = SyncNet(SyncNetConfig.tiny())
    with pytest.raises(ValueError):
        net.embed_visual(torch.randn(2, 4, 3, 32, 64))
    with pytest.raises(ValueError):
        net.embed_audio(torch.randn(2, 80, 16))
    with pytest.raises(ValueError):
        SyncNet(SyncNetConfig(n_frames=5, crop_size=64))  # default strides don't reach 1x1 on 32x64


def test_lower_half_takes_bottom_rows():
    x = torch.arange(8.0).view(1, 1, 8, 1).expand(2, 3, 8, 8)
    assert lower_half(x).shape == (2, 3, 4, 8) and lower_half(x)[0, 0, 0, 0] == 4


def test_sync_loss_is_minus_log_cosine_and_reaches_frames():
    torch.manual_seed(0)
    net = SyncNet(SyncNetConfig.tiny()).requires_grad_(False)
    frames = torch.randn(4, 5, 3, 32, 64, requires_grad=True)
    mel = torch.randn(4, 80, 20)
    loss = sync_loss(net, frames, mel)
    torch.testing.assert_close(loss, -net(frames, mel).clamp(0, 1).log().mean())
    loss.backward()
    assert frames.grad.abs().sum() > 0


def test_sync_pairs_negatives_are_same_clip_windows_shifted_by_at_least_min_shift():
    B, T, m, ctx = 6, 5, 4, 3
    frames = torch.randn(B, T, 3, 32, 64)
    t = torch.arange(m * (T + 2 * ctx), dtype=torch.float32)
    mel = (t + 1000 * torch.arange(B).view(B, 1)).view(B, 1, -1).expand(B, 80, -1)  # value = time + 1000 * clip
    f, pm, labels = sync_pairs(frames, mel, T, m, min_shift=2, generator=torch.Generator().manual_seed(0))
    assert f is frames and pm.shape == (2 * B, 80, m * T)
    assert labels.tolist() == [1.0] * B + [0.0] * B
    torch.testing.assert_close(pm[:B, 0, 0], m * ctx + 1000 * torch.arange(B, dtype=torch.float32))
    start = pm[B:, 0, 0] - 1000 * torch.arange(B)  # first mel frame of each negative, in its own clip
    shift = (start - m * ctx) / m
    assert ((shift.abs() >= 2) & (shift.abs() <= ctx)).all() and (shift == shift.round()).all()
    torch.testing.assert_close(pm[B:, 0] - pm[B:, 0, :1], pm[:B, 0] - pm[:B, 0, :1])  # contiguous windows


def test_sync_pairs_without_context_rolls_the_batch():
    frames, mel = torch.randn(3, 5, 3, 32, 64), torch.randn(3, 80, 20)
    _, pm, _ = sync_pairs(frames, mel, 5)
    torch.testing.assert_close(pm[3:], mel.roll(1, 0))


def test_syncnet_bce_drops_on_a_fixed_toy_batch():
    torch.manual_seed(0)
    T, ctx, B = 5, 3, 8
    sig = smooth_signal(200, seed=1)
    frames, mel = toy_clip(sig)
    starts = torch.arange(ctx, 200 - T - ctx, 11)[:B]
    fb = lower_half(torch.stack([frames[s:s + T] for s in starts]))  # (B, T, 3, 32, 64)
    mb = torch.stack([mel[:, 4 * (s - ctx):4 * (s + T + ctx)] for s in starts])  # (B, 80, 4 (T + 2 ctx))
    batch = sync_pairs(fb, mb, T, generator=torch.Generator().manual_seed(0))
    net = SyncNet(SyncNetConfig.tiny())
    opt = torch.optim.Adam(net.parameters(), 3e-4)
    losses = []
    for _ in range(15):
        loss = syncnet_bce(net, *batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    loss, cos = syncnet_bce(net, *batch, return_cos=True)
    assert loss.item() < 0.5 * losses[0]
    torch.testing.assert_close(cos, net(batch[0].repeat(2, 1, 1, 1, 1), batch[1]))
    assert ((cos > 0.5).float() == batch[2]).float().mean() > 0.9


class HandSync(nn.Module):
    """Known-answer stand-in: embeddings are the centred, normalised per-frame brightness / mel energy."""

    config = SimpleNamespace(n_frames=5, mel_per_frame=4)

    def embed_visual(self, frames):  # (B, T, 3, h, w) -> (B, T)
        return F.normalize(frames.mean((2, 3, 4)) - frames.mean((1, 2, 3, 4)).view(-1, 1), dim=-1)

    def embed_audio(self, mel):  # (B, 80, 4T) -> (B, T)
        e = mel.mean(1).view(mel.shape[0], -1, 4).mean(-1)
        return F.normalize(e - e.mean(1, keepdim=True), dim=-1)


@pytest.mark.parametrize("shift", [0, 3, -4])
def test_sync_offsets_finds_known_shift(shift):
    sig = smooth_signal(80, seed=2)
    frames, mel = toy_clip(sig, shift=shift, size=8, noise=0.0)
    res = sync_offsets(HandSync(), frames, mel, max_offset=6)
    assert res.offsets.tolist() == list(range(-6, 7))
    assert res.best_offset == shift
    assert res.min_dist < 0.05 and res.confidence > 0.5


def test_sync_offsets_limits_offsets_to_available_windows():
    frames, mel = toy_clip(smooth_signal(8, seed=3), size=8, noise=0.0)
    res = sync_offsets(HandSync(), frames, mel, max_offset=15)  # only 4 windows of 5 frames
    assert res.offsets.tolist() == [-3, -2, -1, 0, 1, 2, 3]
