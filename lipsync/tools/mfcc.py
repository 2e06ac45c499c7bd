"""MFCC as python_speech_features computes them with its defaults: the audio front end of SyncNet (LSE-D / LSE-C).

joonson/syncnet_python's `SyncNetInstance.evaluate` calls `python_speech_features.mfcc(audio, 16000)` on the int16
samples (not scaled to [-1, 1]): pre-emphasis 0.97; 25 ms frames (400 samples) every 10 ms (160), the last one
zero-padded; no window (rectangular); power spectrum |rfft_512|^2 / 512; 26 triangular mel filters on integer FFT
bins from 0 Hz to 8 kHz; log (exact zeros become float64 eps first); orthonormal DCT-II, 13 coefficients; lifter 22;
then c0 is replaced by the log of the frame's total power. Re-stated here in numpy, float64 throughout
(python_speech_features/base.py: mfcc, fbank, get_filterbanks, lifter; sigproc.py: framesig, powspec, preemphasis).
"""

import math

import numpy as np

SAMPLE_RATE = 16000
FRAME, HOP = 400, 160  # 25 ms, 10 ms at 16 kHz
NFFT, N_FILTERS, N_CEPS, LIFTER, PREEMPH = 512, 26, 13, 22, 0.97
EPS = np.finfo(float).eps


def hz_to_mel(hz):
    return 2595 * np.log10(1 + hz / 700.0)


def mel_to_hz(mel):
    return 700 * (10 ** (mel / 2595.0) - 1)


def mel_filterbank(n_filters=N_FILTERS, nfft=NFFT, sr=SAMPLE_RATE) -> np.ndarray:
    """(n_filters, nfft // 2 + 1) triangles between mel-spaced FFT bins floor((nfft + 1) f / sr), 0 Hz to sr / 2."""
    bins = np.floor((nfft + 1) * mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_filters + 2)) / sr)
    fb = np.zeros((n_filters, nfft // 2 + 1))
    k = np.arange(nfft // 2 + 1)
    for j in range(n_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        rise, fall = (k >= lo) & (k < mid), (k >= mid) & (k < hi)
        fb[j, rise] = (k[rise] - lo) / (mid - lo)
        fb[j, fall] = (hi - k[fall]) / (hi - mid)
    return fb


def dct_ortho(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II matrix: row k = s_k cos(pi k (2i + 1) / 2n), s_0 = sqrt(1/n), s_k = sqrt(2/n)."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def mfcc(signal) -> np.ndarray:
    """16 kHz samples (any scale; SyncNet's are int16 values) -> (frames, 13) float64, frames = 1 + ceil((len -
    400) / 160) (1 for 400 samples or fewer)."""
    x = np.asarray(signal, np.float64).ravel()
    x = np.append(x[:1], x[1:] - PREEMPH * x[:-1])
    n = 1 if len(x) <= FRAME else 1 + math.ceil((len(x) - FRAME) / HOP)
    x = np.concatenate([x, np.zeros((n - 1) * HOP + FRAME - len(x))])
    frames = x[np.arange(n)[:, None] * HOP + np.arange(FRAME)[None, :]]  # (n, 400)
    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2 / NFFT  # (n, 257)
    energy = power.sum(1)
    feat = power @ mel_filterbank().T  # (n, 26)
    energy, feat = np.where(energy == 0, EPS, energy), np.where(feat == 0, EPS, feat)
    ceps = np.log(feat) @ dct_ortho(N_FILTERS)[:N_CEPS].T  # (n, 13)
    ceps *= 1 + (LIFTER / 2) * np.sin(np.pi * np.arange(N_CEPS) / LIFTER)
    ceps[:, 0] = np.log(energy)
    return ceps
