"""Lip-sync a video or a still image to speech and write an mp4 with the sound.

    python infer.py                                   # the bundled demo -> results/demo.mp4
    python infer.py --video talk.mp4 --audio speech.wav [--ckpt model.pt] [--out out.mp4]
    python infer.py --image face.png --audio speech.mp3 --fps 25
    python infer.py --video talk.mp4 --audio speech.wav --unet musetalkV15/unet.pth --vae sd-vae --whisper whisper
    python infer.py --prepare-avatar talk.mp4 --avatar avatars/talk   # cache everything audio-independent, once
    python infer.py --avatar avatars/talk --audio speech.wav          # then only audio + UNet + decode + blend

The output has the input's resolution and frame rate and the audio's length (floor(seconds * fps) frames; the source
plays forward and backward when the audio is longer), h264 + aac, written to a temp file and renamed when complete.
Faces are tracked with mediapipe, or the fixed --bbox box; a precomputed track `<video>.track.npz` (or
`<stem>.track.npz`) beside the input, in the layout lipsync.training.prepare writes (landmarks, face, boxes), is used
instead of tracking when present. Frames without a face pass through unchanged. Bad inputs stop with one line on stderr and a
non-zero exit code before anything is written.

Crop geometry (docs/geometry.md) follows the weights: the published MuseTalk weights get MuseTalk v1.5's own face box
(--version v15: 10 px below the lowest landmark, v1: 0), unsmoothed so that every frame's box is MuseTalk's; our
checkpoints use the geometry recorded in them (the square crop unless trained on --geometry musetalk clips).
"""

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lipsync import checks
from lipsync.checks import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from lipsync.audio import load_audio
from lipsync.checkpoint import from_published, load_lipsync
from lipsync.model import check_guidance, compile_for_inference
from lipsync.avatar import check_avatar_folder, load_avatar, save_avatar
from lipsync.pipeline import avatar_frames, prepare_avatar
from lipsync.track import box_options as track_box_options
from lipsync.track import read_track, track_file, track_frames
from lipsync.references import RULES as REFERENCE_RULES
from lipsync.tracking import BoxTracker, MeshTracker, parse_bbox
from lipsync.video import SAMPLE_RATE, iter_frames, read_image, resample_indices, video_info, write_video

DEMO = {"video": "assets/demo.mp4", "audio": "assets/demo.wav", "ckpt": "assets/demo.pt", "out": "results/demo.mp4"}
MIN_AUDIO_SECONDS = 0.5


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help=f"talking-head video (default {DEMO['video']})")
    src.add_argument("--image", help="still image (jpg/png, RGBA or grey too); becomes a video at --fps")
    p.add_argument("--audio", help=f"speech: wav/mp3/flac/... or a video with sound (default {DEMO['audio']})")
    p.add_argument("--out", help="output .mp4 (default results/<video>_<audio>.mp4)")
    p.add_argument("--ckpt", help=f"our checkpoint from train.py (default {DEMO['ckpt']})")
    p.add_argument("--unet", help="official MuseTalk UNet (unet.pth / pytorch_model.bin or its folder)")
    p.add_argument("--vae", help="sd-vae-ft-mse folder or file")
    p.add_argument("--whisper", help="whisper encoder: a Hugging Face or CTranslate2 folder, or OpenAI tiny.pt "
                   "(with --unet/--vae: MuseTalk's multilingual whisper-tiny; or for a checkpoint trained on whisper)")
    p.add_argument("--bbox-shift", type=float, default=0.0, help="move the crop's midline from the nose point, "
                   "in source pixels (+ = down: the mouth opens more, - = up: more appearance detail)")
    p.add_argument("--bbox", help="fixed face box x1,y1,x2,y2 (brows to chin, jaw side to side) for every frame "
                   "instead of mediapipe tracking")
    p.add_argument("--version", choices=["v15", "v1"], help="MuseTalk-geometry models (the published weights): "
                   "the crop reaches 10 px (v15, the default) or 0 px (v1) below the lowest landmark, as MuseTalk's "
                   "own --version flag does. MuseTalk's v15 script also fixes bbox_shift at 0; here --bbox-shift "
                   "still applies (default 0)")
    p.add_argument("--smooth", type=float, help="smooth the crop boxes over time, Gaussian sigma in frames "
                   "(default 2 for our square crops, 0 = off for MuseTalk geometry, so boxes are MuseTalk's "
                   "frame for frame)")
    p.add_argument("--reference", default="auto", choices=("auto",) + REFERENCE_RULES,
                   help="which frame shows the UNet the person's face beside each masked frame: self (the frame "
                   "itself, MuseTalk's inference: its original mouth is in view and tends to be copied), closed_pose "
                   "(a closed-mouthed frame of similar pose: the mouth comes from the audio), audio (per frame, a "
                   "frame of similar pose whose mouth is as open as the speech asks for then; needs a checkpoint with "
                   "an opening head) or auto (the rule the checkpoint was trained for; self for the official "
                   "weights). A still image is its own reference")
    p.add_argument("--audio-guidance", type=float, metavar="G", help="how far the mouth follows the speech: each "
                   "frame is also generated with silence and the speech's change from that silent face is scaled by "
                   "G around the lips (1 = none, MuseTalk's one pass; above 1 a wider-moving mouth for two UNet "
                   "passes a frame). "
                   "Default: the checkpoint's (1 for the official weights; with the audio rule on a face whose mouth "
                   "never opens, such as a photo, its opening head's)")
    p.add_argument("--no-source-detail", action="store_true", help="paste the generated face alone, soft at the "
                   "crop's resolution (MuseTalk's paste); by default the source's own detail finer than the crop "
                   "(skin texture, the jaw line) is kept everywhere but around the mouth")
    p.add_argument("--no-restorer", action="store_true", help="paste the mouth as generated, without the "
                   "checkpoint's mouth restorer (a learned 2x upscale, used on faces pasted over 1.25x the crop size; "
                   "checkpoints without one ignore this)")
    p.add_argument("--no-texture", action="store_true", help="paste the mouth without the fine texture borrowed "
                   "from the video's own frames (lipsync.texture: lip lines, teeth edges and skin grain from frames "
                   "whose mouth looks like the generated one; used on faces pasted over 1.25x the crop size)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per UNet + decoder call (and per VAE encode "
                   "when preparing)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--fps", type=float, help="frame rate for --image (default 25); with a video, resample to it")
    p.add_argument("--crf", type=int, default=15, help="x264 quality (lower = better, bigger file)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (CUDA graphs on "
                   "GPU) with fixed-size batches; pays off on long audio on a GPU, costs minutes of compiling on CPU")
    p.add_argument("--prepare-avatar", metavar="VIDEO", help="prepare (and save to --avatar) a reusable avatar")
    p.add_argument("--avatar", metavar="DIR", help="prepared avatar folder: with --audio, generate from it")
    return p.parse_args(argv)


def run(args, stage=lambda name: None):
    """One job of parsed options; stage(name) is called as "loading the model", "tracking faces", "generating" and
    "encoding" begin (lipsync.app shows them)."""
    inputs = resolve_inputs(args)
    device, dtype = inputs.device, pick_dtype(args.dtype, inputs.device)
    wave = seconds = None
    if inputs.audio:
        wave, seconds = read_audio(inputs.audio)
    fps = None
    if inputs.media:
        fps = inputs.fps or (25.0 if inputs.is_image else video_info(inputs.media).fps)
        if fps <= 0:
            raise InputError(f"{inputs.media} has no video stream")
        if seconds is not None and math.floor(seconds * fps) < 2:
            raise InputError(f"{inputs.audio} lasts under two frames at {fps:g} fps")
    stage("loading the model")
    model = load_model(args, inputs, device, dtype)
    if args.version and model.geometry != "musetalk":
        raise InputError(f"--version picks MuseTalk's crop margin; {inputs.ckpt} was trained on {model.geometry} "
                         f"crops")
    start = time.perf_counter()
    if args.prepare_avatar:
        stage("tracking faces")
        avatar = build_avatar(args, inputs, model)
        save_avatar(avatar, args.avatar)
        print(f"avatar: {len(avatar)} frames -> {args.avatar}")
    elif args.avatar:
        avatar = load_avatar(args.avatar, model)
        if args.reference not in ("auto", avatar.reference):
            raise InputError(f"{args.avatar} was prepared with --reference {avatar.reference}; prepare it again "
                             f"with --reference {args.reference}")
    else:
        stage("tracking faces")
        avatar = build_avatar(args, inputs, model, limit=math.floor(seconds * fps))
    if not inputs.audio:
        return
    n = math.floor(seconds * avatar.fps)
    windows = model.audio_windows(wave, n, avatar.fps)
    openings = model.openings(wave, n, avatar.fps) if avatar.reference == "audio" else None  # the audio rule's
    stage("generating")
    frames = tqdm(avatar_frames(model, avatar, windows, args.batch_size, static=args.compile,
                                detail=not args.no_source_detail, openings=openings, texture=not args.no_texture),
                  total=n, desc="lip-sync", unit="frame", disable=None, leave=False)
    write_video(inputs.out, _then(frames, lambda: stage("encoding")), avatar.fps, audio=inputs.audio, crf=args.crf)
    took = time.perf_counter() - start
    print(f"wrote {inputs.out}: {n} frames at {avatar.fps:g} fps ({seconds:.2f} s) in {took:.1f} s")


# ----------------------------------------------------------------------------- what run() calls


class InputError(ValueError):
    """A bad input or option: reported as one line, exit code 1."""


@dataclass
class Inputs:
    """What infer.py reads and writes, every default filled in and checked by `resolve_inputs`."""
    media: str | None  # the video or image to read; None when generating from a saved --avatar
    is_image: bool
    audio: str | None  # the speech; None when only preparing an avatar
    out: str | None  # the mp4 to write; None when only preparing an avatar
    ckpt: str | None  # our checkpoint; None with --unet/--vae/--whisper
    bbox: tuple | None  # the fixed face box of --bbox
    fps: float | None  # --fps, checked
    device: torch.device  # --device, checked: one that exists here


def resolve_inputs(args) -> Inputs:
    """Fill in defaults and check that every input exists and the output can be written (cheap checks first)."""
    media = args.prepare_avatar or args.video or args.image
    generating = not args.prepare_avatar or args.audio is not None
    if args.prepare_avatar and not args.avatar:
        raise InputError("--prepare-avatar needs --avatar DIR (where to save it)")
    if args.avatar and not args.prepare_avatar and (args.video or args.image):
        raise InputError("--avatar DIR already holds the video: drop --video/--image (or re-prepare with "
                         "--prepare-avatar)")
    demo = not (media or args.avatar)
    if demo:
        media = DEMO["video"]
    is_image = bool(args.image) or (args.prepare_avatar is not None
                                    and Path(args.prepare_avatar).suffix.lower() in IMAGE_SUFFIXES)
    published = [args.unet, args.vae]
    if any(published) and not (all(published) and args.whisper):
        raise InputError("official weights need all three: --unet, --vae and --whisper")
    if any(published) and args.ckpt:
        raise InputError("use either --ckpt or --unet/--vae/--whisper")
    for flag, path in (("--unet", args.unet), ("--vae", args.vae), ("--whisper", args.whisper)):
        if path and not Path(path).exists():
            raise InputError(f"{flag} {path} not found")
    ckpt = None
    if not any(published):
        ckpt = args.ckpt or DEMO["ckpt"]
        _need_file(ckpt, "checkpoint", default=ckpt == DEMO["ckpt"])
    audio = None
    if generating:
        audio = args.audio or DEMO["audio"]
        _need_file(audio, "audio file", default=audio == DEMO["audio"])
    if media:
        _need_file(media, "image" if is_image else "video", default=media == DEMO["video"])
        suffix = Path(media).suffix.lower()
        if args.image and suffix in VIDEO_SUFFIXES:
            raise InputError(f"--image {args.image} is a video; pass it as --video")
        if args.video and suffix in IMAGE_SUFFIXES:
            raise InputError(f"--video {args.video} is an image; pass it as --image (with --fps)")
    if args.avatar and not args.prepare_avatar and not (Path(args.avatar) / "avatar_info.json").is_file():
        raise InputError(f"{args.avatar} is not a prepared avatar (make it with --prepare-avatar VIDEO --avatar DIR)")
    bbox = parse_bbox(args.bbox) if args.bbox else None
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.audio_guidance is not None:
        check_guidance(args.audio_guidance, InputError)
    if args.smooth is not None and not args.smooth >= 0:
        raise InputError("--smooth must be >= 0 (0 = no smoothing)")
    fps = checks.positive(args.fps, "--fps") if args.fps is not None else None
    if not math.isfinite(args.bbox_shift):
        raise InputError(f"--bbox-shift must be a number of pixels, not {args.bbox_shift}")
    if not 0 <= args.crf <= 51:
        raise InputError(f"--crf must be 0 (lossless) to 51, not {args.crf}")
    device = checks.pick_device(args.device)
    read = {"video" if not is_image else "image": media, "audio": audio, "checkpoint": ckpt, "UNet": args.unet,
            "VAE": args.vae, "whisper model": args.whisper, "avatar": None if args.prepare_avatar else args.avatar}
    out = None
    if generating:
        out = args.out
        if out is None:
            name = Path(args.avatar).name if args.avatar else Path(media).stem
            out = DEMO["out"] if demo and audio == DEMO["audio"] else f"results/{name}_{Path(audio).stem}.mp4"
        if Path(out).suffix.lower() != ".mp4":
            raise InputError(f"--out must end in .mp4: {out}")
        checks.refuse_overwrite(out, read)
        _check_writable(Path(out).parent)
    if args.prepare_avatar:
        checks.refuse_overwrite(args.avatar, read, "--avatar")
        checks.refuse_overwrite(os.path.abspath(args.avatar) + ".partial", read, "--avatar")  # save_avatar's temp
        check_avatar_folder(args.avatar)
        _check_writable(Path(args.avatar).parent)
    return Inputs(media, is_image, audio, out, ckpt, bbox, fps, device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    name = dtype if dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def read_audio(path):
    wave = load_audio(path)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < MIN_AUDIO_SECONDS:
        raise InputError(f"{path} is {seconds:.2f} s long; need at least {MIN_AUDIO_SECONDS} s of audio")
    return wave, seconds


def load_model(args, inputs: Inputs, device, dtype):
    if args.unet:
        model = from_published(args.unet, args.vae, args.whisper, device, dtype)
    else:
        model = load_lipsync(inputs.ckpt, device, dtype, whisper=args.whisper)
    model = model.to(device)  # the weights are there already; this also moves the PE buffer
    if args.audio_guidance is not None:
        model.set_guidance(args.audio_guidance)
    if args.no_restorer:
        model.restorer = None
    if args.reference == "audio":  # before tracking faces: the rule cannot run without the head
        model.require_opening()
    if args.compile:
        compile_for_inference(model)
    return model


def build_avatar(args, inputs: Inputs, model, limit=None):
    frames, fps, idx, n_read, complete = read_media(args, inputs, limit)
    track = face_track(args, inputs, frames, idx, n_read, complete, model.geometry)
    rule = None if args.reference == "auto" else args.reference  # None: the model's own rule
    with tqdm(total=int(track.face.sum()), desc="prepare", unit="frame", disable=None, leave=False) as bar:
        return prepare_avatar(frames, fps, track, model, args.batch_size, source=inputs.media, bar=bar,
                              reference=rule, texture=not args.no_texture)


def _then(iterable, call):
    """Yield the items, then call() once the last one is taken (x264 then flushes and the audio is muxed)."""
    yield from iterable
    call()


# ----------------------------------------------------------------------------- helpers


def _need_file(path, what, default=False):
    if Path(path).is_dir():
        raise InputError(f"{what} is a folder, not a file: {path}")
    if not Path(path).is_file():
        hint = " (the bundled demo file; pass your own inputs or see the README)" if default else ""
        raise InputError(f"{what} not found: {path}{hint}")


def _check_writable(folder):
    checks.creatable(folder)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"cannot write to {folder}/: {err.strerror or err}") from None


def read_media(args, inputs: Inputs, limit=None):
    """(frames (N, H, W, 3) uint8, fps, source indices into the file's frames, frames read, read to the end)."""
    if inputs.is_image:
        try:
            image = read_image(inputs.media)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {inputs.media} as an image: {err}") from None
        return image[None], inputs.fps or 25.0, np.zeros(1, np.int64), 1, True
    info = video_info(inputs.media)
    if info.fps <= 0:
        raise InputError(f"{inputs.media} has no video stream")
    fps = inputs.fps or info.fps
    need = None if limit is None else math.floor((limit - 1) * info.fps / fps + 0.5) + 2
    src = list(itertools.islice(iter_frames(inputs.media), need))
    if len(src) < 2:
        raise InputError(f"{inputs.media} has {len(src)} frame(s); pass a still picture as --image (with --fps)")
    idx = resample_indices(len(src), info.fps, fps) if inputs.fps else np.arange(len(src))
    idx = idx[:limit]
    return np.stack(src)[idx], fps, idx, len(src), need is None or len(src) < need


def box_options(args, geometry):
    """Keyword arguments of lipsync.track.track_frames / read_track for the model's crop geometry and the flags."""
    margin = {"v15": 10, "v1": 0}[args.version] if args.version else None  # MuseTalk's extra_margin
    return track_box_options(geometry, args.smooth, margin)


def face_track(args, inputs: Inputs, frames, idx, n_read, complete, geometry="square"):
    """--bbox, else a track file beside the input, else mediapipe."""
    opts = box_options(args, geometry)
    if inputs.bbox:
        return track_frames(frames, BoxTracker(inputs.bbox), args.bbox_shift, **opts)
    path = track_file(inputs.media)
    if path is not None:
        track = read_track(path, args.bbox_shift, height=frames.shape[1], **opts)
        if len(track) < n_read or (complete and len(track) != n_read):
            raise InputError(f"{path} has {len(track)} frames but {inputs.media} has {n_read}"
                             f"{'' if complete else ' or more'}")
        return track.select(idx)
    with native_stderr_silenced() as stderr:
        tracker = MeshTracker()
        with tqdm(total=len(frames), desc="track faces", unit="frame", disable=None, leave=False, file=stderr) as bar:
            return track_frames(frames, tracker, args.bbox_shift, bar=bar, **opts)


@contextmanager
def native_stderr_silenced():
    """Point fd 2 at /dev/null (mediapipe's C++ start-up logs) and yield a stream to the real stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    stream = os.fdopen(os.dup(saved), "w")
    try:
        yield stream
    finally:
        stream.close()
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------- errors and main


ERRORS = (OSError, ValueError, RuntimeError, ImportError)  # reported as one line; ImportError: mediapipe's install hint


def error_line(err) -> str:
    """The one line that reports an error in ERRORS (stderr here, the page in lipsync.app)."""
    return f"error: {' '.join(str(err).split())[:600]}"


def main(argv=None):
    try:
        run(parse_args(argv))
    except ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
