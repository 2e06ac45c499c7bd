"""Whisper's front end: 16 kHz mono wave (lipsync.audio.load_audio) -> log-mel.

`log_mel` reproduces whisper's front end (openai-whisper `audio.py`, Hugging Face `WhisperFeatureExtractor`): n_fft
400, hop 160, periodic Hann, 80 Slaney mel bins 0-8 kHz, power spectrum, last frame dropped, log10 floored at 1e-10,
clamped to max - 8, then (x + 4) / 4. The STFT runs in float64 so the result does not depend on how the audio was
split.
"""

import functools
import math

import torch
import torch.nn.functional as F

from .audio import SAMPLE_RATE

N_FFT = 400
HOP = 160
N_MELS = 80
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # whisper's fixed 30 s window

# ----------------------------------------------------------------------------- whisper log-mel


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels=N_MELS, n_fft=N_FFT, sr=SAMPLE_RATE, fmax=8000.0):
    """(n_mels, n_fft // 2 + 1) Slaney-scale, Slaney-normalised triangular filters (librosa's `filters.mel`)."""
    def hz_to_mel(f):
        return torch.where(f < 1000, 3 * f / 200, 15 + torch.log(f / 1000) * 27 / math.log(6.4))

    def mel_to_hz(m):
        return torch.where(m < 15, 200 * m / 3, 1000 * torch.exp((m - 15) * math.log(6.4) / 27))

    fft_hz = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = torch.tensor([0.0, fmax], dtype=torch.float64)
    band_hz = mel_to_hz(torch.linspace(*hz_to_mel(edges).tolist(), n_mels + 2, dtype=torch.float64))
    width = band_hz.diff()  # (n_mels + 1,)
    offset = band_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, bins)
    rising = -offset[:-2] / width[:-1, None]
    falling = offset[2:] / width[1:, None]
    tri = torch.minimum(rising, falling).clamp(min=0)
    return tri * (2 / (band_hz[2:] - band_hz[:-2]))[:, None]


def log_mel_frames(padded):
    """log10 mel power (..., 80, F) of the frames of an already reflect-padded float64 wave; frame j starts at 160 j."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64, device=padded.device)
    frames = padded.unfold(-1, N_FFT, HOP) * window  # (..., F, 400)
    power = torch.view_as_real(torch.fft.rfft(frames, dim=-1)).square().sum(-1)  # (..., F, 201)
    return torch.log10((mel_filters().to(padded.device) @ power.transpose(-1, -2)).clamp(min=1e-10))


def reflect_pad(wave):
    """Whisper's centred STFT padding: N_FFT // 2 reflected samples on each side."""
    if wave.shape[-1] <= N_FFT // 2:
        raise ValueError(f"audio too short for log_mel: {wave.shape[-1]} samples, need > {N_FFT // 2}")
    padded = F.pad(wave.reshape(-1, 1, wave.shape[-1]), (N_FFT // 2, N_FFT // 2), mode="reflect")
    return padded.reshape(*wave.shape[:-1], -1)


def log_mel(wave, *, pad_30s=False, dynamic_floor=True):
    """Whisper log-mel of a 16 kHz wave (..., samples) -> (..., 80, samples // 160), 100 frames/s, float32.

    pad_30s: zero-pad to whisper's 30 s window first (-> (..., 80, 3000)), as WhisperFeatureExtractor does.
    dynamic_floor: clamp to (per-item) max - 8 as whisper does; False keeps only the 1e-10 floor, so every frame
    depends only on its own 25 ms of audio (MelEncoder training, streaming, SyncNet).
    """
    wave = torch.as_tensor(wave).to(torch.float64)
    if pad_30s:
        if wave.shape[-1] > CHUNK_SAMPLES:
            raise ValueError(f"pad_30s needs at most 30 s of audio, got {wave.shape[-1] / SAMPLE_RATE:.2f} s")
        wave = F.pad(wave, (0, CHUNK_SAMPLES - wave.shape[-1]))
    mel = log_mel_frames(reflect_pad(wave))[..., :-1]
    if dynamic_floor:
        mel = torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return ((mel + 4.0) / 4.0).float()
