"""Lip gauge: a small CNN that reads how far the lips are open from a face crop's mouth box.

Frozen, it is a critic for the generator (`--loss.lip`): the L1 between its readings of the generated and the target
mouth. Pixel L1 on a soft, tiny generator settles for an averaged, half-open mouth (the opening is a few pixels of a
128 px crop); the gauge's reading changes with exactly that opening, so the loss does too. It is trained, supervised,
on the prepared clips' own landmarks (no extra labels): the target is the inner-lip gap over the mouth width, which
the mouth crop alone shows (its box follows the lips, so the ratio and not the size is what can be read). Blur,
level, noise, flips and box jitter make it read soft generated mouths as well as real ones.

    python -m lipsync.training.gauge --data DIR --out GAUGE.pt [--steps 1500] [--seed 0]

(on a 2-core CPU: 1500 steps of 64 mouths from ~12 k frames of 128 px crops in 1.5 min; r with the landmark ratio
on 7 real people it never saw: 0.61-0.95.)
"""

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lipsync.blend import gaussian_kernel
from lipsync.checkpoint import atomic_save
from lipsync.tracking import to_crop_coords
from lipsync.training.data import list_clips, load_clip, mouth_box
from lipsync.training.losses import mouth_crops

GAUGE_SIZE = 48  # mouth crops are resampled to GAUGE_SIZE x GAUGE_SIZE
INNER_PAIRS = ([13, 14, 15], [19, 18, 17])  # iBUG 61-63 over 67-65, as indices into the 20 lip points 48-67


def lip_ratio(lips: np.ndarray) -> np.ndarray:
    """Lip points 48-67 (..., 20, 2) -> (...,) inner-lip gap (mean of the three pairs) / mouth width (48 to 54)."""
    gap = np.linalg.norm(lips[..., INNER_PAIRS[0], :] - lips[..., INNER_PAIRS[1], :], axis=-1).mean(-1)
    return gap / np.maximum(np.linalg.norm(lips[..., 6, :] - lips[..., 0, :], axis=-1), 1e-6)


class LipGauge(nn.Module):
    """Mouth crops (B, 3, 48, 48) in [-1, 1] -> (B,) lip ratio, standardised (mean / std of its training labels)."""

    def __init__(self, channels=(32, 64, 96, 128), size: int = GAUGE_SIZE):
        super().__init__()
        self.size, c = size, (3,) + tuple(channels)
        self.convs = nn.Sequential(*[m for i in range(len(channels))  # each block halves: 48 -> 24 -> 12 -> 6 -> 3
                                     for m in (nn.Conv2d(c[i], c[i + 1], 3, 2, 1), nn.GroupNorm(8, c[i + 1]), nn.SiLU())])
        self.head = nn.Linear(c[-1], 1)
        self.register_buffer("label_mean", torch.zeros(()))
        self.register_buffer("label_std", torch.ones(()))

    def forward(self, mouths):
        return self.head(self.convs(mouths).mean((2, 3)))[:, 0]

    def read(self, images, boxes):
        """Faces (B, 3, S, S) and mouth boxes (B, 4) in crop pixels -> (B,) standardised readings."""
        return self(mouth_crops(images, boxes, self.size))

    def ratio(self, images, boxes):
        """The readings in lip-ratio units (gap / width)."""
        return self.read(images, boxes) * self.label_std + self.label_mean


def gauge_loss(gauge: LipGauge, pred, target, boxes) -> torch.Tensor:
    """L1 between the gauge's readings of generated and target faces (B, 3, S, S) at the target's mouth boxes."""
    return F.l1_loss(gauge.read(pred, boxes), gauge.read(target, boxes).detach())


def load_gauge(path, device="cpu") -> LipGauge:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    gauge = LipGauge(tuple(ckpt["channels"]), ckpt["size"])
    gauge.load_state_dict(ckpt["state"])
    return gauge.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------- training


def degrade(faces, boxes, g: torch.Generator):
    """One random degradation per batch: blur (half the time), level and contrast, noise, mirror, box jitter.
    faces (B, 3, S, S) in [-1, 1], boxes (B, 4) -> both, changed."""
    u = lambda a, b: float(a + (b - a) * torch.rand((), generator=g))
    S = faces.shape[-1]
    boxes = boxes + torch.randn(boxes.shape, generator=g) * 0.03 * (boxes[:, 2:3] - boxes[:, 0:1])
    if u(0, 1) < 0.5:
        sigma = u(0.5, 2.0)
        r = int(2 * sigma + 1)
        k = gaussian_kernel(sigma, r).to(faces)
        faces = F.conv2d(F.pad(faces, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        faces = F.conv2d(F.pad(faces, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    faces = faces * u(0.8, 1.2) + u(-0.15, 0.15) + torch.randn(faces.shape, generator=g) * u(0, 0.05)
    if u(0, 1) < 0.5:
        faces, boxes = faces.flip(-1), torch.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
    return faces.clamp(-1, 1), boxes


def clip_labels(clip, size: int):
    """A clip's mouth boxes (N, 4) and lip ratios (N,) in its crops' pixels, for the frames with a face (N,) bool."""
    lips = to_crop_coords(clip.landmarks[:, 48:68], clip.boxes, size)  # (N, 20, 2)
    return mouth_box(lips, size), lip_ratio(lips).astype(np.float32), clip.face


def train_gauge(root, steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0, progress=True) -> LipGauge:
    """Fit a LipGauge to the training split of the prepared clips in `root` (one-cycle lr, smooth L1)."""
    clips = [load_clip(p) for p in list_clips(root, "train")]
    if not clips:
        raise ValueError(f"{root}: no prepared clips")
    size = clips[0].crops.shape[1]
    labels = [clip_labels(c, size) for c in clips]
    frames = [np.flatnonzero(face) for _, _, face in labels]
    y_all = np.concatenate([y[f] for (_, y, _), f in zip(labels, frames)])
    torch.manual_seed(seed)
    gauge = LipGauge()
    gauge.label_mean.fill_(float(y_all.mean()))
    gauge.label_std.fill_(float(y_all.std() + 1e-6))
    opt = torch.optim.AdamW(gauge.parameters(), lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc="lip gauge", unit="step", disable=not progress):
        picks = [(ci, int(rng.choice(frames[ci]))) for ci in rng.integers(len(clips), size=batch)]
        faces = torch.from_numpy(np.stack([clips[ci].crops[i] for ci, i in picks])).permute(0, 3, 1, 2).float() / 127.5 - 1
        boxes = torch.from_numpy(np.stack([labels[ci][0][i] for ci, i in picks]))
        y = torch.tensor([labels[ci][1][i] for ci, i in picks])
        faces, boxes = degrade(faces, boxes, g)
        loss = F.smooth_l1_loss(gauge.read(faces, boxes), (y - gauge.label_mean) / gauge.label_std)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return gauge.eval()


@torch.no_grad()
def score_gauge(gauge: LipGauge, clip_dir) -> tuple[float, float]:
    """The gauge's readings against the landmark lip ratio over one prepared clip's frames with a face: (Pearson r,
    mean absolute error in units of the ratio's std on that clip; always answering the clip's mean scores ~0.8)."""
    clip = load_clip(clip_dir)
    boxes, y, face = clip_labels(clip, clip.crops.shape[1])
    faces = torch.from_numpy(np.ascontiguousarray(clip.crops[face])).permute(0, 3, 1, 2).float() / 127.5 - 1
    reading = gauge.ratio(faces, torch.from_numpy(boxes[face])).numpy()
    y = y[face]
    return float(np.corrcoef(reading, y)[0, 1]), float(np.abs(reading - y).mean() / max(y.std(), 1e-9))


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the lip gauge (--loss.lip's critic) on prepared clips.")
    p.add_argument("--data", required=True, help="folder of prepared clips (python -m lipsync.training.prepare)")
    p.add_argument("--out", required=True, help="where to write the gauge checkpoint (.pt)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (64 mouths each)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches and degradations")
    p.add_argument("--score", nargs="*", default=[], metavar="CLIP",
                   help="prepared clips (people it did not train on) to report r with the landmark ratio on")
    a = p.parse_args(argv)
    start = time.perf_counter()
    gauge = train_gauge(a.data, a.steps, seed=a.seed)
    atomic_save({"channels": [m.out_channels for m in gauge.convs if isinstance(m, nn.Conv2d)], "size": gauge.size,
                 "state": gauge.state_dict()}, a.out)
    print(f"lip gauge: {a.steps} steps in {(time.perf_counter() - start) / 60:.1f} min -> {a.out}")
    for clip in a.score:
        r, error = score_gauge(gauge, clip)
        print(f"  {clip}: r {r:+.2f} with the landmark lip ratio, mean error {error:.2f} of its std")


if __name__ == "__main__":
    main()
