"""Pooling, printing and saving `python -m lipsync.tools.eval` results (the groups: `eval.evaluate_clip`).

`summarise` pools per-clip results by kind (synthetic / real): frames are pooled for r, PSNR/SSIM/L1 and mouth
openings; sync numbers are averaged over clips. `print_report` prints the four groups with their baselines,
`strip_image` builds the PNG of held-out frames, `to_json` makes the report strict JSON (+inf -> "inf", NaN -> null).
"""

import math

import numpy as np

from lipsync.tools.metrics import pearson

SCALE_NOTE = ("sync distances are OUR SyncNet's (unit-embedding L2, 0..2): compare only between videos scored by "
              "the same SyncNet, never with published LSE-C/LSE-D")
BASELINES = ("generated", "ground_truth", "copy_reference")
STRIP_ROWS = ("ground_truth", "generated", "copy_reference")


def _mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def summarise(results: list[dict]) -> dict:
    """Per-clip results -> {kind: {'a', 'b', 'c', 'd'}} pooled over that kind's clips (frames pooled, sync per clip)."""
    out = {}
    for kind in ("synthetic", "real"):
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        s = {"clips": len(rs), "frames": sum(r["frames"] for r in rs)}
        a = [r["a"] for r in rs if "a" in r]
        if a:
            cat = {k: np.concatenate([x[k] for x in a]) for k in a[0]}
            s["a"] = {"clips": len(a), "frames": int(len(cat["truth"])),
                      "r": {k: pearson(cat[k], cat["truth"]) for k in BASELINES},
                      "l1_to_real_opening": {k: _mean(np.abs(cat[k] - cat["ground_truth"]))
                                             for k in ("generated", "copy_reference", "mean_mouth")}}
            s["a"]["r"]["mean_mouth"] = None
        b = {k: {m: np.concatenate([r["b"][k][m] for r in rs]) for m in ("psnr", "ssim", "l1")}
             for k in ("generated", "copy_reference")}
        s["b"] = {"frames": int(len(b["generated"]["l1"])),
                  **{k: {m: (float(np.mean(v)) if len(v) else None) for m, v in b[k].items()} for k in b}}
        c = [r["c"] for r in rs if r.get("c")]
        if c:
            s["c"] = {"clips": len(c), "note": SCALE_NOTE, **{k: {
                "mean_abs_offset": float(np.mean([abs(x[k]["offset"]) for x in c])),
                "in_sync": float(np.mean([abs(x[k]["offset"]) <= 1 for x in c])),
                "lse_d": float(np.mean([x[k]["dist"] for x in c])),
                "lse_c": float(np.mean([x[k]["conf"] for x in c]))} for k in BASELINES}}
        d = [r["d"] for r in rs if r.get("d")]
        if d:
            sil, sp = np.concatenate([x["silent"] for x in d]), np.concatenate([x["speech"] for x in d])
            s["d"] = {"silent_frames": int(sil.sum()), "speech_frames": int(sp.sum()), **{k: {
                "silent": _mean(np.concatenate([x[k] for x in d])[sil]),
                "speech": _mean(np.concatenate([x[k] for x in d])[sp])} for k in BASELINES}}
        out[kind] = s
    return out


def _f(v, fmt="{:.4f}"):
    if v is None:
        return "n/a"
    return "inf" if v == math.inf else fmt.format(v)


def print_report(summary: dict, holdout: float) -> None:
    for kind, s in summary.items():
        print(f"\n== {kind} clips: {s['clips']} clips, {s['frames']} frames ==")
        if "a" in s:
            a = s["a"]
            print(f"(a) mouth opening vs. the true opening ({a['clips']} clips, {a['frames']} frames)")
            print("    Pearson r:  " + " | ".join(f"{k} {_f(v, '{:.3f}')}" for k, v in a["r"].items())
                  + "   (ground_truth = measurement ceiling; mean_mouth is constant: r undefined)")
            print("    L1 to the opening measured on the real frames (fraction of crop height):  "
                  + " | ".join(f"{k} {_f(v)}" for k, v in a["l1_to_real_opening"].items()))
        b = s["b"]
        print(f"(b) held-out last {holdout:.0%}, mouth region vs. real frames ({b['frames']} frames)")
        print(f"    {'':16s} {'PSNR dB':>8s} {'SSIM':>8s} {'L1':>8s}")
        for k in ("generated", "copy_reference"):
            x = b[k]
            print(f"    {k:16s} {_f(x['psnr'], '{:8.2f}')} {_f(x['ssim'], '{:8.4f}')} {_f(x['l1'], '{:8.4f}')}")
        if "c" in s:
            c = s["c"]
            print(f"(c) sync from OUR SyncNet, offsets +-15 frames ({c['clips']} clips) -- {SCALE_NOTE}")
            print(f"    {'':16s} {'mean|off|':>9s} {'in sync':>8s} {'LSE-D*':>8s} {'LSE-C*':>8s}")
            for k in BASELINES:
                print(f"    {k:16s} {c[k]['mean_abs_offset']:9.2f} {c[k]['in_sync']:8.2f} {c[k]['lse_d']:8.4f} "
                      f"{c[k]['lse_c']:8.4f}")
        else:
            print("(c) sync: skipped (no SyncNet in the checkpoint, or no clip at the SyncNet's frame rate)")
        if "d" in s:
            d = s["d"]
            print(f"(d) mean mouth opening (fraction of crop height): silent ({d['silent_frames']} frames) vs. speech "
                  f"({d['speech_frames']} frames)")
            for k in BASELINES:
                print(f"    {k:16s} silent {_f(d[k]['silent'])}   speech {_f(d[k]['speech'])}")
        else:
            print("(d) silence: skipped (real clips need mediapipe to measure the mouth: pip install mediapipe)")


def strip_image(results: list[dict], max_clips: int = 3) -> np.ndarray:
    """Held-out frames, per clip three rows (real, generated, copy-reference) -> uint8 image, upscaled to >= 128 px
    tiles."""
    blocks = []
    for r in results[:max_clips]:
        rows = [np.concatenate(list(r["strip"][k]), 1) for k in STRIP_ROWS]
        blocks.append(np.concatenate(rows, 0))
    width = max(b.shape[1] for b in blocks)
    gap = np.full((4, width, 3), 255, np.uint8)
    img = np.concatenate(sum([[np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0))), gap] for b in blocks], [])[:-1])
    k = max(1, 128 // results[0]["strip"]["ground_truth"].shape[1])
    return img.repeat(k, 0).repeat(k, 1)


def to_json(v):
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return "inf" if v == math.inf else None if math.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def clip_record(r: dict) -> dict:
    rec = {k: r[k] for k in ("name", "path", "kind", "frames", "heldout_from", "fps")}
    rec["b"] = {k: {m: float(np.mean(v)) if len(v) else None for m, v in x.items()} for k, x in r["b"].items()}
    rec["c"] = r.get("c") or r.get("c_skipped")
    return rec
