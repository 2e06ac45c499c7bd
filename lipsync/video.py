"""Video, image and audio-track I/O with the ffmpeg binary shipped by imageio-ffmpeg (no system ffmpeg needed).

Frames are uint8 (H, W, 3) RGB numpy arrays. fps is always read from the container: the stream's average rate
(ffmpeg's "fps", else "tbr"), and decoding is forced to that constant rate, so N frames span exactly N / fps seconds
even for variable-frame-rate phone videos. Writing pipes raw rgb24 frames into libx264 (yuv420p, which needs even
sizes: an odd width or height is padded by one replicated edge pixel), muxes audio as AAC padded/trimmed to N / fps,
and writes to a hidden temp file in the target folder that is os.replace'd only when ffmpeg finished cleanly.
"""

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import soundfile as sf
import torch

from .audio import SAMPLE_RATE  # a wave given to write_video is at this rate (lipsync.audio.load_audio's)


def ffmpeg_exe():
    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass
class VideoInfo:
    fps: float  # 0.0 when the file has no video stream
    size: tuple  # (H, W) of the decoded (auto-rotated) frames; (0, 0) without video
    duration: float  # container duration in seconds (0.0 when unknown)
    has_audio: bool


def video_info(path):
    """Probe a media file by parsing the header that `ffmpeg -i` prints (there is no ffprobe in imageio-ffmpeg)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    text = proc.stderr
    streams = [line for line in text.splitlines() if line.lstrip().startswith("Stream #")]
    video = [line for line in streams if " Video: " in line and "attached pic" not in line]
    if not streams:
        raise ValueError(f"{path}: ffmpeg cannot read this file ({text.strip().splitlines()[-1]})")
    fps, size = 0.0, (0, 0)
    if video:
        rate = re.search(r" ([0-9.]+)(k?) fps", video[0]) or re.search(r" ([0-9.]+)(k?) tbr", video[0])
        if rate:
            fps = float(rate.group(1)) * (1000 if rate.group(2) else 1)
        w, h = map(int, re.search(r" (\d{2,5})x(\d{2,5})[ ,\[]", video[0]).groups())
        rotation = re.search(r"rotation of (-?[0-9.]+) degrees", text)
        if rotation and round(float(rotation.group(1))) % 180 != 0:
            w, h = h, w
        size = (h, w)
    dur = re.search(r"Duration: (\d+):(\d+):([0-9.]+)", text)
    duration = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else 0.0
    return VideoInfo(fps=fps, size=size, duration=duration, has_audio=any(" Audio: " in s for s in streams))


def _rate(fps):
    return str(Fraction(fps).limit_denominator(1001))


# ----------------------------------------------------------------------------- frames in


def iter_frames(path):
    """Yield the frames of a video one at a time (uint8 (H, W, 3) RGB, writeable), at the container fps."""
    info = video_info(path)
    if info.fps <= 0:
        raise ValueError(f"{path}: no video stream with a frame rate")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=["-r", _rate(info.fps)])
    meta = next(reader)
    w, h = meta["size"]
    try:
        for buf in reader:
            yield np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy()
    finally:
        reader.close()


def read_video(path):
    """Whole video in memory: (frames uint8 (N, H, W, 3) RGB, fps float from the container)."""
    frames = list(iter_frames(path))
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(frames), video_info(path).fps


def read_image(path, background="black"):
    """jpg/png/... -> uint8 (H, W, 3) RGB. Alpha is composited over black or white; grey becomes RGB."""
    img = np.asarray(iio.imread(path))
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] in (2, 4):  # grey+alpha or RGBA
        alpha = img[:, :, -1:].astype(np.float32) / 255.0
        bg = {"black": 0.0, "white": 255.0}[background]
        img = (img[:, :, :-1].astype(np.float32) * alpha + bg * (1.0 - alpha)).round().astype(np.uint8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img.astype(np.uint8))


def resample_indices(n_frames, src_fps, dst_fps):
    """Source index for each output frame at dst_fps: the frame nearest in time (output j at t = j / dst_fps).

    The output keeps the duration: round(n_frames * dst_fps / src_fps) frames (at least 1).
    """
    n_out = max(1, int(np.floor(n_frames * dst_fps / src_fps + 0.5)))
    idx = np.floor(np.arange(n_out) * (src_fps / dst_fps) + 0.5).astype(np.int64)
    return np.minimum(idx, n_frames - 1)


def select_frames(frames, indices):
    """Streaming frames[indices] for non-decreasing indices (e.g. from resample_indices): repeats and skips frames
    of an iterable without holding the video in memory."""
    indices = np.asarray(indices)
    j = n = 0
    for n, frame in enumerate(frames, 1):
        while j < len(indices) and indices[j] == n - 1:
            yield frame
            j += 1
        if j == len(indices):
            return
    if j < len(indices):
        raise ValueError(f"select_frames: index {indices[j]} requested but only {n} frames available")


def resample_frames(frames, src_fps, dst_fps):
    """(N, H, W, 3) at src_fps -> (M, H, W, 3) at dst_fps by nearest-in-time frame index mapping."""
    return frames[resample_indices(len(frames), src_fps, dst_fps)]


# ----------------------------------------------------------------------------- audio track


def fit_length(wave, n_samples):
    """Zero-pad or trim a 1-D wave to exactly n_samples."""
    wave = torch.as_tensor(wave, dtype=torch.float32).flatten()
    if len(wave) >= n_samples:
        return wave[:n_samples].clone()
    return torch.cat([wave, wave.new_zeros(n_samples - len(wave))])


# ----------------------------------------------------------------------------- frames out


def _even(frame):
    """libx264 yuv420p needs even dimensions: replicate the last row/column once when odd."""
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame


def write_video(path, frames, fps, audio=None, crf=18, preset="medium"):
    """Encode frames (iterable of uint8 (H, W, 3) RGB) to an h264/yuv420p mp4 at fps; returns the frame count N.

    audio: None, a path ffmpeg can read, or a 1-D 16 kHz wave (numpy/torch); it is muxed as AAC and padded with
    silence or trimmed to N / fps seconds. Odd sizes come out one pixel larger (edge-replicated row/column).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{path.stem}.tmp{os.getpid()}"
    video_tmp = path.with_name(f"{stem}.video{path.suffix}")
    tmp = path.with_name(f"{stem}{path.suffix}")
    wav_tmp = path.with_name(f"{stem}.wav")
    try:
        n = _encode(video_tmp, frames, fps, crf, preset)
        if audio is None:
            os.replace(video_tmp, path)
            return n
        if not isinstance(audio, (str, os.PathLike)):
            sf.write(wav_tmp, torch.as_tensor(audio, dtype=torch.float32).flatten().numpy(), SAMPLE_RATE,
                     subtype="FLOAT")
            audio = wav_tmp
        _mux(video_tmp, audio, n / fps, tmp)
        os.replace(tmp, path)
        return n
    finally:
        for p in (video_tmp, tmp, wav_tmp):
            p.unlink(missing_ok=True)


def _mux(video, audio, seconds, out):
    """The picture of `video` copied as it is, beside `audio` (a path ffmpeg reads) as AAC, padded with silence or
    trimmed to `seconds`, into the mp4 `out`."""
    duration = f"{seconds:.6f}"
    _run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(video), "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0",
          "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-af", f"apad=whole_dur={duration}", "-t", duration,
          "-movflags", "+faststart", str(out)], out)


def replace_audio(video, wave, out, seconds):
    """A copy of the mp4 `video` at `out` with its picture untouched (stream copy) and `wave` (16 kHz mono, (S,)) as
    its sound, padded with silence or trimmed to `seconds` (the picture's length: frames / fps)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, wav_tmp = (out.with_name(f".{out.stem}.tmp{os.getpid()}{suffix}") for suffix in (out.suffix, ".wav"))
    try:
        sf.write(wav_tmp, torch.as_tensor(wave, dtype=torch.float32).flatten().numpy(), SAMPLE_RATE, subtype="FLOAT")
        _mux(video, wav_tmp, seconds, tmp)
        os.replace(tmp, out)
    finally:
        for p in (tmp, wav_tmp):
            p.unlink(missing_ok=True)


def _run(cmd, path):
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-1000:]}")


def _encode(path, frames, fps, crf, preset):
    """Pipe raw rgb24 frames into libx264; every frame in is one frame out (constant rate, no drops)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("write_video: no frames")
    h, w = first.shape[:2]
    hp, wp = _even(first).shape[:2]
    cmd = [ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{wp}x{hp}",
           "-framerate", _rate(fps), "-i", "-", "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
           "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)]
    n = 0
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=log)
        try:
            for frame in itertools.chain([first], frames):
                frame = np.asarray(frame)
                if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
                    raise ValueError(f"frame {n}: expected uint8 {(h, w, 3)}, got {frame.dtype} {frame.shape}")
                proc.stdin.write(np.ascontiguousarray(_even(frame)).tobytes())
                n += 1
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg exited early; its log says why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.wait() != 0:
            log.seek(0)
            raise RuntimeError(f"ffmpeg failed writing {path}: {log.read().decode(errors='replace')[-1000:]}")
    return n
