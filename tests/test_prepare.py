import itertools
import json
import sys

import numpy as np
import pytest
import soundfile as sf

from lipsync.training import prepare as P
from lipsync import tracking as T
from lipsync.video import iter_frames, read_video, resample_indices, write_video
from media import SPEECH_48K, VIDEO

BBOX = "30,20,98,80"  # brows-to-chin box inside the 96x128 test frames


def make_frame(h, w, k=0):
    grad = np.linspace(0, 90, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    return np.clip(grad + 9 * k, 0, 255).repeat(3, axis=2).astype(np.uint8)


def make_video(path, n=15, fps=30.0, audio=True, h=96, w=128):
    frames = [make_frame(h, w, k) for k in range(n)]
    wave = 0.3 * np.sin(np.arange(16000 * 2) / 7.0).astype(np.float32) if audio else None
    write_video(path, frames, fps, audio=wave)
    return path


def test_prepare_writes_the_spec_layout_with_one_crop_per_frame(tmp_path):
    video = make_video(tmp_path / "talk.mp4", n=15, fps=30.0)
    r = P.prepare_clip(video, tmp_path / "out", fps=25, bbox=T.parse_bbox(BBOX), crop_size=32, progress=False)
    clip = tmp_path / "out" / "talk"
    assert r.path == clip and not r.skipped and r.frames == 13 and r.no_face == 0  # 15 frames at 30 -> 13 at 25
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["talk"]  # no .partial left behind
    assert sorted(p.name for p in clip.iterdir()) == ["audio.wav", "crops.npy", "meta.json", "track.npz"]

    meta = json.loads((clip / "meta.json").read_text())
    assert meta["version"] == 1 and meta["fps"] == 25.0 and meta["frames"] == 13 and meta["size"] == [96, 128]
    assert meta["crop_size"] == 32 and meta["tracker"] == "bbox" and meta["audio"] == "audio.wav"
    assert meta["sr"] == 16000 and meta["source"] == str(video.resolve())

    crops = np.load(clip / "crops.npy")
    track = np.load(clip / "track.npz")
    assert crops.shape == (13, 32, 32, 3) and crops.dtype == np.uint8
    assert track["boxes"].shape == (13, 4) and track["boxes"].dtype == np.float32
    assert track["landmarks"].shape == (13, 68, 2) and track["landmarks"].dtype == np.float32
    assert track["face"].shape == (13,) and track["face"].dtype == bool and track["face"].all()
    wave, sr = sf.read(clip / "audio.wav")
    assert sr == 16000 and wave.ndim == 1 and len(wave) == 13 * 640  # exactly N / fps seconds

    frames, _ = read_video(video)
    idx = resample_indices(15, 30.0, 25.0)
    expected = T.crop_faces(frames[idx], track["boxes"], 32)
    assert np.abs(crops.astype(int) - expected).max() <= 1  # crop j comes from the nearest source frame


def test_a_photo_gives_a_one_frame_silent_clip(tmp_path):
    import imageio.v3 as iio
    photo = tmp_path / "me.jpg"
    iio.imwrite(photo, make_frame(96, 128))
    r = P.prepare_clip(photo, tmp_path / "out", bbox=T.parse_bbox(BBOX), crop_size=16, progress=False)
    assert r.frames == 1 and json.loads((r.path / "meta.json").read_text())["frames"] == 1
    wave, _ = sf.read(r.path / "audio.wav")
    assert len(wave) == 640 and not wave.any()  # one silent frame at 25 fps


def test_fps_zero_keeps_the_source_rate_of_a_12_5_fps_video(tmp_path):
    video = make_video(tmp_path / "slow.mp4", n=10, fps=12.5)
    r = P.prepare_clip(video, tmp_path / "out", fps=0, bbox=T.parse_bbox(BBOX), crop_size=16, progress=False)
    meta = json.loads((r.path / "meta.json").read_text())
    assert meta["fps"] == 12.5 and meta["frames"] == 10 and meta["source_fps"] == 12.5
    assert len(sf.read(r.path / "audio.wav")[0]) == 10 * 1280
    r25 = P.prepare_clip(video, tmp_path / "out25", fps=25, bbox=T.parse_bbox(BBOX), crop_size=16, progress=False)
    assert r25.frames == 20  # each source frame shown twice


def test_rerun_skips_finished_clips_and_redoes_interrupted_ones(tmp_path, capsys):
    videos = [str(make_video(tmp_path / f"{name}.mp4", n=6)) for name in "abc"]
    out = tmp_path / "out"
    common = ["--out", str(out), "--bbox", BBOX, "--crop-size", "16"]
    assert P.main([videos[0]] + common) == 0
    done = (out / "a" / "meta.json").stat().st_mtime_ns
    (out / ".b.partial").mkdir()  # crashed while preparing b
    (out / ".b.partial" / "crops.npy").write_bytes(b"junk")
    (out / "c").mkdir()  # a clip folder without meta.json is incomplete
    (out / "c" / "crops.npy").write_bytes(b"junk")

    assert P.main(videos + common) == 0
    assert (out / "a" / "meta.json").stat().st_mtime_ns == done  # finished clip untouched
    assert "a: already prepared, skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]
    for name in "bc":
        assert (out / name / "meta.json").is_file()
        assert np.load(out / name / "crops.npy").shape == (5, 16, 16, 3)


def test_crash_midway_leaves_no_clip_that_passes_as_complete(tmp_path, monkeypatch):
    video = make_video(tmp_path / "v.mp4", n=8)
    calls = itertools.count()

    def crash_on_third(frame, box, size, **kwargs):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return T.crop_face(frame, box, size, **kwargs)

    monkeypatch.setattr(P, "crop_face", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_clip(video, tmp_path / "out", bbox=T.parse_bbox(BBOX), crop_size=16, progress=False)
    assert not (tmp_path / "out" / "v").exists() and (tmp_path / "out" / ".v.partial").is_dir()

    monkeypatch.setattr(P, "crop_face", T.crop_face)
    r = P.prepare_clip(video, tmp_path / "out", bbox=T.parse_bbox(BBOX), crop_size=16, progress=False)
    assert (r.path / "meta.json").is_file() and not (tmp_path / "out" / ".v.partial").exists()


def test_cli_without_mediapipe_says_install_it_or_pass_bbox(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "mediapipe" or m.startswith("mediapipe.")] + ["mediapipe"]:
        monkeypatch.setitem(sys.modules, name, None)
    video = str(make_video(tmp_path / "v.mp4", n=4))
    assert P.main([video, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert 'pip install mediapipe==0.10.21 "numpy<2"' in err and "--bbox" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "v").exists()
    assert P.main([video, "--out", str(tmp_path / "out"), "--bbox", BBOX, "--crop-size", "16"]) == 0


def test_cli_reports_a_video_without_audio_in_one_line(tmp_path, capsys):
    video = str(make_video(tmp_path / "mute.mp4", n=4, audio=False))
    assert P.main([video, "--out", str(tmp_path / "out"), "--bbox", BBOX]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no audio stream" in err[0] and "--audio" in err[0]
    assert not (tmp_path / "out" / "mute").exists()


def test_mediapipe_clip_flags_blank_frames_and_keeps_one_crop_per_frame(tmp_path):
    pytest.importorskip("mediapipe")
    frames = list(itertools.islice(iter_frames(VIDEO), 12))  # 352x608
    frames[5:5] = [np.full_like(frames[0], 128)] * 2  # two frames with nobody in them
    write_video(tmp_path / "y.mp4", frames, 25.0)
    r = P.prepare_clip(tmp_path / "y.mp4", tmp_path / "out", audio=SPEECH_48K, crop_size=64,
                       progress=False)
    track = np.load(r.path / "track.npz")
    assert r.frames == 14 and r.no_face == 2
    assert track["face"].tolist() == [True] * 5 + [False] * 2 + [True] * 7
    assert np.array_equal(track["landmarks"][5], track["landmarks"][4])  # nearest frame with a face
    assert np.load(r.path / "crops.npy").shape == (14, 64, 64, 3)
    nose = T.to_crop_coords(track["landmarks"], track["boxes"], 64)[:, 29]
    assert np.abs(nose[:, 1] - 32).max() < 2.0  # smoothed boxes keep the nose point near the midline
    assert len(sf.read(r.path / "audio.wav")[0]) == 14 * 640  # the 2.5 s wav trimmed to the clip


class JitteryTracker:
    """The template face shaking by up to 4 px from frame to frame: a stand-in for mediapipe on a moving head."""
    name = "jittery"

    def __init__(self):
        rng = np.random.default_rng(0)
        self.landmarks = iter(T.template_landmarks(T.parse_bbox(BBOX)) + rng.uniform(-4, 4, (100, 1, 2)))

    def __call__(self, frame):
        return next(self.landmarks).astype(np.float32)

    def close(self):
        pass


def test_cli_smooth_0_keeps_each_frames_own_box_and_the_default_smooths_square_crops(tmp_path, monkeypatch):
    """--smooth 0 is a value, not "not given": the written boxes are each frame's own crop box."""
    video = make_video(tmp_path / "talk.mp4", n=10, fps=25.0)
    monkeypatch.setattr(P, "MeshTracker", JitteryTracker)
    jitter = {}
    for name, extra in (("off", ["--smooth", "0"]), ("default", [])):
        assert P.main([str(video), "--out", str(tmp_path / name), "--crop-size", "16"] + extra) == 0
        track = np.load(tmp_path / name / "talk" / "track.npz")
        own = T.crop_box(track["landmarks"])  # (10, 4): each frame's box from its own landmarks
        jitter[name] = np.abs(np.diff(track["boxes"][:, :2], axis=0)).max()
        meta = json.loads((tmp_path / name / "talk" / "meta.json").read_text())
        if name == "off":
            np.testing.assert_allclose(track["boxes"], own, atol=1e-4)
            assert meta["smooth_sigma"] == 0
        else:
            assert meta["smooth_sigma"] == 2.0
    assert jitter["off"] > 3 and jitter["default"] < 0.5 * jitter["off"]
