"""Does a dubbed video's mouth follow its speech? Measured from the finished mp4 alone, with no model.

    python -m lipsync.tools.dubcheck results/demo.mp4                      # the audio muxed into the video
    python -m lipsync.tools.dubcheck dubbed.mp4 --audio speech.wav --json check.json

Per frame, mediapipe's face mesh (the optional tracker, lipsync.tracking) gives the inner-lip gap over the eye
distance (`metrics.lip_opening_68`); the speech gives the RMS envelope in a 40 ms window at the frame's time
(`synthetic.frame_envelope`). Reported: the Pearson r between opening and envelope, and between opening and the
envelope in dB (speech loudness is closer to logarithmic), and the mean opening on silent stretches (frame RMS more
than 30 dB below the clip's 95th percentile for >= 3 frames, `metrics.silence_masks`) vs. speech. A mouth that
follows the audio has r clearly above 0 and is more closed in silence than in speech; a still or random mouth has
r near 0. Lips move a frame or two before the sound they make; `--max-lag` also reports the best r over small lags.
"""

import argparse
import json

import numpy as np
from tqdm import tqdm

from lipsync.audio import load_audio
from lipsync.tools.metrics import lagged_r, lip_opening_68, pearson, silence_masks
from lipsync.tools.synthetic import frame_envelope
from lipsync.tracking import MediapipeMissing, MeshTracker, track_landmarks
from lipsync.video import read_video


def check(frames: np.ndarray, fps: float, wave: np.ndarray, max_lag: int = 2, silence_db: float = -30.0,
          progress=None) -> dict:
    """frames (N, H, W, 3) uint8 and 16 kHz mono speech -> the measurements in the module doc (floats, lists)."""
    tracker = MeshTracker()
    try:
        landmarks, face = track_landmarks(frames, tracker, progress)
    finally:
        tracker.close()
    if face.sum() < 3:
        raise ValueError(f"a face was found in {int(face.sum())} of {len(frames)} frames: nothing to measure")
    n = len(frames)
    opening = np.full(n, np.nan, np.float32)
    opening[face] = lip_opening_68(landmarks[face])
    envelope = frame_envelope(wave, n, fps)
    silent, speech, _ = silence_masks(wave, n, fps, silence_db)
    db = 20 * np.log10(np.maximum(envelope, 1e-4 * max(float(envelope.max()), 1e-12)))
    # frames without a face take the clip's median opening so lags keep their meaning; they are few or the r is moot
    filled = np.where(face, opening, np.nanmedian(opening))
    lags = {lag: lagged_r(filled, envelope, lag) for lag in range(-max_lag, max_lag + 1)}
    best = max(lags, key=lags.get)

    def mean(mask):
        return float(np.nanmean(opening[mask & face])) if (mask & face).any() else float("nan")

    return {"frames": n, "fps": fps, "face_frames": int(face.sum()),
            "r_envelope": pearson(filled, envelope), "r_envelope_db": pearson(filled, db),
            "best_lag": best, "r_best_lag": lags[best],
            "silent_frames": int(silent.sum()), "speech_frames": int(speech.sum()),
            "opening_silent": mean(silent), "opening_speech": mean(speech),
            "opening": [None if np.isnan(o) else round(float(o), 5) for o in opening]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lipsync.tools.dubcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("video", help="a dubbed video (e.g. infer.py's output)")
    p.add_argument("--audio", help="the speech (default: the video's own audio stream)")
    p.add_argument("--max-lag", type=int, default=2, help="also report the best r over lags up to this many frames")
    p.add_argument("--silence-db", type=float, default=-30.0, help="silent: frame RMS this far below the clip's p95")
    p.add_argument("--json", help="write the measurements (with the per-frame opening) here")
    args = p.parse_args(argv)
    try:
        frames, fps = read_video(args.video)
        wave = load_audio(args.audio or args.video)
        with tqdm(total=len(frames), desc="tracking", unit="frame") as bar:
            res = check(frames, fps, wave.numpy(), args.max_lag, args.silence_db, bar)
    except (OSError, ValueError, RuntimeError, MediapipeMissing) as e:
        raise SystemExit(f"dubcheck: {e}") from None
    print(f"{args.video}: {res['frames']} frames at {res['fps']:g} fps, face in {res['face_frames']}")
    print(f"  r(mouth opening, speech envelope)     {res['r_envelope']:+.3f}")
    print(f"  r(mouth opening, envelope in dB)      {res['r_envelope_db']:+.3f}")
    print(f"  best lag {res['best_lag']:+d} frames (+ = mouth first) r {res['r_best_lag']:+.3f}")
    print(f"  mean opening: silence {res['opening_silent']:.4f} ({res['silent_frames']} frames), "
          f"speech {res['opening_speech']:.4f} ({res['speech_frames']} frames)  [inner-lip gap / eye distance]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"video": args.video, "audio": args.audio or "(muxed)", **res}, f, indent=1)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
