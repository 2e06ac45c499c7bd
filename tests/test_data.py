import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lipsync.tools import synthetic
from lipsync.melspec import log_mel
from lipsync.training.data import Stage1Dataset, Stage2Dataset, clip_split, list_clips, load_clip
from lipsync.tracking import to_crop_coords

NO_FACE = np.arange(20, 40)  # frames of train_0000 marked as "no face found"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    synthetic.main(["--out", str(root), "--clips", "5", "--seconds", "3", "--heldout", "0.4", "--workers", "1"])
    track = dict(np.load(root / "train_0000" / "track.npz"))
    track["face"][NO_FACE] = False
    np.savez(root / "train_0000" / "track.npz", **track)
    return root


def test_load_clip_reads_the_prepared_layout(root):
    clip = load_clip(root / "train_0001")
    assert clip.crops.shape == (75, 64, 64, 3) and clip.fps == 25.0 and len(clip) == 75
    assert clip.wave.dtype == torch.float32 and clip.wave.shape == (3 * 16000,)
    assert clip.truth["opening"].shape == (75,) and clip.name == "train_0001"


def test_list_clips_skips_incomplete_and_splits_by_meta(root, tmp_path):
    for name in ("train_0000", "heldout_0000"):
        shutil.copytree(root / name, tmp_path / name)
    shutil.copytree(root / "train_0001", tmp_path / "half_done")
    (tmp_path / "half_done" / "meta.json").unlink()
    (tmp_path / ".x.partial").mkdir()
    assert [p.name for p in list_clips(tmp_path)] == ["heldout_0000", "train_0000"]
    assert [p.name for p in list_clips(tmp_path, "train")] == ["train_0000"]
    assert [p.name for p in list_clips(tmp_path, "val")] == ["heldout_0000"]


def test_split_without_meta_split_is_a_stable_hash_of_the_name():
    names = [f"video_{i}" for i in range(400)]
    splits = [clip_split(n, {}) for n in names]
    assert splits == [clip_split(n, {}) for n in names]
    assert 0.05 < splits.count("val") / len(names) < 0.15


def test_train_and_val_datasets_hold_different_clips(root):
    train, val = Stage1Dataset(root, "train"), Stage1Dataset(root, "val")
    assert {c.name for c in train.clips} == {"train_0000", "train_0001", "train_0002"}
    assert {c.name for c in val.clips} == {"heldout_0000", "heldout_0001"}


def test_stage1_item_shapes_and_ranges(root):
    ds = Stage1Dataset(root, "train", seed=0)
    item = ds[0]
    assert item["target"].shape == item["masked"].shape == item["reference"].shape == (3, 64, 64)
    assert item["mel"].shape == (80, 2 * (10 + 2 * 4))
    for key in ("target", "reference"):
        assert item[key].min() >= -1 and item[key].max() <= 1 and item[key].std() > 0.1
    assert (item["masked"][:, 32:] == -1).all() and torch.equal(item["masked"][:, :32], item["target"][:, :32])
    assert len(ds) == sum(len(s) for s in ds.starts)


def test_same_seed_same_sample_other_seed_other_sample(root):
    a, b, c = (Stage1Dataset(root, "train", seed=s) for s in (0, 0, 1))
    later = [b[i] for i in (7, 3, 5)]  # access order must not matter
    for i, item in zip((7, 3, 5), later):
        assert all(torch.equal(a[i][k], item[k]) for k in item)
    pairs = [(int(a[i]["clip"]), int(a[i]["frame"])) != (int(c[i]["clip"]), int(c[i]["frame"])) for i in range(10)]
    assert sum(pairs) >= 8
    a.set_epoch(1)
    assert sum((int(a[i]["frame"]) != int(b[i]["frame"])) for i in range(10)) >= 8


def test_dataloader_workers_give_the_same_batches(root):
    ds = Stage1Dataset(root, "train", seed=3, length=16)
    one = next(iter(DataLoader(ds, batch_size=16)))
    two = next(iter(DataLoader(ds, batch_size=16, num_workers=2)))
    assert torch.equal(one["reference"], two["reference"]) and torch.equal(one["mel"], two["mel"])


@pytest.mark.parametrize("sample", ["pose_mouth", "random", "closed_pose", "audio"])
def test_reference_is_far_inside_clip_and_never_a_no_face_frame(root, sample):
    ds = Stage1Dataset(root, "train", seed=0, sample=sample, length=600)
    seen_no_face_clip = False
    for i in range(600):
        item = ds[i]
        clip = ds.clips[int(item["clip"])]
        f, r = int(item["frame"]), int(item["ref_frame"])
        assert abs(r - f) >= 5 and 0 <= r < len(clip)
        assert clip.face[f] and clip.face[r]
        if clip.name == "train_0000":
            seen_no_face_clip = True
            assert r not in NO_FACE and f not in NO_FACE
    assert seen_no_face_clip


def test_pose_mouth_references_have_a_different_mouth_than_random_ones(root):
    gaps = {}
    for sample in ("pose_mouth", "random"):
        ds = Stage1Dataset(root, "train", seed=0, sample=sample, length=400)
        items = [ds[i] for i in range(400)]
        gaps[sample] = np.mean([abs(ds.clips[int(x["clip"])].truth["opening"][int(x["frame"])]
                                    - ds.clips[int(x["clip"])].truth["opening"][int(x["ref_frame"])]) for x in items])
    assert gaps["pose_mouth"] > 1.15 * gaps["random"]


def test_closed_pose_references_are_closed_mouthed_frames_of_the_targets_nearest_poses(root):
    """The training rule behind infer.py's default: the reference shows a closed mouth (one of the clip's
    CLOSED_FRACTION most closed frames), from the quarter of those nearest the target in jaw pose, never the target."""
    from lipsync.references import closed_frames, jaw_pose, pose_distance
    ds = Stage1Dataset(root, "train", seed=0, sample="closed_pose", length=300)
    random = Stage1Dataset(root, "train", seed=0, sample="random", length=300)
    opening = {"closed_pose": [], "random": []}
    for i in range(300):
        x = ds[i]
        ci, f, r = int(x["clip"]), int(x["frame"]), int(x["ref_frame"])
        clip = ds.clips[ci]
        lm = to_crop_coords(clip.landmarks, clip.boxes, 256)
        closed = closed_frames(lm, clip.face) & (np.abs(np.arange(len(clip)) - f) >= 5)
        assert closed[r] and r != f
        cand = np.flatnonzero(closed)
        jaw = jaw_pose(lm)
        dist = pose_distance(jaw[f:f + 1], jaw[cand])[0]
        assert dist[list(cand).index(r)] <= np.sort(dist)[max(1, len(cand) // 4) - 1] + 1e-12
        opening["closed_pose"].append(clip.truth["opening"][r])
        y = random[i]
        opening["random"].append(random.clips[int(y["clip"])].truth["opening"][int(y["ref_frame"])])
    assert np.mean(opening["closed_pose"]) < 0.5 * np.mean(opening["random"])


def test_audio_references_show_the_targets_own_opening_from_the_nearest_poses(root):
    """The training rule of the "audio" reference: one of the MATCH_DRAW frames whose inner-lip gap is nearest the
    target's, among the MATCH_POOL share of far frames nearest in jaw pose; so its mouth is the target's (the answer
    infer.py's rule asks the audio for), never the target frame itself."""
    from lipsync.references import MATCH_POOL, jaw_pose, mouth_gap, pose_distance
    from lipsync.training.data import MATCH_DRAW
    ds = Stage1Dataset(root, "train", seed=0, sample="audio", length=300)
    random = Stage1Dataset(root, "train", seed=0, sample="random", length=300)
    error = {"audio": [], "random": []}
    for i in range(300):
        x = ds[i]
        ci, f, r = int(x["clip"]), int(x["frame"]), int(x["ref_frame"])
        clip = ds.clips[ci]
        lm = to_crop_coords(clip.landmarks, clip.boxes, 256)
        cand = np.flatnonzero(clip.face & (np.abs(np.arange(len(clip)) - f) >= 5))
        dist = pose_distance(jaw_pose(lm)[f:f + 1], jaw_pose(lm)[cand])[0]
        pool = cand[np.argsort(dist, kind="stable")[:max(1, int(len(cand) * MATCH_POOL))]]
        gap = mouth_gap(lm)
        assert r in pool and r != f
        assert np.abs(gap[r] - gap[f]) <= np.sort(np.abs(gap[pool] - gap[f]))[MATCH_DRAW - 1] + 1e-12
        error["audio"].append(abs(clip.truth["opening"][r] - clip.truth["opening"][f]))
        y = random[i]
        truth = random.clips[int(y["clip"])].truth["opening"]
        error["random"].append(abs(truth[int(y["ref_frame"])] - truth[int(y["frame"])]))
    assert np.mean(error["audio"]) < 0.5 * np.mean(error["random"])


def test_audio_references_are_warped_onto_the_targets_eyes_and_nose(root):
    """As infer.py shows the "audio" rule's reference (lipsync.align): the reference crop moved by the similarity
    that takes its eyes and nose onto the target's; the other rules show the crop as it is."""
    from lipsync.align import reference_maps, warp
    ds = Stage1Dataset(root, "train", seed=0, sample="audio", length=40)
    moves = []
    for i in range(40):
        x = ds[i]
        ci, f, r = int(x["clip"]), int(x["frame"]), int(x["ref_frame"])
        clip = ds.clips[ci]
        maps = reference_maps(*(to_crop_coords(clip.landmarks[[k]], clip.boxes[[k]], 64) for k in (r, f)))
        expect = warp(torch.from_numpy(ds.images(ci, [r])), maps, 64)[0]
        torch.testing.assert_close(x["reference"], expect, atol=1e-6, rtol=0)
        moves.append(np.abs(maps[0] - np.eye(2, 3)).max())
    assert max(moves) > 0.05  # the synthetic faces move within their boxes, so the warp does something
    x = Stage1Dataset(root, "train", seed=0, sample="random", length=1)[0]
    ci, r = int(x["clip"]), int(x["ref_frame"])
    np.testing.assert_array_equal(x["reference"].numpy(), ds.images(ci, [r])[0])


def test_audio_references_with_a_closed_share_draw_that_share_as_closed_pose_does(root):
    """--audio_closed: that share of the audio rule's training references are closed-mouthed frames of similar pose
    (the closed_pose draw), so the audio alone must open the mouth there; the rest keep the target's own gap."""
    from lipsync.references import closed_frames
    every = Stage1Dataset(root, "train", seed=0, sample="audio", length=100, closed_share=1.0)
    some = Stage1Dataset(root, "train", seed=0, sample="audio", length=300, closed_share=0.5)
    never = Stage1Dataset(root, "train", seed=0, sample="audio", length=300)

    def closed_refs(ds, n):
        out = []
        for i in range(n):
            x = ds[i]
            clip = ds.clips[int(x["clip"])]
            out.append(closed_frames(to_crop_coords(clip.landmarks, clip.boxes, 256), clip.face)[int(x["ref_frame"])])
        return np.mean(out)
    assert closed_refs(every, 100) == 1.0
    base = closed_refs(never, 300)
    assert base + 0.3 < closed_refs(some, 300) < 1.0


def test_mel_is_the_frame_window_plus_context_and_floor_outside(root):
    ds = Stage1Dataset(root, "train", seed=0, mel_context=4)
    ci = [c.name for c in ds.clips].index("train_0001")
    mel = log_mel(ds.clips[ci].wave, dynamic_floor=False)
    for f in (0, 1, 30, 74):
        span = ds.audio(ci, f)  # steps [2f - 4 - 4, 2f + 6 + 4) -> mel frames [4f - 16, 4f + 20)
        lo = 4 * f - 16
        for j in range(36):
            expect = mel[:, lo + j] if 0 <= lo + j < mel.shape[1] else torch.full((80,), float(mel.min()))
            assert torch.allclose(span[:, j], expect)


def test_stage2_shapes_sync_span_and_mouth_box_contains_the_lips(root):
    ds = Stage2Dataset(root, "train", T=8, seed=0)
    assert len(ds) == sum(len(s) for s in ds.starts) // 8
    for i in range(20):
        item = ds[i]
        assert item["target"].shape == item["reference"].shape == item["masked"].shape == (8, 3, 64, 64)
        assert item["mel"].shape == (8, 80, 36) and item["sync_mel"].shape == (80, 32)
        ci, frames = int(item["clip"]), item["frame"].numpy()
        assert np.array_equal(frames, np.arange(frames[0], frames[0] + 8))
        clip = ds.clips[ci]
        assert clip.face[frames].all()
        assert torch.allclose(item["sync_mel"], ds.mel_span(ci, 4 * frames[0], 4 * frames[0] + 32))
        lips = to_crop_coords(clip.landmarks[frames, 48:68], clip.boxes[frames], 64)
        box = item["mouth_box"].numpy()
        assert (lips[..., 0] >= box[:, None, 0]).all() and (lips[..., 0] <= box[:, None, 2]).all()
        assert (lips[..., 1] >= box[:, None, 1]).all() and (lips[..., 1] <= box[:, None, 3]).all()
        assert ((box[:, 2] - box[:, 0]) < 40).all()  # a mouth box, not the whole crop


def test_crop_size_resizes_images_and_mouth_box(root):
    ds = Stage2Dataset(root, "val", T=4, crop_size=32, seed=0)
    item = ds[0]
    assert item["target"].shape == (4, 3, 32, 32) and (item["masked"][:, :, 16:] == -1).all()
    assert item["mouth_box"].max() <= 32 and item["mouth_box"][:, 2].min() > 16


def test_whisper_features_give_time_major_then_layer_tokens(root):
    L = 5
    for name in ("heldout_0000", "heldout_0001"):
        steps = 150  # 3 s at 50 steps/s
        t = np.arange(steps)[:, None, None] + np.zeros((1, L, 384))
        layer = np.arange(L)[None, :, None] + np.zeros((steps, 1, 384))
        np.save(root / name / "whisper.npy", (1000 * (t + 1) + layer).astype(np.float32))
    ds = Stage1Dataset(root, "val", seed=0, features="whisper")
    for f in (0, 40):
        tokens = ds.audio(0, f)
        assert tokens.shape == (10 * L, 384)
        for row in range(10 * L):
            step, layer = 2 * f - 4 + row // L, row % L
            expect = 0.0 if step < 0 else 1000.0 * (step + 1) + layer
            assert (tokens[row] == expect).all()
    assert "audio" in ds[0] and "mel" not in ds[0]


def clip30(root, tmp_path):
    """A copy of a held-out clip that says it runs at 30 fps: tmp_path / "clip30"."""
    shutil.copytree(root / "heldout_0001", tmp_path / "clip30")
    meta = json.loads((tmp_path / "clip30" / "meta.json").read_text())
    meta["fps"] = 30.0
    (tmp_path / "clip30" / "meta.json").write_text(json.dumps(meta))


def test_fps_other_than_25_uses_time_not_frame_counts(root, tmp_path):
    clip30(root, tmp_path)
    ds = Stage2Dataset([tmp_path / "clip30"], None, T=6, seed=0, mel_context=0)
    item = ds[0]
    f0 = int(item["frame"][0])
    assert item["sync_mel"].shape == (80, 20)  # 6 frames at 30 fps = 0.2 s = 20 mel frames
    assert torch.allclose(item["sync_mel"], ds.mel_span(0, round(f0 * 100 / 30), round(f0 * 100 / 30) + 20))
    n = math.ceil(50 / 30) * 5  # steps per window
    assert item["mel"].shape == (6, 80, 2 * n)


# ----------------------------------------------------------------------------- item content, frame by frame


def image(clip, f):
    """Crop f of a clip as the model sees it: (3, S, S) float in [-1, 1]."""
    return torch.from_numpy(np.array(clip.crops[f])).permute(2, 0, 1).float() / 127.5 - 1


_MELS = {}


def mel_frames(clip, lo, hi):
    """log-mel frames [lo, hi) of the clip's audio (100 per second), the file's minimum outside it."""
    if clip.path not in _MELS:
        _MELS[clip.path] = log_mel(clip.wave, dynamic_floor=False)
    mel = _MELS[clip.path]
    return torch.stack([mel[:, j] if 0 <= j < mel.shape[1] else torch.full((80,), float(mel.min()))
                        for j in range(lo, hi)], 1)


def test_stage1_item_holds_its_target_frame_its_reference_frame_and_its_own_audio(root):
    ds = Stage1Dataset(root, "train", seed=0, mel_context=4)
    for i in range(12):
        item = ds[i]
        clip = ds.clips[int(item["clip"])]
        f, r = int(item["frame"]), int(item["ref_frame"])
        assert torch.equal(item["target"], image(clip, f))
        assert torch.equal(item["reference"], image(clip, r)) and r != f
        assert not torch.equal(item["reference"], item["target"])
        # 25 fps: steps [2f - 4, 2f + 6) + 4 steps of context each side = mel frames [4f - 16, 4f + 20)
        assert torch.allclose(item["mel"], mel_frames(clip, 4 * f - 16, 4 * f + 20)), (i, f)


def test_stage2_frames_are_consecutive_and_each_has_its_own_crop_reference_and_audio(root):
    T = 5
    ds = Stage2Dataset(root, "train", T=T, seed=1, mel_context=4)
    for i in range(6):
        item = ds[i]
        clip = ds.clips[int(item["clip"])]
        frames, refs = item["frame"].tolist(), item["ref_frame"].tolist()
        assert frames == list(range(frames[0], frames[0] + T))
        for t, (f, r) in enumerate(zip(frames, refs)):
            assert torch.equal(item["target"][t], image(clip, f))
            assert torch.equal(item["reference"][t], image(clip, r)) and abs(r - f) >= 5
            assert torch.allclose(item["mel"][t], mel_frames(clip, 4 * f - 16, 4 * f + 20)), (i, t)
        # the SyncNet's mel covers exactly the T frames: 4 mel frames per video frame at 25 fps
        assert torch.allclose(item["sync_mel"], mel_frames(clip, 4 * frames[0], 4 * frames[0] + 4 * T))


def test_stage2_audio_at_30_fps_follows_each_frames_time(root, tmp_path):
    clip30(root, tmp_path)
    ds = Stage2Dataset([tmp_path / "clip30"], None, T=6, seed=0, mel_context=1)
    clip = ds.clips[0]
    for i in range(4):
        item = ds[i]
        frames = item["frame"].tolist()
        for t, f in enumerate(frames):
            s0 = math.floor(f * 50 / 30) - 2 * 2  # ceil(50 / 30) = 2 steps per frame, 2 frames of left context
            assert torch.allclose(item["mel"][t], mel_frames(clip, 2 * (s0 - 1), 2 * (s0 + 10 + 1))), (f, t)
        lo = round(frames[0] * 100 / 30)
        assert torch.allclose(item["sync_mel"], mel_frames(clip, lo, lo + 20))
