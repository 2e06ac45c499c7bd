"""Cross-dubbing of real talking clips: each clip dubbed with the NEXT clip's speech, its mouth compared with the mouth
of the person who really said that speech.

    python -m lipsync.tools.eval --ckpt assets/demo.pt --crossdub a.mp4 b.mp4 c.mp4 --out results/crossdub

Pairs form a cycle (`cycle_pairs`): a's video with b's speech, b's with c's, c's with a's. Clip A (N frames at fps f)
is dubbed with B's audio track trimmed, or padded with silence, to N / f seconds (`fit_speech`), as
`python infer.py --video A --audio that.wav` dubs it: infer.py's tracking, avatar and frame loop and its default
reference rule (the model's, lipsync.references); `reference` takes another rule: a name, or a function of the face
track -> (N,) frame indices.

Mouth opening per frame = inner-lip gap |p13 - p14| / face height |p10 - p152| from mediapipe's 468-point mesh on full
frames (`metrics.lip_opening_468`, as in `--reenact`), three series on A's frame times j / f, each (N,), NaN where
mediapipe finds no face:
  dubbed: the dubbed video; original: A's real frames; speaker: B's real frames, linearly interpolated from B's frame
  times to A's (`resample_series`; clips may be 25, 29.97 or 30 fps), NaN past B's last frame (padded silence).
Measures (`pair_metrics`), each r a Pearson r over the frames where both series are finite:
- r_speaker: r(dubbed, speaker) at lag 0; r_speaker_best and lag_best: the best r(dubbed[f], speaker[f + lag]) over
  lags -2..2 frames (lag > 0: the dubbed mouth moves before the speaker's);
- r_original: r(dubbed, original): how much the dubbed mouth copies the video's own mouth;
- r_chance: r(original, speaker): two unrelated mouths, the chance level of r_speaker;
- movement: std(dubbed) / std(speaker) over the frames where both exist;
- opening_silent, opening_speech: mean dubbed opening in the speech's silences vs. in its speech. The project's
  silence definition (`metrics.silence_masks`, as eval and dubcheck use it) on the fitted audio: frame RMS in 40 ms
  more than --silence-db (default -30) dB below the audio's 95th-percentile frame RMS; silent = such frames in runs of
  at least MIN_SILENCE = 0.3 s; speech = frames at or above the threshold (shorter dips count as neither). Padded
  silence counts as silence. original_silent, original_speech: the same means of the original opening, what copying
  the video's own mouth would score.
- speech_sync: whether the speech clip's own sound is in step with its own mouth (`avsync.verdict` on B's real
  openings and loudness): the speaker's mouth is the answer key, and a recording whose sound runs ahead of its
  picture shifts that key; print_table names such clips.
- detail_lips, detail_rest: sharpness of the dubbed video against its own source video A, frame by frame
  (`metrics.detail_ratios`, as in `--reenact`): per frame, the variance of the Laplacian of the grey image (luma
  0.299 R + 0.587 G + 0.114 B, kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]], valid region) on regions of A's mesh: the
  mouth square (`reenact.mouth_squares`) for the lips; the lower-face rectangle (`reenact.lower_face_rects`, cheek
  234 to 454, nose tip 1 to chin 152) without the mouth square for the rest (the Laplacian of the whole rectangle,
  its variance over the values whose 5-point stencil reads no pixel of the square). Ratio = sum over A's frames with
  a mesh of the dubbed detail / sum of A's (the ratio of the mean details): 1 = as sharp as the source, < 1 blurrier.
With still (`eval --crossdub --still`), each clip's video is replaced by a photo of its person, its first frame held
for its length (`as_still`), as `python infer.py --video photo.png` dubs one: no mouth movement to copy, and under the
audio reference rule no open mouth to show (lipsync.opening's shut_guidance).
Outputs with out_dir: crossdub.json (per pair: the measures and the per-frame series; the means) and one montage PNG
per pair: rows original / dubbed / speaker, 8 evenly spaced frames of A, mouth squares (`reenact.mouth_squares`; the
speaker's from B's frame nearest in time, black past B's end).
"""

import math
from pathlib import Path

import numpy as np
import torch

from ..pipeline import avatar_frames, prepare_avatar
from ..track import box_options, track_frames
from ..tracking import MeshTracker
from ..video import SAMPLE_RATE, fit_length
from .avsync import clip_sync
from .metrics import detail_ratios, lagged_r, lip_opening_468, silence_masks
from .reenact import lower_face_rects, mesh_points, mouth_squares, square_tiles

MAX_LAG = 2  # frames either way for r_speaker_best
MIN_SILENCE = 0.3  # seconds: shortest run of quiet frames that counts as a silence
MONTAGE_FRAMES = 8
MEASURES = ("r_speaker", "r_speaker_best", "lag_best", "r_original", "r_chance", "movement", "opening_silent",
            "opening_speech", "original_silent", "original_speech", "detail_lips", "detail_rest")


# ----------------------------------------------------------------------------- pure measures (numpy in, numbers out)


def cycle_pairs(videos) -> list:
    """[a, b, c] -> [(a, b), (b, c), (c, a)]: (video, the clip whose speech dubs it)."""
    if len(videos) < 2:
        raise ValueError("cross-dubbing needs at least two clips (each is dubbed with the next one's speech)")
    return [(v, videos[(i + 1) % len(videos)]) for i, v in enumerate(videos)]


def fit_speech(wave, n_frames: int, fps: float) -> torch.Tensor:
    """16 kHz speech (S,) -> exactly the length of n_frames at fps, round(n_frames / fps * 16000) samples: trimmed,
    or padded with zeros (silence)."""
    return fit_length(wave, round(n_frames / fps * SAMPLE_RATE))


def resample_series(values, src_fps: float, n_out: int, out_fps: float) -> np.ndarray:
    """A per-frame series (M,) at src_fps -> (n_out,) at out_fps: linear interpolation at times j / out_fps between
    the two nearest source frames; NaN past the last source frame or next to a NaN one."""
    values = np.asarray(values, np.float64)
    pos = np.arange(n_out) * (src_fps / out_fps)  # output frame j in source-frame units
    out = np.interp(pos, np.arange(len(values)), values)
    out[pos > len(values) - 1 + 1e-9] = np.nan
    return out


def silences(wave, n_frames: int, fps: float, silence_db: float = -30.0):
    """The speech's per-frame (silent, speech) bool masks (n_frames,) (module doc)."""
    min_frames = math.ceil(MIN_SILENCE * fps - 1e-9)
    silent, speech, _ = silence_masks(np.asarray(wave, np.float32), n_frames, fps, silence_db, min_frames)
    return silent, speech


def _both(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def _mean(x, mask):
    x = x[mask & np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def pair_metrics(dubbed, original, speaker, silent, speech, max_lag: int = MAX_LAG) -> dict:
    """Openings dubbed, original, speaker (N,) on the dubbed video's frame times (NaN = unmeasured) and the speech's
    silent / speech masks (N,) -> the measures of the module doc (floats; lag_best an int)."""
    dubbed, original, speaker = (np.asarray(v, np.float64) for v in (dubbed, original, speaker))
    lags = {lag: lagged_r(dubbed, speaker, lag) for lag in range(-max_lag, max_lag + 1)}
    best = max(lags, key=lambda k: -math.inf if math.isnan(lags[k]) else lags[k])
    d, s = _both(dubbed, speaker)
    return {"r_speaker": lags[0], "r_speaker_best": lags[best], "lag_best": best,
            "r_original": lagged_r(dubbed, original, 0), "r_chance": lagged_r(original, speaker, 0),
            "movement": float(d.std() / s.std()) if len(d) > 2 and s.std() > 0 else math.nan,
            "opening_silent": _mean(dubbed, np.asarray(silent, bool)),
            "opening_speech": _mean(dubbed, np.asarray(speech, bool)),
            "original_silent": _mean(original, np.asarray(silent, bool)),
            "original_speech": _mean(original, np.asarray(speech, bool)),
            "silent_frames": int(np.sum(silent)), "speech_frames": int(np.sum(speech))}


def mean_metrics(pairs: list) -> dict:
    """Per-pair measures -> their means over the pairs where each exists, and how many pairs with a silence have the
    dubbed mouth more closed there than in speech."""
    out = {k: float(np.nanmean([p[k] for p in pairs])) if any(np.isfinite(p[k]) for p in pairs) else math.nan
           for k in MEASURES if k != "lag_best"}
    with_silence = [p for p in pairs if np.isfinite(p["opening_silent"]) and np.isfinite(p["opening_speech"])]
    out["pairs"] = len(pairs)
    out["pairs_with_silence"] = len(with_silence)
    out["pairs_closed_in_silence"] = sum(p["opening_silent"] < p["opening_speech"] for p in with_silence)
    return out


# ----------------------------------------------------------------------------- dubbing and reading clips


def face_track(frames, geometry):
    """Frames (N, H, W, 3) -> track.Track from mediapipe with infer.py's box options for the model's geometry
    (unsmoothed MuseTalk boxes, smoothed square ones)."""
    return track_frames(frames, MeshTracker(), **box_options(geometry))


@torch.inference_mode()
def dub_clip(model, frames, fps, wave, track, reference=None, batch_size=8) -> np.ndarray:
    """A clip's frames (N, H, W, 3) uint8, its face track and speech already fitted to N / fps seconds -> dubbed
    frames (N, H, W, 3), as infer.py makes them (avatar, frame loop). reference: None (the model's rule, as infer.py),
    a rule name of lipsync.references, or a function track -> (N,) frame indices."""
    reference = reference(track) if callable(reference) else reference
    avatar = prepare_avatar(frames, fps, track, model, batch_size, reference=reference)
    windows = model.audio_windows(wave, len(frames), fps)
    openings = model.openings(wave, len(frames), fps) if avatar.reference == "audio" else None
    return np.stack(list(avatar_frames(model, avatar, windows, batch_size, openings=openings)))


class Clips:
    """The clips of a cycle: `get` reads a clip's frames (N, H, W, 3) anew each time (every clip's frames at once can
    take gigabytes) and, measured once per clip, its fps, own speech (S,), real openings (N,), mouth squares and
    lower-face rectangles (N, 4), which frames have a face (N,), and whether its own sound is in step with its mouth
    (lipsync.tools.avsync's verdict)."""

    def __init__(self):
        self.info = {}

    def get(self, path):
        from ..audio import load_audio
        from ..video import read_video, video_info
        frames, fps = read_video(path)
        if str(path) not in self.info:
            if not video_info(path).has_audio:
                raise ValueError(f"{path} has no audio track: a cross-dub clip must be a talking clip with its speech")
            mesh, wave = mesh_points(frames), load_audio(path)
            opening = lip_opening_468(mesh)
            self.info[str(path)] = {"fps": fps, "wave": wave, "opening": opening,
                                    "sync": clip_sync(opening, wave.numpy(), fps)[1],
                                    "squares": mouth_squares(np.nan_to_num(mesh), frames.shape[1:3]),
                                    "rects": lower_face_rects(np.nan_to_num(mesh), frames.shape[1:3]),
                                    "face": ~np.isnan(mesh).any((1, 2))}
        return frames, self.info[str(path)]


def as_still(frames, info) -> tuple:
    """A clip as a photo of its speaker: its first frame held for the clip's length (N, H, W, 3), and Clips.get's
    measurements of that frame repeated (the original opening is then constant: r_original and r_chance are 0)."""
    n = len(frames)
    held = {k: (np.repeat(v[:1], n, 0) if k in ("opening", "squares", "rects", "face") else v) for k, v in info.items()}
    return np.repeat(frames[:1], n, 0), held


def _rounded(x) -> list:
    """A per-frame series (N,) -> a JSON list, 5 decimals, None where unmeasured."""
    return [None if not np.isfinite(v) else round(float(v), 5) for v in x]


def montage(original, dubbed, speaker_frames, a, b, side=96) -> np.ndarray:
    """Rows original / dubbed / speaker at MONTAGE_FRAMES evenly spaced frames of A -> uint8 (3 side, 8 side, 3);
    a, b: Clips.get info of A and B."""
    n = len(original)
    idx = np.linspace(0, n - 1, MONTAGE_FRAMES).round().astype(int)
    rows = [square_tiles(original, a["squares"], idx, side), square_tiles(dubbed, a["squares"], idx, side)]
    src = np.floor(idx / a["fps"] * b["fps"] + 0.5).astype(int)  # B's frame nearest in time
    inside = src < len(speaker_frames)
    row = np.zeros((side, MONTAGE_FRAMES * side, 3), np.uint8)  # black past B's end
    tiles = square_tiles(speaker_frames, b["squares"], src[inside], side)
    for k, j in enumerate(np.flatnonzero(inside)):
        row[:, j * side:(j + 1) * side] = tiles[:, k * side:(k + 1) * side]
    return np.concatenate(rows + [row], 0)


def dubbed_lse(syncnet, dubbed, fps, track, wave) -> dict:
    """LSE-D / LSE-C of a dubbed clip (lipsync.tools.lse, syncnet_python's protocol at 25 fps): crops around the
    source track's faces, where the new mouth was pasted."""
    from ..tracking import fill_missing
    from .lse import lse, syncnet_crops, to_25fps
    frames, idx = to_25fps(dubbed, fps)
    return lse(syncnet, syncnet_crops(frames, fill_missing(track.landmarks[idx], track.face[idx])), np.asarray(wave))


def crossdub(model, videos, out_dir=None, reference=None, batch_size=8, silence_db=-30.0, progress=True,
             syncnet=None, still=False) -> dict:
    """Dub each clip with the next one's speech -> {"pairs": [per pair: names, frames, fps, measures], "mean": ...};
    with out_dir also crossdub.json and one montage PNG per pair; with a syncnet (lse.SyncNetV2) LSE-D / LSE-C too.
    still: dub a photo of each clip's person instead (`as_still`: its first frame held for its length), the
    speech and the speaker's mouth as before: a face that shows no mouth movement to copy or to pick from."""
    import json

    import imageio.v3 as iio
    from tqdm import tqdm

    from .eval_report import to_json
    clips, pairs = Clips(), []
    for k, (video, speech_clip) in enumerate(tqdm(cycle_pairs(videos), desc="cross-dub", unit="pair",
                                                  disable=not progress)):
        frames, a = clips.get(video)
        if still:
            frames, a = as_still(frames, a)
        speaker_frames, b = clips.get(speech_clip)
        n, fps = len(frames), a["fps"]
        wave = fit_speech(b["wave"], n, fps)
        track = face_track(frames, model.geometry)
        dubbed = dub_clip(model, frames, fps, wave, track, reference, batch_size)
        opening = lip_opening_468(mesh_points(dubbed))
        speaker = resample_series(b["opening"], b["fps"], n, fps)
        silent, speech = silences(wave.numpy(), n, fps, silence_db)
        pairs.append({"video": str(video), "speech": str(speech_clip), "frames": n, "fps": fps, "speech_fps": b["fps"],
                      "speaker_measured": int(np.isfinite(speaker).sum()), "speech_sync": b["sync"],
                      **pair_metrics(opening, a["opening"], speaker, silent, speech),
                      **detail_ratios(dubbed, frames, a["squares"], a["rects"], np.flatnonzero(a["face"])),
                      "series": {"dubbed": _rounded(opening), "original": _rounded(a["opening"]),
                                 "speaker": _rounded(speaker), "silent": silent.tolist(), "speech": speech.tolist()}})
        if syncnet is not None:
            pairs[-1]["lse"] = dubbed_lse(syncnet, dubbed, fps, track, wave.numpy())
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            name = f"{k}_{Path(video).stem}_with_{Path(speech_clip).stem}.png"
            iio.imwrite(Path(out_dir) / name, montage(frames, dubbed, speaker_frames, a, b))
        del frames, speaker_frames, dubbed
    if syncnet is not None:
        lse_mean = {k: float(np.mean([p["lse"][k] for p in pairs])) for k in ("lse_d", "lse_c")}
    res = {"pairs": pairs, "mean": {**mean_metrics(pairs), **({"lse": lse_mean} if syncnet is not None else {})},
           "silence_db": silence_db, "min_silence_s": MIN_SILENCE, "max_lag": MAX_LAG,
           "reference": getattr(reference, "__name__", reference or model.reference), "guidance": model.guidance,
           "still": still}
    if out_dir is not None:
        (Path(out_dir) / "crossdub.json").write_text(json.dumps(to_json(res), indent=1))
    return res


def print_table(res: dict) -> None:
    """The per-pair table and the means."""
    def f(v, fmt="{:+.3f}"):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    head = (f"{'video <- speech':36s} {'r spk':>6s} {'best (lag)':>12s} {'r orig':>6s} {'chance':>6s} {'move':>5s} "
            f"{'open silent / speech':>22s} {'(original)':>15s}")
    print(head)
    for p in res["pairs"]:
        name = f"{Path(p['video']).stem[:17]} <- {Path(p['speech']).stem[:15]}"
        print(f"{name:36s} {f(p['r_speaker']):>6s} {f(p['r_speaker_best']):>6s} ({p['lag_best']:+d}) "
              f"{f(p['r_original']):>6s} {f(p['r_chance']):>6s} {f(p['movement'], '{:.2f}'):>5s} "
              f"{f(p['opening_silent'], '{:.4f}'):>13s} / {f(p['opening_speech'], '{:.4f}'):>6s} "
              f"({f(p['original_silent'], '{:.4f}')} / {f(p['original_speech'], '{:.4f}')}) "
              f"{p['silent_frames']} / {p['speech_frames']} frames")
    m = res["mean"]
    print(f"{'mean over ' + str(m['pairs']) + ' pairs':36s} {f(m['r_speaker']):>6s} {f(m['r_speaker_best']):>6s}"
          f"{'':5s} {f(m['r_original']):>6s} {f(m['r_chance']):>6s} {f(m['movement'], '{:.2f}'):>5s} "
          f"{f(m['opening_silent'], '{:.4f}'):>13s} / {f(m['opening_speech'], '{:.4f}'):>6s} "
          f"({f(m['original_silent'], '{:.4f}')} / {f(m['original_speech'], '{:.4f}')})")
    for p in res["pairs"]:
        print(f"{Path(p['video']).stem[:17]} <- {Path(p['speech']).stem[:15]}: detail lips "
              f"{f(p['detail_lips'], '{:.3f}')} rest {f(p['detail_rest'], '{:.3f}')} (dubbed / source)")
    print(f"mean detail lips {f(m['detail_lips'], '{:.3f}')}, rest {f(m['detail_rest'], '{:.3f}')} (Laplacian variance "
          f"of the dubbed video / its source, on the mouth square and on the rest of the lower face)")
    if "lse" in m:
        for p in res["pairs"]:
            print(f"{Path(p['video']).stem[:17]} <- {Path(p['speech']).stem[:15]}: LSE-D {p['lse']['lse_d']:.2f} "
                  f"LSE-C {p['lse']['lse_c']:.2f} (offset {p['lse']['offset']:+d})")
        print(f"mean LSE-D {m['lse']['lse_d']:.2f}, LSE-C {m['lse']['lse_c']:.2f}")
    print(f"dubbed mouth more closed in silence than in speech on {m['pairs_closed_in_silence']} of "
          f"{m['pairs_with_silence']} pairs with a silence of {MIN_SILENCE} s or more")
    for p in res["pairs"]:
        sync = p.get("speech_sync", {})
        if sync.get("status") == "out of sync":
            print(f"note: {p['speech']}'s own mouth moves {sync['delay_frames']:+d} frames ({sync['delay_ms']:+.0f} ms) "
                  f"from its sound (+ = after; avsync), so r spk on its pair grades a mouth in step with the speech "
                  f"against a shifted answer; python -m lipsync.tools.avsync --resync DIR writes it in sync")
