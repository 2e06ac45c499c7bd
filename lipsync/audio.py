"""Audio conditioning for the UNet: 50 steps/s encoder features -> per-video-frame windows of tokens.

The features come from `whisper` (weight-compatible whisper-tiny encoder) or `mel_encoder` (our tiny convolutional
encoder), both reading `melspec.log_mel` (loading, resampling, whisper log-mel). This module is MuseTalk v1.5's
per-frame windowing (docs/musetalk.md §4): frame f at `fps` takes the n = ceil(50 / fps) *
(left + right + 1) steps starting at floor(f * 50 / fps) - ceil(50 / fps) * left -- [2f - 4, 2f + 6) at 25 fps --
zero-padded outside the file, flattened time-major then layer (row = L * t + layer); the sinusoidal
PositionalEncoding added to those tokens; and MelStream, which produces the same windows from audio arriving in chunks.
"""

import math

import torch
import torch.nn as nn

from .melspec import HOP, N_FFT, SAMPLE_RATE, log_mel_frames

__all__ = ["window_layout", "window_start", "frame_windows", "encode_windows", "PositionalEncoding", "MelStream"]

STEPS_PER_SECOND = SAMPLE_RATE // (2 * HOP)  # 50


def window_layout(fps, left=2, right=2):
    """(steps per window n, steps of left padding) for frames at `fps`."""
    k = math.ceil(STEPS_PER_SECOND / fps)
    return k * (left + right + 1), k * left


def window_start(frames, fps, left=2) -> torch.Tensor:
    """Video frame index/indices -> the first 50 Hz step of each one's window (LongTensor, negative near the start):
    floor(f * 50 / fps) - ceil(50 / fps) * left, i.e. 2f - 4 at 25 fps."""
    lead = window_layout(fps, left)[1]
    return torch.floor(torch.as_tensor(frames, dtype=torch.float64) * STEPS_PER_SECOND / fps).long() - lead


def _windows(feats, first, frames, fps, left, right, total):
    """Windows (F, n * L, D) of `frames` from feats (L, S, D) holding steps [first, first + S); zero outside [0, total)."""
    n = window_layout(fps, left, right)[0]
    L, S, D = feats.shape
    starts = window_start(frames, fps, left)
    idx = (starts[:, None] + torch.arange(n)).to(feats.device)  # (F, n) absolute steps
    if S == 0:
        return feats.new_zeros(len(frames), n * L, D)
    rows = feats[:, (idx - first).clamp(0, S - 1)]  # (L, F, n, D)
    rows = rows.masked_fill(~((idx >= 0) & (idx < total))[..., None], 0)
    return rows.permute(1, 2, 0, 3).reshape(len(frames), n * L, D)  # row = L * t + layer


def frame_windows(features, n_frames, fps=25, left=2, right=2):
    """Per-frame token windows: features (L, T, D) or (1, L, T, D) -> (n_frames, n * L, D), n = 10 at 25 fps.

    n_frames is floor(seconds * fps) for the clip; steps outside [0, T) are zeros.
    """
    feats = features[0] if features.ndim == 4 else features
    return _windows(feats, 0, torch.arange(n_frames), fps, left, right, feats.shape[1])


def encode_windows(encoder, mel_spans, context, n):
    """Training helper: mel spans (B, 80, 2 * (n + 2 * context)) -> tokens (B, n * L, dim) of their middle n steps.

    With context >= encoder.context each row equals the matching frame_windows row of the whole-file encoding
    (away from the file's ends, where the span's fill differs from the encoder's zero padding).
    """
    feats = encoder(mel_spans)  # (B, L, n + 2c, dim)
    assert feats.shape[2] == n + 2 * context, f"spans give {feats.shape[2]} steps, expected {n + 2 * context}"
    B, L, _, D = feats.shape
    return feats[:, :, context: context + n].transpose(1, 2).reshape(B, n * L, D)


class PositionalEncoding(nn.Module):
    """x (B, N, d) + sinusoidal PE: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...). No parameters."""

    def __init__(self, d_model=384, max_len=5000):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)
        self.register_buffer("pe", pe.float(), persistent=False)

    def forward(self, x):
        return x + self.pe[: x.shape[-2]].to(x.dtype)


class MelStream:
    """Realtime front end: 16 kHz mono chunks of any size -> the windows of every frame whose audio is complete.

    `push(chunk)` returns (k, n * L, dim) for the next k frames (k may be 0); `finish()` returns the remaining frames,
    padded at the end exactly as offline encoding pads. Concatenated, they equal
    frame_windows(encoder.encode(whole_wave), floor(seconds * fps), fps, left, right). A frame is ready once the
    mel frames of its window plus the encoder's context have arrived: about 0.2 s after the frame's time at 25 fps.
    Only a few hundred ms of audio, mel and features are kept.
    """

    def __init__(self, encoder, fps=25.0, left=2, right=2):
        self.encoder, self.fps, self.left, self.right = encoder, fps, left, right
        self.n = window_layout(fps, left, right)[0]
        self.wave = torch.zeros(0, dtype=torch.float64)  # samples [wave_at, received)
        self.mel = torch.zeros(encoder.cfg.n_mels, 0)  # mel frames [mel_at, mel_at + width)
        self.feats = torch.zeros(encoder.n_states, 0, encoder.dim)  # steps [feat_at, feat_at + width)
        self.received = self.wave_at = self.mel_at = self.feat_at = self.frames_done = 0

    @property
    def mel_done(self):
        return self.mel_at + self.mel.shape[1]

    @property
    def feat_done(self):
        return self.feat_at + self.feats.shape[1]

    def push(self, chunk):
        chunk = torch.as_tensor(chunk).reshape(-1).to(torch.float64)
        self.wave = torch.cat([self.wave, chunk])
        self.received += len(chunk)
        half = N_FFT // 2
        if self.received > half:  # frame j is final once samples up to 160 j + 200 are in
            self._add_mel((self.received - half) // HOP + 1, end=False)
        self._add_steps(self.mel_done // 2 - self.encoder.context, total=self.mel_done // 2)
        ready, upto = math.floor(self.received / SAMPLE_RATE * self.fps), self.frames_done
        while upto < ready and self._start(upto) + self.n <= self.feat_done:
            upto += 1
        return self._emit(upto, total=float("inf"))

    def finish(self):
        if self.received <= N_FFT // 2:
            raise ValueError(f"audio too short for log_mel: {self.received} samples, need > {N_FFT // 2}")
        self._add_mel(self.received // HOP, end=True)
        steps = self.received // (2 * HOP)
        self._add_steps(steps, total=steps)
        return self._emit(math.floor(self.received / SAMPLE_RATE * self.fps), total=steps)

    def _start(self, frame):
        return int(window_start(frame, self.fps, self.left))

    def _add_mel(self, upto, end):
        """Mel frames [mel_done, upto) from the wave buffer, reflect-padded at the file's start (and end)."""
        j0, half = self.mel_done, N_FFT // 2
        if upto <= j0:
            return
        seg, seg_at = self.wave, self.wave_at
        if seg_at == 0:
            seg, seg_at = torch.cat([seg[1: half + 1].flip(0), seg]), -half
        if end:
            seg = torch.cat([seg, self.wave[-half - 1: -1].flip(0)])
        lo = HOP * j0 - half - seg_at
        mel = (log_mel_frames(seg[lo: lo + HOP * (upto - j0 - 1) + N_FFT]) + 4.0) / 4.0
        self.mel = torch.cat([self.mel, mel.float()], dim=1)
        keep = max(0, HOP * upto - half)  # first sample the next frame needs
        self.wave, self.wave_at = self.wave[keep - self.wave_at:], keep

    @torch.no_grad()
    def _add_steps(self, upto, total):
        """Encoder steps [feat_done, upto), encoding a span with `context` steps each side (or up to the end)."""
        s0, c = self.feat_done, self.encoder.context
        if upto <= s0:
            return
        a, b = max(0, s0 - c), min(upto + c, total)
        p = next(self.encoder.parameters())
        span = self.mel[:, 2 * a - self.mel_at: 2 * b - self.mel_at]
        feats = self.encoder(span[None].to(p.device, p.dtype))[0].float().cpu()  # (L, b - a, dim)
        self.feats = torch.cat([self.feats, feats[:, s0 - a: upto - a]], dim=1)
        keep = max(0, upto - c)
        self.mel, self.mel_at = self.mel[:, 2 * keep - self.mel_at:], 2 * keep

    def _emit(self, upto, total):
        frames = torch.arange(self.frames_done, upto)
        out = _windows(self.feats, self.feat_at, frames, self.fps, self.left, self.right, total)
        self.frames_done = upto
        keep = min(max(self.feat_at, self._start(upto)), self.feat_done)
        self.feats, self.feat_at = self.feats[:, keep - self.feat_at:], keep
        return out
