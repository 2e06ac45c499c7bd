"""Paste a generated face crop back into its frame: a feathered lower-face mask from the landmarks, colour matching
and the source's own fine detail outside the mouth.

MuseTalk's paste-back (`musetalk/utils/blending.py:get_image`, docs/musetalk.md §6) with the mask built from the 68
tracked landmarks instead of a face-parsing network. `make_blend` precomputes a `Blend` per frame (avatars cache
them); `paste` is the per-frame cost of the realtime loop: a few resizes and passes over the mask's rectangle.

Why the fine detail: the face is generated at S px (128 for our models, 256 for MuseTalk's) and scaled up 2-4x onto
a 720p face, so everything pasted is soft. But only the mouth and jaw move with speech. `paste(detail=True)` splits
the source patch at the crop's own resolution -- low = the patch taken down to S px and back up, the round trip the
crop went through; high = patch - low, what the crop could never hold -- and adds the high band to the generated
face everywhere except around the mouth (Blend.mouth, feathered): cheeks, skin texture and the jaw line keep the
source's sharpness, while the mouth, whose original shape must not come back, is the generated one alone. There, a
model with a restorer (lipsync.restore) supplies a face generated at S px and restored to 2S (`fine`), and an avatar
with a texture bank (lipsync.texture) adds fine detail borrowed from another frame whose mouth looks like the
generated one (`texture`, in frame pixels: never resampled). With a texture, the restored face gives only what the
crop can hold (its contrast); the detail finer than that is the video's own.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .tracking import pixel_box

JAW = slice(0, 17)
NOSTRILS = slice(31, 36)
LIPS = slice(48, 60)
NOSE_POINT = 29


@dataclass
class Blend:
    """Where and how one generated crop goes back into its frame."""

    box: tuple  # (x0, y0, w, h): the integer pixel square the crop covers (tracking.pixel_box); may exceed the frame
    rect: tuple  # (top, left, bottom, right) frame pixels: the mask's support, clipped to the frame
    mask: np.ndarray  # float16 (bottom - top, right - left) in [0, 1]
    mouth: tuple  # (top, left, bottom, right) within `mask`: left out of the colour statistics


def gaussian_kernel(sigma: float, radius: int, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian exp(-x^2 / (2 sigma^2)) at x = -radius .. radius, computed in `dtype`, returned as
    float32: (2 radius + 1,)."""
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).float()


def _band(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n, n) banded matrix that convolves a length-n signal with `kernel` (odd length), zero outside the signal."""
    r = len(kernel) // 2
    d = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    return torch.where(d.abs() <= r, kernel[(d + r).clamp(0, 2 * r)], 0.0)


def feather(hard: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of a (h, w) mask, zero outside it: support grows by exactly `radius` pixels.

    Two matrix products with banded matrices: on CPU far faster than a single-channel conv2d with a long kernel.
    """
    if radius < 1:
        return hard
    k = gaussian_kernel(radius / 3, radius, torch.float64)
    h, w = hard.shape
    return (_band(h, k) @ hard @ _band(w, k)).clamp(0, 1)


def inside_polygon(poly: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd rule for the grid of pixel centres xs (w,) x ys (h,): polygon (K, 2) -> bool (h, w)."""
    a, b = poly, np.roll(poly, -1, axis=0)  # edges a -> b
    y = ys[:, None]  # (h, 1) against (K,) edges
    crosses = (a[:, 1] <= y) != (b[:, 1] <= y)
    t = (y - a[:, 1]) / np.where(a[:, 1] == b[:, 1], 1.0, b[:, 1] - a[:, 1])
    x_cross = np.where(crosses, a[:, 0] + t * (b[:, 0] - a[:, 0]), np.inf)  # (h, K)
    return (x_cross[:, None, :] < xs[None, :, None]).sum(-1) % 2 == 1


FEATHER_FRAC = 0.06  # the mask's blur radius, and the source detail's fade into the mouth, as a fraction of the crop


def feather_radius(crop_side: int, frac: float = FEATHER_FRAC) -> int:
    """Blur radius in source pixels for a crop `crop_side` pixels high."""
    return max(1, round(frac * crop_side))


def make_blend(landmarks, box, frame_size, feather_frac=FEATHER_FRAC, cheek_inset=0.06, chin_drop=0.15) -> Blend:
    """Landmarks (68, 2) and crop box (4,) in source pixels, frame (H, W) -> the frame's Blend: the lower face
    inside the jaw line, minus the nose, below the crop's midline, feathered.

    feather_frac: blur radius as a fraction of the crop side. cheek_inset: the jaw line is pulled towards the face's
    centre by this fraction of its half-width. chin_drop: points below the midline move down by this fraction of
    their distance to it.
    """
    lm = np.asarray(landmarks, np.float64)
    x0, y0, w, h = pixel_box(box)
    r = feather_radius(h, feather_frac)
    mid = h / 2  # the crop's midline in box coordinates (source pixel i spans [i, i + 1))
    pts = lm - (x0, y0)

    # the area inside the jaw line, pulled in at the cheeks (the background behind the jaw stays the source's) and let
    # down below the chin (an opening mouth lowers the generated chin)
    jaw = pts[JAW].copy()
    cx = 0.5 * (jaw[:, 0].min() + jaw[:, 0].max())
    jaw[:, 0] = cx + (jaw[:, 0] - cx) * (1 - cheek_inset)
    below = jaw[:, 1] > mid
    jaw[below, 1] = mid + (jaw[below, 1] - mid) * (1 + chin_drop)

    # hard mask on the lower half of the box (the part the UNet saw masked), r pixels clear of the midline and the box
    # edges: feathered by a Gaussian truncated at r, the soft mask is exactly 0 above the midline and outside the
    # crop, and there the output is the source frame bit for bit
    top = int(np.ceil(mid))
    xs, ys = np.arange(w) + 0.5, np.arange(top, h) + 0.5
    hard = inside_polygon(jaw, xs, ys)
    hard &= (ys[:, None] >= mid + r) & (ys[:, None] < h - r) & (xs >= r) & (xs < w - r)
    nose = pts[NOSTRILS]  # minus the nose, down to the nostrils
    n_left, n_right = nose[:, 0].min() - r / 2, nose[:, 0].max() + r / 2
    hard &= ~((ys[:, None] < nose[:, 1].max()) & (xs >= n_left) & (xs < n_right))
    soft = feather(torch.from_numpy(hard.astype(np.float32)), r).numpy()  # (h - top, w)

    # clip to the frame
    H, W = frame_size
    t, b = max(y0 + top, 0), min(y0 + h, H)
    left, right = max(x0, 0), min(x0 + w, W)
    if b <= t or right <= left:
        return Blend((x0, y0, w, h), (0, 0, 0, 0), np.zeros((0, 0), np.float16), (0, 0, 0, 0))
    mask = soft[t - y0 - top: b - y0 - top, left - x0: right - x0].astype(np.float16)

    lips = lm[LIPS]
    mw = lips[:, 0].max() - lips[:, 0].min()
    mouth = (lips[:, 1].min() - 0.1 * mw - t, lips[:, 0].min() - 0.15 * mw - left,
             lips[:, 1].max() + 0.6 * mw - t, lips[:, 0].max() + 0.15 * mw - left)
    mouth = tuple(int(np.clip(round(v), 0, lim)) for v, lim in zip(mouth, mask.shape * 2))
    return Blend((x0, y0, w, h), (t, left, b, right), mask, mouth)


def match_colour(gen: torch.Tensor, src: torch.Tensor, weights: torch.Tensor, max_gain: float = 1.25,
                 step: int = 2):
    """Per-channel affine map of gen (h, w, 3) so that its weighted mean/std equal src's; weights (h, w) >= 0.

    The statistics are taken on every `step`-th row and column (4x cheaper, same values to a fraction of a level).
    """
    g, s, wt = gen[::step, ::step], src[::step, ::step], weights[::step, ::step]
    total = wt.sum()
    if total < 1:
        return gen
    w = (wt / total)[..., None]
    mg, ms = (w * g).sum((0, 1)), (w * s).sum((0, 1))  # (3,)
    sg = (w * (g - mg) ** 2).sum((0, 1)).sqrt()
    ss = (w * (s - ms) ** 2).sum((0, 1)).sqrt()
    gain = (ss / sg.clamp_min(1.0)).clamp(1 / max_gain, max_gain)
    return (gen - mg) * gain + ms


def resize_crop(crop: np.ndarray, h: int, w: int) -> torch.Tensor:
    """uint8 (S, S, 3) -> uint8 tensor (h, w, 3), antialiased bilinear (the inverse of tracking.crop_face)."""
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0)


def round_trip(x: torch.Tensor, h: int, w: int) -> tuple:
    """Float (B, C, H, W) -> (small, low): small (B, C, h, w) antialiased bilinear, as tracking.crop_face takes a
    face box down to the crop; low (B, C, H, W) = small back up, bilinear, as resize_crop. x - low is the detail a
    crop of (h, w) px cannot hold (the paste's source detail here, lipsync.texture's bank)."""
    small = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return small, F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def low_band(patch: torch.Tensor, scale_h: float, scale_w: float) -> torch.Tensor:
    """Float (h, w, 3) -> the same size after a trip down to (h scale_h, w scale_w) pixels and back (round_trip)."""
    h, w = patch.shape[:2]
    _, low = round_trip(patch.permute(2, 0, 1)[None], max(1, round(h * scale_h)), max(1, round(w * scale_w)))
    return low[0].permute(1, 2, 0)


def place(dst: torch.Tensor, src: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Copy src (h, w, ...) into dst (H, W, ...) with its corner at (top, left) of dst, clipped to dst; returns dst."""
    h, w = src.shape[:2]
    y1, x1, y2, x2 = max(top, 0), max(left, 0), min(top + h, dst.shape[0]), min(left + w, dst.shape[1])
    if y2 > y1 and x2 > x1:
        dst[y1:y2, x1:x2] = src[y1 - top: y2 - top, x1 - left: x2 - left]
    return dst


def keep_weight(shape, mouth, radius: int) -> torch.Tensor:
    """(h, w) weight of the source's fine detail: 1, falling to 0 over `radius` pixels into the mouth box. A box is
    separable, so its feathered mask (as `feather` would blur it) is the outer product of two feathered 1-D
    indicators: O(h + w) per frame in the realtime loop, not a 2-D blur."""
    (h, w), (mt, ml, mb, mr) = shape, mouth
    k = gaussian_kernel(radius / 3, radius, torch.float64)[None, None]  # (1, 1, 2 radius + 1)

    def side(n, lo, hi):  # the box's indicator along one axis, blurred with zeros outside: (n,)
        x = torch.zeros(1, 1, n)
        x[..., lo:hi] = 1
        return F.conv1d(x, k, padding=radius)[0, 0]
    return 1 - torch.outer(side(h, mt, mb), side(w, ml, mr))


def paste(frame: np.ndarray, crop: np.ndarray, blend: Blend, colour: bool = True, detail: bool = True,
          fine: np.ndarray | None = None, texture: tuple | None = None) -> np.ndarray:
    """Source frame (H, W, 3) uint8 + generated crop (S, S, 3) uint8 -> new frame; pixels where the mask is 0 are
    the source's exactly. detail: add the source's own detail finer than the crop's resolution outside the mouth
    (module doc). fine: the same face restored to more pixels (lipsync.restore), used around the mouth only, fading
    to the crop where the source's detail takes over. texture: (top, left, float (h, w, 3)) detail in frame pixels
    with its corner at frame pixel (top, left) (lipsync.texture), added where the source's detail is not: around the
    mouth only."""
    out = np.array(frame)  # a copy, also of a read-only memmap
    t, left, b, right = blend.rect
    if b <= t:
        return out
    x0, y0, w, h = blend.box
    gen = resize_crop(crop, h, w)[t - y0: b - y0, left - x0: right - x0].float()  # (b - t, right - left, 3)
    src = torch.from_numpy(out[t:b, left:right]).float()
    m = torch.from_numpy(blend.mask).float()
    keep = (keep_weight(m.shape, blend.mouth, feather_radius(h))[..., None]
            if detail or fine is not None or texture is not None else None)
    if fine is not None:
        if texture is not None:  # the texture lends detail finer than the crop, the video's own: of the restored
            fine = resize_crop(fine, *crop.shape[:2]).numpy()  # face keep what the crop can hold (its contrast)
        fine = resize_crop(fine, h, w)[t - y0: b - y0, left - x0: right - x0].float()
    low = low_band(src, crop.shape[0] / h, crop.shape[1] / w) if detail else src  # what the crop could hold
    if colour:
        # the VAE drifts in colour: match the generated pixels' mean and std to the source's over the skin part of the
        # mask (minus the mouth, whose content legitimately differs), so no seam shows where the mask fades out; the
        # restored face has colours of its own, so it is matched by its own statistics
        skin = m.clone()
        mt, ml, mb, mr = blend.mouth
        skin[mt:mb, ml:mr] = 0
        gen = match_colour(gen, low, skin)
        fine = match_colour(fine, low, skin) if fine is not None else None
    if fine is not None:
        gen = gen + (1 - keep) * (fine - gen)
    if texture is not None:
        ty, tx, lent = texture
        gen = gen + (1 - keep) * place(torch.zeros_like(gen), lent.float(), ty - t, tx - left)
    if detail:
        gen = gen + keep * (src - low)
    mixed = src + m[..., None] * (gen - src)
    out[t:b, left:right] = mixed.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out
