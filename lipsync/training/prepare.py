"""Clip preparation: a talking-head video (+ audio) -> DIR/<clip>/ with crops, track, audio and meta (spec layout).
A photo gives a one-frame clip (silent unless --audio): a still face for `python -m lipsync.tools.puppet` to animate.

    python -m lipsync.training.prepare VIDEO [VIDEO ...] --out DIR [--audio WAV] [--fps 25] [--bbox x1,y1,x2,y2]
                                       [--bbox-shift N] [--crop-size 256] [--geometry square|musetalk]
                                       [--audio-delay MS]

Two streaming passes over the video (memory stays at one frame + the crops): pass 1 tracks every source frame,
then the track is mapped to the target fps (nearest frame in time), gaps without a face are filled from the nearest
face, crop boxes are smoothed (square geometry; MuseTalk geometry keeps MuseTalk's per-frame boxes); pass 2 crops.
Everything is written to DIR/.<clip>.partial/ (meta.json last, via meta.json.tmp) and renamed to DIR/<clip> at the
end, so a clip is complete iff DIR/<clip>/meta.json exists; reruns skip complete clips and redo everything else.
--geometry musetalk writes MuseTalk v1.5's own crops (lipsync.tracking.musetalk_box with --margin as its
extra_margin, docs/geometry.md), so a model trained on them can run in MuseTalk's pipeline and back.
--audio-delay re-syncs a recording whose sound runs ahead of its mouth (positive ms: the audio plays later) or
behind it (negative); `python -m lipsync.tools.avsync` estimates the delay. The clip keeps its frames and length.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from lipsync import checks
from lipsync.audio import delay, load_audio
from lipsync.checks import IMAGE_SUFFIXES
from lipsync.tracking import GEOMETRIES, BoxTracker, MediapipeMissing, MeshTracker, crop_face, face_boxes
from lipsync.tracking import parse_bbox, track_and_fill
from lipsync.video import SAMPLE_RATE, fit_length, iter_frames, resample_indices, select_frames, video_info


@dataclass
class Prepared:
    path: Path
    frames: int  # frames written (at the target fps)
    no_face: int  # of those, frames where the tracker found no face
    skipped: bool  # True when the clip was already complete
    seconds: float = 0.0  # wall time
    track_ms: float = 0.0  # tracker time per source frame


def _write_meta(folder, meta):
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


def prepare_clip(video, out_dir, *, audio=None, fps=25.0, bbox=None, bbox_shift=0, crop_size=256, margin=10,
                 smooth_sigma=None, name=None, progress=True, geometry="square", silent=False, audio_delay=0.0):
    """Prepare one clip into out_dir/<name> (name defaults to the video's stem); see the module docstring.

    audio: audio file to use instead of the video's own track; silent=True (always so for a photo): a silent track.
    audio_delay: seconds the audio plays later than the picture (negative: earlier), to re-sync a recording.
    fps: target rate (None or 0 keeps the source rate).
    bbox: (x1, y1, x2, y2) fixed face box instead of mediapipe. geometry: tracking.GEOMETRIES. smooth_sigma: box
    smoothing in frames (default 2 for square, 0 for musetalk). Returns a Prepared record.
    """
    start = time.perf_counter()
    video, out_dir = Path(video), Path(out_dir)
    name = name or video.stem
    final = out_dir / name
    for replaced in (final, out_dir / f".{name}.partial"):
        checks.refuse_overwrite(replaced, {"video": video, "audio": audio}, "--out")
    if (final / "meta.json").is_file():
        meta = json.loads((final / "meta.json").read_text())
        return Prepared(final, meta["frames"], int((~np.load(final / "track.npz")["face"]).sum()), skipped=True)

    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown crop geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
    if smooth_sigma is None:
        smooth_sigma = 2.0 if geometry == "square" else 0.0
    info = video_info(video)
    if info.fps <= 0:
        raise ValueError(f"{video}: no video stream")
    dst_fps = float(fps) if fps else info.fps
    if audio is None and (silent or video.suffix.lower() in IMAGE_SUFFIXES):
        wave = torch.zeros(0)  # padded to the clip's length below
    else:
        wave = load_audio(audio if audio is not None else video)  # fail fast, before tracking
    tracker = BoxTracker(bbox) if bbox is not None else MeshTracker()

    partial = out_dir / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    # pass 1: landmarks for every source frame
    expected = round(info.duration * info.fps) or None
    with tqdm(total=expected, desc=f"{name}: track", unit="frame", disable=not progress, leave=False) as bar:
        landmarks_src, face_src, track_ms = track_and_fill(iter_frames(video), tracker, bar)

    # source fps -> target fps, then boxes
    idx = resample_indices(len(face_src), info.fps, dst_fps)
    landmarks, face = landmarks_src[idx], face_src[idx]
    boxes = face_boxes(landmarks, geometry, bbox_shift, margin, smooth_sigma, height=info.size[0])
    n = len(idx)

    # pass 2: crops, straight into the .npy on disk
    crops = np.lib.format.open_memmap(partial / "crops.npy", mode="w+", dtype=np.uint8,
                                      shape=(n, crop_size, crop_size, 3))
    frames = select_frames(iter_frames(video), idx)
    for j, frame in enumerate(tqdm(frames, total=n, desc=f"{name}: crop", unit="frame", disable=not progress,
                                   leave=False)):
        crops[j] = crop_face(frame, boxes[j], crop_size, lanczos=geometry == "musetalk")
    crops.flush()
    del crops

    np.savez(partial / "track.npz", boxes=boxes, face=face, landmarks=landmarks.astype(np.float32))
    wave = fit_length(delay(wave, audio_delay), round(n / dst_fps * SAMPLE_RATE)).clamp(-1, 1)
    sf.write(partial / "audio.wav", wave.numpy(), SAMPLE_RATE, subtype="PCM_16")
    _write_meta(partial, {
        "version": 1, "fps": dst_fps, "frames": n, "size": [int(info.size[0]), int(info.size[1])],
        "crop_size": crop_size, "source": str(video.resolve()), "tracker": tracker.name, "audio": "audio.wav",
        "sr": SAMPLE_RATE, "source_fps": info.fps, "bbox_shift": bbox_shift, "margin": margin,
        "geometry": geometry, "smooth_sigma": smooth_sigma, "audio_delay": audio_delay,
    })
    if final.exists():  # an incomplete clip from an older run (no meta.json)
        shutil.rmtree(final)
    os.rename(partial, final)
    return Prepared(final, n, int((~face).sum()), skipped=False, seconds=time.perf_counter() - start,
                    track_ms=track_ms)


def encoder_digest(encoder) -> str:
    """A short fingerprint of an audio encoder's weights (which whisper made a clip's whisper.npy)."""
    h = hashlib.sha1()
    for name, value in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def add_whisper_features(clip_dirs, encoder, say=print) -> int:
    """Write <clip>/whisper.npy, (T50, L, D) float16, the frozen encoder's hidden states of the clip's audio (30 s
    windows, as infer.py computes them), for features="whisper" training. whisper.json records the encoder's digest;
    a clip made with another encoder is redone. Returns how many clips were (re)written."""
    digest, done = encoder_digest(encoder), 0
    for clip in tqdm(list(clip_dirs), desc="whisper features", unit="clip", leave=False):
        clip = Path(clip)
        tag = clip / "whisper.json"
        if tag.exists() and json.loads(tag.read_text()).get("encoder") == digest and (clip / "whisper.npy").exists():
            continue
        meta = json.loads((clip / "meta.json").read_text())
        feats = encoder.encode(load_audio(clip / meta["audio"]))[0].transpose(0, 1)  # (L, T, D) -> (T, L, D)
        np.save(clip / "whisper.tmp.npy", feats.float().cpu().numpy().astype(np.float16))
        os.replace(clip / "whisper.tmp.npy", clip / "whisper.npy")
        tag.write_text(json.dumps({"encoder": digest}))
        done += 1
    if done:
        say(f"whisper features written for {done} clip(s) (encoder {digest})")
    return done


# ----------------------------------------------------------------------------- CLI


def _bbox_arg(text):
    try:
        return parse_bbox(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_args(args):
    """Options that cannot work, and an --out that would replace an input, before anything is written."""
    if args.fps != 0:  # 0 keeps the source rate
        checks.positive(args.fps, "--fps")
    if args.crop_size < 1:
        raise ValueError(f"--crop-size must be >= 1 pixel, not {args.crop_size}")
    if not (math.isfinite(args.bbox_shift) and math.isfinite(args.margin)):
        raise ValueError("--bbox-shift and --margin must be numbers of pixels")
    if not math.isfinite(args.audio_delay) or abs(args.audio_delay) > 1000:
        raise ValueError(f"--audio-delay must be a number of milliseconds within +-1000, not {args.audio_delay}")
    checks.creatable(args.out)
    out, inputs = Path(args.out), [("video", v) for v in args.videos] + [("audio", args.audio)]
    for what, path in inputs:
        if path and Path(path).is_dir():
            raise ValueError(f"{what} {path} is a folder, not a file")
    for video in args.videos:
        if checks.same_file(out, Path(video).parent):
            raise ValueError(f"--out {args.out} is the folder of {video}; prepared clips need a folder of their own")
        for replaced in (out / Path(video).stem, out / f".{Path(video).stem}.partial"):
            for what, path in inputs:
                checks.refuse_overwrite(replaced, {what: path})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lipsync.training.prepare", description=__doc__.split("\n")[0])
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="talking-head videos, or photos (one-frame clips to animate with lipsync.tools.puppet)")
    p.add_argument("--out", required=True, help="output folder, one sub-folder per clip")
    p.add_argument("--audio", help="audio file to use instead of the video's own track (one VIDEO only)")
    p.add_argument("--fps", type=float, default=25.0, help="target frame rate (0 keeps the source rate)")
    p.add_argument("--bbox", type=_bbox_arg, help="fixed face box x1,y1,x2,y2 (brows to chin, jaw side to side) "
                   "for every frame instead of mediapipe tracking")
    p.add_argument("--bbox-shift", type=float, default=0, help="move the crop's midline from the nose point, "
                   "in source pixels (+ = down: the mask hides less, the mouth opens more)")
    p.add_argument("--crop-size", type=int, default=256, help="side of the square face crops, in pixels")
    p.add_argument("--margin", type=float, default=10, help="pixels below the chin (source scale); with "
                   "--geometry musetalk MuseTalk's extra_margin: 10 for v1.5, 0 for v1")
    p.add_argument("--geometry", choices=GEOMETRIES, default="square", help="crop geometry: square (our default) "
                   "or musetalk (MuseTalk v1.5's own face box and Lanczos resize, for the published weights)")
    p.add_argument("--smooth", type=float, help="box smoothing over time, Gaussian sigma in frames (default 2 for "
                   "square, 0 = off for musetalk)")
    p.add_argument("--audio-delay", type=float, default=0.0, metavar="MS", help="play the audio this many ms later "
                   "than the picture (negative: earlier), to re-sync a recording whose sound runs ahead of its mouth; "
                   "python -m lipsync.tools.avsync estimates it")
    args = p.parse_args(argv)
    if args.audio and len(args.videos) > 1:
        p.error("--audio goes with a single VIDEO")
    stems = [Path(v).stem for v in args.videos]
    if len(set(stems)) < len(stems):
        p.error("two VIDEOs share a file name; clips are named by it")
    try:
        check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    failed = 0
    for video in args.videos:
        try:
            r = prepare_clip(video, args.out, audio=args.audio, fps=args.fps, bbox=args.bbox,
                             bbox_shift=args.bbox_shift, crop_size=args.crop_size, margin=args.margin,
                             smooth_sigma=args.smooth, geometry=args.geometry, audio_delay=args.audio_delay / 1000)
        except MediapipeMissing as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (ValueError, RuntimeError, OSError) as err:
            where = "" if str(Path(video)) in str(err) else f"{video}: "
            print(f"error: {where}{err}", file=sys.stderr)
            failed += 1
            continue
        if r.skipped:
            print(f"{r.path.name}: already prepared, skipped")
        else:
            print(f"{r.path.name}: {r.frames} frames ({r.no_face} without a face) in {r.seconds:.1f} s, "
                  f"tracker {r.track_ms:.1f} ms/frame -> {r.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
