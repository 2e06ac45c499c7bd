"""The mouth restorer's training data and loss (lipsync.restore; `train.py --stage restorer`).

Self-supervised, no labels: real face crops at 2S px are the targets. The input (`--restorer_input`) is either the
face the generator itself draws for that frame at S px, each frame its own reference, with the clip's audio
(generated, the default: what the restorer sees in use), or the real crop taken down to S px (antialiased bilinear, as
tracking.crop_face crops) and through the generator's frozen VAE (vae: only what the VAE loses). Only the lower part
of the face is scored (the paste uses the restored face only around the mouth), and only frames whose face box is at
least 2S source pixels wide: a smaller face would be scaled up to the target size, with no real detail to learn. An
L1-trained restorer draws the average of the details a soft input allows; `--loss.restorer_gan` adds a patch
discriminator (LSGAN, as stage 2's) that pushes it toward the real faces' sharpness.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lipsync.blend import resize_crop
from lipsync.training.data import list_clips, load_clip
from lipsync.training.losses import lsgan_d_loss, lsgan_g_loss

LOWER_FROM = 3 / 8  # the restorer is trained on rows LOWER_FROM * side .. side of the crop: nose tip to chin


class RestorerDataset(Dataset):
    """Face crops (3, size, size) in [-1, 1] from the prepared clips in root, randomly mirrored; after
    `add_generated`, each with the generator's own face for that frame (3, side, side) as "input"."""

    def __init__(self, root, split: str, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self.clips, self.items = [], []  # prepared clips; (clip, frame) per item
        self.generated = None  # {clip: {frame: uint8 (3, S, S) generated face}} (add_generated)
        for path in list_clips(root, split):
            clip = load_clip(path)
            wide = clip.face & (clip.boxes[:, 2] - clip.boxes[:, 0] >= size)
            self.items += [(len(self.clips), int(i)) for i in np.flatnonzero(wide)]
            self.clips.append(clip)
        if not self.items:
            raise ValueError(f"no {split} frames in {root} with a face box of at least {size} px: the restorer needs "
                             f"faces larger than its output (prepare clips of larger faces with --crop-size {size})")

    def target(self, c: int, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.clips[c].crops[i])).permute(2, 0, 1).float() / 127.5 - 1  # (3, S', S')
        if x.shape[-1] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return x

    @torch.no_grad()
    def add_generated(self, model, batch_size: int = 16):
        """The generator's own face for every item: its crop at the model's size, each frame its own reference (as
        infer.py dubs a video with the bundled model), with the clip's own audio. The restorer then learns to
        restore what the generator actually draws, not only what its VAE loses."""
        side = model.crop_size
        self.generated = {}
        for c, clip in enumerate(self.clips):
            frames = [i for k, i in self.items if k == c]
            if not frames:
                continue
            windows = model.audio_windows(clip.wave, len(clip), clip.fps)[frames]  # (n, N, D)
            faces = []
            for k in range(0, len(frames), batch_size):
                chunk = frames[k: k + batch_size]
                crops = torch.stack([resize_crop(np.array(clip.crops[i]), side, side) for i in chunk])  # (b, S, S, 3)
                faces.append(model(model.face.unet_input(crops), windows[k: k + batch_size]))  # (b, 3, S, S)
            faces = ((torch.cat(faces).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            self.generated[c] = dict(zip(frames, faces))

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        c, i = self.items[index]
        item = {"target": self.target(c, i)}
        if self.generated is not None:
            item["input"] = self.generated[c][i].float() / 127.5 - 1  # (3, S, S)
        if np.random.default_rng((self.seed, self.epoch, index)).random() < 0.5:
            item = {k: v.flip(-1) for k, v in item.items()}
        return item


@torch.no_grad()
def degrade(target: torch.Tensor, vae, side: int) -> torch.Tensor:
    """Real crops (B, 3, rS, rS) -> the restorer's input (B, 3, S, S): down to S px, then the VAE's round trip."""
    x = F.interpolate(target, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return vae.decode(vae.encode(x).mean).clamp(-1, 1)


def restorer_step(restorer, batch, vae, perceptual, side: int, perceptual_weight: float = 0.1, disc=None,
                  gan_weight: float = 0.0):
    """L1 + perceptual (+ gan_weight x LSGAN against disc) between the restored lower face and the real one -> loss,
    logs (with the bilinear upscale's L1, the untrained restorer's: the figure to beat), restored and real lower
    faces (for the discriminator's own step)."""
    target = batch["target"]
    x = batch["input"] if "input" in batch else degrade(target, vae, side)
    r, top = target.shape[-1] // side, round(LOWER_FROM * side)
    x, target = x[..., top:, :], target[..., r * top:, :]  # (B, 3, S - top, S), (B, 3, r (S - top), r S)
    pred = restorer(x)
    l1 = F.l1_loss(pred, target)
    p = perceptual(pred, target)
    loss = l1 + perceptual_weight * p
    logs = {"l1": l1.item(), "perceptual": p.item()}
    if disc is not None and gan_weight > 0:
        g = lsgan_g_loss(disc(pred)[1])
        loss = loss + gan_weight * g
        logs["gan"] = g.item()
    with torch.no_grad():
        base = F.l1_loss(F.interpolate(x, scale_factor=r, mode="bilinear", align_corners=False), target)
    return loss, logs | {"l1_bilinear": base.item()}, pred, target


def critic_step(disc, pred, target):
    """The restorer's discriminator: LSGAN on real vs restored lower faces (restored ones detached)."""
    d = lsgan_d_loss(disc(target)[1], disc(pred.detach())[1])
    return d, {"d": d.item()}
