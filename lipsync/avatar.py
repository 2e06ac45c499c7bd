"""The avatar: everything about one video that does not depend on the audio (MuseTalk's realtime-mode cache,
docs/musetalk.md §6), and its folder on disk.

A saved avatar is a folder written as DIR.partial and renamed when complete: frames.npy (N, H, W, 3) uint8,
track.npz (spec layout), latents.npy (N, 8, s, s) float32, blend.npz, texture.npz (the mouth texture bank, when
the avatar has one), and avatar_info.json (crop size and geometry,
fps, the reference rule, the VAE fingerprint: latents from another VAE or crop would be garbage, so load_avatar
refuses them with a clear message). lipsync.pipeline makes avatars (prepare_avatar) and generates from them.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .blend import Blend
from .texture import TextureBank
from .track import Track

AVATAR_VERSION = 3  # 2: texture.npz; 3: its detail in frame pixels


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
    texture: TextureBank | None = None  # the mouth texture borrowed from the frames (lipsync.texture)

    def __len__(self):
        return len(self.frames)

    def source_index(self, i):
        """Output frame index/indices -> source frame: 0 .. N-1, N-1 .. 0, 0 .. (MuseTalk's frames + frames[::-1])."""
        n = len(self.frames)
        j = np.asarray(i) % (2 * n)
        return np.where(j < n, j, 2 * n - 1 - j)


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
    if avatar.texture is not None:
        b = avatar.texture
        np.savez(partial / "texture.npz", frames=b.frames, coarse=b.coarse.numpy(), fine=b.fine.numpy(),
                 area=np.array(b.area, np.int64), margin=b.margin, shift=b.shift)
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
    texture = None
    if (folder / "texture.npz").is_file():
        with np.load(folder / "texture.npz") as z:
            texture = TextureBank(z["frames"], torch.from_numpy(z["coarse"]), torch.from_numpy(z["fine"]),
                                  tuple(map(int, z["area"])), int(z["margin"]), int(z["shift"]))
    return Avatar(frames, info["fps"], track, latents, blends, info["crop_size"], info["fingerprint"],
                  info.get("source", ""), info.get("geometry", "square"), info.get("reference", "self"), texture)
