"""Per-frame audio windows: encoder features at 50 steps/s -> one window of audio features per video frame.

The words, one per concept, along the audio path:
    wave      16 kHz mono float32 (samples,)               lipsync.audio.load_audio
    features  (1, L, T, D), T steps at 50/s, L states      encoder.encode(wave): MelEncoder or WhisperEncoder
    window    (n * L, D): the features of one video frame  this module; n = 10 steps at 25 fps
    tokens    window + sinusoidal position code            PositionalEncoding, added in LipSync.forward

This is MuseTalk v1.5's per-frame windowing (docs/musetalk.md §4): frame f at `fps` takes the n = ceil(50 / fps) *
(left + right + 1) steps starting at floor(f * 50 / fps) - ceil(50 / fps) * left -- [2f - 4, 2f + 6) at 25 fps --
zero-padded outside the file, flattened time-major then layer (row = L * t + layer). What returns windows, from what:
    frame_windows(features, n_frames, ...)      frames 0 .. n_frames - 1, from a whole file's features
    gather_windows(features, first, frames..)   any frames, from features of steps [first, ...): the rule itself
    span_windows(encoder, mel_spans, ...)       training: one frame each, from mel spans cut around it
    LipSync.audio_windows(wave, n_frames, fps)  inference: from a whole wave (encode, then frame_windows)
    streaming.WindowStream                      realtime: from audio arriving in chunks (pipeline.stream_windows)
    training.steps.batch_windows(model, batch)  a training batch's (span_windows, or precomputed whisper windows)
"""

import math

import torch
import torch.nn as nn

from .audio import SAMPLE_RATE
from .melspec import HOP

__all__ = ["window_layout", "window_start", "gather_windows", "gather_steps", "frame_windows", "steady_windows",
           "span_windows", "PositionalEncoding"]

STEPS_PER_SECOND = SAMPLE_RATE // (2 * HOP)  # 50


def window_layout(fps, left=2, right=2):
    """(steps per window n, steps of left padding) for frames at `fps`."""
    k = math.ceil(STEPS_PER_SECOND / fps)
    return k * (left + right + 1), k * left


def window_start(frames, fps, left=2, layout_fps=None) -> torch.Tensor:
    """Video frame index/indices -> the first 50 Hz step of each one's window (LongTensor, negative near the start):
    floor(f * 50 / fps) - ceil(50 / layout_fps) * left, i.e. 2f - 4 at 25 fps. layout_fps: the rate whose window
    layout is used (default fps; steady_windows uses 25's at any rate)."""
    lead = window_layout(fps if layout_fps is None else layout_fps, left)[1]
    return torch.floor(torch.as_tensor(frames, dtype=torch.float64) * STEPS_PER_SECOND / fps).long() - lead


def gather_windows(features, first, frames, fps, left, right, total):
    """Windows (F, n * L, D) of `frames` from features (L, S, D) holding steps [first, first + S); zero outside
    [0, total)."""
    return gather_steps(features, first, window_start(frames, fps, left), window_layout(fps, left, right)[0], total)


def gather_steps(features, first, starts, n, total):
    """Windows (F, n * L, D) of the n steps from each of `starts` (F,) out of features (L, S, D) holding steps
    [first, first + S); zero outside [0, total)."""
    L, S, D = features.shape
    idx = (starts[:, None] + torch.arange(n)).to(features.device)  # (F, n) absolute steps
    if S == 0:
        return features.new_zeros(len(starts), n * L, D)
    rows = features[:, (idx - first).clamp(0, S - 1)]  # (L, F, n, D)
    rows = rows.masked_fill(~((idx >= 0) & (idx < total))[..., None], 0)
    return rows.permute(1, 2, 0, 3).reshape(len(starts), n * L, D)  # row = L * t + layer


def steady_windows(features, n_frames, fps, left=2, right=2):
    """The 25 fps window layout at any frame rate: features (L, T, D) or (1, L, T, D) -> (n_frames, 10 L, D), frame f
    taking the 10 steps from floor(f * 50 / fps) - 4. Equal to frame_windows at 25 fps (and wherever ceil(50 / fps)
    is 2, e.g. 30 fps); below 25 fps frame_windows' windows grow (15 steps at 20 fps, 25 at 10), so a read-out fitted
    on 25 fps windows (the opening head, lipsync.opening) reads these instead."""
    feats = features[0] if features.ndim == 4 else features
    starts = window_start(torch.arange(n_frames), fps, left, layout_fps=25)
    return gather_steps(feats, 0, starts, window_layout(25, left, right)[0], feats.shape[1])


def frame_windows(features, n_frames, fps=25, left=2, right=2):
    """Per-frame windows of a whole file: features (L, T, D) or (1, L, T, D) -> (n_frames, n * L, D), n = 10 at 25 fps.

    n_frames is floor(seconds * fps) for the clip; steps outside [0, T) are zeros.
    """
    feats = features[0] if features.ndim == 4 else features
    return gather_windows(feats, 0, torch.arange(n_frames), fps, left, right, feats.shape[1])


def span_windows(encoder, mel_spans, context, n):
    """Training: mel spans (B, 80, 2 * (n + 2 * context)) -> windows (B, n * L, dim) of their middle n steps.

    With context >= encoder.context each row equals the matching frame_windows row of the whole-file encoding
    (away from the file's ends, where the span's fill differs from the encoder's zero padding).
    """
    feats = encoder(mel_spans)  # (B, L, n + 2c, dim)
    assert feats.shape[2] == n + 2 * context, f"spans give {feats.shape[2]} steps, expected {n + 2 * context}"
    B, L, _, D = feats.shape
    return feats[:, :, context: context + n].transpose(1, 2).reshape(B, n * L, D)


class PositionalEncoding(nn.Module):
    """Windows x (B, N, d) -> tokens x + sinusoidal PE: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...).
    No parameters."""

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
