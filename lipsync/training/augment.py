"""Training augmentation: one random draw per item, applied identically to the target frames and their references.

Colour (hue, saturation, brightness, contrast, white balance), geometry (scale, shift, rotation, horizontal flip)
and degradation (blur, noise, JPEG) change together for target and reference, so the only way for the generator to
get a face's skin and lip colour right is to copy it from the reference frame, not to remember the identity.
"""

import io
import math
from dataclasses import dataclass

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from lipsync.blend import gaussian_kernel


@dataclass
class AugmentConfig:
    p: float = 0.8  # fraction of items augmented at all
    hue: float = 0.04  # hue rotation up to +-hue turns
    saturation: float = 0.3  # saturation x U(1 - s, 1 + s)
    brightness: float = 0.2  # + U(-b, b) in [-1, 1] units
    contrast: float = 0.25  # contrast x U(1 - c, 1 + c) around the mean
    white_balance: float = 0.08  # per-channel gain U(1 - w, 1 + w)
    scale: float = 0.05  # zoom U(1 - s, 1 + s)
    shift: float = 0.03  # translation up to +-shift of the crop side
    rotate: float = 4.0  # rotation up to +-rotate degrees
    flip: float = 0.5  # probability of a horizontal flip
    blur: float = 0.2  # probability of a Gaussian blur, sigma U(0.3, 1.0) px at 128 px
    noise: float = 0.015  # Gaussian noise, std U(0, noise) in [-1, 1] units
    jpeg: float = 0.2  # probability of JPEG at quality U(50, 95)


def draw(rng: np.random.Generator, cfg: AugmentConfig) -> dict | None:
    """The parameters of one item's augmentation, or None (left as it is, with probability 1 - p)."""
    if rng.random() >= cfg.p:
        return None
    u = lambda a: float(rng.uniform(-a, a))
    return {"hue": u(cfg.hue), "saturation": 1 + u(cfg.saturation), "brightness": u(cfg.brightness),
            "contrast": 1 + u(cfg.contrast), "gains": 1 + rng.uniform(-cfg.white_balance, cfg.white_balance, 3),
            "scale": 1 + u(cfg.scale), "shift": (u(cfg.shift), u(cfg.shift)), "angle": u(cfg.rotate),
            "flip": bool(rng.random() < cfg.flip),
            "blur": float(rng.uniform(0.3, 1.0)) if rng.random() < cfg.blur else 0.0,
            "noise": float(rng.uniform(0, cfg.noise)), "noise_seed": int(rng.integers(2 ** 31)),
            "jpeg": int(rng.integers(50, 96)) if rng.random() < cfg.jpeg else 0}


# YIQ: luma plus two chroma axes; hue is a rotation of (I, Q), saturation their length.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def colour_matrix(params: dict) -> torch.Tensor:
    """(3, 3) RGB -> RGB matrix for hue and saturation, then white-balance gains."""
    a = 2 * math.pi * params["hue"]
    s = params["saturation"]
    rot = torch.tensor([[1.0, 0, 0], [0, s * math.cos(a), -s * math.sin(a)], [0, s * math.sin(a), s * math.cos(a)]])
    return torch.diag(torch.as_tensor(params["gains"], dtype=torch.float32)) @ _YIQ2RGB @ rot @ _RGB2YIQ


def affine(params: dict, n: int) -> torch.Tensor:
    """(n, 2, 3) sampling grids' affine maps (output -> input, normalised coordinates) for scale, rotation, shift
    and flip."""
    a = math.radians(params["angle"])
    c, s = math.cos(a) / params["scale"], math.sin(a) / params["scale"]
    fx = -1.0 if params["flip"] else 1.0
    m = torch.tensor([[c * fx, -s, 2 * params["shift"][0]], [s * fx, c, 2 * params["shift"][1]]])
    return m.expand(n, 2, 3)


def map_points(params: dict, xy: np.ndarray, size: int) -> np.ndarray:
    """Points (..., 2) in crop pixels -> where the geometric part of the augmentation moves them."""
    m = affine(params, 1)[0].double().numpy()
    full = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(full)  # input -> output
    p = np.asarray(xy, np.float64) / size * 2 - 1  # crop pixels (pixel i spans [i, i + 1)) -> [-1, 1]
    q = p @ inv[:2, :2].T + inv[:2, 2]
    return ((q + 1) / 2 * size).astype(np.float32)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(2.5 * sigma))
    k = gaussian_kernel(sigma, r).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy():
        data = iio.imwrite("<bytes>", img, extension=".jpg", quality=quality)
        out.append(iio.imread(io.BytesIO(data), extension=".jpg"))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def apply(x: torch.Tensor | np.ndarray, params: dict | None) -> torch.Tensor:
    """Images (N, 3, S, S) in [-1, 1] (targets and references of one item) -> the same images augmented with one
    set of parameters. Every step is a function of the image alone, so equal inputs give equal outputs."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if params is None:
        return x
    n, _, h, w = x.shape
    # geometry: one affine warp (scale, rotation, shift, flip), edges repeated
    grid = F.affine_grid(affine(params, n), (n, 3, h, w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # colour: contrast around mid-grey and brightness, then hue, saturation and white balance
    x = x * params["contrast"] + params["brightness"]
    x = torch.einsum("ij,njhw->nihw", colour_matrix(params), x).clamp(-1, 1)
    # degradation: blur, noise (one field shared by all images of the item), JPEG
    if params["blur"] > 0:
        x = _blur(x, params["blur"] * w / 128)
    if params["noise"] > 0:
        g = torch.Generator().manual_seed(params["noise_seed"])
        x = (x + params["noise"] * torch.randn((1, 3, h, w), generator=g)).clamp(-1, 1)
    if params["jpeg"]:
        x = _jpeg(x, params["jpeg"])
    return x
