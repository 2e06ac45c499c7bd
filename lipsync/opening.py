"""How wide the speech asks the mouth to open: a linear read-out of the model's own audio windows.

The "audio" reference rule (lipsync.references.audio_match) shows the UNet, beside each masked frame, another frame
of the same video whose lips are as far apart as the speech asks for at that moment. This head gives that
prediction: per output frame, the audio window the UNet attends to (n L tokens of D, rows L t + layer,
lipsync.windows) averaged over the L layers -> (n, D) features -> one number, the inner-lip gap in face heights
(lipsync.references.mouth_gap). It is a ridge regression, fitted in closed form by `train.py --stage opening` on
prepared talking clips (their own speech and face-mesh lips), and travels in the checkpoint as its "opening" entry.
It reads the generator's own audio windows, or those of an encoder of its own (`--opening_whisper`: a frozen whisper
encoder, stored with it), since what orders the frames best need not be what the UNet was trained to attend to.

    windows (n, 10 L, D) -> mean over layers (n, 10 D) -> standardise -> . beta + offset -> (n,) predicted gaps

Only the ranks of the predictions are used (a speaker's own range of openings comes from the video's frames), so
what matters is that the head orders the frames by how open the mouth should be. Pauses are not left to the ranks:
`quiet_frames` marks the frames where the speech falls QUIET_DB under its loud frames for at least QUIET_RUN frames,
and LipSync.openings gives them -inf, which the rule reads as "the most closed mouth the video has".

A video whose mouth never opens (a still photo; a face that listens) has only closed mouths to show, whatever the
speech asks for; a generator trained to draw its reference's mouth then keeps it closed. There the head's
`shut_guidance` scales the audio's own pull instead (pipeline.avatar_frames).
"""

from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE, frame_envelope, runs_at_least


@dataclass
class OpeningConfig:
    steps: int = 10  # audio steps per frame window (MuseTalk: 2 + 1 + 2 frames x 2 at 50 Hz)
    layers: int = 5  # encoder states per step (whisper-tiny / MelEncoder: 5)
    dim: int = 384  # features per state
    lam: float = 30000.0  # ridge penalty on the standardised features (train.py --opening_lam; chosen on validation
    # speakers among 3e3 .. 3e6: docs/results.md)
    shut_guidance: float = 1.0  # audio guidance (LipSync.generate) on tracks whose mouth never opens (a photo, a
    # closed-mouthed video: references.is_shut), where the rule has no open mouth to show and the audio alone must
    # open it; 1 = none (train.py --opening_shut_guidance, chosen on still validation faces: docs/results.md)


class OpeningHead:
    """Not an nn.Module on purpose: a closed-form fit, never trained by gradients, kept in float64 numpy whatever
    device and dtype the generator runs in (the standardisation would lose its precision in fp16)."""

    def __init__(self, cfg: OpeningConfig, state: dict | None = None, encoder=None):
        self.cfg = cfg
        # the audio encoder whose windows it reads: None = the generator's own (LipSync.audio); else its own, e.g. a
        # frozen whisper encoder beside a MelEncoder generator. Kept on the CPU in float32.
        self.encoder = encoder
        n = cfg.steps * cfg.dim
        state = state or {"mean": np.zeros(n), "std": np.ones(n), "beta": np.zeros(n), "offset": np.zeros(())}
        self.mean, self.std, self.beta, self.offset = (np.asarray(state[k], np.float64)
                                                       for k in ("mean", "std", "beta", "offset"))

    def state_dict(self) -> dict:
        return {k: torch.from_numpy(getattr(self, k).copy()) for k in ("mean", "std", "beta", "offset")}

    def features(self, windows) -> np.ndarray:
        """Audio windows (n, steps L, D), rows L t + layer -> (n, steps D) layer-averaged features, float64."""
        c = self.cfg
        w = torch.as_tensor(windows).detach().float().cpu().numpy().astype(np.float64)
        return w.reshape(len(w), c.steps, c.layers, c.dim).mean(2).reshape(len(w), -1)

    def __call__(self, windows) -> np.ndarray:
        """(n, steps L, D) -> (n,) predicted inner-lip gaps (face heights)."""
        return self.predict(self.features(windows))

    def predict(self, features) -> np.ndarray:
        """(n, steps D) features -> (n,) predicted gaps."""
        return ((np.asarray(features, np.float64) - self.mean) / self.std) @ self.beta + self.offset

    def fit(self, features, gaps) -> "OpeningHead":
        """Closed-form ridge on (F, steps D) features (self.features of the training frames) and their (F,) gaps:
        (Z'Z + lam I) beta = Z'(y - mean y), Z the standardised features."""
        x, y = np.asarray(features, np.float64), np.asarray(gaps, np.float64)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mean) / self.std
        self.beta = np.linalg.solve(z.T @ z + self.cfg.lam * np.eye(z.shape[1]), z.T @ (y - y.mean()))
        self.offset = np.asarray(y.mean())
        return self


QUIET_DB = -35.0  # a frame is quiet when its RMS is this far under the speech's loud frames (95th percentile)
QUIET_SPAN = 0.1  # seconds of audio around each frame's time whose RMS counts
QUIET_RUN = 3  # ... for at least this many frames in a row (a pause, not a stop consonant)


def quiet_frames(wave, n_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech (S,) -> (n_frames,) bool: the output frames that fall in a pause of the speech."""
    rms = frame_envelope(np.asarray(wave, np.float32).reshape(-1), n_frames, fps, sample_rate, QUIET_SPAN)
    loud = np.percentile(rms, 95) if n_frames else 0.0
    return runs_at_least(rms <= loud * 10 ** (QUIET_DB / 20), QUIET_RUN)
