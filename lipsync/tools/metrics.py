"""Evaluation metrics (lipsync.tools.eval) on uint8 crops, mouth regions, audio activity and SyncNet offsets.

- `pearson`, `lagged_r`: Pearson r; `lagged_r` pairs x[f] with y[f + lag] and skips frames where either is NaN.
- `psnr`: 10 log10(R^2 / MSE) over all elements, R = 255; +inf for identical inputs.
- `mouth_metrics`: per-frame PSNR, SSIM and L1 inside each frame's mouth box (`lipsync.training.data.mouth_box` from
  lip landmarks, snapped outwards to whole pixels). L1 is the mean |difference| / 255 (0..1). SSIM is
  `lipsync.training.losses.ssim` on the box grown by half a window on each side, so the 'valid' SSIM map holds exactly
  one value per window centre inside the box: the mean SSIM over the mouth region, even for boxes smaller than the
  11 px window (mouths in 64 px crops are ~10 px wide).
- `silence_masks`: per video frame, silent = audio RMS (40 ms around the frame) more than `threshold_db` below the
  clip's 95th-percentile frame RMS, kept only in runs of >= `min_frames`; speech = at or above the threshold.
- `lip_opening_68`, `lip_opening_468`: the mouth opening from landmarks, one formula (`lip_opening`) for iBUG-68
  points and for mediapipe's 468-point mesh.
- `sync_score`: `lipsync.training.syncnet.sync_offsets` on a crop sequence: LSE-D/LSE-C-style numbers on OUR SyncNet's
  scale (distances between unit embeddings, 0..2), comparable only between videos scored by the same SyncNet.
- `detail`, `detail_ratios`: sharpness. detail = variance (population, ddof 0) of the Laplacian of the grey image:
  luma 0.299 R + 0.587 G + 0.114 B in float64, kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]], 'valid' (only the values
  whose stencil lies inside the region). Lips: the region is the mouth square. Rest of the lower face: the Laplacian
  of the whole lower-face rectangle, its variance over the values whose 5-point stencil reads no pixel of the mouth
  square (values centred in the square or next to one of its sides are left out), so it sees no pixel of the square.
  A clip's ratio is sum over frames of detail(generated) / sum over frames of detail(source) on the same regions (the
  ratio of the mean details; frames where a region holds no Laplacian value are skipped): 1 = as sharp as the source,
  < 1 blurrier, > 1 sharper (or noisier).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.training.data import mouth_box
from lipsync.training.losses import ssim
from lipsync.audio import frame_envelope, runs_at_least
from lipsync.training.syncnet import lower_half, sync_offsets

SSIM_WINDOW = 11


def pearson(x, y) -> float:
    """Pearson r; 0 when either input is constant (all values equal: their float std need not be exactly 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size == 0 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def lagged_r(x, y, lag: int) -> float:
    """Pearson r between x[f] and y[f + lag] (x, y: (N,)) over the frames where both are finite (lag > 0: x leads
    y); NaN with fewer than 3 such frames."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = (x[:len(x) - lag], y[lag:]) if lag >= 0 else (x[-lag:], y[:len(y) + lag])
    ok = np.isfinite(a) & np.isfinite(b)
    return pearson(a[ok], b[ok]) if ok.sum() >= 3 else math.nan


def psnr(x, y, data_range: float = 255.0) -> float:
    """PSNR in dB of two same-shape arrays; +inf when they are identical."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {x.shape} and {y.shape}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def pixel_boxes(boxes, size: int) -> np.ndarray:
    """Float boxes (N, 4) x1, y1, x2, y2 (pixel i spans [i, i+1)) -> the int boxes covering them, >= 1 px, clipped
    to the crop."""
    b = np.asarray(boxes, np.float64)
    lo = np.clip(np.floor(b[:, :2]), 0, size - 1)
    hi = np.clip(np.ceil(b[:, 2:]), lo + 1, size)
    return np.concatenate([lo, hi], 1).astype(np.int64)


def mouth_boxes(lips, size: int) -> np.ndarray:
    """Lip landmarks (N, K, 2) in crop pixels -> int mouth boxes (N, 4) (data.mouth_box, snapped outwards)."""
    return pixel_boxes(mouth_box(np.asarray(lips, np.float32), size), size)


def region_ssim(x: np.ndarray, y: np.ndarray, box) -> float:
    """Mean SSIM over window centres inside box (x1, y1, x2, y2) of two uint8 images (S, S, 3)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    h = SSIM_WINDOW // 2
    H, W = x.shape[:2]
    # the window needs h pixels of context around each centre: replicate the edge where the crop ends
    pad = ((h, h), (h, h), (0, 0))
    xs, ys = np.pad(x, pad, mode="edge"), np.pad(y, pad, mode="edge")
    sl = (slice(y1, y2 + 2 * h), slice(x1, x2 + 2 * h))
    a, b = (torch.from_numpy(np.ascontiguousarray(v[sl])).permute(2, 0, 1)[None].float() for v in (xs, ys))
    return float(ssim(a, b, data_range=255.0, window=SSIM_WINDOW))


def mouth_metrics(pred, truth, boxes) -> dict:
    """uint8 crops pred, truth (N, S, S, 3), int mouth boxes (N, 4) -> per-frame arrays psnr, ssim, l1 (N,)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    out = {"psnr": [], "ssim": [], "l1": []}
    for p, t, (x1, y1, x2, y2) in zip(pred, truth, boxes):
        a, b = p[y1:y2, x1:x2].astype(np.float64), t[y1:y2, x1:x2].astype(np.float64)
        out["psnr"].append(psnr(a, b))
        out["l1"].append(float(np.abs(a - b).mean() / 255))
        out["ssim"].append(region_ssim(p, t, (x1, y1, x2, y2)))
    return {k: np.array(v, np.float64) for k, v in out.items()}


# ----------------------------------------------------------------------------- audio activity


def silence_masks(wave, n_frames: int, fps: float, threshold_db: float = -30.0, min_frames: int = 3):
    """Per-frame (silent, speech) bool masks (n_frames,) and the frame RMS (module doc)."""
    rms = frame_envelope(np.asarray(wave, np.float32), n_frames, fps).astype(np.float64)
    ref = np.percentile(rms, 95) if len(rms) else 0.0
    if ref <= 0:
        return np.ones(n_frames, bool), np.zeros(n_frames, bool), rms
    quiet = rms < ref * 10 ** (threshold_db / 20)
    return runs_at_least(quiet, min_frames), ~quiet, rms


# ----------------------------------------------------------------------------- mouth opening from landmarks
# Lip geometry, for any face with landmarks: iBUG-68 points (tracks, prepared clips, dubcheck) or mediapipe's 468-point
# mesh (reenact, on full frames). Our own drawn faces are also read from pixels (synthetic_face.dark_height), a
# different measurement: the height of the dark mouth the model drew, with no landmark tracker in the loop.

UPPER_INNER, LOWER_INNER = [61, 62, 63], [67, 66, 65]  # iBUG-68 inner-lip pairs, left to right


def eye_axes(lm):
    """Unit vectors along the eye line (right) and perpendicular to it (down) of iBUG-68 landmarks (..., 68, 2)
    -> 2 x (..., 1, 2)."""
    right = lm[..., 42:48, :].mean(-2) - lm[..., 36:42, :].mean(-2)
    right = right / np.linalg.norm(right, axis=-1, keepdims=True)
    return right[..., None, :], np.stack([-right[..., 1], right[..., 0]], -1)[..., None, :]


def lip_opening(upper, lower, length, down=None) -> np.ndarray:
    """Inner-lip gap over a face length per frame: paired inner-lip points upper, lower (N, K, 2) -> the mean over
    pairs of their distance (or of lower - upper along the unit vectors `down` (N, 1, 2)) / length (N,)."""
    d = lower - upper
    gap = np.linalg.norm(d, axis=-1) if down is None else (d * down).sum(-1)
    return gap.mean(-1) / np.maximum(length, 1e-6)


def lip_opening_68(landmarks) -> np.ndarray:
    """iBUG-68 landmarks (N, 68, 2) in any pixel units -> (N,) float32: the gap of pairs 61-67, 62-66, 63-65
    perpendicular to the eye line over the distance between the eye centres (yongen: ~0.02 closed, ~0.2 puppeted
    wide open)."""
    lm = np.asarray(landmarks, np.float64)
    _, down = eye_axes(lm)
    eye_distance = np.linalg.norm(lm[:, 42:48].mean(1) - lm[:, 36:42].mean(1), axis=-1)
    return lip_opening(lm[:, UPPER_INNER], lm[:, LOWER_INNER], eye_distance, down).astype(np.float32)


def lip_opening_468(mesh) -> np.ndarray:
    """mediapipe face-mesh points (N, 468, 2) -> (N,): inner-lip gap |p13 - p14| over the face height |p10 - p152|."""
    return lip_opening(mesh[:, [13]], mesh[:, [14]], np.linalg.norm(mesh[:, 10] - mesh[:, 152], axis=-1))


# ----------------------------------------------------------------------------- SyncNet offsets


def to_syncnet_frames(crops, size: int) -> torch.Tensor:
    """uint8 crops (N, S, S, 3) -> lower halves (N, 3, size/2, size) in [-1, 1], resized when S != size."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return lower_half(x)


def sync_score(syncnet, crops, mel: torch.Tensor, max_offset: int = 15) -> dict:
    """Crops (N, S, S, 3) uint8 and their log-mel (80, >= m N) -> {'offset', 'dist' (LSE-D-like), 'conf'
    (LSE-C-like), 'dists' per offset}; on our SyncNet's scale (module doc)."""
    frames = to_syncnet_frames(crops, syncnet.config.crop_size)
    res = sync_offsets(syncnet, frames, mel, max_offset=max_offset)
    return {"offset": res.best_offset, "dist": res.min_dist, "conf": res.confidence,
            "dists": [round(float(d), 5) for d in res.dists]}


# ----------------------------------------------------------------------------- sharpness (detail)

LUMA = (0.299, 0.587, 0.114)


def luma(image) -> np.ndarray:
    """RGB image (H, W, 3) -> float64 grey (H, W): 0.299 R + 0.587 G + 0.114 B."""
    x = np.asarray(image, np.float64)
    return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]


def laplacian(grey) -> np.ndarray:
    """Grey image (H, W) -> its 'valid' 3x3 Laplacian [[0, 1, 0], [1, -4, 1], [0, 1, 0]], (H - 2, W - 2): value
    (i, j) is centred on pixel (i + 1, j + 1)."""
    g = np.asarray(grey, np.float64)
    return g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]


def detail(image, region, exclude=None) -> float:
    """Variance of the Laplacian of the luma of image[y1:y2, x1:x2] (region: int x1, y1, x2, y2 in image pixels;
    module doc). exclude: a box x1, y1, x2, y2 in image pixels whose pixels the counted Laplacian values must not
    read (values centred in it or next to one of its sides are left out). NaN when no value is left."""
    x1, y1, x2, y2 = (int(v) for v in region)
    lap = laplacian(luma(np.asarray(image)[y1:y2, x1:x2])) if y2 - y1 >= 3 and x2 - x1 >= 3 else np.empty((0, 0))
    if exclude is not None and lap.size:
        ex1, ey1, ex2, ey2 = (int(v) for v in exclude)
        ys, xs = y1 + 1 + np.arange(lap.shape[0]), x1 + 1 + np.arange(lap.shape[1])  # the values' centre pixels
        # the 5-point stencil of a value centred on (y, x) reads (y, x) and its 4 side neighbours: it reads a pixel
        # of the box when the centre is in the box or next to one of its sides
        rows, rows1 = (ys >= ey1) & (ys < ey2), (ys >= ey1 - 1) & (ys <= ey2)
        cols, cols1 = (xs >= ex1) & (xs < ex2), (xs >= ex1 - 1) & (xs <= ex2)
        reads = rows[:, None] & cols1[None, :] | rows1[:, None] & cols[None, :]
        lap = lap[~reads]
    return float(lap.var()) if lap.size else math.nan


def detail_ratios(generated, source, squares, rects, frames=None) -> dict:
    """Generated and source frames (N, H, W, 3), each frame's mouth square and lower-face rectangle (N, 4) int
    x1, y1, x2, y2 (from the source's mesh), the frames to score (default all) -> {"detail_lips", "detail_rest"}: sum
    of detail(generated) / sum of detail(source) over the frames where the region has a value (module doc); NaN when
    the source's sum is 0."""
    sums = np.zeros((2, 2))  # [lips, rest] x [generated, source]
    for i in range(len(source)) if frames is None else frames:
        for k, (region, exclude) in enumerate([(squares[i], None), (rects[i], squares[i])]):
            g, s = detail(generated[i], region, exclude), detail(source[i], region, exclude)
            if np.isfinite(g) and np.isfinite(s):
                sums[k] += g, s
    return {name: float(sums[k, 0] / sums[k, 1]) if sums[k, 1] > 0 else math.nan
            for k, name in enumerate(("detail_lips", "detail_rest"))}
