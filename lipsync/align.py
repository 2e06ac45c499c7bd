"""Aligning a reference crop to its frame: the "audio" rule's reference is another frame of the video, so warp it
until its eyes and nose sit where the frame's own do.

A face crop follows the tracker's box, and the box's bottom follows the chin: a frame whose mouth is wide open is
cropped taller, so its face sits smaller and higher in its crop than a closed-mouthed frame's. Shown such a
reference unaligned, the UNet has to move and rescale the mouth it is meant to draw; aligned, the reference's mouth
is already where the frame's mouth goes, as with MuseTalk's own-frame reference (which the generator follows best).

    landmarks (68, 2) of both crops -> similarity (scale, rotation, shift) fitted on the eyes and nose (points 27-47,
    which do not move with the mouth) -> reference crop resampled in the frame's crop coordinates (bilinear)

Coordinates are crop pixels with pixel k spanning [k, k + 1) (lipsync.tracking.to_crop_coords).
"""

import numpy as np
import torch
import torch.nn.functional as F

STABLE = np.arange(27, 48)  # iBUG-68 nose (27-35) and eyes (36-47)


def similarity(src, dst) -> np.ndarray:
    """Points (K, 2) -> (2, 3) matrix M of the similarity with dst ~ M [src; 1], least squares (Umeyama's, no
    reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    u, sig, vt = np.linalg.svd(d.T @ s / len(s))
    e = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    a = np.trace(np.diag(sig) @ e) / (s ** 2).sum(1).mean() * (u @ e @ vt)  # scale x rotation (2, 2)
    return np.concatenate([a, (md - a @ ms)[:, None]], 1)


def reference_maps(ref_landmarks, frame_landmarks) -> np.ndarray:
    """Crop-coordinate landmarks (n, 68, 2) of the references and of their frames -> (n, 2, 3) maps from reference
    crop pixels to frame crop pixels."""
    return np.stack([similarity(r[STABLE], f[STABLE]) for r, f in zip(ref_landmarks, frame_landmarks)])


def warp(images, maps, size: int) -> torch.Tensor:
    """Reference crops (n, C, S, S) float (any range) and maps (n, 2, 3) (reference px -> frame px) -> the crops as
    the frame would see them (n, C, S, S): output pixel u samples the reference at M^-1 u (bilinear, edges
    replicated)."""
    x = torch.as_tensor(images)
    m = np.asarray(maps, np.float64)
    a, b = m[:, :, :2], m[:, :, 2]
    a_inv = np.linalg.inv(a)  # (n, 2, 2)
    b_inv = -np.einsum("nij,nj->ni", a_inv, b)
    # normalised coords (-1 .. 1 across the crop, align_corners=False): n = 2 u / S - 1 on both sides
    theta = np.concatenate([a_inv, (a_inv.sum(-1) + 2 * b_inv / size - 1)[..., None]], -1)  # (n, 2, 3)
    grid = F.affine_grid(torch.from_numpy(theta).to(torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)
