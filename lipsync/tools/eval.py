"""Evaluation: does the generated mouth follow the audio, and how close is it to the real frames?

Each clip is regenerated from its own audio with references from its first 80 % only, and scored in four groups next
to baselines (`evaluate_clip`): (a) mouth opening vs. the true one, (b) held-out mouth PSNR / SSIM / L1, (c) the
audio-video offset as SyncNet-eval's LSE-D / LSE-C measure it, but with our own SyncNet, (d) mouth opening in silence
vs. speech. The maths is in lipsync/tools/metrics.py, pooling and printing in lipsync/tools/eval_report.py.

    python -m lipsync.tools.eval --ckpt runs/tiny/lipsync.pt --data data/synthetic [--clip CLIP ...] --out results/eval

Real talking clips instead: `--reenact` dubs each with its own speech (lipsync/tools/reenact.py), `--crossdub` each
with the next clip's speech (lipsync/tools/crossdub.py).
"""

import argparse
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lipsync.tools import metrics
from lipsync.tools.eval_report import SCALE_NOTE, clip_record, print_report, strip_image, summarise, to_json
from lipsync.training.data import MIN_GAP, list_clips, load_clip
from lipsync.checks import pick_device
from lipsync.melspec import log_mel
from lipsync.model import check_guidance
from lipsync.references import RULES as REFERENCE_RULES
from lipsync.tools.metrics import lip_opening_68, pearson
from lipsync.tools.synthetic_face import dark_mouth_height
from lipsync.training.syncnet import load_syncnet
from lipsync.tracking import to_crop_coords
from lipsync.vae import to_uint8_images

STRIP_FRAMES = 8  # held-out frames per clip in the PNG strip


def far_references(n: int, rng: np.random.Generator) -> np.ndarray:
    """For each of n frames, a uniformly drawn frame of the same clip at least MIN_GAP away (as in training)."""
    frames = np.arange(n)
    return np.array([rng.choice(frames[np.abs(frames - f) >= MIN_GAP]) for f in frames])


def holdout_references(n: int, cut: int, face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each of n frames, a frame drawn uniformly from the face frames in [0, cut), at least MIN_GAP away
    (the farthest such frame when none is far enough)."""
    pool = np.flatnonzero(face[:cut])
    if len(pool) == 0:
        raise ValueError(f"no frame with a face in the first {cut} frames to use as reference")
    refs = np.empty(n, np.int64)
    for f in range(n):
        far = pool[np.abs(pool - f) >= MIN_GAP]
        refs[f] = rng.choice(far) if len(far) else pool[np.argmax(np.abs(pool - f))]
    return refs


@torch.no_grad()
def regenerate_crops(model, crops, targets, refs, windows, batch_size: int = 32, bar=None, lips=None) -> np.ndarray:
    """crops (N, S, S, 3) uint8; targets, refs (K,) frame indices; audio windows (K, n L, D) -> generated uint8
    (K, S, S, 3). Only the targets' upper halves reach the model. lips (K, 20, 2): the targets' lips in crop pixels,
    where audio guidance acts (LipSync.generate), as infer.py's pipeline gives them."""
    out = []
    for i in range(0, len(targets), batch_size):
        sl = slice(i, min(len(targets), i + batch_size))
        unet_in = model.face.unet_input(np.asarray(crops[targets[sl]]), np.asarray(crops[refs[sl]]))
        out.append(to_uint8_images(model.generate(unet_in, windows[sl], lips=None if lips is None else lips[sl])))
        if bar is not None:
            bar.update(sl.stop - sl.start)
    return np.concatenate(out)


def synthetic_sync(model, clip_dirs, seed: int = 0, max_frames: int | None = None):
    """The quick check train.py runs at the end of training, references from anywhere in the clip: held-out synthetic
    clips -> {'r', 'r_reference', 'clips', 'frames'}; None when no clip has ground truth."""
    gen, ref, truth = [], [], []
    for d in clip_dirs:
        clip = load_clip(d)
        if clip.truth is None or clip.meta.get("tracker") != "synthetic":  # dark_mouth_height reads cartoon faces
            continue
        n = len(clip) if max_frames is None else min(len(clip), max_frames)
        rng = np.random.default_rng([seed, len(truth)])
        refs = far_references(len(clip), rng)[:n]
        windows = model.audio_windows(clip.wave, len(clip), clip.fps)[:n]
        gen.append(dark_mouth_height(regenerate_crops(model, clip.crops, np.arange(n), refs, windows)))
        ref.append(dark_mouth_height(np.asarray(clip.crops[refs])))
        truth.append(clip.truth["opening"][:n])
    if not truth:
        return None
    g, r, t = np.concatenate(gen), np.concatenate(ref), np.concatenate(truth)
    return {"r": pearson(g, t), "r_reference": pearson(r, t), "clips": len(truth), "frames": int(len(t))}


# ----------------------------------------------------------------------------- loading


def eval_clip_dirs(data, clips, split="val") -> list[Path]:
    """Clip dirs to evaluate: the `split` clips of `data` (all with split='all') followed by each --clip."""
    out = []
    if data:
        if not os.path.isdir(data):
            raise SystemExit(f"--data {data}: no such directory")
        out = list_clips(data, None if split == "all" else split)
        if not out:
            raise SystemExit(f"no complete {split!r} clips in {data} (prepared clips have a meta.json; "
                             f"--split all evaluates every clip)")
    for c in clips or []:
        if not (Path(c) / "meta.json").exists():
            raise SystemExit(f"--clip {c}: not a complete prepared clip (no meta.json; "
                             f"see python -m lipsync.training.prepare)")
        out.append(Path(c))
    return out


# ----------------------------------------------------------------------------- one clip


def model_crops(clip, n: int, size: int) -> np.ndarray:
    """The clip's first n crops at the model's crop size, uint8 (n, size, size, 3)."""
    crops = np.array(clip.crops[:n])
    if crops.shape[1] == size:
        return crops
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def mouth_opening(crops, synthetic: bool):
    """Opening per frame (synthetic: dark mouth height read from the pixels, a fraction of the crop height; real:
    inner-lip gap over the eye distance, metrics.lip_opening_68; NaN where unmeasurable), or None when no measure is
    available."""
    if synthetic:
        return dark_mouth_height(crops)
    from lipsync.tracking import MediapipeMissing, MeshTracker, track_landmarks
    try:
        tracker = MeshTracker()
    except MediapipeMissing:
        return None
    try:
        lm, face = track_landmarks(crops, tracker)
    finally:
        tracker.close()
    out = np.full(len(crops), np.nan, np.float32)
    out[face] = lip_opening_68(lm[face])
    return out


def evaluate_clip(model, syncnet, clip, *, seed=0, holdout=0.2, max_frames=0, batch_size=32, silence_db=-30.0,
                  bar=None) -> dict:
    """Regenerate one clip and measure it -> dict of per-clip results and the per-frame arrays for pooling.

    The model sees each frame's upper half (the lower half masked, as always) and a reference frame drawn (seeded)
    from the clip's first 1 - holdout, at least MIN_GAP frames from the target, so the last `holdout` of the frames
    are held out: no reference comes from them and their lower halves are never seen. Baselines: the reference frame
    itself as the prediction (copy-reference) and the real frames (the measurement's ceiling)."""
    S = model.crop_size
    n = len(clip) if not max_frames else min(len(clip), max_frames)
    cut = n - max(1, round(holdout * n))
    if cut < 1:
        raise ValueError(f"{clip.name}: {n} frames are too few to hold out {holdout:.0%}")
    synthetic = clip.meta.get("tracker") == "synthetic"
    rng = np.random.default_rng([seed, zlib.crc32(clip.name.encode())])
    refs = holdout_references(n, cut, clip.face[:n], rng)
    crops = model_crops(clip, n, S)
    windows = model.audio_windows(clip.wave, len(clip), clip.fps)[:n]
    lips = to_crop_coords(clip.landmarks[:n, 48:68], clip.boxes[:n], S)  # (n, 20, 2)
    gen = regenerate_crops(model, crops, np.arange(n), refs, windows, batch_size, bar, lips)
    videos = {"generated": gen, "ground_truth": crops, "copy_reference": crops[refs]}
    res = {"name": clip.name, "path": str(clip.path), "kind": "synthetic" if synthetic else "real", "frames": n,
           "heldout_from": cut, "fps": clip.fps}

    # (a) synthetic clips, whose true opening is known: r of the opening measured in each video vs. the truth. A
    # constant mean-mouth predictor (the clip's mean measured opening over the reference part) has no r, so the L1
    # to the opening measured on the real frames is given too
    opening = {k: mouth_opening(v, synthetic) for k, v in videos.items()}
    if clip.truth is not None and synthetic:
        res["a"] = {"truth": clip.truth["opening"][:n].astype(np.float64), **opening,
                    "mean_mouth": np.full(n, float(np.mean(opening["ground_truth"][:cut])))}

    # (b) held-out tail, frames with a face: mouth-region PSNR / SSIM / L1 against the real frames
    tail = np.arange(cut, n)[clip.face[cut:n]]
    lips = to_crop_coords(clip.landmarks[tail, 48:68], clip.boxes[tail], S)
    boxes = metrics.mouth_boxes(lips, S)
    res["b"] = {k: metrics.mouth_metrics(videos[k][tail], crops[tail], boxes) for k in ("generated", "copy_reference")}
    pick = cut + np.unique(np.linspace(0, n - cut - 1, STRIP_FRAMES).round().astype(int))
    res["strip"] = {k: v[pick] for k, v in videos.items()}

    # (c) sync: best audio offset in +-15 frames, the distance there (LSE-D-like) and median minus minimum (LSE-C-like)
    # from OUR SyncNet (the checkpoint's): on its scale only, not comparable with published LSE-C / LSE-D numbers
    res["c"] = None
    if syncnet is not None:
        c = syncnet.config
        if abs(clip.fps * c.mel_per_frame - 100) > 1e-3:
            rate = 100 / c.mel_per_frame
            res["c_skipped"] = (f"our SyncNet reads {rate:g} fps video ({c.mel_per_frame} mel frames per frame); this "
                                f"clip is {clip.fps:g} fps (re-prepare it with --fps {rate:g})")
        elif n < c.n_frames + 1:
            res["c_skipped"] = f"{n} frames: too short for {c.n_frames}-frame SyncNet windows"
        else:
            mel = log_mel(clip.wave, dynamic_floor=False)
            need = c.mel_per_frame * n
            if mel.shape[1] < need:
                mel = F.pad(mel, (0, need - mel.shape[1]), value=float(mel.min()))
            res["c"] = {k: metrics.sync_score(syncnet, v, mel[:, :need]) for k, v in videos.items()}

    # (d) mean opening on silent stretches (audio RMS below a threshold) vs. speech
    silent, speech, _ = metrics.silence_masks(clip.wave.numpy(), n, clip.fps, silence_db)
    res["d"] = None if opening["generated"] is None else {"silent": silent, "speech": speech, **opening}
    return res


# ----------------------------------------------------------------------------- CLI


def _real_clips(args, run):
    """run(model) for --reenact / --crossdub with our checkpoint; unreadable inputs end as one error line."""
    from lipsync.checkpoint import load_lipsync
    from lipsync.weights import CheckpointError
    try:
        return run(guided(load_lipsync(args.ckpt, pick_device(args.device), whisper=args.whisper).eval(), args))
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def guided(model, args):
    """The model with --audio-guidance, when given, as its guidance (else the checkpoint's own)."""
    if args.audio_guidance is not None:
        model.set_guidance(check_guidance(args.audio_guidance))
    return model


def _syncnet_v2(args):
    """The public SyncNet of --syncnet-weights, or None without it."""
    if not args.syncnet_weights:
        return None
    from lipsync.tools.lse import load_syncnet_v2
    return load_syncnet_v2(args.syncnet_weights, pick_device(args.device))


def reenact_main(args):
    from lipsync.tools.reenact import reenact
    res = _real_clips(args, lambda model: reenact(model, args.reenact, args.out, min(args.batch_size, 16),
                                                  syncnet=_syncnet_v2(args)))
    lse = " LSE-D  LSE-C" if args.syncnet_weights else ""
    print(f"{'clip':24s} {'row':50s} {'PSNR':>6s} {'SSIM':>6s} {'colour':>6s} {'r':>6s} {'lips':>5s} "
          f"{'rest':>5s}{lse}")
    for clip, rows in res.items():
        for name, v in rows.items():
            lse = f" {v['lse_d']:6.2f} {v['lse_c']:6.2f}" if "lse_d" in v else ""
            print(f"{Path(clip).stem[:24]:24s} {name:50s} {v['psnr']:6.2f} {v['ssim']:6.3f} {v['colour']:6.2f} "
                  f"{v['r']:+6.3f} {v['detail_lips']:5.2f} {v['detail_rest']:5.2f}{lse}")
    print("lips, rest: detail (Laplacian variance) of the generated frames / the real ones, on the mouth square and "
          "on the rest of the lower face (lipsync.tools.reenact)")
    print(f"wrote {args.out}/reenact.json and one mouth montage per clip")
    return res


def crossdub_main(args):
    from lipsync.tools.crossdub import crossdub, print_table

    def run(model):
        return crossdub(model, args.crossdub, args.out, reference=args.reference, batch_size=min(args.batch_size, 8),
                        silence_db=args.silence_db, syncnet=_syncnet_v2(args), still=args.still)

    res = _real_clips(args, run)
    print_table(res)
    print(f"wrote {args.out}/crossdub.json and one montage per pair (rows: original, dubbed, speaker)")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lipsync.tools.eval", description=__doc__.split("\n\n")[0],
                                epilog="Groups, each next to baselines: (a) mouth opening vs. the true one (synthetic "
                                "clips), (b) mouth PSNR/SSIM/L1 on each clip's held-out end, (c) audio-video offset "
                                "from the checkpoint's SyncNet, (d) mouth opening in silence vs. speech.")
    p.add_argument("--ckpt", help="our checkpoint (lipsync.pt from train.py); required except with --lse")
    p.add_argument("--data", help="folder of prepared clips; its held-out ('val') clips are evaluated")
    p.add_argument("--clip", action="append", default=[], help="a prepared clip folder to evaluate as well "
                   "(e.g. a real one); repeatable")
    p.add_argument("--out", default="results/eval", help="output folder: eval.json and heldout_strip.png (rows per "
                   "clip: real, generated, copy-reference); with --reenact, reenact.json and mouth montages; with "
                   "--crossdub, crossdub.json and a montage per pair")
    p.add_argument("--split", default="val", choices=("val", "train", "all"), help="which clips of --data")
    p.add_argument("--syncnet", help="SyncNet file (default: the checkpoint's 'syncnet' entry)")
    p.add_argument("--whisper", help="whisper encoder (Hugging Face or CTranslate2 folder, or tiny.pt), for "
                   "checkpoints trained on whisper features")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of each clip's frames held out at its end")
    p.add_argument("--max-frames", type=int, default=1500, help="evaluate at most this many frames per clip (0 = all)")
    p.add_argument("--max-clips", type=int, default=0, help="at most this many clips (0 = all)")
    p.add_argument("--silence-db", type=float, default=-30.0, help="silent: frame RMS this far below the clip's p95 "
                   "(with --crossdub: the speech's, in runs of 0.3 s or more)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per model call (at most 16 with --reenact, "
                   "8 with --crossdub: infer.py's default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of reference frames")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--reenact", nargs="+", metavar="VIDEO", help="self-reenactment instead: dub each real talking "
                   "clip with its own audio and compare with its frames (lipsync.tools.reenact)")
    p.add_argument("--crossdub", nargs="+", metavar="VIDEO", help="cross-dubbing instead: dub each real talking "
                   "clip with the NEXT clip's speech (the last with the first's) as infer.py does, and compare the "
                   "dubbed mouth with the speech's real speaker's mouth (lipsync.tools.crossdub)")
    p.add_argument("--still", action="store_true", help="--crossdub: dub a photo of each clip's person (its first "
                   "frame held for the clip's length) instead of its video, with the next clip's speech as before")
    p.add_argument("--audio-guidance", type=float, metavar="G", help="audio guidance, as infer.py's (default: the "
                   "checkpoint's; 1 = none; with the audio rule on a photo or a face whose mouth never opens, its "
                   "opening head's)")
    p.add_argument("--reference", choices=REFERENCE_RULES, help="--crossdub: the reference rule to dub with "
                   "(default: the checkpoint's, as infer.py's --reference auto)")
    p.add_argument("--lse", action="store_true", help="score the VIDEOs given (dubbed mp4s with their speech) with "
                   "the public SyncNet as the papers do: AV offset, LSE-D, LSE-C (lipsync.tools.lse)")
    p.add_argument("--syncnet-weights", metavar="PATH", help="syncnet_v2.model of joonson/syncnet_python: for "
                   "--lse, and LSE columns with --reenact and --crossdub")
    p.add_argument("video", nargs="*", help="videos to score with --lse")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lse or args.video:
        if not args.lse:
            p.error(f"unexpected arguments {' '.join(args.video)} (videos are for --lse)")
        from lipsync.tools import lse
        return lse.main(args.video, args.syncnet_weights, str(pick_device(args.device)), min(args.batch_size, 20))
    if not args.ckpt:
        p.error("the following arguments are required: --ckpt")
    if args.reenact and args.crossdub:
        p.error("give --reenact or --crossdub, not both")
    if args.still and not args.crossdub:
        p.error("--still goes with --crossdub")
    if args.reenact:
        return reenact_main(args)
    if args.crossdub:
        if len(args.crossdub) < 2:
            p.error("--crossdub needs at least two clips (each is dubbed with the next one's speech)")
        return crossdub_main(args)
    if not 0 < args.holdout < 1:
        p.error("--holdout must be in (0, 1)")

    data = args.data
    if data is None and not args.clip:
        if not os.path.isdir("data/synthetic"):
            p.error("give --data (prepared clips, e.g. data/synthetic) and/or --clip")
        data = "data/synthetic"
    dirs = eval_clip_dirs(data, args.clip, args.split)
    if args.max_clips:
        dirs = dirs[:args.max_clips]
    try:
        device = str(pick_device(args.device))
    except ValueError as e:
        p.error(str(e))

    from lipsync.checkpoint import load_lipsync
    from lipsync.weights import CheckpointError
    try:
        model = guided(load_lipsync(args.ckpt, device, whisper=args.whisper), args)
        syncnet = load_syncnet(args.syncnet or args.ckpt)
    except (CheckpointError, ValueError, KeyError) as e:
        raise SystemExit(f"cannot load: {e}") from None
    if syncnet is None:
        print(f"note: {args.syncnet or args.ckpt} holds no SyncNet: group (c) is skipped (pass --syncnet FILE)")
    else:
        syncnet = syncnet.to(device)

    clips = [load_clip(d) for d in dirs]
    total = sum(len(c) if not args.max_frames else min(len(c), args.max_frames) for c in clips)
    print(f"evaluating {len(clips)} clips ({total} frames) with {args.ckpt} on {device}")
    results = []
    with tqdm(total=total, desc="regenerating", unit="frame") as bar:
        for clip in clips:
            try:
                results.append(evaluate_clip(model, syncnet, clip, seed=args.seed, holdout=args.holdout,
                                             max_frames=args.max_frames, batch_size=args.batch_size,
                                             silence_db=args.silence_db, bar=bar))
            except ValueError as e:
                tqdm.write(f"skipping {clip.path}: {e}")
    if not results:
        raise SystemExit("no clip could be evaluated")

    summary = summarise(results)
    print_report(summary, args.holdout)
    os.makedirs(args.out, exist_ok=True)
    report = {"checkpoint": args.ckpt, "data": data, "clips_given": args.clip, "seed": args.seed,
              "holdout": args.holdout, "silence_db": args.silence_db, "device": device,
              "units": {"opening": "fraction of crop height", "psnr": "dB, uint8 range", "l1": "mean |diff| / 255",
                        "ssim": "mean over window centres in the mouth box", "sync": SCALE_NOTE},
              "summary": summary, "per_clip": [clip_record(r) for r in results]}
    json_path, png_path = os.path.join(args.out, "eval.json"), os.path.join(args.out, "heldout_strip.png")
    with open(json_path, "w") as f:
        json.dump(to_json(report), f, indent=1)
    import imageio.v3 as iio
    iio.imwrite(png_path, strip_image(results))
    print(f"\nwrote {json_path} and {png_path} (rows per clip: real, generated, copy-reference)")
    return report


if __name__ == "__main__":
    main()
