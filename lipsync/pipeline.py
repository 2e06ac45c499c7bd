"""Inference: frames + face track -> Avatar (everything that does not depend on the audio) -> generated frames.

An `Avatar` holds what MuseTalk's realtime mode caches (docs/musetalk.md §6): the source frames, their
face track, the UNet's image input per frame -- latents of [masked crop, reference crop], the reference picked by
the model's rule (lipsync.references: the frame itself as in MuseTalk's inference, or a closed-mouthed frame of
similar pose) unless `prepare_avatar(reference=...)` names another rule or other frames -- and the blend masks (lipsync.blend). Output frame i shows source frame `avatar.source_index(i)`: the video plays forward then
backward (ping-pong, 2N cycle), so audio longer than the video loops without a jump. Per frame the loop then runs
only audio windows -> LipSync.forward (PE, UNet, VAE decode) -> paste.

    track = track_frames(frames, tracker)                 # or read_track(...) / a BoxTracker for --bbox
    avatar = prepare_avatar(frames, fps, track, model)    # save_avatar(avatar, DIR) / load_avatar(DIR, model)
    for frame in avatar_frames(model, avatar, model.audio_windows(wave, n, fps)): ...
    for frame in stream_frames(model, avatar, audio_chunks): ...  # MelEncoder checkpoints: frames as audio arrives

A saved avatar is a folder written as DIR.partial and renamed when complete: frames.npy (N, H, W, 3) uint8,
track.npz (spec layout), latents.npy (N, 8, s, s) float32, blend.npz, and avatar_info.json (crop size and geometry,
fps, the reference rule, the VAE fingerprint: latents from another VAE or crop would be garbage, so load_avatar refuses them with a clear
message).
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import references
from .blend import Blend, make_blend, paste
from .mel_encoder import MelEncoder
from .streaming import WindowStream
from .tracking import crop_faces, face_boxes, track_and_fill
from .vae import to_uint8_images

AVATAR_VERSION = 1


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


def vae_fingerprint(model) -> str:
    """Short hash of the VAE encoder weights (what cached latents depend on), the same in fp32, fp16 and bf16."""
    h = hashlib.sha1()
    vae = model.vae
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            flat = t.detach().flatten()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float16).numpy().tobytes())
    h.update(str(model.crop_size).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- avatar


@dataclass
class Avatar:
    frames: np.ndarray  # (N, H, W, 3) uint8 source frames (array or read-only memmap)
    fps: float
    track: Track
    latents: torch.Tensor  # (N, 8, s, s) UNet image input per frame (scaled latents, model.face.unet_input), on the
    # model's device/dtype; 0 without a face
    blends: list  # Blend per frame, None without a face
    crop_size: int
    fingerprint: str
    source: str = ""
    geometry: str = "square"  # crop geometry of the latents (tracking.GEOMETRIES)
    reference: str = "self"  # the rule that picked each frame's reference (lipsync.references), "custom" for a list

    def __len__(self):
        return len(self.frames)

    def source_index(self, i):
        """Output frame index/indices -> source frame: 0 .. N-1, N-1 .. 0, 0 .. (MuseTalk's frames + frames[::-1])."""
        n = len(self.frames)
        j = np.asarray(i) % (2 * n)
        return np.where(j < n, j, 2 * n - 1 - j)


def with_references(latents: torch.Tensor, reference) -> torch.Tensor:
    """UNet image inputs (N, 8, s, s) = [masked crop, reference crop] -> the same with frame i's reference half taken
    from frame reference[i] (reference: (N,) frame indices)."""
    idx = torch.as_tensor(np.asarray(reference), dtype=torch.long, device=latents.device)
    return torch.cat([latents[:, :4], latents[idx, 4:]], 1)


@torch.inference_mode()
def prepare_avatar(frames, fps, track: Track, model, batch_size=16, source="", bar=None, reference=None) -> Avatar:
    """Crops -> VAE latents of [masked, reference] (batched) and blend masks for every frame with a face.

    reference: a rule of lipsync.references ("self", "closed_pose"), or (N,) frame indices: frame i's reference crop
    is frame reference[i]'s (one with a face wherever frame i has one); default None = the model's own rule
    (model.reference)."""
    frames = np.asarray(frames)
    if len(frames) != len(track):
        raise ValueError(f"{len(frames)} frames but a track of {len(track)}")
    if not track.face.any():
        raise ValueError("no face found in any frame")
    size = model.crop_size
    good = np.flatnonzero(track.face)
    parts = []
    for k in range(0, len(good), batch_size):
        idx = good[k: k + batch_size]
        crops = crop_faces(frames[idx], track.boxes[idx], size, lanczos=model.geometry == "musetalk")
        parts.append(model.face.unet_input(crops))  # (b, S, S, 3) -> (b, 8, s, s), latents x scaling_factor
        if bar is not None:
            bar.update(len(idx))
    encoded = torch.cat(parts)
    latents = encoded.new_zeros((len(frames),) + encoded.shape[1:])
    latents[torch.from_numpy(good).to(latents.device)] = encoded
    rule = reference if isinstance(reference, str) or reference is None else "custom"
    if rule != "custom":
        rule = rule or getattr(model, "reference", "self")
        reference = references.pick(rule, track.landmarks, track.face)
    reference = np.asarray(reference)
    if reference.shape != (len(frames),) or not track.face[reference[good]].all():
        raise ValueError(f"reference must name, for each of the {len(frames)} frames, a frame with a face")
    if rule != "self":
        latents = with_references(latents, reference)
    shape = frames.shape[1:3]
    blends = [make_blend(track.landmarks[i], track.boxes[i], shape) if track.face[i] else None
              for i in range(len(frames))]
    return Avatar(frames, float(fps), track, latents, blends, size, vae_fingerprint(model), str(source),
                  model.geometry, rule)


def check_avatar_folder(folder) -> None:
    """An avatar may only replace an older avatar or an empty folder, never other files."""
    folder = Path(folder)
    if folder.exists() and not (folder / "avatar_info.json").is_file() and (not folder.is_dir() or any(
            folder.iterdir())):
        raise ValueError(f"{folder} exists and is not an avatar folder; pick a new or empty --avatar DIR")


def save_avatar(avatar: Avatar, folder) -> Path:
    """Write the avatar to folder (replacing an older avatar) via folder.partial, avatar_info.json last."""
    folder = Path(folder)
    check_avatar_folder(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / "frames.npy", np.asarray(avatar.frames))
    t = avatar.track
    np.savez(partial / "track.npz", boxes=t.boxes, face=t.face, landmarks=t.landmarks)
    np.save(partial / "latents.npy", avatar.latents.float().cpu().numpy())
    empty = Blend((0, 0, 0, 0), (0, 0, 0, 0), np.zeros((0, 0), np.float16), (0, 0, 0, 0))
    blends = [b or empty for b in avatar.blends]
    sizes = [b.mask.size for b in blends]
    np.savez(partial / "blend.npz", boxes=np.array([b.box for b in blends], np.int64),
             rects=np.array([b.rect for b in blends], np.int64), mouths=np.array([b.mouth for b in blends], np.int64),
             offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
             masks=np.concatenate([b.mask.ravel() for b in blends]).astype(np.float16))
    info = {"version": AVATAR_VERSION, "fps": avatar.fps, "frames": len(avatar), "size": list(avatar.frames.shape[1:3]),
            "crop_size": avatar.crop_size, "fingerprint": avatar.fingerprint, "source": avatar.source,
            "tracker": t.tracker, "geometry": avatar.geometry, "reference": avatar.reference}
    (partial / "avatar_info.json").write_text(json.dumps(info, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(partial, folder)
    return folder


def load_avatar(folder, model) -> Avatar:
    """Read a saved avatar for `model` (latents go to its device/dtype); refuses one prepared with another VAE."""
    folder = Path(folder)
    info_path = folder / "avatar_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared avatar (no avatar_info.json); "
                                f"make one with --prepare-avatar VIDEO --avatar {folder}")
    info = json.loads(info_path.read_text())
    redo = f"prepare it again: python infer.py --prepare-avatar {info.get('source') or 'VIDEO'} --avatar {folder}"
    if info.get("version") != AVATAR_VERSION:
        raise ValueError(f"{folder}: avatar format version {info.get('version')} is not {AVATAR_VERSION}; {redo}")
    if (info["crop_size"] != model.crop_size or info["fingerprint"] != vae_fingerprint(model)
            or info.get("geometry", "square") != model.geometry):
        raise ValueError(f"{folder} was prepared for a different model (VAE fingerprint {info['fingerprint']}, "
                         f"crop {info['crop_size']} {info.get('geometry', 'square')}); {redo} with this checkpoint")
    frames = np.load(folder / "frames.npy", mmap_mode="r")
    with np.load(folder / "track.npz") as z:
        track = Track(z["landmarks"], z["face"], z["boxes"], info.get("tracker", "file"))
    p = next(model.vae.parameters())
    latents = torch.from_numpy(np.load(folder / "latents.npy")).to(p.device, p.dtype)
    with np.load(folder / "blend.npz") as z:
        off, masks = z["offsets"], z["masks"]
        blends = [Blend(tuple(map(int, z["boxes"][i])), tuple(map(int, r)), masks[off[i]: off[i + 1]].reshape(
                  r[2] - r[0], r[3] - r[1]), tuple(map(int, z["mouths"][i]))) if track.face[i] else None
                  for i, r in enumerate(z["rects"])]
    return Avatar(frames, info["fps"], track, latents, blends, info["crop_size"], info["fingerprint"],
                  info.get("source", ""), info.get("geometry", "square"), info.get("reference", "self"))


# ----------------------------------------------------------------------------- generation


@torch.inference_mode()
def _render(model, avatar: Avatar, windows: torch.Tensor, first: int, colour: bool, detail: bool, pad_to: int = 0):
    """Audio windows (b, T, D) for output frames first .. first + b - 1 -> those frames, in order. With pad_to, the
    model always sees pad_to frames (the last face frame repeated, extra outputs dropped): static shapes for compiled
    models and CUDA graphs."""
    src = avatar.source_index(np.arange(first, first + len(windows)))
    has = avatar.track.face[src]
    crops = iter(())
    if has.any():
        sel = np.flatnonzero(has)
        if len(sel) < pad_to:
            sel = np.concatenate([sel, np.full(pad_to - len(sel), sel[-1])])
        unet_in = avatar.latents[torch.from_numpy(src[sel]).to(avatar.latents.device)]
        crops = iter(to_uint8_images(model(unet_in, windows[torch.from_numpy(sel)])))  # (b', S, S, 3)
    for j, i in enumerate(src):
        yield (paste(avatar.frames[i], next(crops), avatar.blends[i], colour, detail) if has[j]
               else np.array(avatar.frames[i]))


def avatar_frames(model, avatar: Avatar, windows, batch_size=8, start=0, colour=True, static=False, detail=True):
    """Audio windows -> full frames (H, W, 3) uint8, yielded in order as each batch is made.

    windows: (n, T, D) (model.audio_windows) for n output frames, or an iterable of such blocks arriving over time
    (stream_windows); blocks are re-batched to batch_size (the last batch may be smaller). Output frame i (counting
    from `start`) shows avatar.source_index(i); frames without a face pass through unchanged.
    static: every UNet/decoder call gets exactly batch_size frames (tails and no-face gaps padded), so a compiled
    model never re-compiles; the frames are the same. colour, detail: blend.paste's colour matching and the
    source's fine detail outside the mouth.
    """
    blocks = [windows] if isinstance(windows, torch.Tensor) else windows
    pending, done, pad_to = None, start, batch_size if static else 0
    for block in blocks:
        pending = block if pending is None else torch.cat([pending, block.to(pending.device)])
        while len(pending) >= batch_size:
            yield from _render(model, avatar, pending[:batch_size], done, colour, detail, pad_to)
            pending, done = pending[batch_size:], done + batch_size
    if pending is not None and len(pending):
        yield from _render(model, avatar, pending, done, colour, detail, pad_to)


def stream_windows(model, chunks, fps):
    """16 kHz mono audio chunks (any sizes) -> window blocks (k, T, D) as soon as each frame's audio is in.

    Only MelEncoder checkpoints stream (a whisper encoder needs the whole file); concatenated, the blocks equal
    model.audio_windows(whole_wave, floor(seconds * fps), fps).
    """
    if not isinstance(model.audio, MelEncoder):
        raise ValueError("streaming audio needs a checkpoint with our MelEncoder; whisper features are whole-file")
    stream = WindowStream(model.audio, fps, model.left, model.right)
    for chunk in chunks:
        windows = stream.push(chunk)
        if len(windows):
            yield windows
    windows = stream.finish()
    if len(windows):
        yield windows


def stream_frames(model, avatar: Avatar, chunks, batch_size=8, colour=True, static=False, detail=True):
    """Realtime: audio chunks in, frames out (each batch as soon as its audio has arrived)."""
    return avatar_frames(model, avatar, stream_windows(model, chunks, avatar.fps), batch_size, colour=colour,
                         static=static, detail=detail)
