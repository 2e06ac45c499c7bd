"""A face track: per frame, 68 landmarks, whether a face was found, and the crop box -- from a tracker
(lipsync.tracking.MeshTracker, or a BoxTracker for a fixed --bbox) or from a track file beside the video.

    track = track_frames(frames, MeshTracker(), **box_options(model.geometry))
    track = read_track(track_file("talk.mp4"), **box_options(model.geometry))   # talk.mp4.track.npz / talk.track.npz
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tracking import face_boxes, track_and_fill


@dataclass
class Track:
    landmarks: np.ndarray  # (N, 68, 2) float32 source pixels; no-face frames hold the nearest face's
    face: np.ndarray  # (N,) bool
    boxes: np.ndarray  # (N, 4) float32 crop boxes
    tracker: str = "mediapipe"

    def __len__(self):
        return len(self.face)

    def select(self, idx) -> "Track":
        return Track(self.landmarks[idx], self.face[idx], self.boxes[idx], self.tracker)


def box_options(geometry, smooth=None, margin=None) -> dict:
    """Keyword arguments of track_frames / read_track for a crop geometry, infer.py's defaults where None: square
    boxes smoothed over time (Gaussian sigma 2 frames); MuseTalk's per-frame boxes unsmoothed, extra_margin 10
    (v1.5)."""
    if geometry == "square":
        return dict(geometry=geometry, smooth_sigma=2.0 if smooth is None else smooth)
    return dict(geometry=geometry, margin=10 if margin is None else margin, smooth_sigma=smooth or 0.0)


def track_frames(frames, tracker, bbox_shift=0.0, margin=10.0, smooth_sigma=2.0, bar=None,
                 geometry="square") -> Track:
    """Run a tracker (tracking.MeshTracker / BoxTracker) over frames, as lipsync.training.prepare does; closes it.
    Boxes of `geometry` (tracking.face_boxes; "musetalk" boxes end at the frame's bottom edge)."""
    height = np.shape(frames)[1] if geometry != "square" else None
    landmarks, face, _ = track_and_fill(frames, tracker, bar)
    boxes = face_boxes(landmarks, geometry, bbox_shift, margin, smooth_sigma, height)
    return Track(landmarks, face, boxes, tracker.name)


def track_file(media) -> Path | None:
    """A precomputed track beside a video or image: `<file>.track.npz` (e.g. demo.mp4.track.npz), else
    `<stem>.track.npz`."""
    media = Path(media)
    for cand in (media.with_name(media.name + ".track.npz"), media.with_suffix(".track.npz")):
        if cand.is_file():
            return cand
    return None


def read_track(path, bbox_shift=0.0, margin=10.0, smooth_sigma=2.0, geometry="square", height=None) -> Track:
    """track.npz (landmarks, face, boxes as written by lipsync.training.prepare). For the square geometry its boxes
    are used as they are unless bbox_shift moves the midline; then they are recomputed from the landmarks with the
    file's own chin margin. "musetalk" boxes are always computed from the landmarks (exact, and cheap)."""
    with np.load(path) as z:
        landmarks, face = z["landmarks"].astype(np.float32), z["face"].astype(bool)
        boxes = z["boxes"].astype(np.float32) if "boxes" in z else None
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2) or face.shape != landmarks.shape[:1]:
        raise ValueError(f"{path}: expected landmarks (N, 68, 2) and face (N,), got {landmarks.shape}, {face.shape}")
    if not face.any():
        raise ValueError(f"{path}: no face found in any frame")
    if geometry != "square":
        boxes = face_boxes(landmarks, geometry, bbox_shift, margin, smooth_sigma, height)
        return Track(landmarks, face, boxes, "file")
    if boxes is not None and bbox_shift:
        margin = float(np.median(boxes[:, 3] - landmarks[:, 8, 1]))
    if boxes is None or bbox_shift:
        boxes = face_boxes(landmarks, "square", bbox_shift, margin, smooth_sigma)
    return Track(landmarks, face, boxes, "file")
