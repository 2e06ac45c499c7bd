"""Face tracking: iBUG-68 landmarks per frame, MuseTalk-v1.5 crop boxes, smoothed over time, and the crops.

Trackers map a frame (H, W, 3) uint8 RGB to (68, 2) float32 landmarks in source pixels, or None for no face:
- `MeshTracker`: mediapipe 0.10.21's legacy face mesh (468 points, video mode, offline models), reduced to iBUG-68
  with `MESH_TO_IBUG68`. mediapipe is optional and imported lazily.
- `BoxTracker`: the `--bbox x1,y1,x2,y2` fallback for a static shot. It needs nothing: every frame gets the same
  landmarks, a symmetric mean face (`TEMPLATE`, measured with the mesh on a frontal talking head) stretched so its
  landmark bounding box (brow tops to chin, jaw side to side) fills the given box. Crop geometry, blend masks and
  reference sampling then work unchanged, but the mouth landmarks do not move.

Crop geometry, one of `GEOMETRIES` (docs/geometry.md):
- "square" (our own checkpoints' default, `crop_box`): nose point (lm 29, + bbox_shift, + = down) on the crop's
  horizontal midline, bottom = chin (lm 8) + margin, square, centred on the jaw.
- "musetalk" (the published MuseTalk weights, `musetalk_box`): MuseTalk v1.5's own integer box from
  `musetalk/utils/preprocessing.py:get_landmark_and_bbox` and `scripts/inference.py` (extra_margin): jaw-wide, not
  square, resized to S x S without keeping the aspect ratio, with OpenCV's Lanczos-4 filter (`resize_lanczos4`).
Crops cover the integer pixel rectangle `pixel_box(box)` (pixels outside the frame replicate the edge) resized to
S x S; `to_crop_coords` uses the same rounding, in continuous coordinates where source pixel i spans [i, i + 1).
"""

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

GEOMETRIES = ("square", "musetalk")
INSTALL_HINT = 'face tracking needs mediapipe: pip install mediapipe==0.10.21 "numpy<2"   (or pass --bbox x1,y1,x2,y2)'

# iBUG-68 point -> face-mesh vertices (averaged when two). Picked on the mesh's own contours (FACEMESH_FACE_OVAL,
# _LIPS, _EYES, _EYEBROWS, _NOSE): jaw points evenly spaced in arc length from the ear-level oval vertex (234/454) to
# the chin (152); lips/eyelids at 1/3, 1/2, 2/3 of the corner-to-centre distance; mirror points are mirror vertices.
MESH_TO_IBUG68 = (
    (234,), (93,), (132,), (58,), (172,), (136, 150), (149,), (148,), (152,),  # jaw 0-8, subject's right -> chin
    (377,), (378,), (365, 379), (397,), (288,), (361,), (323,), (454,),  # jaw 9-16
    (70,), (63,), (105,), (66,), (107,),  # right brow 17-21, outer -> inner
    (336,), (296,), (334,), (293,), (300,),  # left brow 22-26, inner -> outer
    (168,), (6, 197), (195, 5), (4,),  # nose bridge 27-30, top -> tip (29 = nose point)
    (98,), (97,), (2,), (326,), (327,),  # nostril base 31-35
    (33,), (160,), (158,), (133,), (153,), (144,),  # right eye 36-41
    (362,), (385,), (387,), (263,), (373,), (380,),  # left eye 42-47
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (405,), (314,), (17,), (84,), (181,),  # outer lips 48-59
    (78,), (81,), (13,), (311,), (308,), (402,), (14,), (178,),  # inner lips 60-67
)

# Symmetric mean face in the landmarks' own bounding box (x: jaw side to side, y: brow tops to chin), our measurement:
# MESH_TO_IBUG68 on three faces (yongen.mp4 averaged over its frames, video1.png, sit.jpeg), mirrored and averaged.
TEMPLATE = np.array([
    (0.000, 0.266), (0.013, 0.375), (0.035, 0.491), (0.073, 0.613), (0.121, 0.718), (0.209, 0.832),
    (0.297, 0.913), (0.417, 0.988), (0.500, 1.000), (0.583, 0.988), (0.703, 0.913), (0.791, 0.832),
    (0.879, 0.718), (0.927, 0.613), (0.965, 0.491), (0.987, 0.375), (1.000, 0.266), (0.066, 0.055),
    (0.110, 0.015), (0.179, 0.000), (0.271, 0.013), (0.381, 0.033), (0.619, 0.033), (0.729, 0.013),
    (0.821, 0.000), (0.890, 0.015), (0.934, 0.055), (0.500, 0.185), (0.500, 0.296), (0.500, 0.413),
    (0.500, 0.509), (0.382, 0.564), (0.449, 0.588), (0.500, 0.590), (0.551, 0.588), (0.618, 0.564),
    (0.155, 0.197), (0.205, 0.173), (0.289, 0.171), (0.369, 0.223), (0.304, 0.238), (0.224, 0.237),
    (0.631, 0.223), (0.711, 0.171), (0.795, 0.173), (0.845, 0.197), (0.776, 0.237), (0.696, 0.238),
    (0.328, 0.718), (0.396, 0.690), (0.448, 0.681), (0.500, 0.689), (0.552, 0.681), (0.604, 0.690),
    (0.672, 0.718), (0.597, 0.788), (0.552, 0.807), (0.500, 0.813), (0.448, 0.807), (0.403, 0.788),
    (0.353, 0.715), (0.428, 0.724), (0.500, 0.731), (0.572, 0.724), (0.647, 0.715), (0.578, 0.734),
    (0.500, 0.742), (0.422, 0.734),
], np.float32)


class MediapipeMissing(ImportError):
    pass


def _face_mesh_module():
    os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ start-up chatter
    try:
        from mediapipe.python.solutions import face_mesh
    except ImportError as err:
        raise MediapipeMissing(f"{INSTALL_HINT}  [import failed: {err}]") from err
    return face_mesh


class MeshTracker:
    """mediapipe face mesh in video mode (static_image_mode=False, refine off), one face, reduced to iBUG-68."""

    name = "mediapipe"

    def __init__(self, min_detection_confidence=0.5, min_tracking_confidence=0.5):
        face_mesh = _face_mesh_module()
        self.mesh = face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=False,
                                       min_detection_confidence=min_detection_confidence,
                                       min_tracking_confidence=min_tracking_confidence)
        self.first = np.array([ids[0] for ids in MESH_TO_IBUG68])
        self.last = np.array([ids[-1] for ids in MESH_TO_IBUG68])

    def points468(self, frame):
        """Frame (H, W, 3) uint8 -> the face mesh's (468, 2) points in pixels, or None without a face."""
        h, w = frame.shape[:2]
        result = self.mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        return np.array([(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark], np.float32)

    def __call__(self, frame):
        mesh = self.points468(frame)
        return None if mesh is None else 0.5 * (mesh[self.first] + mesh[self.last])  # (468, 2) -> (68, 2)

    def close(self):
        self.mesh.close()


class BoxTracker:
    """Fixed face box for every frame: the template face stretched to (x1, y1, x2, y2)."""

    name = "bbox"

    def __init__(self, box):
        self.landmarks = template_landmarks(box)

    def __call__(self, frame):
        return self.landmarks.copy()

    def close(self):
        pass


def parse_bbox(text):
    """'x1,y1,x2,y2' -> (x1, y1, x2, y2) floats, with x2 > x1 and y2 > y1."""
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--bbox wants x1,y1,x2,y2 (four numbers), got {text!r}") from None
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"--bbox wants x2 > x1 and y2 > y1, got {text!r}")
    return x1, y1, x2, y2


def template_landmarks(box):
    x1, y1, x2, y2 = box
    return (TEMPLATE * np.array([x2 - x1, y2 - y1], np.float32) + np.array([x1, y1], np.float32)).astype(np.float32)


# ----------------------------------------------------------------------------- per-frame tracking


def track_landmarks(frames, tracker, progress=None):
    """Run a tracker over frames -> (landmarks (N, 68, 2) float32 with NaN where no face, face (N,) bool)."""
    out = []
    for frame in frames:
        lm = tracker(frame)
        out.append(np.full((68, 2), np.nan, np.float32) if lm is None else lm)
        if progress is not None:
            progress.update(1)
    landmarks = np.stack(out) if out else np.zeros((0, 68, 2), np.float32)
    return landmarks, ~np.isnan(landmarks).any(axis=(1, 2))


def fill_missing(landmarks, face):
    """No-face frames take the landmarks of the nearest frame with a face (earlier one on ties)."""
    good = np.flatnonzero(face)
    if len(good) == 0:
        raise ValueError("no face found in any frame (pass --bbox x1,y1,x2,y2 for a fixed face box)")
    idx = np.arange(len(face))
    pos = np.searchsorted(good, idx)  # first good frame at or after each frame
    after, before = good[np.minimum(pos, len(good) - 1)], good[np.maximum(pos - 1, 0)]
    nearest = np.where(np.abs(idx - before) <= np.abs(after - idx), before, after)
    return landmarks[nearest].astype(np.float32)


# ----------------------------------------------------------------------------- crop boxes


def track_and_fill(frames, tracker, bar=None):
    """Track every frame, then give frames without a face the nearest face's landmarks; closes the tracker.

    Returns (landmarks (N, 68, 2) float32, face (N,) bool, tracker milliseconds per frame).
    """
    spent = 0.0

    def timed_tracker(frame):
        nonlocal spent
        t0 = time.perf_counter()
        out = tracker(frame)
        spent += time.perf_counter() - t0
        return out

    try:
        raw, face = track_landmarks(frames, timed_tracker, bar)
    finally:
        tracker.close()
    if len(face) == 0:
        raise ValueError("no frames decoded")
    return fill_missing(raw, face), face, 1000 * spent / len(face)


def crop_box(landmarks, bbox_shift=0, margin=10):
    """(..., 68, 2) -> (..., 4) square (x1, y1, x2, y2): nose point + bbox_shift on the midline, chin + margin at
    the bottom, centred on the jaw's x-range."""
    nose_y = landmarks[..., 29, 1] + bbox_shift
    bottom = landmarks[..., 8, 1] + margin
    half = np.maximum(bottom - nose_y, 1.0)
    jaw_x = landmarks[..., 0:17, 0]
    cx = 0.5 * (jaw_x.min(-1) + jaw_x.max(-1))
    return np.stack([cx - half, bottom - 2 * half, cx + half, bottom], axis=-1).astype(np.float32)


def musetalk_box(landmarks, bbox_shift=0, extra_margin=10, height=None):
    """MuseTalk v1.5's face box: (68, 2) landmarks -> (x1, y1, x2, y2) ints, or (N, 68, 2) -> (N, 4) int64.

    As `get_landmark_and_bbox` computes it: landmarks truncated to int32; the nose point (lm 29) moved by bbox_shift
    in place (so a float shift is truncated too, and the moved point counts in max y); x from the min to the max x
    of all 68 points; top = nose - (max y - nose), at least 0; bottom = max y + extra_margin (scripts/inference.py:
    10 for v15, 0 for v1), at most `height`. MuseTalk falls back to its face detector's box when this box is empty
    or x1 < 0; we have no detector and keep the box (crops replicate the frame's edge pixels).
    """
    lm = np.asarray(landmarks).astype(np.int32).astype(np.int64)  # float -> int32 truncates towards zero
    ys = lm[..., 1].copy()
    ys[..., 29] = np.trunc(ys[..., 29] + bbox_shift)
    nose, bottom = ys[..., 29], ys.max(-1)
    y2 = bottom + int(extra_margin)
    if height is not None:
        y2 = np.minimum(y2, int(height))
    box = np.stack([lm[..., 0].min(-1), np.maximum(0, 2 * nose - bottom), lm[..., 0].max(-1), y2], axis=-1)
    return tuple(int(v) for v in box) if box.ndim == 1 else box


def face_boxes(landmarks, geometry="square", bbox_shift=0.0, margin=10.0, smooth_sigma=2.0, height=None):
    """(N, 68, 2) -> (N, 4) float32 crop boxes of `geometry` (margin: below the chin for "square", MuseTalk's
    extra_margin for "musetalk"), smoothed over time with `smooth_boxes` unless smooth_sigma is 0."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown crop geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
    if geometry == "square":
        boxes = crop_box(landmarks, bbox_shift, margin)
    else:
        boxes = musetalk_box(landmarks, bbox_shift, margin, height).reshape(-1, 4).astype(np.float32)
    return smooth_boxes(boxes, smooth_sigma) if smooth_sigma > 0 else boxes


def _gaussian_smooth(x, sigma):
    """Zero-phase Gaussian smoothing along axis 0 with edge replication; (N, C) -> (N, C)."""
    if sigma <= 0 or len(x) < 2:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, ((r, r), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, c], k, mode="valid") for c in range(x.shape[1])], axis=1)


def smooth_boxes(boxes, sigma=2.0):
    """Remove landmark jitter without lag: Gaussian (sigma frames) over box centres, 2*sigma over the side length
    (zoom flicker is the more visible artefact). Square boxes stay square."""
    boxes = np.asarray(boxes, np.float64)
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    size = boxes[:, 2:] - boxes[:, :2]
    centre, size = _gaussian_smooth(centre, sigma), _gaussian_smooth(size, 2 * sigma)
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- crops and coordinates


def pixel_box(box):
    """The integer pixel rectangle a crop covers: (x0, y0, w, h), x0/y0 rounded, w/h rounded and >= 1."""
    return tuple(int(v) for v in _pixel_boxes(box)[0])


def box_patch(frame, box) -> np.ndarray:
    """(H, W, C) + box -> the pixels of its pixel_box (h, w, C), unresized; outside the frame the edge pixels are
    replicated."""
    h_img, w_img = frame.shape[:2]
    x0, y0, w, h = pixel_box(box)
    if x0 >= 0 and y0 >= 0 and x0 + w <= w_img and y0 + h <= h_img:
        return frame[y0:y0 + h, x0:x0 + w]
    rows = np.clip(np.arange(y0, y0 + h), 0, h_img - 1)
    cols = np.clip(np.arange(x0, x0 + w), 0, w_img - 1)
    return frame[rows[:, None], cols[None, :]]


def crop_face(frame, box, size, lanczos=False):
    """(H, W, 3) uint8 + box -> (size, size, 3) uint8; outside the frame the edge pixels are replicated.
    Resized with antialiased bilinear, or with lanczos=True as MuseTalk does (`resize_lanczos4`)."""
    patch = box_patch(frame, box)
    if lanczos:
        return resize_lanczos4(patch, size, size)
    x = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None]  # uint8, channels-last memory
    # (1, 3, h, w) -> (1, 3, size, size); torch's uint8 antialiased path is ~10x faster than float here
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())


_S45 = 0.70710678118654752440084436210485
_LANCZOS4_CS = np.array([[1, 0], [-_S45, -_S45], [0, 1], [_S45, -_S45], [-1, 0], [_S45, _S45], [0, -1], [-_S45, _S45]])


def _lanczos4_matrix(n_in, n_out):
    """OpenCV's INTER_LANCZOS4 along one axis as an (n_out, n_in) float64 matrix of 11-bit integer weights.

    Output pixel i samples the input at (i + 0.5) n_in / n_out - 0.5 with the 8 taps around it, weights
    sinc(d) sinc(d / 4) normalised to sum 1 and rounded to multiples of 1/2048, taps past the ends clamped to the edge
    pixel. No wider kernel when shrinking: OpenCV does not antialias here. The float arithmetic follows OpenCV's
    resize and interpolateLanczos4 step by step (imgproc/src/resize.cpp), so every weight rounds the same way.
    """
    pos = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    left = np.floor(pos)
    frac = pos - left  # float32
    d = frac[:, None] + np.float32(3) - np.arange(8, dtype=np.float32)  # float32 distance to taps left - 3 .. left + 4
    y = -d.astype(np.float64) * np.pi * 0.25
    y0 = y[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):  # y = 0 on a pixel; those rows are replaced below
        w = ((_LANCZOS4_CS[:, 0] * np.sin(y0) + _LANCZOS4_CS[:, 1] * np.cos(y0)) / (y * y)).astype(np.float32)
        total = w[:, 0].copy()
        for k in range(1, 8):  # summed in order, in float32
            total += w[:, k]
        w *= (np.float32(1) / total)[:, None]
    w[frac < np.finfo(np.float32).eps] = np.eye(8, dtype=np.float32)[3]  # on a pixel: copy it
    taps = np.clip(left[:, None] + np.arange(-3, 5), 0, n_in - 1).astype(np.int64)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), 8), taps.ravel()), np.round(w * 2048).ravel())
    return torch.from_numpy(m)


def resize_lanczos4(image, height, width):
    """(h, w, 3) uint8 -> (height, width, 3) uint8, equal to cv2.resize(image, (width, height),
    interpolation=cv2.INTER_LANCZOS4), MuseTalk's crop filter, without OpenCV: the same taps and 11-bit weights,
    rounded once at the end. float64 holds every partial sum exactly, so this is OpenCV's integer arithmetic."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).double()  # (3, h, w)
    x = _lanczos4_matrix(x.shape[1], height) @ x @ _lanczos4_matrix(x.shape[2], width).T  # (3, height, width)
    x = torch.floor((x + 2 ** 21) / 2 ** 22)  # OpenCV's (v + 2^21) >> 22
    return x.clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def crop_faces(frames, boxes, size, lanczos=False):
    """(N, H, W, 3) (or any iterable of frames) + (N, 4) boxes -> (N, size, size, 3) uint8."""
    crops = [crop_face(frame, box, size, lanczos) for frame, box in zip(frames, boxes)]
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def _pixel_boxes(boxes):
    """Vectorised pixel_box: (..., 4) float boxes -> (..., 1, 4) float (x0, y0, w, h), broadcastable over points."""
    boxes = np.asarray(boxes, np.float64)
    origin = np.floor(boxes[..., :2] + 0.5)
    size = np.maximum(1.0, np.floor(boxes[..., 2:] - boxes[..., :2] + 0.5))
    return np.concatenate([origin, size], axis=-1)[..., None, :]


def to_crop_coords(landmarks, boxes, size):
    """Source-pixel points (N, K, 2) with boxes (N, 4) (or (K, 2) with (4,)) -> crop pixel coords, same shape."""
    pb = _pixel_boxes(boxes)
    return ((np.asarray(landmarks, np.float64) - pb[..., :2]) * size / pb[..., 2:]).astype(np.float32)


def from_crop_coords(points, boxes, size):
    """Inverse of to_crop_coords: crop pixel coords -> source pixels."""
    pb = _pixel_boxes(boxes)
    return (np.asarray(points, np.float64) * pb[..., 2:] / size + pb[..., :2]).astype(np.float32)
