"""Audio probe: how much of the mouth's opening do the audio features themselves carry, for people never trained on?

A ridge regression from each frame's whisper window (the model's own 10 steps at 25 fps, layers averaged: (10 x 384))
to the landmark lip opening (lip_opening_68), fitted on the training clips and scored (Pearson r per clip) on others.
It separates the two halves of the lip-sync problem: if the probe follows a held-out speaker's mouth but the
generator, driven by the same speech, does not, the generator is what fails to draw the audio, not the features.

    python -m lipsync.tools.audio_probe --train DIR --test CLIP [CLIP ...] [--whisper PATH] [--lam 3000]

(clips are prepared folders, python -m lipsync.training.prepare; --whisper computes the whisper.npy they lack.)
"""

import argparse

import numpy as np
import torch

from lipsync.tools.metrics import lip_opening_68, pearson
from lipsync.training.data import list_clips, load_clip
from lipsync.windows import frame_windows


def clip_xy(clip_dir):
    """A prepared clip with whisper.npy -> X (n, 10 D) layer-averaged windows, y (n,) lip openings, frames with a
    face only."""
    clip = load_clip(clip_dir)
    feats = torch.from_numpy(np.load(clip.path / "whisper.npy").astype(np.float32)).transpose(0, 1)  # (L, T50, D)
    n = len(clip)
    windows = frame_windows(feats, n, clip.fps)  # (n, 10 L, D), row = L t + layer
    x = windows.view(n, -1, feats.shape[0], feats.shape[-1]).mean(2).reshape(n, -1).numpy()
    return x[clip.face], lip_opening_68(clip.landmarks)[clip.face]


class Ridge:
    """Standardised inputs, centred target, closed-form ridge: (X'X + lam I) beta = X'y."""

    def __init__(self, x, y, lam: float = 3e3):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.mean, self.std, self.offset = x.mean(0), x.std(0) + 1e-6, y.mean()
        z = (x - self.mean) / self.std
        self.beta = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ (y - self.offset))

    def __call__(self, x):
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.beta + self.offset


def main(argv=None):
    p = argparse.ArgumentParser(description="How well do the audio features alone predict the mouth opening of "
                                            "held-out people? (ridge probe, Pearson r per clip)")
    p.add_argument("--train", required=True, help="folder of prepared clips to fit on (their training split)")
    p.add_argument("--test", nargs="+", required=True, metavar="CLIP", help="prepared clips to score")
    p.add_argument("--whisper", help="a local whisper encoder, to compute the whisper.npy of clips that lack it")
    p.add_argument("--lam", type=float, default=3e3, help="ridge penalty on the standardised inputs")
    a = p.parse_args(argv)
    train = list_clips(a.train, "train")
    if a.whisper:
        from lipsync.training.prepare import add_whisper_features
        from lipsync.whisper import load_whisper_encoder
        add_whisper_features(train + list(a.test), load_whisper_encoder(a.whisper))
    xs, ys = zip(*[clip_xy(c) for c in train])
    probe = Ridge(np.concatenate(xs), np.concatenate(ys), a.lam)
    print(f"ridge probe fitted on {len(train)} clips ({sum(map(len, ys))} frames)")
    rs = []
    for clip in a.test:
        x, y = clip_xy(clip)
        rs.append(pearson(probe(x), y))
        print(f"  {clip}: r {rs[-1]:+.2f} ({len(y)} frames)")
    print(f"mean r {np.mean(rs):+.2f} over {len(rs)} clips")


if __name__ == "__main__":
    main()
