"""Is a talking clip's sound in step with its picture? A model-free estimate of a recording's audio-video offset.

    python -m lipsync.tools.avsync talk.mp4 [more.mp4 ...] [--max-lag 6] [--json sync.json] [--resync DIR]

Training clips and evaluation clips are only as good as their sync: a clip whose sound runs 100 ms ahead of its
mouth teaches (or grades) a mouth that moves 100 ms late. Per frame f: the inner-lip gap over face height from
mediapipe's mesh (`metrics.lip_opening_468`, as the evaluation tools measure it) and the speech's loudness in dB
(40 ms RMS at the frame's time, `audio.frame_envelope`). `delay_curve` gives, for each k in -max_lag..max_lag,

    r(k) = Pearson r(opening[f], loudness[f - k])      over the frames where both exist

so k > 0 means the mouth moves k frames AFTER the sound that goes with it: the audio is early, and delaying it by
k frames re-syncs the clip (`python -m lipsync.training.prepare --audio-delay`, in ms). Lips lead their sound a
little in real speech: in-sync GRID clips peak at k = 0 or -1. `verdict` calls a clip out of sync only where the
peak is clear: at least MIN_PEAK itself, MIN_GAIN above r(0), PROMINENCE above the curve's median (a flat curve's
noise wins by a little somewhere), and not at the edge of the lags (a curve still rising there has no peak in view). Loudness and opening are loosely related (a closed-mouth /m/ is loud), so
short or quiet clips give flat curves: "unclear" is then the honest answer. --resync DIR writes each clip found
out of sync to DIR/<name>.mp4 with its picture copied as it is and its sound delayed by the estimate (a clip to
evaluate with, `python -m lipsync.tools.eval`; for training clips prepare's --audio-delay does the same).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np

from .. import checks
from ..audio import frame_envelope
from .metrics import lagged_r

MAX_LAG = 6  # frames either way
MIN_GAIN = 0.1  # r(peak) - r(0) for a clear offset
MIN_PEAK = 0.2  # r(peak) for a clear offset
PROMINENCE = 0.15  # r(peak) - median r over the lags, for a clear offset
IN_SYNC = (-1, 0)  # peaks that are ordinary speech: the lips lead their sound by up to a frame


def loudness_db(wave, n_frames: int, fps: float) -> np.ndarray:
    """16 kHz speech (S,) -> (n_frames,) RMS in dB at each frame's time, floored 80 dB under its loudest frame."""
    env = frame_envelope(np.asarray(wave, np.float32), n_frames, fps).astype(np.float64)
    return 20 * np.log10(np.maximum(env, 1e-4 * max(float(env.max()), 1e-12)))


def delay_curve(opening, loudness, max_lag: int = MAX_LAG) -> dict:
    """opening, loudness (N,) (NaN = unmeasured) -> {k: r(opening[f], loudness[f - k])} for k in -max_lag..max_lag."""
    return {k: lagged_r(opening, loudness, -k) for k in range(-max_lag, max_lag + 1)}


def verdict(curve: dict, fps: float) -> dict:
    """A delay curve -> its peak k, delay_ms (k / fps in ms: how much later the audio should play), r at the peak and
    at 0, and status: "in sync" (a peak of at least MIN_PEAK at IN_SYNC), "out of sync" (a clear peak elsewhere) or
    "unclear" (a weak or flat curve: mouth and loudness too loosely tied to tell)."""
    finite = {k: r for k, r in curve.items() if math.isfinite(r)}
    if not finite:
        return {"status": "unclear", "delay_frames": 0, "delay_ms": 0.0, "r_peak": math.nan, "r_zero": math.nan}
    k = max(finite, key=finite.get)
    r0 = curve.get(0, math.nan)
    edge = abs(k) == max(abs(j) for j in curve)
    clear = (not edge and finite[k] - np.median(list(finite.values())) >= PROMINENCE
             and (not math.isfinite(r0) or finite[k] - r0 >= MIN_GAIN))
    if finite[k] < MIN_PEAK:
        status = "unclear"
    elif k in IN_SYNC:
        status = "in sync"
    else:
        status = "out of sync" if clear else "unclear"
    return {"status": status, "delay_frames": int(k), "delay_ms": 1000.0 * k / fps, "r_peak": float(finite[k]),
            "r_zero": float(r0)}


def clip_sync(opening, wave, fps: float, max_lag: int = MAX_LAG) -> tuple[dict, dict]:
    """A clip's own openings (N,) and 16 kHz speech (S,) -> (its delay curve, the curve's verdict)."""
    curve = delay_curve(opening, loudness_db(np.asarray(wave), len(opening), fps), max_lag)
    return curve, verdict(curve, fps)


def measure(path, max_lag: int = MAX_LAG, resync_dir=None) -> dict:
    """A talking clip with its own audio -> verdict's fields, fps, frames and the curve; with resync_dir, a clip out
    of sync is also written there re-synced ("resynced": its path)."""
    from ..audio import load_audio
    from ..video import read_video, video_info
    from .metrics import lip_opening_468
    from .reenact import mesh_points
    if not video_info(path).has_audio:
        raise ValueError(f"{path} has no audio track: nothing to sync")
    frames, fps = read_video(path)
    opening = lip_opening_468(mesh_points(frames))
    if np.isfinite(opening).sum() < 3:
        raise ValueError(f"{path}: a face was found in {int(np.isfinite(opening).sum())} frames: nothing to measure")
    wave = load_audio(path)
    curve, found = clip_sync(opening, wave.numpy(), fps, max_lag)
    res = {"video": str(path), "fps": fps, "frames": len(frames), **found,
           "curve": {int(k): None if not math.isfinite(r) else round(float(r), 4) for k, r in curve.items()}}
    if resync_dir is not None and res["status"] == "out of sync":
        from ..audio import delay
        from ..video import replace_audio
        res["resynced"] = str(Path(resync_dir) / f"{Path(path).stem}.mp4")
        replace_audio(path, delay(wave, res["delay_ms"] / 1000), res["resynced"], len(frames) / fps)
    return res


def describe(res: dict) -> str:
    k, ms = res["delay_frames"], res["delay_ms"]
    head = f"{res['video']}: {res['status']}"
    if res["status"] == "unclear":
        return f"{head} (no clear peak; best r {res['r_peak']:+.2f} at {k:+d} frames, {res['r_zero']:+.2f} at 0)"
    where = "with" if k == 0 else f"{abs(k)} frame(s) ({abs(ms):.0f} ms) {'after' if k > 0 else 'before'}"
    line = f"{head}: the mouth moves {where} its sound (r {res['r_peak']:+.2f}, {res['r_zero']:+.2f} at 0)"
    if "resynced" in res:
        line += f"; re-synced -> {res['resynced']}"
    elif res["status"] == "out of sync":
        line += f"; re-sync it with --resync DIR (or prepare --audio-delay {ms:.0f})"
    return line


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lipsync.tools.avsync", description=__doc__.split("\n\n")[0])
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="talking clips with their own speech")
    p.add_argument("--max-lag", type=int, default=MAX_LAG, help="frames either way to look for the peak")
    p.add_argument("--json", help="write every clip's measurements (with its curve) here")
    p.add_argument("--resync", metavar="DIR", help="write each clip found out of sync here, its sound delayed by the "
                   "estimate and its picture copied as it is")
    args = p.parse_args(argv)
    if args.max_lag < 2:
        p.error("--max-lag must be at least 2 frames (a peak needs room either side of the ordinary lead)")
    out = []
    for video in args.videos:
        if args.resync and checks.same_file(Path(args.resync), Path(video).parent):
            raise SystemExit(f"avsync: --resync {args.resync} is the folder of {video}; it would be replaced")
        try:
            out.append(measure(video, args.max_lag, args.resync))
        except (OSError, ValueError, RuntimeError, ImportError) as err:
            raise SystemExit(f"avsync: {err}") from None
        print(describe(out[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
