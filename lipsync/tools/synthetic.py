"""Synthetic talking faces whose mouth shape is known exactly.

One clip = one phoneme-like control sequence (mouth opening a(t), roundness r(t), consonant noise) rendered twice:
as frames of a simple face whose lips follow a(t) and r(t), and as 16 kHz audio from a glottal source through formant
resonators tied to the same mouth shape (F1 ~ opening, F2 ~ roundness). A model that learns lip-sync on these clips can
be scored exactly: `synthetic_face.dark_mouth_height` reads the opening back from rendered crops. Clips are written
in the prepared-clip layout (`lipsync.training.data.write_clip`).

    python -m lipsync.tools.synthetic --out DIR --clips 20 --seconds 10 [--size 64] [--frame 128] [--seed 0]
                                      [--heldout 0.2]
"""

import argparse
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lipsync.audio import frame_envelope
from lipsync.training import data
from lipsync.tools.synthetic_face import Face, dark_mouth_height, random_motion, render
from lipsync.tracking import crop_box, crop_faces

__all__ = ["Sequence", "random_sequence", "Voice", "synth_audio", "frame_envelope", "Face", "render",
           "make_synthetic_clip", "write_synthetic_clip", "run_jobs", "main"]

RATE = 100.0  # control rate of a Sequence (Hz): 10 ms steps, one mel hop
SR = 16000

# -----------------------------------------------------------------------------
# phoneme-like control sequence


@dataclass
class Sequence:
    opening: np.ndarray    # (n,) in [0, 1], 0 = lips closed
    roundness: np.ndarray  # (n,) in [0, 1], 1 = rounded (narrow) lips
    noise: np.ndarray      # (n,) consonant noise level in [0, 1]
    noise_hz: np.ndarray   # (n,) centre frequency of the consonant noise
    rate: float = RATE

    def at(self, times):
        """Tracks linearly interpolated at `times` (seconds) -> dict of (len(times),) arrays."""
        grid = np.arange(len(self.opening)) / self.rate
        return {k: np.interp(times, grid, getattr(self, k)).astype(np.float32)
                for k in ("opening", "roundness", "noise", "noise_hz")}


def _box_smooth(x, taps):
    pad = np.pad(x, (taps // 2, taps - 1 - taps // 2), mode="edge")
    return np.convolve(pad, np.ones(taps) / taps, mode="valid")


def random_sequence(seconds, rng, pause=0.22, consonant=0.6):
    """Syllables of 80-250 ms (openness 0.2-1, roundness 0-1), optional stop (closure + burst) or fricative onsets,
    pauses of 100-600 ms (~28 % of the time closed and silent), smoothed over 50 ms. Steps are 10 ms."""
    n = int(np.ceil(seconds * RATE)) + 1
    a, r, nz, hz = [], [], [], []
    cur_r = rng.uniform()

    def seg(steps, op, ro, no=0.0, f=4000.0):
        for track, value in ((a, op), (r, ro), (nz, no), (hz, f)):
            track.extend([value] * steps)

    while len(a) < n:
        if rng.random() < pause:
            seg(int(rng.integers(10, 61)), 0.0, cur_r)
            continue
        if rng.random() < consonant:
            f = rng.uniform(2500, 6500)
            if rng.random() < 0.5:  # stop: closure then a release burst
                seg(int(rng.integers(3, 9)), 0.0, cur_r)
                seg(int(rng.integers(1, 3)), 0.05, cur_r, rng.uniform(0.4, 0.8), f)
            else:  # fricative: narrow opening with noise
                seg(int(rng.integers(6, 13)), rng.uniform(0.05, 0.15), cur_r, rng.uniform(0.2, 0.5), f)
        cur_r = rng.uniform()
        seg(int(rng.integers(8, 26)), rng.uniform(0.2, 1.0), cur_r)
    a, r, nz, hz = (np.asarray(x[:n], np.float64) for x in (a, r, nz, hz))
    return Sequence(_box_smooth(a, 5).astype(np.float32), _box_smooth(r, 5).astype(np.float32),
                    _box_smooth(nz, 2).astype(np.float32), hz.astype(np.float32))


# -----------------------------------------------------------------------------
# audio: glottal pulses + aspiration through 3 formant resonators, consonant noise, amplitude ~ opening


@dataclass
class Voice:
    f0: float = 120.0          # Hz
    vibrato_hz: float = 5.0
    vibrato: float = 0.02      # relative depth
    jitter: float = 0.01       # relative, slowly varying
    scale: float = 1.0         # formant scale (shorter vocal tract -> higher)
    breath: float = 0.05       # aspiration noise relative to the pulses
    level: float = 0.5         # output peak

    @classmethod
    def random(cls, rng):
        return cls(f0=rng.uniform(90, 250), vibrato_hz=rng.uniform(4, 6.5), vibrato=rng.uniform(0.005, 0.03),
                   jitter=0.01, scale=rng.uniform(0.85, 1.2), breath=rng.uniform(0.02, 0.1),
                   level=rng.uniform(0.3, 0.7))


def _resonator(freq, bw, w):
    """Complex response of a unity-DC-gain two-pole resonator at normalised angular frequencies w.
    freq, bw: (J, 1) Hz; w: (F,) -> (J, F)."""
    rho = np.exp(-np.pi * bw / SR)
    c = 2 * rho * np.cos(2 * np.pi * freq / SR)
    z1 = np.exp(-1j * w)
    return (1 - c + rho ** 2) / (1 - c * z1 + rho ** 2 * z1 ** 2)


def synth_audio(opening, roundness, rate, voice=None, noise=None, noise_hz=None, seconds=None, seed=0):
    """Speech-like audio from a mouth-shape sequence sampled at `rate` Hz (e.g. a video's fps or RATE).

    F1 = (300 + 500 a) s, F2 = (2200 - 1300 r) s, F3 = 2900 s; voicing amplitude ~ opening, so a closed mouth is
    silent apart from consonant noise. Filtering is a time-varying STFT filter (20 ms Hann frames, 10 ms hop, causal
    resonator responses), which keeps it vectorised. Returns float32 (samples,) at 16 kHz, peak = voice.level."""
    voice = voice or Voice()
    rng = np.random.default_rng(seed)
    opening = np.asarray(opening, np.float64)
    n_ctrl = len(opening)
    seconds = n_ctrl / rate if seconds is None else seconds
    n = int(round(seconds * SR))
    grid = np.arange(n_ctrl) / rate
    noise = np.zeros(n_ctrl) if noise is None else np.asarray(noise, np.float64)
    noise_hz = np.full(n_ctrl, 4000.0) if noise_hz is None else np.asarray(noise_hz, np.float64)
    t = np.arange(n) / SR

    # voiced source: pulse train with vibrato and slow jitter, plus aspiration
    drift = np.interp(t, np.arange(int(seconds * 50) + 2) / 50, rng.normal(size=int(seconds * 50) + 2))
    f0 = voice.f0 * (1 + voice.vibrato * np.sin(2 * np.pi * voice.vibrato_hz * t + rng.uniform(0, 6.3)))
    f0 = f0 * (1 + voice.jitter * drift)
    pulses = np.diff(np.floor(np.cumsum(f0 / SR)), prepend=0.0)
    amp = np.interp(t, grid, opening)
    voiced = amp * (pulses + voice.breath * rng.normal(size=n))
    fric = np.interp(t, grid, noise) * rng.normal(size=n)

    # (n,) -> (J, win) frames, 50 % overlap periodic Hann (sums to 1)
    win, hop, nfft = 320, 160, 1120
    J = n // hop + 2
    pad = lambda x: np.pad(x, (win // 2, J * hop + win - n - win // 2))
    idx = np.arange(J)[:, None] * hop + np.arange(win)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    spec_v = np.fft.rfft(pad(voiced)[idx] * window, nfft)
    spec_n = np.fft.rfft(pad(fric)[idx] * window, nfft)

    # per-frame filters from the mouth shape at the frame centre
    tc = (np.arange(J) * hop / SR)[:, None]
    a, r = np.interp(tc, grid, opening), np.interp(tc, grid, roundness)
    w = 2 * np.pi * np.fft.rfftfreq(nfft, 1 / SR) / SR
    s = voice.scale
    tilt = (1 - np.exp(-2 * np.pi * 300 / SR)) / (1 - np.exp(-2 * np.pi * 300 / SR) * np.exp(-1j * w))
    h_v = tilt * (1 - np.exp(-1j * w))  # glottal roll-off and lip radiation
    for f, bw in (((300 + 500 * a) * s, 90.0), ((2200 - 1300 * r) * s, 110.0), (np.full_like(a, 2900 * s), 170.0)):
        h_v = h_v * _resonator(f, bw, w)
    h_n = (1 - np.exp(-1j * w)) * _resonator(np.interp(tc, grid, noise_hz), 1800.0, w)
    # overlap-add the filtered frames (tails included), drop the leading pad
    k = nfft // hop

    def overlap_add(spec):
        frames, out = np.fft.irfft(spec, nfft), np.zeros((J + k, hop))  # (J, nfft)
        for i in range(k):
            out[i:i + J] += frames[:, i * hop:(i + 1) * hop]
        return out.reshape(-1)[win // 2:win // 2 + n]

    def unit(x, env):  # RMS per unit of the envelope -> 1
        return x / max(np.sqrt((x ** 2).sum() / max((env ** 2).sum(), 1e-12)), 1e-12)

    wave = unit(overlap_add(spec_v * h_v), amp) + 0.25 * unit(overlap_add(spec_n * h_n), np.interp(t, grid, noise))
    peak = np.abs(wave).max()
    return (wave * (voice.level / peak if peak > 0 else 0.0)).astype(np.float32)


# -----------------------------------------------------------------------------
# clips in the prepared-clip layout

HELDOUT_BASE = 1_000_000  # face/speaker ids (and seeds) of held-out clips start here, so they never meet training ones


@contextmanager
def _torch_threads(n):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def make_synthetic_clip(index, split="train", seconds=10.0, fps=25.0, frame=128, size=64, seed=0):
    """Render one clip -> dict of crops (N, S, S, 3) uint8, boxes, landmarks, wave (samples,), opening/width (N,),
    id (face = speaker id). Face, voice and sequence come from seeds derived from (seed, split, index)."""
    ident = index + (HELDOUT_BASE if split == "heldout" else 0)
    face = Face.random(np.random.default_rng([seed, 1, ident]), frame)
    voice = Voice.random(np.random.default_rng([seed, 2, ident]))
    rng = np.random.default_rng([seed, 3, ident])
    n = int(round(seconds * fps))
    seq = random_sequence(n / fps, rng)
    truth = seq.at(np.arange(n) / fps)
    opening, width = truth["opening"], 1 - truth["roundness"]
    frames, landmarks = render(face, random_motion(rng, n, fps, face.ry), opening, width, frame)
    boxes = crop_box(landmarks, 0, margin=0.25 * face.ry)
    wave = synth_audio(seq.opening, seq.roundness, seq.rate, voice, seq.noise, seq.noise_hz, n / fps, seed=ident)
    with _torch_threads(1):  # per-frame crops are tiny ops; a thread pool only adds waiting
        crops = crop_faces(frames, boxes, size)
    return {"crops": crops, "frames": frames, "boxes": boxes, "landmarks": landmarks,
            "wave": wave, "opening": opening, "width": width.astype(np.float32), "id": ident}


def write_synthetic_clip(out, name, clip, fps=25.0, split="train", seed=0):
    """Write DIR/<name>/ atomically in the prepared-clip layout (lipsync.training.data.write_clip)."""
    n, frame = len(clip["crops"]), clip["frames"].shape[1]
    meta = {"version": 1, "fps": float(fps), "frames": n, "size": [frame, frame], "crop_size": clip["crops"].shape[1],
            "source": "synthetic", "tracker": "synthetic", "audio": "audio.wav", "sr": SR, "split": split,
            "speaker": clip["id"], "face": clip["id"], "seed": seed}
    return data.write_clip(out, name, meta, clip["crops"], clip["boxes"], np.ones(n, bool), clip["landmarks"],
                           clip["wave"], truth={"opening": clip["opening"], "width": clip["width"]})


def _corr(x, y):
    return float(np.corrcoef(x, y)[0, 1])


def _synthetic_job(out, name, index, split, seconds, fps, frame, size, seed):
    """Make and write one clip -> (r(truth, measured opening), r(RMS envelope, opening))."""
    clip = make_synthetic_clip(index, split, seconds, fps, frame, size, seed)
    write_synthetic_clip(out, name, clip, fps, split, seed)
    env = frame_envelope(clip["wave"], len(clip["opening"]), fps)
    return _corr(clip["opening"], dark_mouth_height(clip["crops"])), _corr(clip["opening"], env)


def run_jobs(fn, arg_tuples, workers: int, desc: str) -> list:
    """fn(*args) for each tuple, in order, in `workers` processes (1 = here), with a progress bar -> the results."""
    with tqdm(total=len(arg_tuples), desc=desc, unit="clip") as bar:
        if workers <= 1:
            results = []
            for a in arg_tuples:
                results.append(fn(*a))
                bar.update(1)
            return results
        # fork where available: workers inherit the imports instead of re-importing torch (no torch op ran yet)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(fn, *a) for a in arg_tuples]
            for f in futures:
                f.add_done_callback(lambda _: bar.update(1))
            return [f.result() for f in futures]


def add_clip_set_flags(p: argparse.ArgumentParser, seconds: float, seeds: str, heldout: str):
    """The flags every generator of training clips takes (this module's and lipsync.tools.puppet's)."""
    p.add_argument("--out", required=True, help="output directory (one sub-directory per clip)")
    p.add_argument("--clips", type=int, default=20, help="number of clips to write (train + held-out)")
    p.add_argument("--seconds", type=float, default=seconds, help="length of each clip")
    p.add_argument("--size", type=int, default=64, help="crop size S of the written clips")
    p.add_argument("--seed", type=int, default=0, help=f"seeds each clip's {seeds}")
    p.add_argument("--heldout", type=float, default=0.2, help=f"fraction of clips with held-out {heldout}")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="clips made in parallel processes")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lipsync.tools.synthetic", description=__doc__.split("\n\n")[0])
    add_clip_set_flags(p, 10.0, "face, voice and sequence", "faces and speakers")
    p.add_argument("--frame", type=int, default=128, help="side of the square frames rendered before cropping")
    p.add_argument("--fps", type=float, default=25.0, help="video frame rate of the clips")
    args = p.parse_args(argv)

    n_held = int(round(args.clips * args.heldout))
    jobs = [(f"{split}_{i:04d}", i, split) for split, n in (("train", args.clips - n_held), ("heldout", n_held))
            for i in range(n)]
    todo = [j for j in jobs if not (Path(args.out) / j[0] / "meta.json").exists()]
    common = (args.seconds, args.fps, args.frame, args.size, args.seed)
    results = run_jobs(_synthetic_job, [(args.out, name, i, split, *common) for name, i, split in todo], args.workers,
                       "synthetic clips")
    print(f"{len(todo)} clips written, {len(jobs) - len(todo)} already complete, in {args.out}")
    if results:
        r_open, r_env = np.array(results).T
        print(f"r(truth, measured opening): mean {r_open.mean():.4f}, min {r_open.min():.4f}; "
              f"r(audio RMS envelope, opening): mean {r_env.mean():.3f}, min {r_env.min():.3f}")


if __name__ == "__main__":
    main()
