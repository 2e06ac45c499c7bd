"""Self-reenactment of real talking clips: each clip dubbed with its own speech, compared with its real frames.

    python -m lipsync.tools.eval --ckpt assets/demo.pt --reenact talk1.mp4 talk2.mp4 --out results/reenact

A clip without sound, or a photo (one frame), is dubbed with silence: the generated mouth must match the real one.

On full frames, RGB uint8, with mediapipe's face mesh (468 points):
- mouth region: on the REAL frame, the square centred on the mean of the lip points MOUTH_POINTS, side 1.6 x the
  larger of their x and y extents; mouth PSNR over it (of the MSE averaged over the clip's frames), mean SSIM over it;
- lower-face colour error: |mean RGB generated - mean RGB real| over the rectangle from cheek point 234 to 454 and
  from the nose tip (1) to the chin (152), averaged over frames, largest channel, in levels of 255;
- mouth opening: inner-lip gap |p13 - p14| / face height |p10 - p152| (`metrics.lip_opening_468`); r = Pearson r of
  generated vs real openings.
- detail (sharpness, `metrics.detail_ratios`): per frame, the variance of the Laplacian of the grey image (luma
  0.299 R + 0.587 G + 0.114 B, kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]], valid region) on two regions of the REAL
  frame's mesh, in the generated and in the real frame: detail_lips over the mouth square; detail_rest over the
  lower-face rectangle above with the mouth square left out (the Laplacian of the whole rectangle, its variance over
  the values whose 5-point stencil reads no pixel of the square). Per clip, over the frames where the real frame has
  a mesh: sum of the generated detail / sum of the real detail (the ratio of the mean details, not the mean of
  per-frame ratios): 1 = as sharp as the real frames, < 1 blurrier (VAE / UNet blur), > 1 sharper or noisier.
Rows: the model as infer.py runs it (its default reference rule, model.reference: lipsync.references); when that is
not "self", the model with each frame's own crop as the reference (MuseTalk's inference: the real mouth is in view,
so this row rewards copying); the model with a far reference (the frame half a clip away: the mouth must come from
the audio); and two baselines: the VAE round trip of each real crop (the ceiling) and the clip's first-frame mouth
pasted on every frame.
"""

import math

import numpy as np
import torch

from .. import references
from ..blend import paste
from ..pipeline import avatar_frames, prepare_avatar, with_references
from ..tracking import MeshTracker, crop_faces
from ..vae import to_model_images, to_uint8_images
from .metrics import detail_ratios, lip_opening_468, pearson, region_ssim

MOUTH_POINTS = [61, 291, 0, 17, 13, 14, 78, 308, 37, 267, 84, 314]


def mesh_points(frames):
    """Frames (N, H, W, 3) uint8 -> mediapipe face-mesh points (N, 468, 2) in pixels (NaN without a face)."""
    tracker = MeshTracker()
    out = np.full((len(frames), 468, 2), np.nan, np.float32)
    try:
        for i, frame in enumerate(frames):
            points = tracker.points468(frame)
            if points is not None:
                out[i] = points
    finally:
        tracker.close()
    return out


def mouth_squares(mesh, shape):
    """Mesh points (N, 468, 2) -> int squares (N, 4) x1, y1, x2, y2 clipped to the frame (H, W)."""
    lips = mesh[:, MOUTH_POINTS]
    centre = lips.mean(1)
    side = 1.6 * (lips.max(1) - lips.min(1)).max(1)
    lo = np.round(centre - side[:, None] / 2).astype(np.int64)
    hi = np.round(centre + side[:, None] / 2).astype(np.int64)
    h, w = shape
    return np.stack([np.clip(lo[:, 0], 0, w - 1), np.clip(lo[:, 1], 0, h - 1), np.clip(hi[:, 0], 1, w),
                     np.clip(hi[:, 1], 1, h)], 1)


def lower_face_rects(mesh, shape):
    """Mesh points (N, 468, 2) -> int rectangles (N, 4): x from cheek point 234 to 454, y from nose tip 1 to chin
    152."""
    x = np.sort(np.stack([mesh[:, 234, 0], mesh[:, 454, 0]], 1), 1)
    r = np.stack([x[:, 0], mesh[:, 1, 1], x[:, 1], mesh[:, 152, 1]], 1).round().astype(np.int64)
    h, w = shape
    return np.clip(r, 0, [w - 1, h - 1, w, h])


def score(generated, real, real_mesh, gen_mesh) -> dict:
    """Generated vs real frames (N, H, W, 3) uint8 with both meshes -> the clip's numbers: mouth PSNR (of the mean
    MSE over frames, so +inf only for identical mouths), mean mouth SSIM, lower-face colour error (largest channel
    of the mean |difference of means|, in levels), r of the openings, detail ratios of the lips and of the rest of
    the lower face (module doc), frames scored."""
    shape = real.shape[1:3]
    ok = ~np.isnan(real_mesh).any((1, 2))
    squares, rects = mouth_squares(np.nan_to_num(real_mesh), shape), lower_face_rects(np.nan_to_num(real_mesh), shape)
    mse, ssims, colour = [], [], []
    for i in np.flatnonzero(ok):
        x1, y1, x2, y2 = squares[i]
        a, b = generated[i, y1:y2, x1:x2].astype(np.float64), real[i, y1:y2, x1:x2].astype(np.float64)
        mse.append(((a - b) ** 2).mean())
        ssims.append(region_ssim(generated[i], real[i], squares[i]))
        x1, y1, x2, y2 = rects[i]
        colour.append(np.abs(generated[i, y1:y2, x1:x2].reshape(-1, 3).mean(0)
                             - real[i, y1:y2, x1:x2].reshape(-1, 3).astype(np.float64).mean(0)))
    both = ok & ~np.isnan(gen_mesh).any((1, 2))
    r = pearson(lip_opening_468(gen_mesh[both]), lip_opening_468(real_mesh[both])) if both.sum() > 2 else math.nan
    m = float(np.mean(mse))
    return {"psnr": math.inf if m == 0 else 10 * math.log10(255 ** 2 / m), "ssim": float(np.mean(ssims)),
            "colour": float(np.mean(colour, 0).max()), "r": r,
            **detail_ratios(generated, real, squares, rects, np.flatnonzero(ok)), "frames": int(ok.sum())}


def far_reference(n):
    """Frame i's reference in the far row: the frame half a clip away."""
    return (np.arange(n) + n // 2) % n


@torch.inference_mode()
def reenact_clip(model, frames, fps, wave, track, batch_size=16):
    """One real clip and its own speech -> {row: frames (N, H, W, 3) uint8} for the rows in the module doc."""
    n = len(frames)
    avatar = prepare_avatar(frames, fps, track, model, batch_size, reference="self")
    windows = model.audio_windows(wave, n, fps)
    rows = {}
    own = avatar.latents  # (N, 8, s, s) [masked own frame, own frame as reference]
    if model.reference != "self":
        openings = None
        if model.reference == "audio":  # the avatar keeps its own crops; the speech picks per frame (avatar_frames)
            avatar.reference, openings = "audio", model.openings(wave, n, fps)
        else:
            avatar.latents = with_references(own, references.pick(model.reference, track.landmarks, track.face))
        rows[f"model, infer.py's reference ({model.reference})"] = np.stack(
            list(avatar_frames(model, avatar, windows, batch_size, openings=openings)))
    avatar.latents, avatar.reference = own, "self"
    rows["model, own frame as reference"] = np.stack(list(avatar_frames(model, avatar, windows, batch_size)))
    avatar.latents = with_references(own, far_reference(n))  # [masked own frame, far frame as reference]
    rows["model, far reference"] = np.stack(list(avatar_frames(model, avatar, windows, batch_size)))
    avatar.latents = own
    crops = crop_faces(frames, track.boxes, model.crop_size, lanczos=model.geometry == "musetalk")
    p = next(model.vae.parameters())
    trip = np.concatenate([to_uint8_images(model.face.decode(model.face.encode(
        to_model_images(crops[k:k + batch_size]).to(p.device, p.dtype)))) for k in range(0, n, batch_size)])
    first = crops[int(np.flatnonzero(track.face)[0])]

    def pasted(crop_of):
        return np.stack([paste(frames[i], crop_of(i), avatar.blends[i]) if track.face[i] else frames[i]
                         for i in range(n)])

    rows["ceiling: VAE round trip of the real crop"] = pasted(lambda i: trip[i])
    rows["baseline: first frame's mouth on every frame"] = pasted(lambda i: first)
    return rows


def square_tiles(frames, squares, idx, side=96) -> np.ndarray:
    """Frames (N, H, W, 3) uint8, int squares (N, 4), k frame indices -> those frames' squares side by side, each
    resized to side x side: uint8 (side, k side, 3)."""
    import torch.nn.functional as F

    def tile(i):
        x1, y1, x2, y2 = squares[i]
        t = torch.from_numpy(np.ascontiguousarray(frames[i, y1:y2, x1:x2])).permute(2, 0, 1)[None].float()
        return F.interpolate(t, size=(side, side), mode="bilinear", antialias=True)[0].permute(1, 2, 0)

    return torch.cat([tile(i) for i in idx], 1).round().clamp(0, 255).byte().numpy()


def mouth_montage(real, rows, squares, k=8, side=96) -> np.ndarray:
    """k frames of a clip: its real mouth squares on top, then one row per entry of rows -> uint8 image."""
    idx = np.linspace(0, len(real) - 1, k).round().astype(int)
    return np.concatenate([square_tiles(f, squares, idx, side) for f in [real] + list(rows.values())], 0)


def reenact(model, videos, out_dir=None, batch_size=16, progress=True, syncnet=None) -> dict:
    """Self-reenact each talking clip with its own audio -> {clip: {row: score}} plus "mean" over clips; with
    out_dir, also reenact.json and one montage PNG per clip (real mouth on top, then the rows). With a syncnet
    (lse.SyncNetV2) every row also gets lse_d / lse_c (the papers' sync scores against the clip's own speech)."""
    import json
    from pathlib import Path

    import imageio.v3 as iio
    from tqdm import tqdm

    from ..audio import load_audio
    from ..track import box_options, track_frames
    from ..video import SAMPLE_RATE, read_video, video_info
    results = {}
    for video in tqdm(videos, desc="reenact", unit="clip", disable=not progress):
        frames, fps = read_video(video)
        info = video_info(video)  # a photo or a video without sound is dubbed with silence: the mouth must stay put
        wave = load_audio(video) if info.has_audio else torch.zeros(round(len(frames) / fps * SAMPLE_RATE))
        track = track_frames(frames, MeshTracker(), **box_options(model.geometry))  # as infer.py tracks
        rows = reenact_clip(model, frames, fps, wave, track, batch_size)
        real_mesh = mesh_points(frames)
        results[str(video)] = {name: score(gen, frames, real_mesh, mesh_points(gen)) for name, gen in rows.items()}
        if syncnet is not None:
            from .crossdub import dubbed_lse
            for name, gen in rows.items():
                got = dubbed_lse(syncnet, gen, fps, track, wave.numpy())
                results[str(video)][name].update(lse_d=got["lse_d"], lse_c=got["lse_c"])
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            squares = mouth_squares(np.nan_to_num(real_mesh), frames.shape[1:3])
            iio.imwrite(Path(out_dir) / f"{Path(video).stem}_mouths.png", mouth_montage(frames, rows, squares))
    names = next(iter(results.values())).keys()
    keys = ("psnr", "ssim", "colour", "r", "detail_lips", "detail_rest")
    keys += ("lse_d", "lse_c") if syncnet is not None else ()
    results["mean"] = {name: {k: float(np.nanmean([r[name][k] for r in results.values()])) for k in keys}
                       for name in names}  # r, detail: over clips where it exists
    if out_dir is not None:
        (Path(out_dir) / "reenact.json").write_text(json.dumps(results, indent=1))
    return results
