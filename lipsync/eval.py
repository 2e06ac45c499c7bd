"""Evaluation: does the generated mouth follow the audio?

(a) synthetic held-out clips: Pearson r between the mouth opening measured in generated frames and the ground truth,
next to the copy-the-reference baseline.
"""

import numpy as np
import torch

from .data import MIN_GAP, load_clip
from .synthetic import measure_opening


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def far_references(n: int, rng: np.random.Generator) -> np.ndarray:
    """For each of n frames, a uniformly drawn frame of the same clip at least MIN_GAP away (as in training)."""
    frames = np.arange(n)
    return np.array([rng.choice(frames[np.abs(frames - f) >= MIN_GAP]) for f in frames])


@torch.no_grad()
def generate_clip(model, clip, refs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Regenerate every frame of a prepared clip from its own audio -> uint8 crops (N, S, S, 3)."""
    n = len(clip)
    tokens = model.tokens_from_wave(clip.wave, n, clip.fps)
    p = next(model.unet.parameters())
    out = []
    for i in range(0, n, batch_size):
        sl = slice(i, min(n, i + batch_size))
        unet_in = model.face.unet_input(np.asarray(clip.crops[sl]), np.asarray(clip.crops[refs[sl]]))
        out.append(model.face.decode_uint8(model.predict_latents(unet_in, tokens[sl].to(p.device, p.dtype))))
    return np.concatenate(out)


def synthetic_sync(model, clip_dirs, seed: int = 0, max_frames: int | None = None):
    """Held-out synthetic clips -> {'r', 'r_reference', 'clips', 'frames'}; None when no clip has ground truth."""
    gen, ref, truth = [], [], []
    for d in clip_dirs:
        clip = load_clip(d)
        if clip.truth is None:
            continue
        n = len(clip) if max_frames is None else min(len(clip), max_frames)
        rng = np.random.default_rng([seed, len(truth)])
        refs = far_references(len(clip), rng)
        frames = generate_clip(model, clip, refs)[:n]
        gen.append(measure_opening(frames))
        ref.append(measure_opening(np.asarray(clip.crops[refs[:n]])))
        truth.append(clip.truth["opening"][:n])
    if not truth:
        return None
    g, r, t = np.concatenate(gen), np.concatenate(ref), np.concatenate(truth)
    return {"r": pearson(g, t), "r_reference": pearson(r, t), "clips": len(truth), "frames": int(len(t))}
