"""LSE-D and LSE-C, the lip-sync scores of the papers, with the public SyncNet of joonson/syncnet_python.

    python -m lipsync.tools.eval --lse --syncnet-weights syncnet_v2.model dubbed1.mp4 dubbed2.mp4

`SyncNetV2` is syncnet_python's `SyncNetModel.S` (the audio and lip towers, 1024-d embeddings); its parameter names are
those of `syncnet_v2.model`, which loads strictly (`load_syncnet_v2`). The protocol is `SyncNetInstance.evaluate`:
- video at 25 fps (other rates are resampled to the nearest frame in time, as run_pipeline.py's `ffmpeg -r 25`);
  224x224 face crops, BGR 0..255 as cv2 reads them, 5 consecutive frames per lip window (a 3-D conv over time);
- audio: the int16 16 kHz samples -> 13 MFCC every 10 ms (lipsync/tools/mfcc.py); window i = MFCC steps 4i .. 4i + 19
  (0.2 s), against lip frames i .. i + 4; windows i = 0 .. min(frames, samples // 640) - 6;
- `calc_pdist`: for each lip window i and shift j in 0..30, the distance from lip embedding i to audio embedding
  i + j - 15 (zeros past either end); the mean over i per shift; AV offset = 15 - argmin (k > 0: lip frame i matches
  audio window i - k, the picture lags the sound); LSE-D = that minimum mean distance; LSE-C = median over the 31
  shifts minus the minimum. Over several videos the papers average each (Wav2Lip's calculate_scores_real_videos.py).

Crops: syncnet_python's run_pipeline.py detects faces with S3FD, median-filters each track's box centre and half-size
max(w, h) / 2 over 13 frames and crops rows y - s .. y + 1.8 s, columns x - 1.4 s .. x + 1.4 s (crop_scale 0.4; grey
110 outside the frame), resized to 224 with cv2's bilinear filter. `syncnet_crops` does the same from our tracker
(lipsync.tracking: mediapipe's face mesh, or a `<video>.track.npz` beside the video) with the bounding box of the 68
landmarks in place of S3FD's box. Differences: that box runs from the brows to the chin and jaw side to jaw side, while
S3FD's is a learnt face box (a little larger, usually reaching the forehead), so faces sit somewhat larger in our
crops; we track one face per video (no scene cuts, no minimum track length) and give frames without a face the nearest
face's landmarks; syncnet_python's frames pass through JPEG and an XVID .avi first, ours are cropped from the decoded
video directly; the resize is torch's bilinear (no antialias, as cv2), not cv2's fixed-point arithmetic.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipsync.tools.mfcc import mfcc
from lipsync.weights import CheckpointError, check_keys, read_state_dict

FPS, CROP, LIP_FRAMES, MFCC_STEPS, VSHIFT = 25, 224, 5, 20, 15
SAMPLES_PER_FRAME, MFCC_PER_FRAME = 640, 4  # at 16 kHz and 25 fps
CROP_SCALE, MEDIAN_FRAMES, PAD_GREY = 0.4, 13, 110  # run_pipeline.py: --crop_scale, medfilt kernel, np.pad value

# (in, out, kernel, stride, padding, max-pool (kernel, stride, padding) after the ReLU or None), SyncNetModel.py
AUDIO_TOWER = [(1, 64, 3, 1, 1, ((1, 1), (1, 1), 0)),
               (64, 192, 3, 1, 1, ((3, 3), (1, 2), 0)),
               (192, 384, 3, 1, 1, None),
               (384, 256, 3, 1, 1, None),
               (256, 256, 3, 1, 1, ((3, 3), (2, 2), 0)),
               (256, 512, (5, 4), 1, 0, None)]
LIP_TOWER = [(3, 96, (5, 7, 7), (1, 2, 2), 0, ((1, 3, 3), (1, 2, 2), 0)),
             (96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))),
             (256, 256, (1, 3, 3), 1, (0, 1, 1), None),
             (256, 256, (1, 3, 3), 1, (0, 1, 1), None),
             (256, 256, (1, 3, 3), 1, (0, 1, 1), ((1, 3, 3), (1, 2, 2), 0)),
             (256, 512, (1, 6, 6), 1, 0, None)]


def conv_tower(spec, conv, norm, pool) -> nn.Sequential:
    """conv, BatchNorm, ReLU[, max-pool] per row: indices, and so state-dict names, as in SyncNetModel.py."""
    layers = []
    for c_in, c_out, k, s, p, mp in spec:
        layers += [conv(c_in, c_out, k, s, p), norm(c_out), nn.ReLU(inplace=True)]
        if mp is not None:
            layers.append(pool(*mp))
    return nn.Sequential(*layers)


def fc_tower(dim) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNetV2(nn.Module):
    """syncnet_python's `S`: MFCC windows (B, 1, 13, 20) and lip windows (B, 3, 5, 224, 224) -> (B, 1024) each."""

    def __init__(self, dim=1024):
        super().__init__()
        self.netcnnaud = conv_tower(AUDIO_TOWER, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)  # -> (B, 512, 1, 1)
        self.netfcaud = fc_tower(dim)
        self.netfclip = fc_tower(dim)
        self.netcnnlip = conv_tower(LIP_TOWER, nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)  # -> (B, 512, 1, 1, 1)

    def forward_aud(self, x):
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x):
        return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet_v2(path, device="cpu") -> SyncNetV2:
    """syncnet_v2.model (a bare state dict) -> SyncNetV2 in eval mode. Strict: any missing, extra or misshaped tensor
    is one CheckpointError line; only BatchNorm's num_batches_tracked may be absent (the file predates it, and eval
    mode never reads it). torch.load runs with weights_only=True: a file that needs code to load is refused."""
    sd = read_state_dict(str(path))
    net = SyncNetV2()
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd.setdefault(k, torch.zeros_like(v))
    check_keys(net, sd, f"SyncNet ({path})")
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval()


# ----------------------------------------------------------------------------- the protocol


def calc_pdist(lip, aud, vshift=VSHIFT) -> torch.Tensor:
    """(N, D) lip and audio embeddings -> (N, 2 vshift + 1) distances ||lip_i - aud_{i + j - vshift} + 1e-6||
    (F.pairwise_distance, zeros past the ends), SyncNetInstance.calc_pdist."""
    padded = F.pad(aud, (0, 0, vshift, vshift))
    windows = padded.unfold(0, 2 * vshift + 1, 1).transpose(1, 2)  # (N, 2 vshift + 1, D)
    return F.pairwise_distance(lip[:, None, :], windows)


def sync_scores(dists, vshift=VSHIFT) -> dict:
    """(N, 2 vshift + 1) distances -> {'offset', 'lse_d', 'lse_c'}: the shift with the smallest mean distance
    (vshift - its index), that mean, and the median over shifts minus it."""
    mdist = torch.as_tensor(dists).mean(0)
    minval, minidx = torch.min(mdist, 0)
    return {"offset": vshift - int(minidx), "lse_d": float(minval), "lse_c": float(torch.median(mdist) - minval)}


def to_int16(wave) -> np.ndarray:
    """[-1, 1] float samples -> int16 values as ffmpeg's pcm_s16le writes them (round, clip), in float64."""
    return np.clip(np.rint(np.asarray(wave, np.float64) * 32768), -32768, 32767)


@torch.no_grad()
def embed(net, crops_bgr, audio, batch_size=20):
    """crops (N, 224, 224, 3) uint8 BGR at 25 fps, audio int16-valued 16 kHz samples -> lip and audio embeddings
    (W, 1024) of the W = min(N, len(audio) // 640) - 5 windows syncnet_python evaluates."""
    cc = torch.from_numpy(mfcc(audio).T).float()[None]  # (1, 13, T)
    n = min(len(crops_bgr), len(audio) // SAMPLES_PER_FRAME) - LIP_FRAMES
    if n < 1:
        raise ValueError(f"{min(len(crops_bgr), len(audio) // SAMPLES_PER_FRAME)} frames with audio: SyncNet needs "
                         f"at least {LIP_FRAMES + 1}")
    device = next(net.parameters()).device
    lip, aud = [], []
    for i in range(0, n, batch_size):
        idx = range(i, min(n, i + batch_size))
        video = torch.from_numpy(np.array(crops_bgr[i:idx[-1] + LIP_FRAMES], np.float32)).permute(3, 0, 1, 2)
        lip.append(net.forward_lip(torch.stack([video[:, v - i:v - i + LIP_FRAMES] for v in idx]).to(device)).cpu())
        mf = torch.stack([cc[:, :, v * MFCC_PER_FRAME:v * MFCC_PER_FRAME + MFCC_STEPS] for v in idx])  # (B,1,13,20)
        aud.append(net.forward_aud(mf.to(device)).cpu())
    return torch.cat(lip), torch.cat(aud)


def lse(net, crops_rgb, wave, batch_size=20) -> dict:
    """25 fps RGB crops (N, 224, 224, 3) uint8 and 16 kHz float speech -> {'offset', 'lse_d', 'lse_c', 'windows'}."""
    lip, aud = embed(net, np.asarray(crops_rgb)[..., ::-1], to_int16(wave), batch_size)
    return {**sync_scores(calc_pdist(lip, aud)), "windows": len(lip)}


# ----------------------------------------------------------------------------- crops


def medfilt(x, k=MEDIAN_FRAMES) -> np.ndarray:
    """scipy.signal.medfilt: the median over k samples around each, zeros past the ends."""
    padded = np.pad(np.asarray(x, np.float64), k // 2)
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, k), axis=-1)


def syncnet_crop(frame, x, y, s, size=CROP, scale=CROP_SCALE) -> np.ndarray:
    """run_pipeline.py's crop_video for one frame: box centre (x, y), half-size s -> (size, size, 3) uint8."""
    pad = int(s * (1 + 2 * scale))
    my, mx = y + pad, x + pad  # in the padded frame, whose origin is (-pad, -pad)
    rows = np.arange(int(my - s), int(my + s * (1 + 2 * scale))) - pad
    cols = np.arange(int(mx - s * (1 + scale)), int(mx + s * (1 + scale))) - pad
    h, w = frame.shape[:2]
    patch = frame[np.clip(rows, 0, h - 1)[:, None], np.clip(cols, 0, w - 1)[None, :]]
    outside = ((rows < 0) | (rows >= h))[:, None] | ((cols < 0) | (cols >= w))[None, :]
    patch = np.where(outside[..., None], np.uint8(PAD_GREY), patch)
    t = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def syncnet_crops(frames, landmarks) -> np.ndarray:
    """Frames (N, H, W, 3) and filled landmarks (N, 68, 2) -> (N, 224, 224, 3): the landmarks' bounding box as the
    face box, its centre and half-size max(w, h) / 2 median-filtered over 13 frames, then `syncnet_crop`."""
    lo, hi = landmarks.min(1), landmarks.max(1)  # (N, 2)
    x, y = medfilt((lo[:, 0] + hi[:, 0]) / 2), medfilt((lo[:, 1] + hi[:, 1]) / 2)
    s = medfilt((hi - lo).max(1) / 2)
    return np.stack([syncnet_crop(f, x[i], y[i], s[i]) for i, f in enumerate(frames)])


# ----------------------------------------------------------------------------- videos


def to_25fps(frames, fps):
    """Frames at fps -> (frames at 25 fps, source index of each): the nearest frame in time; unchanged at 25."""
    from lipsync.video import resample_indices
    idx = np.arange(len(frames)) if abs(fps - FPS) < 1e-3 else resample_indices(len(frames), fps, FPS)
    return frames[idx], idx


def video_landmarks(path, frames, idx):
    """Filled (N, 68, 2) landmarks of the 25 fps frames: from `<video>.track.npz` (at the source rate) if there is
    one, else mediapipe's face mesh on the frames."""
    from lipsync.track import read_track, track_file
    from lipsync.tracking import MeshTracker, fill_missing, track_and_fill
    found = track_file(path)
    if found is not None:
        track = read_track(found)
        if idx[-1] >= len(track.landmarks):
            raise ValueError(f"{found} has {len(track.landmarks)} frames, the video more")
        return fill_missing(track.landmarks[idx], track.face[idx])
    return track_and_fill(frames, MeshTracker())[0]


def score_video(net, path, batch_size=20) -> dict:
    """A video file with its speech -> the scores of `lse` plus 'fps' (the file's), 'frames' (at 25 fps)."""
    from lipsync.audio import load_audio
    from lipsync.video import read_video
    frames, fps = read_video(path)
    frames, idx = to_25fps(frames, fps)
    wave = load_audio(path).numpy()
    crops = syncnet_crops(frames, video_landmarks(path, frames, idx))
    return {"video": str(path), "fps": fps, "frames": len(frames), **lse(net, crops, wave, batch_size)}


def main(videos, weights, device="cpu", batch_size=20) -> dict:
    """The `eval --lse` command: score each video, print one row each and the averages."""
    from lipsync.tracking import MediapipeMissing
    if not weights:
        raise SystemExit("error: --lse needs --syncnet-weights syncnet_v2.model (see README: Lip-sync scores)")
    if not videos:
        raise SystemExit("error: --lse needs one or more videos")
    try:
        net = load_syncnet_v2(weights, device)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    rows = []
    for v in videos:
        try:
            rows.append(score_video(net, v, batch_size))
        except (OSError, ValueError, MediapipeMissing) as e:
            raise SystemExit(f"error: {e}" if str(v) in str(e) else f"error: {v}: {e}") from None
        if abs(rows[-1]["fps"] - FPS) >= 1e-3:
            print(f"note: {v} is {rows[-1]['fps']:g} fps: resampled to 25 fps (nearest frame in time) as "
                  f"syncnet_python does")
    print(f"{'video':40s} {'frames':>6s} {'offset':>6s} {'LSE-D':>7s} {'LSE-C':>7s}")
    for r in rows:
        print(f"{os.path.basename(r['video'])[:40]:40s} {r['frames']:6d} {r['offset']:+6d} {r['lse_d']:7.3f} "
              f"{r['lse_c']:7.3f}")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("lse_d", "lse_c")}
    print(f"{f'average of {len(rows)}':40s} {'':6s} {'':6s} {mean['lse_d']:7.3f} {mean['lse_c']:7.3f}")
    return {"videos": rows, **mean}
