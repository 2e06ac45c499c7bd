import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipsync.tools import puppet as P
from lipsync.tools.metrics import LOWER_INNER, UPPER_INNER, lip_opening_68
from lipsync.training.data import load_clip
from lipsync.tools.synthetic import SR, frame_envelope
from lipsync.tracking import to_crop_coords


@pytest.fixture(scope="module")
def clip(source):
    return P.make_puppet_clip(source, 0, "train", seconds=4.0, size=64, seed=0)


def _source_crops(source, frames, size):
    crops = torch.from_numpy(np.load(source / "crops.npy")[frames]).permute(0, 3, 1, 2)
    crops = F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return crops.permute(0, 2, 3, 1).numpy()


def test_cli_writes_loadable_clips_with_disjoint_speakers(source, tmp_path):
    P.main([str(source), "--out", str(tmp_path), "--clips", "3", "--seconds", "1.2", "--heldout", "0.34",
            "--workers", "1"])
    names = sorted(d.name for d in tmp_path.iterdir())
    assert names == ["demo_heldout_0000", "demo_train_0000", "demo_train_0001"]
    speakers = {}
    for name in names:
        c = load_clip(tmp_path / name)
        n = c.meta["frames"]
        assert c.meta["tracker"] == "puppet" and c.meta["split"] == name.split("_")[1] and c.meta["size"] == [608, 352]
        assert c.crops.shape == (n, 64, 64, 3) == (30, 64, 64, 3) and len(c.wave) == round(n / c.fps * SR)
        assert c.truth["opening"].shape == c.truth["width"].shape == (n,) and c.face.all()
        assert np.isfinite(c.landmarks).all() and c.landmarks.shape == (n, 68, 2)
        with np.load(source / "track.npz") as t:  # boxes are the source's, frame by frame
            assert np.array_equal(c.boxes, t["boxes"][c.meta["source_frames"]])
        speakers[name] = c.meta["speaker"]
    assert speakers["demo_heldout_0000"] not in {speakers["demo_train_0000"], speakers["demo_train_0001"]}
    assert len(set(speakers.values())) == 3


def test_landmark_opening_and_dark_mouth_height_follow_the_truth(clip):
    lm = to_crop_coords(clip["landmarks"], clip["boxes"], 64)
    truth = clip["opening"]
    r_lm = np.corrcoef(lip_opening_68(lm), truth)[0, 1]
    r_dark = np.corrcoef(P.dark_mouth_height(clip["crops"], lm), truth)[0, 1]
    print(f"r(truth, landmark opening) {r_lm:.4f}, r(truth, dark mouth height) {r_dark:.3f}")
    assert r_lm > 0.99 and r_dark > 0.8
    assert truth.min() < 0.02 and truth.max() > 0.8


def test_upper_half_is_the_source_crop_unchanged_and_the_lower_half_moves(source, clip):
    ref = _source_crops(source, clip["frames"], 64)
    assert np.array_equal(clip["crops"][:, :32], ref[:, :32])
    diff = np.abs(clip["crops"][:, 32:].astype(int) - ref[:, 32:]).mean((1, 2, 3))
    assert np.corrcoef(diff, clip["opening"])[0, 1] > 0.8 and diff[clip["opening"] > 0.8].min() > 3


def test_closed_unrounded_mouth_is_the_source_and_opening_moves_lips_and_chin(source):
    crops, track = np.load(source / "crops.npy"), np.load(source / "track.npz")
    frames = np.array([3, 3, 3])
    lm = to_crop_coords(track["landmarks"][frames], track["boxes"][frames], 256)
    out, dst = P.puppet_crops(crops[frames], lm, np.array([0.0, 1.0, 1.0], np.float32),
                              np.array([0.0, 0.0, 1.0], np.float32))
    assert np.abs(out[0].astype(int) - crops[3]).max() <= 1  # no opening, no rounding: identity warp
    assert np.abs(dst[0] - lm[0]).max() < 1e-4
    down = dst[1] - lm[1]
    assert down[66, 1] > 10 and down[8, 1] > 4 and -8 < down[62, 1] < 0  # lower lip and chin down, upper lip up
    assert np.abs(down[:2]).max() == 0 and np.abs(down[17:48]).max() == 0  # ears, brows, nose, eyes stay
    width = lambda l: l[54, 0] - l[48, 0]
    assert width(dst[2]) < 0.8 * width(dst[1])  # rounded lips are narrower
    mouth = out[1, 185:215, 85:125].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert (mouth < 60).mean() > 0.2  # a dark interior where the lips parted


def test_audio_envelope_follows_the_opening(clip):
    env = frame_envelope(clip["wave"], len(clip["opening"]), clip["fps"])
    assert np.corrcoef(env, clip["opening"])[0, 1] > 0.6


def test_landmark_opening_ignores_scale_roll_and_translation(source):
    with np.load(source / "track.npz") as t:
        lm = t["landmarks"][:5].astype(np.float64)
    a = np.radians(20)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = 2.5 * lm @ rot.T + np.array([100.0, -40.0])
    np.testing.assert_allclose(lip_opening_68(moved), lip_opening_68(lm), atol=1e-5)
    closed = lm.copy()
    closed[:, LOWER_INNER] = closed[:, UPPER_INNER]
    assert np.abs(lip_opening_68(closed)).max() < 1e-6


def test_pingpong_walks_back_and_forth():
    assert P.pingpong(4, 10).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert P.pingpong(4, 4, start=5).tolist() == [1, 0, 1, 2]
    assert P.pingpong(1, 3).tolist() == [0, 0, 0]


def test_mediapipe_sees_the_puppeted_mouth_open_and_close(source):
    pytest.importorskip("mediapipe")
    from lipsync.tracking import MeshTracker, track_landmarks

    clip = P.make_puppet_clip(source, 1, "train", seconds=3.0, size=256, seed=0)
    tracker = MeshTracker()
    try:
        lm, found = track_landmarks(clip["crops"], tracker)
    finally:
        tracker.close()
    assert found.mean() > 0.95
    measured = lip_opening_68(lm[found])
    r = np.corrcoef(measured, clip["opening"][found])[0, 1]
    print(f"r(truth, mediapipe opening on 256 px puppet crops) {r:.3f}")
    assert r > 0.8


def test_speech_opening_maps_loudness_in_db():
    fps, n = 25.0, 50
    level = np.repeat([0.0, 0.01, 10 ** -0.5, 1.0, 10 ** -0.5], 10)  # 10 frames each: silence, -40, -10, 0, -10 dB
    wave = np.repeat(level, SR // 25) * np.where(np.arange(n * SR // 25) % 2, 1.0, -1.0)  # RMS = level
    o = P.speech_opening(wave, n, fps)
    middle = [5, 15, 25, 35, 45]  # frames whose 40 ms window lies in one level
    np.testing.assert_allclose(o[middle], [0, 0, 0.5, 1, 0.5], atol=1e-6)  # p95 = 1: -20 dB and below closed


def test_speech_clips_speak_a_window_of_a_recording_and_the_mouth_follows_its_loudness(source, tmp_path):
    rng = np.random.default_rng(0)
    syllables = np.repeat(rng.uniform(0, 1, 40) ** 2, SR // 10)  # 4 s of 100 ms loudness steps
    speech = (syllables * rng.standard_normal(len(syllables))).astype(np.float32)  # noise: one best alignment
    short = speech[:SR]  # 1 s: too short for a 2 s clip, never used
    clip = P.make_puppet_clip(source, 0, "train", seconds=2.0, size=64, seed=0, speech=[short, speech])
    n, wave = len(clip["opening"]), clip["wave"]
    assert len(wave) == 2 * SR and clip["speaker"] == P.speaker_id(0, "train") + P.VOICE_BASE
    # the clip's sound is a window of the recording, rescaled
    c = np.correlate(speech, wave[:SR // 4], "valid")  # the first quarter second, slid along the recording
    start = int(np.argmax(c))
    np.testing.assert_allclose(wave / np.abs(wave).max(), speech[start:start + 2 * SR] /
                               np.abs(speech[start:start + 2 * SR]).max(), atol=1e-5)
    np.testing.assert_allclose(clip["opening"], P.speech_opening(wave, n, clip["fps"]), atol=1e-6)
    lm = to_crop_coords(clip["landmarks"], clip["boxes"], 64)
    assert np.corrcoef(clip["opening"], lip_opening_68(lm))[0, 1] > 0.95  # the drawn mouth opens as the truth says
    with pytest.raises(ValueError, match="shorter than a clip"):
        P.make_puppet_clip(source, 0, "train", seconds=2.0, size=64, seed=0, speech=[short])


def test_cli_refuses_a_missing_speech_file_before_writing(source, tmp_path):
    with pytest.raises(SystemExit) as e:
        P.main([str(source), "--out", str(tmp_path / "out"), "--speech", str(tmp_path / "nope.wav")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
