"""Prepared clips and the two training datasets built on them: MuseTalk v1.5's stage-1 (single frames) and stage-2
(T consecutive frames) data, with its reference-frame rule (`musetalk/data/dataset.py`, docs/musetalk.md §7).

`write_clip` / `load_clip` / `list_clips`: the prepared-clip directory that `lipsync.training.prepare` and the
generators in `lipsync.tools` write. `Stage1Dataset`, `Stage2Dataset`: the training items.
"""

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lipsync.align import reference_maps, warp
from lipsync.audio import load_audio
from lipsync.melspec import log_mel
from lipsync.references import MATCH_POOL, MIN_GAP, closed_frames, jaw_pose, mouth_gap, pose_pool
from lipsync.training.augment import AugmentConfig, apply, draw, map_points
from lipsync.tracking import to_crop_coords
from lipsync.windows import window_layout, window_start

# MuseTalk v1.5's rule (similar pose, different lips), v1's (any frame) and ours (a closed mouth, similar pose: the
# reference never shows the target's mouth shape, so the opening must come from the audio; lipsync.references)
MATCH_DRAW = 3  # sample="audio": the reference is one of this many pose-near frames whose lip gap is nearest
REFERENCE_RULES = ("pose_mouth", "random", "closed_pose", "audio")


@dataclass
class Clip:
    path: Path
    meta: dict
    crops: np.ndarray      # (N, S, S, 3) uint8, memory-mapped
    boxes: np.ndarray      # (N, 4) float32 crop boxes, source pixels
    face: np.ndarray       # (N,) bool, False = no face found in that frame
    landmarks: np.ndarray  # (N, 68, 2) float32, source pixels
    wave: torch.Tensor     # (samples,) float32, 16 kHz
    truth: dict | None     # synthetic clips: opening (N,), width (N,)

    @property
    def name(self):
        return self.path.name

    @property
    def fps(self):
        return float(self.meta["fps"])

    def __len__(self):
        return len(self.crops)


def load_clip(path):
    path = Path(path)
    if not (path / "meta.json").exists():
        raise ValueError(f"{path}: not a complete prepared clip (no meta.json)")
    meta = json.loads((path / "meta.json").read_text())
    track = np.load(path / "track.npz")
    truth = None
    if (path / "truth.npz").exists():
        with np.load(path / "truth.npz") as t:
            truth = {k: t[k] for k in t.files}
    return Clip(path=path, meta=meta, crops=np.load(path / "crops.npy", mmap_mode="r"),
                boxes=track["boxes"].astype(np.float32), face=track["face"].astype(bool),
                landmarks=track["landmarks"].astype(np.float32),
                wave=torch.as_tensor(load_audio(path / meta.get("audio", "audio.wav"))).float(), truth=truth)


def write_clip(out, name, meta, crops, boxes, face, landmarks, wave, truth=None):
    """Write DIR/<name>/ in the prepared-clip layout: crops.npy (N, S, S, 3) uint8, track.npz (boxes (N, 4), face
    (N,), landmarks (N, 68, 2) in source pixels), audio.wav (16 kHz mono), optional truth.npz, and meta.json (fps,
    sr, ...). Atomically: everything into DIR/.<name>.partial/ (meta.json last, via meta.json.tmp), then one rename,
    so a clip is complete iff its meta.json exists. A previous clip of that name is replaced."""
    out = Path(out)
    final, tmp = out / name, out / f".{name}.partial"
    for stale in (tmp, final):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    np.save(tmp / "crops.npy", crops)
    np.savez(tmp / "track.npz", boxes=boxes, face=face, landmarks=landmarks)
    if truth is not None:
        np.savez(tmp / "truth.npz", **truth)
    sf.write(tmp / "audio.wav", wave, int(meta["sr"]), subtype="PCM_16")
    (tmp / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
    os.rename(tmp, final)
    return final


def clip_split(name, meta, val_fraction=0.1):
    """'train' or 'val' for a clip: meta["split"] when present ('heldout' -> 'val'), else a stable hash of the name."""
    if "split" in meta:
        return "val" if meta["split"] in ("heldout", "val") else "train"
    return "val" if zlib.crc32(name.encode()) % 1000 < val_fraction * 1000 else "train"


def list_clips(root, split=None, val_fraction=0.1):
    """Complete clip directories under root, sorted by name; split: None (all), 'train', 'val' (= 'heldout')."""
    split = {"heldout": "val"}.get(split, split)
    out = []
    for d in sorted(Path(root).iterdir()):
        if d.name.startswith(".") or not (d / "meta.json").exists():
            continue
        if split is None or clip_split(d.name, json.loads((d / "meta.json").read_text()), val_fraction) == split:
            out.append(d)
    return out


def mouth_box(lips, size):
    """Lip landmarks (..., K, 2) in crop pixels -> (..., 4) x1, y1, x2, y2: x range padded 10 % each side, height
    width / 2 (MuseTalk's rule) but at least 1.2 x the lip height, centred on the lips; clamped to the crop."""
    lo, hi = lips.min(-2), lips.max(-2)
    pad = 0.1 * (hi[..., 0] - lo[..., 0])
    x1, x2 = lo[..., 0] - pad, hi[..., 0] + pad
    half = 0.5 * np.maximum(0.5 * (x2 - x1), 1.2 * (hi[..., 1] - lo[..., 1]))
    cy = 0.5 * (lo[..., 1] + hi[..., 1])
    return np.clip(np.stack([x1, cy - half, x2, cy + half], -1), 0, size).astype(np.float32)


# -----------------------------------------------------------------------------


class _ClipFrames(Dataset):
    """Shared machinery: clips, cached mels, valid targets, reference sampling, tensor conversion."""

    T = 1

    def __init__(self, root_or_clips, split="train", crop_size=None, seed=0, mel_context=4, left=2, right=2,
                 sample="pose_mouth", length=None, features="mel", val_fraction=0.1,
                 augment: AugmentConfig | None = None, closed_share=0.0):
        assert sample in REFERENCE_RULES and features in ("mel", "whisper")
        self.seed, self.epoch, self.mel_context, self.left, self.right = seed, 0, mel_context, left, right
        self.sample, self.features, self.augment = sample, features, augment
        self.closed_share = closed_share if sample == "audio" else 0.0
        split = {"heldout": "val"}.get(split, split)
        if isinstance(root_or_clips, (str, Path)):
            root_or_clips = list_clips(root_or_clips, split, val_fraction)
        clips = [c if isinstance(c, Clip) else load_clip(c) for c in root_or_clips]
        clips = [c for c in clips if split is None or clip_split(c.name, c.meta, val_fraction) == split]
        starts = [self._valid_starts(c) for c in clips]
        keep = [i for i, s in enumerate(starts) if len(s)]
        if not keep:
            raise ValueError(f"no usable clips (split={split!r}, T={self.T}) in {len(clips)} clips")
        self.clips, self.starts = [clips[i] for i in keep], [starts[i] for i in keep]
        self.cum = np.cumsum([len(s) for s in self.starts])
        self.crop_size = crop_size or self.clips[0].crops.shape[1]
        self.mels = [log_mel(c.wave, dynamic_floor=False).numpy() for c in self.clips]  # (80, M) each
        self.floors = [np.float32(m.min()) for m in self.mels]
        # landmarks in a 256 px face box, for the pose/mouth reference rule
        self.norm_lm = [to_crop_coords(c.landmarks, c.boxes, 256) for c in self.clips]
        if sample in ("closed_pose", "audio"):  # every frame's jaw pose
            self.jaw = [jaw_pose(lm) for lm in self.norm_lm]
        if sample == "closed_pose" or self.closed_share:  # each clip's closed-mouthed frames
            self.closed = [closed_frames(lm, c.face) for lm, c in zip(self.norm_lm, self.clips)]
        if sample == "audio":  # every frame's inner-lip gap
            self.gap = [mouth_gap(lm) for lm in self.norm_lm]
        self.whisper = None
        if features == "whisper":
            self.whisper = [np.load(c.path / "whisper.npy", mmap_mode="r") for c in self.clips]  # (T50, L, D) each
        self.length = length or max(1, int(self.cum[-1]) // self.T)

    def _valid_starts(self, clip):
        """Start frames whose T frames all have a face and a possible reference."""
        face = clip.face
        n = len(face)
        if n < self.T:
            return np.zeros(0, np.int64)
        c = np.concatenate([[0], np.cumsum(face)])
        idx = np.arange(n)
        near = c[np.minimum(idx + MIN_GAP, n)] - c[np.maximum(idx - MIN_GAP + 1, 0)]
        ok = face & (c[-1] - near > 0)
        run = np.convolve(ok.astype(int), np.ones(self.T, int), mode="valid")  # (n - T + 1,)
        return np.flatnonzero(run == self.T)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def _rng(self, index):
        """Item `index` of this epoch draws everything from here, so DataLoader workers and resumed runs see the same
        samples."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def _pick_start(self, rng):
        k = int(rng.integers(self.cum[-1]))
        ci = int(np.searchsorted(self.cum, k, side="right"))
        return ci, int(self.starts[ci][k - (self.cum[ci - 1] if ci else 0)])

    def reference(self, ci, d, rng):
        """Reference frame for target d of clip ci, MuseTalk v1.5's rule: with landmarks normalised to a 256 px crop
        box, the k = int(0.51 N) frames with the most similar jaw contour (points 0-15) and the k with the most
        different inner lips (60-66); uniformly from their intersection, else (sample="random", or an empty
        intersection) from the whole clip. sample="closed_pose": uniformly from the quarter nearest in jaw pose of the
        clip's closed-mouthed frames (lipsync.references), as infer.py's rule of that name picks the nearest.
        sample="audio": of the MATCH_POOL share of frames nearest in jaw pose, uniformly one of the MATCH_DRAW nearest
        to the target's own inner-lip gap (infer.py's rule of that name picks the one nearest the gap the audio
        predicts); with closed_share, that share of its draws as closed_pose's. Always >= MIN_GAP frames away and
        never a frame without a face."""
        clip, lm = self.clips[ci], self.norm_lm[ci]
        n = len(clip)
        far = (np.abs(np.arange(n) - d) >= MIN_GAP) & clip.face
        if self.sample == "closed_pose" or (self.closed_share and rng.random() < self.closed_share):
            cand = np.flatnonzero(self.closed[ci] & far)
            if len(cand):
                return int(rng.choice(pose_pool(self.jaw[ci], d, cand, 0.25)))
        if self.sample == "audio":
            cand = np.flatnonzero(far)
            if len(cand):
                pool = pose_pool(self.jaw[ci], d, cand, MATCH_POOL)
                near = pool[np.argsort(np.abs(self.gap[ci][pool] - self.gap[ci][d]), kind="stable")[:MATCH_DRAW]]
                return int(rng.choice(near))
        if self.sample == "pose_mouth":
            k = int(0.51 * n)
            pose = np.linalg.norm(lm[:, 0:16] - lm[d, 0:16], axis=-1).mean(1)
            pose[d] = np.inf
            mouth = np.linalg.norm(lm[:, 60:67] - lm[d, 60:67], axis=-1).mean(1)
            cand = np.zeros(n, bool)
            cand[np.argsort(pose, kind="stable")[:k]] = True
            cand[np.argsort(-mouth, kind="stable")[k:]] = False
            cand &= far
            if cand.any():
                return int(rng.choice(np.flatnonzero(cand)))
        return int(rng.choice(np.flatnonzero(far)))

    def images(self, ci, frames):
        """Crops of `frames` -> (len, 3, S, S) float32 numpy in [-1, 1] at crop_size. Items are built in numpy:
        tiny torch ops in a multi-threaded main process cost more than the work."""
        x = self.clips[ci].crops[frames].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
        if x.shape[-1] != self.crop_size:
            size = (self.crop_size, self.crop_size)
            x = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", antialias=True).numpy()
        return x

    def mel_span(self, ci, lo, hi):
        """Mel frames [lo, hi) of clip ci -> (80, hi - lo), the clip's minimum outside the file."""
        mel = self.mels[ci]
        idx = np.arange(lo, hi)
        inside = (idx >= 0) & (idx < mel.shape[1])
        return torch.from_numpy(np.where(inside, mel[:, np.clip(idx, 0, mel.shape[1] - 1)], self.floors[ci]))

    def audio(self, ci, f):
        """Frame f's audio: the log-mel span (80, 2 (n + 2c)) around its window, (80, 36) at 25 fps, or with
        features="whisper" its window (n L, 384) from <clip>/whisper.npy (T50, L, 384)."""
        fps = self.clips[ci].fps
        n = window_layout(fps, self.left, self.right)[0]
        s0 = int(window_start(f, fps, self.left))  # floor(f * 50 / fps) - ceil(50 / fps) * left: first 50 Hz step
        if self.features == "mel":  # mel frames [2 (s0 - c), 2 (s0 + n + c)), c = mel_context, the minimum outside
            return self.mel_span(ci, 2 * (s0 - self.mel_context), 2 * (s0 + n + self.mel_context))
        feats = self.whisper[ci]  # (T50, L, D)
        steps = np.arange(s0, s0 + n)
        out = np.array(feats[np.clip(steps, 0, len(feats) - 1)], np.float32)
        out[(steps < 0) | (steps >= len(feats))] = 0
        return torch.from_numpy(out.reshape(-1, out.shape[-1]))  # (n, L, D) -> (n L, D), row = L t + layer

    def frames_item(self, ci, frames, rng):
        """Targets, masked targets, references, audio and mouth boxes for `frames` of clip ci, each stacked over
        frames. One augmentation draw (when on) for targets and references; the boxes follow its warp."""
        refs = [self.reference(ci, int(f), rng) for f in frames]
        target, reference = self.images(ci, frames), self.images(ci, refs)
        clip = self.clips[ci]
        if self.sample == "audio":  # as infer.py's audio rule shows it: warped onto the target's eyes and nose
            crop_lm = [to_crop_coords(clip.landmarks[i], clip.boxes[i], self.crop_size) for i in (refs, frames)]
            reference = warp(reference, reference_maps(*crop_lm), self.crop_size).numpy()
        params = draw(rng, self.augment) if self.augment is not None else None
        if params is not None:
            both = apply(np.concatenate([target, reference]), params).numpy()  # (2 len, 3, S, S)
            target, reference = both[:len(frames)], both[len(frames):]
        lips = to_crop_coords(clip.landmarks[frames, 48:68], clip.boxes[frames], self.crop_size)  # (len, 20, 2)
        if params is not None:  # the lips move with the augmentation's warp
            lips = map_points(params, lips, self.crop_size)
        masked = target.copy()
        masked[:, :, self.crop_size // 2:] = -1  # (len, 3, S, S), lower half masked
        key = "mel" if self.features == "mel" else "audio"
        return {"target": torch.from_numpy(target), "masked": torch.from_numpy(masked),
                "reference": torch.from_numpy(reference),
                key: torch.stack([self.audio(ci, int(f)) for f in frames]),
                "mouth_box": torch.from_numpy(mouth_box(lips, self.crop_size)),
                "clip": torch.tensor(ci), "frame": torch.as_tensor(np.asarray(frames)), "ref_frame": torch.tensor(refs)}


class Stage1Dataset(_ClipFrames):
    """Single frames: target/masked/reference (3, S, S), mel (80, 2 (n + 2c)) or audio (n L, 384), mouth_box (4,),
    clip, frame, ref_frame. Epoch length defaults to the number of usable target frames."""

    def __getitem__(self, index):
        rng = self._rng(index)
        ci, f = self._pick_start(rng)
        return {k: v if k == "clip" else v[0] for k, v in self.frames_item(ci, [f], rng).items()}


class Stage2Dataset(_ClipFrames):
    """T consecutive frames: target/masked/reference (T, 3, S, S), mel (T, 80, 2 (n + 2c)) or audio (T, n L, 384),
    mouth_box (T, 4) x1, y1, x2, y2 in crop pixels, sync_mel (80, 100 T / fps) covering the T frames (4 T at 25 fps),
    clip, frame (T,), ref_frame (T,). Epoch length defaults to usable frames // T."""

    def __init__(self, root_or_clips, split="train", T=16, **kwargs):
        self.T = T
        super().__init__(root_or_clips, split, **kwargs)

    def __getitem__(self, index):
        rng = self._rng(index)
        ci, f0 = self._pick_start(rng)
        clip, frames = self.clips[ci], np.arange(f0, f0 + self.T)
        item = self.frames_item(ci, frames, rng)
        lo = round(f0 * 100 / clip.fps)
        item["sync_mel"] = self.mel_span(ci, lo, lo + round(self.T * 100 / clip.fps))
        return item
