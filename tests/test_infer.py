import dataclasses
import itertools
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import infer
from lipsync import pipeline as P
from lipsync import avatar as A
from lipsync import track as T
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.checkpoint import export
from lipsync.model import build
from lipsync.tracking import INSTALL_HINT, BoxTracker, MediapipeMissing, crop_box, parse_bbox, pixel_box
from lipsync.tracking import musetalk_box, template_landmarks
from lipsync.unet import UNetConfig
from lipsync.vae import VAEConfig
from lipsync.video import ffmpeg_exe, iter_frames, read_video, write_video
from media import SPEECH, VIDEO

BBOX = "55,78,115,131"  # brows-to-chin box of the face in yongen.mp4 scaled to 176 x 304
FPS = 25.0
PING_PONG = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]  # 25 frames from 12


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(seed):
    torch.manual_seed(seed)
    return build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny checkpoint, a 12-frame talking-head clip (silent) and 1 s of speech."""
    d = tmp_path_factory.mktemp("infer")
    model = tiny_model(0)
    export(model, d / "tiny.pt")
    frames = np.stack(list(itertools.islice(iter_frames(VIDEO), 12)))
    x = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=(304, 176), mode="bilinear",
                      antialias=True)
    write_video(d / "clip.mp4", x.permute(0, 2, 3, 1).contiguous().numpy(), FPS)
    wave, sr = sf.read(SPEECH, dtype="float32")
    sf.write(d / "speech.wav", wave[3 * sr: 4 * sr], sr)  # 1.0 s -> 25 frames: the 12 frames ping-pong
    sf.write(d / "short.wav", wave[3 * sr: 3 * sr + sr // 5], sr)  # 0.2 s
    clip, _ = read_video(d / "clip.mp4")
    return {"dir": d, "model": model, "ckpt": d / "tiny.pt", "video": d / "clip.mp4", "audio": d / "speech.wav",
            "short": d / "short.wav", "frames": clip, "wave": torch.from_numpy(wave[3 * sr: 4 * sr])}


@pytest.fixture(scope="module")
def avatar(files):
    track = T.track_frames(files["frames"], BoxTracker(parse_bbox(BBOX)))
    return P.prepare_avatar(files["frames"], FPS, track, files["model"], batch_size=8)


def run_cli(argv, capsys):
    code = infer.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def probe(path):
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


def nearest_source(frame, sources, keep):
    """Index of the source frame most like `frame` on the pixels `keep` (neighbouring frames of the clip differ by
    ~46 dB there, so a fixed PSNR threshold cannot tell them apart; the best match can)."""
    return int(np.argmax([psnr(frame[keep], s[keep]) for s in sources]))


def face_box_lower_half_excluded(shape):
    lm = template_landmarks(parse_bbox(BBOX))
    x0, y0, w, h = pixel_box(crop_box(lm))
    keep = np.ones(shape, bool)
    keep[y0 + h // 2: y0 + h, x0: x0 + w] = False  # everything but the lower half of the face box
    return keep


def whole_mask(avatar, i):
    m = np.zeros(avatar.frames.shape[1:3], np.float32)
    t, left, b, r = avatar.blends[i].rect
    m[t:b, left:r] = avatar.blends[i].mask
    return m


# ----------------------------------------------------------------------------- the CLI


def test_cli_writes_h264_aac_at_source_size_and_fps_with_the_audio_length_and_ping_pong(files, capsys):
    out = files["dir"] / "out" / "dubbed.mp4"
    code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", files["ckpt"],
                         "--bbox", BBOX, "--out", out], capsys)
    assert code == 0, err
    text = probe(out)
    streams = [s for s in text.splitlines() if "Stream #" in s]
    assert len(streams) == 2
    assert sum(" Video: h264" in s for s in streams) == 1 and sum(" Audio: aac" in s for s in streams) == 1
    assert " 176x304" in text and " 25 fps" in text
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([0-9.]+)", text).groups()
    assert hours == minutes == "00" and abs(float(seconds) - 1.0) <= 1 / FPS

    frames, fps = read_video(out)
    assert fps == FPS and frames.shape == (25, 304, 176, 3)  # floor(1.0 s * 25 fps)
    src = files["frames"]
    lm = template_landmarks(parse_bbox(BBOX))
    x0, y0, w, h = pixel_box(crop_box(lm))
    keep = np.ones(frames.shape[1:3], bool)
    keep[y0 + h // 2: y0 + h, x0: x0 + w] = False  # everything but the lower half of the face box
    for i, j in enumerate(PING_PONG):  # h264 both ways: >= 40 dB in every frame, not only on average
        assert psnr(frames[i][keep], src[j][keep]) >= 40.0, i
    assert [nearest_source(f, src, keep) for f in frames] == PING_PONG


def test_still_image_becomes_a_video_at_the_requested_fps(files, capsys, tmp_path):
    import imageio.v3 as iio
    rgba = np.concatenate([files["frames"][0], np.full((304, 176, 1), 255, np.uint8)], axis=2)
    iio.imwrite(tmp_path / "face.png", rgba)
    out = tmp_path / "still.mp4"
    code, err = run_cli(["--image", tmp_path / "face.png", "--audio", files["audio"], "--ckpt", files["ckpt"],
                         "--bbox", BBOX, "--fps", 10, "--out", out], capsys)
    assert code == 0, err
    frames, fps = read_video(out)
    assert fps == 10 and frames.shape == (10, 304, 176, 3)


def test_fps_resamples_a_video_to_the_requested_rate(files, capsys, tmp_path):
    out = tmp_path / "slow.mp4"
    code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", files["ckpt"],
                         "--bbox", BBOX, "--fps", 12.5, "--out", out], capsys)
    assert code == 0, err
    frames, fps = read_video(out)
    assert fps == 12.5 and frames.shape == (12, 304, 176, 3)  # floor(1.0 s * 12.5)
    keep = face_box_lower_half_excluded(frames.shape[1:3])
    src = files["frames"]  # 12 frames at 25 fps -> 6 at 12.5 fps (every other one), played forward then back
    expect = [0, 2, 4, 6, 8, 10, 10, 8, 6, 4, 2, 0]
    assert [nearest_source(f, src, keep) for f in frames] == expect


def test_avatar_mode_prepares_once_then_dubs_from_the_cache(files, capsys, tmp_path):
    avatar_dir = tmp_path / "avatars" / "clip"
    code, err = run_cli(["--prepare-avatar", files["video"], "--avatar", avatar_dir, "--ckpt", files["ckpt"],
                         "--bbox", BBOX], capsys)
    assert code == 0, err
    assert sorted(p.name for p in avatar_dir.parent.iterdir()) == ["clip"]  # no .partial left
    out = tmp_path / "from_avatar.mp4"
    code, err = run_cli(["--avatar", avatar_dir, "--audio", files["audio"], "--ckpt", files["ckpt"], "--out", out],
                        capsys)
    assert code == 0, err
    assert read_video(out)[0].shape == (25, 304, 176, 3)


def test_reference_flag_reaches_the_avatar_and_a_prepared_avatar_refuses_another_rule(files, capsys, tmp_path,
                                                                                     monkeypatch):
    """--reference auto takes the checkpoint's rule; an explicit rule overrides it; the avatar records the rule and
    generating from it with a different --reference stops with one line instead of silently using the old one."""
    import json
    picked = []
    real = P.prepare_avatar
    monkeypatch.setattr(infer, "prepare_avatar", lambda *a, **k: picked.append(k["reference"]) or real(*a, **k))
    model = tiny_model(0)
    model.reference = "closed_pose"
    export(model, tmp_path / "closed.pt")
    for ckpt, flag, rule in ((files["ckpt"], "auto", "self"), (tmp_path / "closed.pt", "auto", "closed_pose"),
                             (tmp_path / "closed.pt", "self", "self")):
        avatar_dir = tmp_path / f"av_{flag}_{rule}"
        code, err = run_cli(["--prepare-avatar", files["video"], "--avatar", avatar_dir, "--ckpt", ckpt, "--bbox",
                             BBOX, "--reference", flag], capsys)
        assert code == 0, err
        assert json.loads((avatar_dir / "avatar_info.json").read_text())["reference"] == rule
    assert picked == [None, None, "self"]  # None: prepare_avatar takes the model's own rule
    code, err = run_cli(["--avatar", tmp_path / "av_self_self", "--audio", files["audio"], "--ckpt",
                         tmp_path / "closed.pt", "--reference", "closed_pose", "--out", tmp_path / "x.mp4"], capsys)
    assert code == 1 and err.strip().startswith("error:") and "--reference self" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()


def test_no_source_detail_flag_turns_the_source_detail_off_and_it_is_on_by_default(files, capsys, tmp_path,
                                                                                  monkeypatch):
    seen = []
    real = infer.avatar_frames
    monkeypatch.setattr(infer, "avatar_frames", lambda *a, **k: seen.append(k["detail"]) or real(*a, **k))
    outs = [tmp_path / "kept.mp4", tmp_path / "soft.mp4"]
    for out, extra in zip(outs, ([], ["--no-source-detail"])):
        code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", files["ckpt"], "--bbox",
                             BBOX, "--out", out] + extra, capsys)
        assert code == 0, err
    assert seen == [True, False]
    assert not np.array_equal(read_video(outs[0])[0], read_video(outs[1])[0])


def test_a_checkpoints_restorer_is_used_by_default_and_no_restorer_turns_it_off(files, capsys, tmp_path, monkeypatch):
    """A checkpoint with a mouth restorer: infer.py runs it on every face (the test video's faces are pasted more than
    1.25x the 64 px crop) and the output differs from --no-restorer's, which never runs it."""
    from lipsync.restore import Restorer, RestorerConfig
    calls = []
    real = Restorer.forward
    monkeypatch.setattr(Restorer, "forward", lambda self, x: calls.append(len(x)) or real(self, x))
    model = tiny_model(0)
    model.restorer = Restorer(RestorerConfig(channels=8, blocks=1))
    torch.nn.init.normal_(model.restorer.tail.weight, std=0.2)
    export(model, tmp_path / "restored.pt")
    outs, counts = [tmp_path / "restored.mp4", tmp_path / "plain.mp4"], []
    for out, extra in zip(outs, ([], ["--no-restorer"])):
        calls.clear()
        code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", tmp_path / "restored.pt",
                             "--bbox", BBOX, "--out", out] + extra, capsys)
        assert code == 0, err
        counts.append(sum(calls))
    assert counts[0] == len(read_video(outs[0])[0]) and counts[1] == 0
    assert not np.array_equal(read_video(outs[0])[0], read_video(outs[1])[0])


def test_a_track_file_beside_the_video_replaces_face_tracking(files, capsys, tmp_path, monkeypatch):
    video = tmp_path / "tracked.mp4"
    video.write_bytes(files["video"].read_bytes())
    lm = np.repeat(template_landmarks(parse_bbox(BBOX))[None], 12, axis=0)
    np.savez(tmp_path / "tracked.mp4.track.npz", landmarks=lm, face=np.ones(12, bool), boxes=crop_box(lm))

    def no_mediapipe():
        raise AssertionError("tracker must not run when a track file is present")
    monkeypatch.setattr(infer, "MeshTracker", no_mediapipe)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["--video", video, "--audio", files["audio"], "--ckpt", files["ckpt"]], capsys)
    assert code == 0, err
    assert read_video(tmp_path / "results" / "tracked_speech.mp4")[0].shape == (25, 304, 176, 3)  # default --out


# ----------------------------------------------------------------------------- the generator API


def test_generated_frames_equal_their_ping_pong_source_exactly_outside_the_blend_mask(files, avatar):
    model = files["model"]
    windows = model.audio_windows(files["wave"], 25, FPS)
    frames = list(P.avatar_frames(model, avatar, windows, batch_size=5))
    assert len(frames) == 25
    for frame, j in zip(frames, PING_PONG):
        outside = whole_mask(avatar, j) == 0
        assert np.array_equal(frame[outside], files["frames"][j][outside])
        assert not np.array_equal(frame, files["frames"][j])  # the lower face was regenerated


def test_frames_without_a_face_pass_through_unchanged(files):
    model = files["model"]
    track = T.track_frames(files["frames"], BoxTracker(parse_bbox(BBOX)))
    track.face[[2, 3, 7]] = False
    av = P.prepare_avatar(files["frames"], FPS, track, model)
    frames = list(P.avatar_frames(model, av, model.audio_windows(files["wave"], 10, FPS), batch_size=4))
    for i in range(10):
        same = np.array_equal(frames[i], files["frames"][i])
        assert same == (i in (2, 3, 7))


def test_saved_avatar_gives_the_same_frames_as_the_in_memory_one(files, avatar, tmp_path):
    model = files["model"]
    A.save_avatar(avatar, tmp_path / "av")
    loaded = A.load_avatar(tmp_path / "av", model)
    windows = model.audio_windows(files["wave"], 25, FPS)
    for a, b in zip(P.avatar_frames(model, avatar, windows), P.avatar_frames(model, loaded, windows), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="different model"):
        A.load_avatar(tmp_path / "av", tiny_model(1))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an avatar folder"):
        A.save_avatar(avatar, tmp_path / "notes")  # never deletes a folder of other files
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


class ListTracker:
    """Landmarks from a list, one per frame: a stand-in for mediapipe."""
    name = "list"

    def __init__(self, landmarks):
        self.landmarks = iter(landmarks)

    def __call__(self, frame):
        return next(self.landmarks)

    def close(self):
        pass


@pytest.mark.parametrize("geometry", ["square", "musetalk"])
def test_smooth_0_turns_box_smoothing_off_and_other_values_and_the_defaults_reach_the_tracker(geometry):
    """--smooth 0 is a value, not "not given": each frame gets its own box (a jittery track stays jittery), with
    either crop geometry. --smooth 3 smooths; without --smooth, square crops are smoothed and MuseTalk's are not."""
    rng = np.random.default_rng(0)
    lm = template_landmarks(parse_bbox(BBOX)) + rng.uniform(-4, 4, (10, 1, 2)).astype(np.float32)  # head jitter
    frames = np.zeros((10, 304, 176, 3), np.uint8)

    def boxes(argv):
        opts = infer.box_options(infer.parse_args(argv), geometry)
        return T.track_frames(frames, ListTracker(lm), **opts).boxes

    def jitter(b):
        return np.abs(np.diff(b[:, :2], axis=0)).max()

    own = crop_box(lm) if geometry == "square" else musetalk_box(lm, 0, 10, 304)  # (10, 4), frame by frame
    assert jitter(own) > 3
    np.testing.assert_allclose(boxes(["--smooth", "0"]), own, atol=1e-4)
    assert jitter(boxes(["--smooth", "3"])) < 0.5 * jitter(own)
    if geometry == "square":
        assert jitter(boxes([])) < 0.5 * jitter(own)
    else:
        np.testing.assert_allclose(boxes([]), own, atol=1e-4)


def test_bbox_shift_moves_the_midline_of_a_precomputed_track_keeping_its_margin(tmp_path):
    lm = np.repeat(template_landmarks(parse_bbox(BBOX))[None], 5, axis=0)
    boxes = crop_box(lm, margin=5)
    np.savez(tmp_path / "t.npz", landmarks=lm, face=np.ones(5, bool), boxes=boxes)
    assert np.array_equal(T.read_track(tmp_path / "t.npz").boxes, boxes)
    shifted = T.read_track(tmp_path / "t.npz", bbox_shift=4).boxes
    np.testing.assert_allclose(shifted, crop_box(lm, bbox_shift=4, margin=5), atol=1e-4)


def test_streaming_audio_chunks_give_the_frames_of_the_whole_file(files, avatar):
    model = files["model"]
    wave = files["wave"]
    whole = list(P.avatar_frames(model, avatar, model.audio_windows(wave, 25, FPS), batch_size=4))
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(wave)), 30, replace=False))
    chunks = np.split(wave.numpy(), cuts)  # 31 chunks of random sizes
    windows = torch.cat(list(P.stream_windows(model, chunks, FPS)))
    torch.testing.assert_close(windows, model.audio_windows(wave, 25, FPS), atol=1e-5, rtol=0)
    streamed = list(P.stream_frames(model, avatar, chunks, batch_size=4))
    assert len(streamed) == len(whole) == 25
    diff = np.abs(np.stack(whole).astype(int) - np.stack(streamed))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3  # float rounding of the windows, nothing more


def test_static_batches_pad_every_model_call_to_the_batch_size_and_give_the_same_frames(files, avatar, monkeypatch):
    """avatar_frames(static=True), used with --compile: tails and no-face gaps are padded so shapes never change."""
    model = files["model"]
    windows = model.audio_windows(files["wave"], 25, FPS)
    face = avatar.track.face.copy()
    face[[2, 5, 6]] = False  # frames without a face inside a batch
    avatar = dataclasses.replace(avatar, track=dataclasses.replace(avatar.track, face=face))
    plain = np.stack(list(P.avatar_frames(model, avatar, windows, batch_size=4)))
    sizes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, w: sizes.append(len(x)) or forward(x, w))
    static = np.stack(list(P.avatar_frames(model, avatar, windows, batch_size=4, static=True)))
    assert set(sizes) == {4} and len(sizes) == 7  # 25 frames = 6 full batches + a tail of 1
    gaps = [i for i in range(25) if not avatar.track.face[avatar.source_index(i)]]
    assert gaps == [2, 5, 6, 17, 18, 21]  # ping-pong: they come back on the way back
    assert np.array_equal(static[gaps], np.stack([avatar.frames[avatar.source_index(i)] for i in gaps]))
    diff = np.abs(static.astype(int) - plain)
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3  # batch-size-dependent float rounding, nothing more


# ----------------------------------------------------------------------------- bad inputs


def one_frame_video(d):
    write_video(d / "one.mp4", np.zeros((1, 64, 64, 3), np.uint8), FPS)
    return d / "one.mp4"


def blank_with_track(d):
    video = d / "blank.mp4"
    write_video(video, np.full((6, 64, 64, 3), 128, np.uint8), FPS)
    lm = np.zeros((6, 68, 2), np.float32)
    np.savez(d / "blank.mp4.track.npz", landmarks=lm, face=np.zeros(6, bool), boxes=crop_box(lm))
    return video


def blank_video(d):
    pytest.importorskip("mediapipe")
    write_video(d / "grey.mp4", np.full((4, 96, 96, 3), 128, np.uint8), FPS)
    return d / "grey.mp4"


def corrupt_ckpt(d):
    (d / "bad.pt").write_bytes(b"\x80\x02not a checkpoint" * 100)
    return d / "bad.pt"


def unwritable(d):
    (d / "file").write_text("a file, not a folder")
    return d / "file" / "out.mp4"


BAD = {  # name -> (what to override, expected words in the error)
    "missing video": (lambda f, d: {"--video": d / "nope.mp4"}, "not found"),
    "missing audio": (lambda f, d: {"--audio": d / "nope.wav"}, "not found"),
    "missing checkpoint": (lambda f, d: {"--ckpt": d / "nope.pt"}, "not found"),
    "audio file without audio": (lambda f, d: {"--audio": f["video"]}, "no audio stream"),
    "0.2 s audio": (lambda f, d: {"--audio": f["short"]}, "at least 0.5 s"),
    "1-frame video": (lambda f, d: {"--video": one_frame_video(d)}, "--image"),
    "no face in any frame": (lambda f, d: {"--video": blank_with_track(d), "--bbox": None}, "no face"),
    "no face found by mediapipe": (lambda f, d: {"--video": blank_video(d), "--bbox": None}, "no face"),
    "corrupt checkpoint": (lambda f, d: {"--ckpt": corrupt_ckpt(d)}, "cannot read checkpoint"),
    "unwritable output folder": (lambda f, d: {"--out": unwritable(d)}, "cannot write"),
    "mediapipe missing": (lambda f, d: {"--bbox": None}, "pip install mediapipe"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_error_line_nonzero_exit_and_no_output(case, files, capfd, tmp_path, monkeypatch):
    def missing():
        raise MediapipeMissing(INSTALL_HINT)
    if case != "no face found by mediapipe":
        monkeypatch.setattr(infer, "MeshTracker", missing)
    make, words = BAD[case]
    args = {"--video": files["video"], "--audio": files["audio"], "--ckpt": files["ckpt"], "--bbox": BBOX,
            "--out": tmp_path / "out" / "x.mp4"}
    args.update(make(files, tmp_path))
    argv = [str(v) for k, val in args.items() if val is not None for v in (k, val)]
    code, err = run_cli(argv, capfd)  # capfd: also what native libraries write to fd 2
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_no_arguments_runs_the_bundled_demo_or_names_the_missing_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a checkout without assets/
    code, err = run_cli([], capsys)
    assert code != 0 and err.count("\n") == 1 and "assets/demo.pt" in err and "bundled demo" in err
    assert not (tmp_path / "results" / "demo.mp4").exists()


# ----------------------------------------------------------------------------- what inference puts inside the mask


def test_face_vae_round_trip_equals_the_vaes_own_and_scales_latents_once(files):
    """FaceVAE scales latents by scaling_factor on the way in and divides on the way out: decode(encode(x)) is the
    plain VAE's decode(posterior mean), and the latents themselves are mean * scale (a missing or doubled scale on
    either side breaks one of the two)."""
    face, vae = files["model"].face, files["model"].vae
    crops = P.crop_faces(files["frames"][:2], T.track_frames(files["frames"][:2], BoxTracker(parse_bbox(BBOX))).boxes,
                         64)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).mean
        torch.testing.assert_close(face.encode(x), mean * vae.config.scaling_factor, atol=1e-6, rtol=0)
        torch.testing.assert_close(face.decode(face.encode(x)), vae.decode(mean), atol=1e-5, rtol=0)
        z = torch.randn(2, 4, 16, 16)
        torch.testing.assert_close(face.decode(z), vae.decode(z / vae.config.scaling_factor), atol=1e-6, rtol=0)
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_avatar_caches_each_frames_own_unet_input_and_blend(files):
    """prepare_avatar caches, per frame j, [masked crop j, crop j] (MuseTalk's inference reference is the frame) and
    the blend of frame j's own landmarks and box: with a face that moves 2 px per frame, no frame can borrow
    another's."""
    model, frames = files["model"], files["frames"]
    lm = template_landmarks(parse_bbox(BBOX))[None] + np.stack([np.array([2.0 * j, 0.0], np.float32)
                                                                 for j in range(len(frames))])[:, None]
    track = T.Track(lm, np.ones(len(frames), bool), crop_box(lm), "file")
    av = P.prepare_avatar(frames, FPS, track, model, batch_size=8)
    for j in (0, 5, 11):
        with torch.no_grad():
            expect = model.face.unet_input(P.crop_faces(frames[j:j + 1], track.boxes[j:j + 1], 64))[0]
        torch.testing.assert_close(av.latents[j], expect, atol=1e-5, rtol=0)
        blend = P.make_blend(lm[j], track.boxes[j], frames.shape[1:3])
        assert av.blends[j].box == pixel_box(track.boxes[j]) and av.blends[j].rect == blend.rect
        assert np.array_equal(av.blends[j].mask, blend.mask)
    assert not torch.allclose(av.latents[0], av.latents[5], atol=1e-3)  # the frames do differ


def test_every_output_frame_is_the_unet_on_its_source_latents_and_its_own_audio_decoded_and_pasted(
        files, avatar, monkeypatch):
    """Spy on the UNet: output frame i gets avatar.latents[ping-pong source of i] and tokens[i]; the frame written
    is that UNet output, unscaled, decoded by the VAE and pasted with the source frame's blend and the mouth texture
    the avatar's bank lends for that face."""
    model = files["model"]
    windows = model.audio_windows(files["wave"], 25, FPS)
    tokens = model.pe(windows)  # what the UNet attends to
    calls = []
    unet_forward = model.unet.forward

    def spy(x, t, ctx):
        out = unet_forward(x, t, ctx)
        calls.append((x.clone(), ctx.clone(), out.clone()))
        return out
    monkeypatch.setattr(model.unet, "forward", spy)
    frames = list(P.avatar_frames(model, avatar, windows, batch_size=5))
    monkeypatch.undo()
    assert len(frames) == 25 and [len(c[0]) for c in calls] == [5] * 5
    unet_in = torch.cat([c[0] for c in calls])
    ctx = torch.cat([c[1] for c in calls])
    for i, j in enumerate(PING_PONG):
        assert torch.equal(unet_in[i], avatar.latents[j]), i
        assert torch.equal(ctx[i], tokens[i]), i
    vae, scale = model.vae, model.vae.config.scaling_factor
    assert avatar.texture is not None  # faces pasted larger than the crop: the mouth texture is part of the frame
    for k, (_, _, out) in enumerate(calls):
        with torch.no_grad():
            faces = vae.decode(out / scale)
            crops = ((faces.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        shown = PING_PONG[5 * k: 5 * k + 5]
        texture = avatar.texture.detail((faces.clamp(-1, 1) + 1) * 127.5, shown, avatar.track.boxes[shown])
        for b in range(5):
            i = 5 * k + b
            j = PING_PONG[i]
            expect = P.paste(files["frames"][j], crops[b], avatar.blends[j], texture=texture[b])
            assert np.array_equal(frames[i], expect), i


def smooth_frame(h, w):
    """A frame with only low spatial frequencies (resampling is nearly exact on it) but steep enough that a shift of
    a few pixels changes it by tens of levels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 60 * np.sin(2 * np.pi * x / 37) * np.cos(2 * np.pi * y / 53)
    g = 128 + 60 * np.cos(2 * np.pi * (x + y) / 41)
    b = 128 + 60 * np.sin(2 * np.pi * (x - 2 * y) / 61)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("colour", [False, True])
def test_pasting_a_crop_of_the_frame_back_gives_the_frame_inside_the_mask(size, colour):
    frame = smooth_frame(304, 176)
    lm = template_landmarks(parse_bbox(BBOX))
    box = crop_box(lm)
    blend = P.make_blend(lm, box, frame.shape[:2])
    crop = P.crop_faces(frame[None], box[None], size)[0]
    out = P.paste(frame, crop, blend, colour)
    t, left, b, r = blend.rect
    inside = blend.mask > 0.5
    assert inside.sum() > 500  # the mask covers the lower face
    diff = np.abs(out[t:b, left:r].astype(int) - frame[t:b, left:r])[inside]
    assert diff.max() <= 2, diff.max()
    shifted = np.roll(frame, 4, axis=1)  # the same content 4 px to the side is far off: the test can see it
    assert np.abs(shifted[t:b, left:r].astype(int) - frame[t:b, left:r])[inside].mean() > 10


# ----------------------------------------------------------------------------- frame rates other than 25


@pytest.mark.parametrize("fps", [30, 24])
def test_cli_keeps_a_video_frame_rate_other_than_25(fps, files, capsys, tmp_path, monkeypatch):
    """A 12-frame clip at 30 or 24 fps and 1.0 s of speech, no --fps: the output keeps the clip's rate, has
    floor(1.0 * fps) frames that ping-pong through the source, and frame i gets the audio window of time i / fps."""
    video = tmp_path / f"clip{fps}.mp4"
    write_video(video, files["frames"], fps)
    seen = {}
    real_avatar_frames = infer.avatar_frames

    def spy(model, avatar, windows, *args, **kwargs):
        seen["fps"], seen["windows"] = avatar.fps, windows
        return real_avatar_frames(model, avatar, windows, *args, **kwargs)
    monkeypatch.setattr(infer, "avatar_frames", spy)
    out = tmp_path / "out.mp4"
    code, err = run_cli(["--video", video, "--audio", files["audio"], "--ckpt", files["ckpt"], "--bbox", BBOX,
                         "--out", out], capsys)
    assert code == 0, err
    frames, out_fps = read_video(out)
    assert out_fps == fps and frames.shape == (fps, 304, 176, 3)  # floor(1.0 s * fps)
    assert seen["fps"] == fps
    expect = files["model"].audio_windows(infer.load_audio(files["audio"]), fps, fps)
    torch.testing.assert_close(seen["windows"], expect, atol=1e-5, rtol=0)
    source, _ = read_video(video)
    keep = face_box_lower_half_excluded(frames.shape[1:3])
    expect = [i if i < 12 else 23 - i if i < 24 else i - 24 for i in range(fps)]  # ping-pong over 12 frames
    assert [nearest_source(f, source, keep) for f in frames] == expect


def test_audio_guidance_defaults_to_the_checkpoints_and_the_flag_overrides_it(files, capsys, tmp_path, monkeypatch):
    """--audio-guidance unset: the checkpoint's value (1 for ours unless set; under the audio rule on a face whose
    mouth never opens, its opening head's); given: that value reaches every generated batch; a negative one stops
    with one line and writes nothing."""
    from lipsync.model import LipSync
    seen = []
    real = LipSync.generate
    from lipsync.opening import OpeningConfig, OpeningHead

    def spy(self, unet_in, windows, guidance=None, lips=None):
        seen.append(self.guidance if guidance is None else guidance)
        return real(self, unet_in, windows, guidance, lips)

    monkeypatch.setattr(LipSync, "generate", spy)
    model = tiny_model(0)
    model.guidance = 1.5
    export(model, tmp_path / "guided.pt")
    # the audio rule on this fixed-box track (template landmarks: a mouth that never opens) uses the head's own
    model.opening, model.reference = OpeningHead(OpeningConfig(10, 5, 128, shut_guidance=2.0)), "audio"
    export(model, tmp_path / "shut.pt")
    for ckpt, extra, want in ((files["ckpt"], [], 1.0), (tmp_path / "guided.pt", [], 1.5),
                              (tmp_path / "guided.pt", ["--audio-guidance", "3"], 3.0), (tmp_path / "shut.pt", [], 2.0),
                              (tmp_path / "shut.pt", ["--audio-guidance", "3"], 3.0)):
        seen.clear()
        code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", ckpt, "--bbox", BBOX,
                             "--out", tmp_path / "o.mp4"] + extra, capsys)
        assert code == 0, err
        assert seen and set(seen) == {want}
    code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", files["ckpt"], "--bbox", BBOX,
                         "--audio-guidance", "-1", "--out", tmp_path / "bad.mp4"], capsys)
    assert code == 1 and err.strip().startswith("error:") and "--audio-guidance" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.mp4").exists()


def test_the_audio_reference_needs_an_opening_head_and_one_error_line_writes_nothing(files, capsys, tmp_path):
    code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", files["ckpt"], "--bbox", BBOX,
                         "--reference", "audio", "--out", tmp_path / "x.mp4"], capsys)
    assert code == 1 and err.strip().startswith("error:") and "opening head" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()
    from lipsync.opening import OpeningConfig, OpeningHead
    model = tiny_model(0)
    model.opening, model.reference = OpeningHead(OpeningConfig(10, 5, 128)), "audio"
    model.opening.beta[:] = 1.0
    export(model, tmp_path / "audio.pt")
    code, err = run_cli(["--video", files["video"], "--audio", files["audio"], "--ckpt", tmp_path / "audio.pt",
                         "--bbox", BBOX, "--out", tmp_path / "y.mp4"], capsys)
    assert code == 0, err
    assert read_video(tmp_path / "y.mp4")[0].shape[0] > 1
    avatar_dir = tmp_path / "av_audio"
    code, err = run_cli(["--prepare-avatar", files["video"], "--avatar", avatar_dir, "--ckpt", tmp_path / "audio.pt",
                         "--bbox", BBOX], capsys)
    assert code == 0, err
    code, err = run_cli(["--avatar", avatar_dir, "--audio", files["audio"], "--ckpt", tmp_path / "audio.pt", "--out",
                         tmp_path / "z.mp4"], capsys)  # a saved avatar with the audio rule: the speech picks again
    assert code == 0, err
    np.testing.assert_array_equal(read_video(tmp_path / "z.mp4")[0], read_video(tmp_path / "y.mp4")[0])
