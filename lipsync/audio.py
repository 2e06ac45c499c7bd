"""Audio loading: any audio file (or array) -> the 16 kHz mono float32 wave everything downstream reads.

`load_audio` reads wav/flac/ogg with soundfile and everything else (mp4, m4a, mp3, ...) through the ffmpeg binary
that imageio-ffmpeg ships, which only decodes (to float WAV on a pipe, native rate and channels). Channels are
averaged and resampling is our own Kaiser-windowed sinc in polyphase form (`resample`), whatever the source.
`frame_envelope` and `runs_at_least` read loudness per video frame (pauses in the speech: lipsync.opening, the
evaluation tools). Next along the audio path: lipsync.melspec (wave -> whisper log-mel), lipsync.mel_encoder / lipsync.whisper
(log-mel -> features), lipsync.windows (features -> per-frame windows).
"""

import io
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
_FFMPEG_SUFFIXES = {".mp4", ".m4a", ".mp3", ".aac", ".mov", ".mkv", ".webm", ".avi", ".opus", ".wma"}

# ----------------------------------------------------------------------------- loading


def load_audio(source, sr=SAMPLE_RATE):
    """Mono float32 wave (samples,) at `sr` Hz from a file path, an array already at `sr`, or an (array, rate) pair.

    Arrays may be (samples,) or 2-D with channels on the shorter axis; integer arrays are scaled to [-1, 1).
    Channels are averaged. Raises FileNotFoundError / ValueError with the file's name on unusable input.
    """
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        wave, rate = _read_file(Path(source))  # (samples, channels)
    else:
        name = "audio array"
        array, rate = source if isinstance(source, tuple) else (source, sr)
        wave = _as_float(array)
        wave = wave[:, None] if wave.ndim == 1 else wave
        if wave.ndim != 2:
            raise ValueError(f"{name}: expected 1-D or 2-D audio, got shape {tuple(wave.shape)}")
        wave = wave.T if wave.shape[0] < wave.shape[1] else wave  # (channels, samples) -> (samples, channels)
    if wave.numel() == 0:
        raise ValueError(f"{name}: audio is empty")
    if not torch.isfinite(wave).all():
        raise ValueError(f"{name}: audio contains NaN or infinite samples")
    wave = wave.mean(dim=1)
    return resample(wave, int(rate), sr).float().contiguous()


def _as_float(array):
    array = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    if array.dtype == torch.uint8:
        return (array.float() - 128) / 128
    if not array.is_floating_point():
        return array.double() / 2 ** (8 * array.element_size() - 1)
    return array.float()


def _read_file(path):
    """(samples, channels) float tensor and its sample rate."""
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    if path.suffix.lower() not in _FFMPEG_SUFFIXES:
        try:
            return _soundfile_read(str(path))
        except RuntimeError:
            pass  # not a libsndfile format: let ffmpeg try
    return _ffmpeg_decode(path)


def _soundfile_read(file):
    data, rate = sf.read(file, dtype="float32", always_2d=True)
    return torch.from_numpy(data), rate


def _ffmpeg_decode(path):
    """Decode the first audio stream, keeping its rate and channels, to float WAV on a pipe."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0",
           "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        if any("matches no streams" in s for s in lines):
            raise ValueError(f"{path} has no audio stream (give the speech separately with --audio)")
        raise ValueError(f"{path}: cannot decode audio ({(lines or ['?'])[-1]})")
    try:
        return _soundfile_read(io.BytesIO(proc.stdout))
    except RuntimeError as e:
        raise ValueError(f"{path}: cannot decode audio ({e})") from None


# ----------------------------------------------------------------------------- resampling


def resample(wave, orig, new, zeros=64, rolloff=0.97, beta=8.6):
    """Band-limited resampling of (..., samples) from `orig` to `new` Hz; output length ceil(n * new / orig).

    Output sample k sits at input position k * down / up (down/up = orig/new reduced); it is the input convolved
    with a Kaiser-windowed sinc low-pass at rolloff * min(orig, new) / 2 reaching `zeros` zero crossings per side.
    Polyphase: each of the `up` output phases is one conv1d kernel applied with stride `down`.
    """
    if orig == new:
        return wave
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    fc = 0.5 * min(1.0, up / down) * rolloff  # cut-off, cycles per input sample
    half = zeros / (2 * fc)  # window half-width in input samples
    reach = math.ceil(half) + 1
    taps = torch.arange(-reach, reach + down, dtype=torch.float64)
    t = taps[None, :] - torch.arange(up, dtype=torch.float64)[:, None] * down / up  # (up, K) offsets
    window = torch.special.i0(beta * torch.sqrt((1 - (t / half) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64))
    kernel = 2 * fc * torch.sinc(2 * fc * t) * window * (t.abs() <= half)

    shape, n = wave.shape[:-1], wave.shape[-1]
    n_out = -(-n * up // down)
    n_q = -(-n_out // up)
    x = wave.reshape(-1, 1, n).to(torch.float64 if wave.dtype == torch.float64 else torch.float32)
    x = F.pad(x, (reach, max(0, (n_q - 1) * down + kernel.shape[1] - reach - n)))
    y = F.conv1d(x, kernel.to(x.dtype)[:, None, :], stride=down)  # (B, up, n_q)
    return y.transpose(1, 2).reshape(*shape, -1)[..., :n_out]


# ----------------------------------------------------------------------------- loudness per video frame


def delay(wave, seconds: float, sr=SAMPLE_RATE):
    """Play a wave (S,) `seconds` later (silence in front) or, negative, earlier (its start dropped); the end is left
    for the caller to fit. Re-syncs a recording whose sound runs ahead of (or behind) its picture."""
    shift = round(abs(seconds) * sr)
    wave = torch.as_tensor(wave)
    if seconds >= 0:
        return torch.cat([wave.new_zeros(shift), wave])
    return wave[shift:]


def frame_envelope(wave, n_frames, fps, sr=SAMPLE_RATE, span=0.04):
    """RMS of the audio in a `span`-second window centred on each video frame -> (n_frames,)."""
    c = (np.arange(n_frames) / fps * sr).astype(int)
    half = int(span * sr / 2)
    sq = np.concatenate([[0.0], np.cumsum(np.asarray(wave, np.float64) ** 2)])
    lo, hi = np.clip(c - half, 0, len(wave)), np.clip(c + half, 0, len(wave))
    return np.sqrt((sq[hi] - sq[lo]) / np.maximum(hi - lo, 1)).astype(np.float32)


def runs_at_least(mask: np.ndarray, n: int) -> np.ndarray:
    """Keep only the runs of True that are at least n long."""
    out = np.zeros_like(mask)
    start = None
    for i, m in enumerate(np.append(mask, False)):
        if m and start is None:
            start = i
        elif not m and start is not None:
            if i - start >= n:
                out[start:i] = True
            start = None
    return out

