"""Realtime audio: 16 kHz mono chunks of any size in, the per-frame windows of lipsync.windows out, as soon as each
frame's audio has arrived.

`WindowStream` keeps three short buffers -- the wave not yet cut into mel frames, the mel not yet encoded, and the
features that later frames still need -- and matches offline encoding to float rounding: the mel frames are
whisper's, reflect-padded at the file's start and end, and each new stretch of features is encoded with
`encoder.context` steps of mel on either side, which makes it equal the whole file's encoding (lipsync.mel_encoder).
pipeline.stream_windows and stream_frames use it; only MelEncoder checkpoints stream.
"""

import math

import torch

from .audio import SAMPLE_RATE
from .melspec import HOP, N_FFT, log_mel_frames
from .windows import gather_windows, window_layout, window_start

__all__ = ["WindowStream"]


class WindowStream:
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
        out = gather_windows(self.feats, self.feat_at, frames, self.fps, self.left, self.right, total)
        self.frames_done = upto
        keep = min(max(self.feat_at, self._start(upto)), self.feat_done)
        self.feats, self.feat_at = self.feats[:, keep - self.feat_at:], keep
        return out
