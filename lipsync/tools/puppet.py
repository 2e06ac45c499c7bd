"""Real faces puppeteered: a prepared real clip re-mouthed to a known opening/roundness sequence, with matching audio.

The bundled talking-head renders are silent and their lips barely move, so this makes training pairs from them. Per
new clip: a phoneme-like sequence (`synthetic.random_sequence`) and a new speaker's formant audio of it
(`synthetic.synth_audio`); the source clip's 256 px crops in ping-pong order (real head motion), each with its lower
face warped along the landmarks to the target mouth.

With `--speech`, a clip speaks with a real recording instead: a random window of one of the given speech files, and
the mouth opens with its loudness (`speech_opening`: closed below -20 dB of the window's loud frames, linear in dB up
to wide open at their level; roundness fixed per clip). Real voices then drive puppets of every face. Use clean
recordings: under steady music or noise the loudness no longer tells speech from pauses.

Target landmarks (crop pixels, axes from the eye line): interior height h = opening * open_max * mouth width; upper lip
up 0.2 h, lower lip down 0.8 h and corners down 0.35 h, graded as (1 - u^2)^0.7 from the centre (u = 0) to the inner
corners; chin down jaw * h, fading along the jaw line; lips narrower by round_narrow * roundness (and a little with
h). The interior (dark cavity, upper teeth, a hint of tongue) is painted between the lips. The warp is a thin-plate
spline fitted from target to source points (lips, jaw, fixed nose/eye/crop-edge anchors), evaluated on an S/32 grid
(bicubic in between: landmarks land within ~0.25 px, 1 px at most, of where the warp puts their source), faded
in below the crop's midline (rows < S/2 + S/32 are copied), applied with `grid_sample`. Boxes stay the source's.

    python -m lipsync.tools.puppet PREPARED_CLIP_DIR --out DIR --clips 20 --seconds 8 [--size 64] [--seed 0]
                                   [--heldout 0.2] [--speech WAV_OR_VIDEO ...]
"""

import argparse
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.audio import load_audio
from lipsync.training import data
from lipsync.tools.metrics import LOWER_INNER, UPPER_INNER, eye_axes, lip_opening_68
from lipsync.tools.synthetic import (HELDOUT_BASE, SR, Voice, add_clip_set_flags, frame_envelope, random_sequence,
                                     run_jobs, synth_audio)
from lipsync.tools.synthetic_face import dark_height
from lipsync.tracking import from_crop_coords, to_crop_coords

__all__ = ["MouthStyle", "target_landmarks", "puppet_crops", "dark_mouth_height", "pingpong", "speech_opening",
           "make_puppet_clip", "write_puppet_clip", "main"]

PUPPET_BASE = 500_000  # speaker ids: train 500000 + i, held-out HELDOUT_BASE + 500000 + i (never synthetic ones)
VOICE_BASE = 100_000  # added to the speaker id of a clip spoken by a real recording (--speech)
MOVED = np.r_[2:15, 48:68]  # jaw 2-14 and all lip points move; the rest of the controls are anchors
ANCHORS = np.r_[0, 1, 15, 16, 30:36, 36, 39, 42, 45]
SHAPE = 0.7  # lip profile exponent: 0.5 = elliptical opening, 1 = parabolic
EDGE = np.array([(0, .5), (.5, .5), (1, .5), (0, .75), (1, .75), (0, 1), (1, 1)], np.float32)  # x S, fixed


@dataclass
class MouthStyle:
    open_max: float = 0.38     # interior height at opening 1, in mouth widths
    jaw: float = 0.45          # chin drop / interior height
    round_narrow: float = 0.3  # mouth width lost at roundness 1
    teeth: float = 0.3         # upper-teeth band / interior height
    dark: float = 1.0          # interior brightness factor

    @classmethod
    def random(cls, rng):
        return cls(open_max=rng.uniform(0.32, 0.44), jaw=rng.uniform(0.35, 0.55), round_narrow=rng.uniform(0.25, 0.35),
                   teeth=rng.uniform(0.15, 0.4), dark=rng.uniform(0.7, 1.3))


def target_landmarks(lm, opening, roundness, style=MouthStyle()):
    """Source landmarks (B, 68, 2) in crop pixels + opening, roundness (B,) in [0, 1] -> target landmarks (B, 68, 2),
    interior height h (B,) in pixels and the fraction of mouth width lost (B,). Only jaw 2-14 and lips 48-67 move;
    the inner-lip gap grows by h."""
    lm = np.asarray(lm, np.float32)
    right, down = eye_axes(lm)
    centre = 0.5 * (lm[:, 48] + lm[:, 54])[:, None]  # (B, 1, 2)
    width = np.linalg.norm(lm[:, 54] - lm[:, 48], axis=-1)
    inner = np.linalg.norm(lm[:, 64] - lm[:, 60], axis=-1)
    h = (np.asarray(opening, np.float32) * style.open_max * width)[:, None]  # (B, 1)
    lips = lm[:, 48:68]
    along = ((lips - centre) * right).sum(-1)  # (B, 20)
    u = along / (0.5 * width[:, None])  # -1 at the left corner, +1 at the right
    q = np.clip(1 - (along / (0.5 * inner[:, None])) ** 2, 0, 1) ** SHAPE  # 0 from the inner corners out
    upper = np.isin(np.r_[48:68], [49, 50, 51, 52, 53, 61, 62, 63])
    lift = np.where(upper, -0.2, 0.8)
    dv = (0.35 + (lift - 0.35) * q) * h  # (B, 20) pixels along `down`
    narrow = style.round_narrow * np.asarray(roundness, np.float32) + 0.08 * h[:, 0] / width  # (B,)
    out = lm.copy()
    out[:, 48:68] = lips + dv[..., None] * down - ((narrow[:, None] * u) * 0.5 * width[:, None])[..., None] * right
    k = np.arange(2, 15)
    fall = np.cos(np.clip(np.abs(k - 8) / 8, 0, 1) * np.pi / 2) ** 1.5  # 1 at the chin, ~0.24 at points 2/14
    out[:, 2:15] = lm[:, 2:15] + (style.jaw * h * fall)[..., None] * down
    return out, h[:, 0], narrow


def _tps_backward(dst, src, nodes):
    """Thin-plate spline through dst -> src (B, K, 2), evaluated at nodes (G, 2): (B, G, 2) source points.
    Coordinates are in crop units (0..1); a tiny ridge keeps near-coincident controls solvable. Fit in float64,
    evaluation in float32."""
    B, K, _ = dst.shape

    def kernel(a, b):  # U(r) = r^2 log r = r^2 log(r^2) / 2, (B, I, 2) x (B, J, 2) -> (B, I, J)
        r2 = torch.cdist(a, b).square_()
        return r2.mul(r2.clamp(min=1e-24).log_()).mul_(0.5)

    P = torch.cat([dst.new_ones(B, K, 1), dst], -1)  # (B, K, 3)
    A = dst.new_zeros(B, K + 3, K + 3)
    A[:, :K, :K] = kernel(dst, dst) + 1e-6 * torch.eye(K, dtype=dst.dtype)
    A[:, :K, K:], A[:, K:, :K] = P, P.transpose(1, 2)
    rhs = torch.cat([src - dst, dst.new_zeros(B, 3, 2)], 1)
    coef = torch.linalg.solve(A, rhs).float()  # (B, K + 3, 2)
    g = nodes.float().expand(B, -1, -1)
    Pg = torch.cat([g.new_ones(B, len(nodes), 1), g], -1)
    return g + kernel(g, dst.float()) @ coef[:, :K] + Pg @ coef[:, K:]


def _interp(x, xk, yk):
    """Batched piecewise-linear interpolation, constant beyond the ends: x (B, W), knots xk, yk (B, M) -> (B, W)."""
    xk = torch.cummax(xk, 1).values + 1e-4 * torch.arange(xk.shape[1], dtype=xk.dtype)
    i = torch.searchsorted(xk, x.contiguous()).clamp(1, xk.shape[1] - 1)
    x0, x1 = xk.gather(1, i - 1), xk.gather(1, i)
    y0, y1 = yk.gather(1, i - 1), yk.gather(1, i)
    return y0 + ((x - x0) / (x1 - x0)).clamp(0, 1) * (y1 - y0)


def _lip_profile(u, lift):
    """Vertical move of a lip point at lateral position u (-1..1 corner to corner) in units of h: `lift` at the
    centre, 0.35 (the corners' drop) at the inner corners, graded as (1 - u^2)^SHAPE (an almond-shaped opening)."""
    return 0.35 + (lift - 0.35) * (1 - u * u).clamp(min=0) ** SHAPE


def _paint_mouth(img, lm_src, h, narrow, row0, style):
    """Dark interior with upper teeth and a hint of tongue, blended in place into img (B, 3, R, S) float 0..255,
    which holds crop rows row0..S. Per column, at lateral position u of the narrowed mouth, the interior spans the
    source lips' contact line (corners and inner-pair midpoints) moved by the lips' profiles: height q(u) h."""
    B, _, R, S = img.shape
    lm = torch.from_numpy(np.asarray(lm_src, np.float32))
    pairs = 0.5 * (lm[:, UPPER_INNER] + lm[:, LOWER_INNER])  # inner-pair midpoints
    mid = torch.cat([lm[:, 48:49], pairs, lm[:, 54:55]], 1)  # (B, 5, 2) contact line
    cx = 0.5 * (lm[:, 48, 0] + lm[:, 54, 0])[:, None]
    hw = (0.5 * (lm[:, 64, 0] - lm[:, 60, 0])).clamp(min=1)[:, None]  # inner corners
    x = torch.arange(S, dtype=torch.float32)[None] + 0.5  # (1, S)
    u = (x - cx) / (hw * (1 - torch.from_numpy(np.asarray(narrow, np.float32))[:, None]))  # (B, S)
    hh = torch.from_numpy(np.asarray(h, np.float32))[:, None]
    line = _interp(cx + u * hw, mid[..., 0], mid[..., 1])
    t, b = line + _lip_profile(u, -0.2) * hh, line + _lip_profile(u, 0.8) * hh  # (B, S)
    cols = torch.nonzero(((b - t) > 0).any(0)).flatten()
    if len(cols) == 0 or t.min() >= row0 + R or b.max() <= row0:
        return
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    r0, r1 = max(int(t.min().floor()), row0), min(int(b.max().ceil()) + 1, row0 + R)
    win = img[:, :, r0 - row0:r1 - row0, c0:c1]  # a view: painted in place
    t, b, u, hw = t[:, None, c0:c1], b[:, None, c0:c1], u[:, None, c0:c1], hw[:, :, None]  # (B, 1, W)
    y = torch.arange(r0, r1, dtype=torch.float32)[None, :, None]  # pixel y spans [y, y + 1)
    cover = (torch.minimum(y + 1, b) - torch.maximum(y, t)).clamp(0, 1)  # (B, rows, W)
    u2 = (u * u).clamp(max=1)
    v = ((y + 0.5 - t) / (b - t).clamp(min=1e-3)).clamp(0, 1)
    back, front = torch.tensor([20.0, 7, 9])[:, None, None], torch.tensor([75.0, 30, 34])[:, None, None]
    shade = (u2 + (2 * v - 1) ** 4).clamp(0, 1)[:, None]  # lighter towards the lips
    colour = style.dark * (back + (front - back) * shade)  # (B, 3, rows, W)
    hh, q = hh[:, :, None], (1 - u2) ** SHAPE
    show = ((hh - 0.1 * hw) / (0.15 * hw)).clamp(0, 1)  # teeth and tongue once open a little
    teeth = (style.teeth * hh * q * q - (y - t)).clamp(0, 1) * show
    tooth = torch.tensor([196.0, 188, 175])[:, None, None] * (1 - 0.7 * u2)[:, None]
    colour = colour + (tooth - colour) * teeth[:, None]
    tongue = ((y + 1 - (b - 0.3 * (b - t) * q)).clamp(0, 1) * 0.5 * show)[:, None]
    colour = colour + (torch.tensor([105.0, 43, 46])[:, None, None] - colour) * tongue
    win += (colour - win) * cover[:, None]


def puppet_crops(crops, lm, opening, roundness, style=MouthStyle(), size=None):
    """Re-mouth source crops (B, S, S, 3) uint8 with landmarks lm (B, 68, 2) in their pixels to opening/roundness
    (B,) -> (crops (B, size, size, 3) uint8, target landmarks (B, 68, 2) in S pixels). Rows < S/2 + S/32 are the
    source's exactly (so after resizing, the upper half of the output equals the resized source)."""
    crops = torch.from_numpy(np.ascontiguousarray(crops))
    B, S = crops.shape[:2]
    size = size or S
    dst, h, narrow = target_landmarks(lm, opening, roundness, style)
    ctrl = np.r_[MOVED, ANCHORS]
    edge = np.broadcast_to(EDGE * S, (B, len(EDGE), 2))
    d = torch.from_numpy(np.concatenate([dst[:, ctrl], edge], 1) / S).double()
    s = torch.from_numpy(np.concatenate([lm[:, ctrl], edge], 1) / S).double()
    row0, step = S // 2 + S // 32, max(S // 32, 2)
    R = S - row0
    gy, gx = torch.meshgrid((torch.arange(-(-R // step)) + 0.5) * step + row0,
                            (torch.arange(-(-S // step)) + 0.5) * step, indexing="ij")
    nodes = torch.stack([gx, gy], -1).reshape(-1, 2) / S
    field = (_tps_backward(d, s, nodes) - nodes).reshape(B, gy.shape[0], gy.shape[1], 2).permute(0, 3, 1, 2)
    field = F.interpolate(field, scale_factor=step, mode="bicubic", align_corners=False)[:, :, :R, :S]  # (B, 2, R, S)
    ramp = ((torch.arange(R) + 0.5) / (S / 16)).clamp(max=1)
    field = field * (ramp * ramp * (3 - 2 * ramp))[:, None]  # smoothstep over S/16 rows below row0
    top = row0 - S // 16  # the warp never reaches higher: nose and eye anchors hold the field near row0 at zero
    ys, xs = torch.meshgrid((torch.arange(R) + 0.5 + row0 - top) / (S - top), (torch.arange(S) + 0.5) / S,
                            indexing="ij")
    grid = torch.stack([xs, ys])[None] + field * torch.tensor([1.0, S / (S - top)])[:, None, None]  # (B, 2, R, S)
    src = crops[:, top:].permute(0, 3, 1, 2).float()  # (B, 3, S - top, S)
    lower = F.grid_sample(src, (2 * grid - 1).permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                          align_corners=False)  # (B, 3, R, S): source points, in units of the source rows used
    _paint_mouth(lower, lm, h, narrow, row0, style)
    out = crops.permute(0, 3, 1, 2).clone()  # uint8 (B, 3, S, S), channels-last memory
    out[:, :, row0:] = lower.round().clamp(0, 255).to(torch.uint8)
    if size != S:
        out = F.interpolate(out, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy()), dst


# ----------------------------------------------------------------------------- measuring the mouth


def dark_mouth_height(crops, landmarks, lo=30.0, hi=80.0):
    """Height of the painted dark interior read from pixels (synthetic_face.dark_height, luma `hi` down to `lo`,
    three tallest columns): crops (N, S, S, 3) uint8 with landmarks (N, 68, 2) in those crops' pixels, in a box that
    depends only on points that do not follow the mouth (x: lip corners +- 10 %, y: nose base + 0.1 .. 0.75 eye
    distances) -> (N,) float32 over the eye distance."""
    crops, lm = np.asarray(crops), np.asarray(landmarks, np.float32)
    N, S = crops.shape[:2]
    iod = np.linalg.norm(lm[:, 42:48].mean(1) - lm[:, 36:42].mean(1), axis=-1)
    w = lm[:, 54, 0] - lm[:, 48, 0]
    x0, x1 = lm[:, 48, 0] - 0.1 * w, lm[:, 54, 0] + 0.1 * w
    y0, y1 = lm[:, 33, 1] + 0.1 * iod, lm[:, 33, 1] + 0.75 * iod
    c = np.arange(S) + 0.5
    inside = ((c[None, :, None] >= y0[:, None, None]) & (c[None, :, None] < y1[:, None, None])
              & (c[None, None, :] >= x0[:, None, None]) & (c[None, None, :] < x1[:, None, None]))
    return (dark_height(crops, lo, hi, 3, inside) / np.maximum(iod, 1e-6)).astype(np.float32)


# ----------------------------------------------------------------------------- clips


def pingpong(n_source, n, start=0):
    """Frame indices 0, 1, .., n_source - 1, n_source - 2, .., 1, 0, 1, .. from `start` in that cycle -> (n,)."""
    if n_source == 1:
        return np.zeros(n, np.int64)
    p = (start + np.arange(n)) % (2 * n_source - 2)
    return np.where(p < n_source, p, 2 * n_source - 2 - p)


def _source(path):
    """A prepared clip's meta, crops (memory-mapped) and track."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise ValueError(f"{path}: not a complete prepared clip (no meta.json)")
    with np.load(path / "track.npz") as t:
        track = {k: t[k] for k in t.files}
    return json.loads((path / "meta.json").read_text()), np.load(path / "crops.npy", mmap_mode="r"), track


def speaker_id(index, split):
    return PUPPET_BASE + index + (HELDOUT_BASE if split == "heldout" else 0)


def speech_opening(wave, n, fps, closed_db=-20.0, open_db=0.0):
    """Mouth opening (n,) in [0, 1] from a real recording's loudness: the RMS envelope at each frame
    (`synthetic.frame_envelope`) in dB of its 95th percentile, 0 at closed_db and below, 1 at open_db and above."""
    env = frame_envelope(wave, n, fps).astype(np.float64)
    loud = max(float(np.percentile(env, 95)), 1e-9)
    db = 20 * np.log10(np.maximum(env, 1e-9 * loud) / loud)
    return np.clip((db - closed_db) / (open_db - closed_db), 0, 1).astype(np.float32)


def make_puppet_clip(source, index, split="train", seconds=8.0, size=64, seed=0, chunk=50, speech=()):
    """One puppeted clip of the prepared clip at `source` -> dict of crops (N, size, size, 3), boxes, face,
    landmarks (source pixels), wave, opening/width (N,), speaker, fps. Draws come from (seed, split, index).
    speech: 16 kHz waves; when given, the clip speaks a window of one of those at least `seconds` long."""
    meta, crops, track = _source(source)
    fps, ident = float(meta["fps"]), speaker_id(index, split) + (VOICE_BASE if len(speech) else 0)
    voice = Voice.random(np.random.default_rng([seed, 2, ident]))
    rng = np.random.default_rng([seed, 3, ident])
    style = MouthStyle.random(rng)
    n = int(round(seconds * fps))
    if len(speech):
        samples = int(round(n / fps * SR))
        long_enough = [w for w in speech if len(w) >= samples]
        if not long_enough:
            raise ValueError(f"every --speech recording is shorter than a clip ({seconds:g} s)")
        wave = long_enough[int(rng.integers(len(long_enough)))]
        start = int(rng.integers(len(wave) - samples + 1))
        wave = np.asarray(wave[start:start + samples], np.float32)
        wave = wave * (voice.level / max(float(np.abs(wave).max()), 1e-6))
        truth = {"opening": speech_opening(wave, n, fps), "roundness": np.full(n, rng.uniform(0, 0.6), np.float32)}
    else:
        seq = random_sequence(n / fps, rng)
        truth = seq.at(np.arange(n) / fps)
        wave = synth_audio(seq.opening, seq.roundness, seq.rate, voice, seq.noise, seq.noise_hz, n / fps, seed=ident)
    idx = pingpong(len(crops), n, int(rng.integers(2 * max(len(crops) - 1, 1))))
    S = crops.shape[1]
    boxes = track["boxes"][idx]
    lm = to_crop_coords(track["landmarks"][idx], boxes, S)
    out, lm_out = np.empty((n, size, size, 3), np.uint8), np.empty_like(lm)
    for a in range(0, n, chunk):
        sl = slice(a, min(n, a + chunk))
        out[sl], lm_out[sl] = puppet_crops(crops[idx[sl]], lm[sl], truth["opening"][sl], truth["roundness"][sl],
                                           style, size)
    landmarks = track["landmarks"][idx].copy()
    landmarks[:, MOVED] = from_crop_coords(lm_out[:, MOVED], boxes, S)
    return {"crops": out, "boxes": boxes, "face": track["face"][idx], "landmarks": landmarks, "wave": wave,
            "opening": truth["opening"], "width": (1 - truth["roundness"]).astype(np.float32), "speaker": ident,
            "fps": fps, "frames": idx, "meta": meta}


def write_puppet_clip(out, name, clip, source, split="train", seed=0):
    """Write DIR/<name>/ atomically in the prepared-clip layout (lipsync.training.data.write_clip)."""
    src = clip["meta"]
    meta = {"version": 1, "fps": clip["fps"], "frames": len(clip["crops"]), "size": src["size"],
            "crop_size": clip["crops"].shape[1], "source": str(Path(source).resolve()), "tracker": "puppet",
            "audio": "audio.wav", "sr": SR, "split": split, "speaker": clip["speaker"],
            "face": zlib.crc32(Path(source).name.encode()) % HELDOUT_BASE, "seed": seed,
            "source_frames": clip["frames"].tolist()}
    return data.write_clip(out, name, meta, clip["crops"], clip["boxes"], clip["face"], clip["landmarks"],
                           clip["wave"], truth={"opening": clip["opening"], "width": clip["width"]})


def _puppet_job(source, out, name, index, split, seconds, size, seed, threads, speech):
    """Make and write one clip -> (r(truth, landmark opening), r(truth, dark height), r(RMS envelope, truth))."""
    torch.set_num_threads(threads)
    clip = make_puppet_clip(source, index, split, seconds, size, seed, speech=speech)
    write_puppet_clip(out, name, clip, source, split, seed)
    lm = to_crop_coords(clip["landmarks"], clip["boxes"], size)
    env = frame_envelope(clip["wave"], len(clip["opening"]), clip["fps"])
    t = clip["opening"]
    return (np.corrcoef(t, lip_opening_68(lm))[0, 1], np.corrcoef(t, dark_mouth_height(clip["crops"], lm))[0, 1],
            np.corrcoef(t, env)[0, 1])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lipsync.tools.puppet", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="PREPARED_CLIP_DIR",
                   help="a clip written by lipsync.training.prepare (crops at 256)")
    add_clip_set_flags(p, 8.0, "voice, mouth style, sequence and frames", "speakers")
    p.add_argument("--speech", nargs="+", default=[], metavar="AUDIO",
                   help="real speech recordings (audio files or videos with sound): each clip speaks a random window "
                        "of one, the mouth opening with its loudness, instead of a synthesised voice")
    args = p.parse_args(argv)
    meta, crops, _ = _source(args.source)
    if crops.shape[1] < args.size:
        p.error(f"{args.source} has {crops.shape[1]} px crops; --size must not exceed that")
    for path in args.speech:
        if not os.path.isfile(path):
            p.error(f"--speech {path}: no such file")

    stem = Path(args.source).name
    n_held = int(round(args.clips * args.heldout))
    tag = "voice" if args.speech else ""
    jobs = [(f"{stem}_{split}{tag}_{i:04d}", i, split)
            for split, n in (("train", args.clips - n_held), ("heldout", n_held)) for i in range(n)]
    todo = [j for j in jobs if not (Path(args.out) / j[0] / "meta.json").exists()]
    speech = [load_audio(path).numpy() for path in args.speech]  # read once, shared by every clip
    common = (args.seconds, args.size, args.seed, max(1, (os.cpu_count() or 1) // max(args.workers, 1)), speech)
    results = run_jobs(_puppet_job, [(args.source, args.out, name, i, split, *common) for name, i, split in todo],
                       args.workers, "puppet clips")
    print(f"{len(todo)} clips written, {len(jobs) - len(todo)} already complete, in {args.out}")
    if results:
        r_lm, r_dark, r_env = np.array(results).T
        print(f"r(truth, landmark opening): mean {r_lm.mean():.4f}, min {r_lm.min():.4f}; r(truth, dark mouth "
              f"height): mean {r_dark.mean():.3f}, min {r_dark.min():.3f}; r(audio RMS envelope, truth): mean "
              f"{r_env.mean():.3f}, min {r_env.min():.3f}")


if __name__ == "__main__":
    main()
