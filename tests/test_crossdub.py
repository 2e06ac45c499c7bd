"""Cross-dub evaluation (lipsync.tools.crossdub): the measures give known answers on made-up series, the pairing,
audio fitting, resampling and silences do what the module doc says, the reference rule reaches the UNet, and the CLI
runs end to end."""

import json

import numpy as np
import pytest
import torch

from lipsync.tools import crossdub as C
from lipsync.tracking import crop_faces
from lipsync.video import read_video, write_video
from media import ROOT, SPEECH, VIDEO


def smooth_series(n, seed, scale=1.0):
    """A mouth-like opening series (n,): smoothed noise, positive."""
    rng = np.random.default_rng(seed)
    return 0.05 + scale * np.convolve(rng.random(n + 4), np.ones(5) / 5, "valid")[:n]


def measures(dubbed, original, speaker):
    """pair_metrics with no silence: every frame speech."""
    n = len(dubbed)
    return C.pair_metrics(dubbed, original, speaker, np.zeros(n, bool), np.ones(n, bool))


# ----------------------------------------------------------------------------- measures with known answers


def test_dubbed_mouth_that_is_the_speakers_has_r_1_with_the_speaker_and_movement_ratio_1():
    speaker, original = smooth_series(120, 0), smooth_series(120, 1, scale=2.0)
    m = measures(speaker.copy(), original, speaker)
    assert m["r_speaker"] == pytest.approx(1.0) and m["r_speaker_best"] == pytest.approx(1.0) and m["lag_best"] == 0
    assert m["movement"] == pytest.approx(1.0)
    assert abs(m["r_original"]) < 0.5  # independent mouths
    assert m["r_chance"] == pytest.approx(m["r_original"])  # here dubbed = speaker, so chance = copying


def test_dubbed_mouth_that_is_the_original_has_r_1_with_the_original_and_chance_r_with_the_speaker():
    speaker, original = smooth_series(120, 0), smooth_series(120, 1, scale=2.0)
    m = measures(original.copy(), original, speaker)
    assert m["r_original"] == pytest.approx(1.0)
    assert m["r_speaker"] == pytest.approx(m["r_chance"]) and abs(m["r_chance"]) < 0.5
    assert m["movement"] == pytest.approx(original.std() / speaker.std()) and m["movement"] > 1.5  # 2x the scale
    same = measures(speaker.copy(), speaker, speaker)  # the original IS the speaker: ratio exactly 1
    assert same["r_original"] == pytest.approx(1.0) and same["movement"] == pytest.approx(1.0)


@pytest.mark.parametrize("lag", [1, -2])
def test_lagged_copy_of_the_speaker_is_found_at_its_lag_while_lag_0_r_is_below_1(lag):
    speaker = smooth_series(150, 3)
    dubbed = np.roll(speaker, -lag)  # dubbed[f] = speaker[f + lag]
    m = measures(dubbed, smooth_series(150, 4), speaker)
    assert m["lag_best"] == lag and m["r_speaker_best"] == pytest.approx(1.0, abs=1e-3)  # roll wraps lag frames
    assert m["r_speaker"] < 0.95


def test_unmeasured_frames_are_left_out_of_every_r_and_of_the_movement_ratio():
    speaker, original = smooth_series(100, 5), smooth_series(100, 6)
    dubbed = speaker.copy()
    dubbed[[3, 50]] = np.nan  # no face found
    short = speaker.copy()
    short[80:] = np.nan  # the speaker's clip ended: padded silence
    m = measures(dubbed, original, short)
    assert m["r_speaker"] == pytest.approx(1.0) and m["movement"] == pytest.approx(1.0)
    assert np.isfinite(m["r_original"]) and np.isfinite(m["r_chance"])


def test_opening_in_silence_and_in_speech_are_means_of_the_dubbed_mouth_over_those_frames():
    dubbed = np.array([0.01, 0.02, np.nan, 0.10, 0.20, 0.30, 0.5])
    silent = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    speech = np.array([0, 0, 0, 1, 1, 0, 1], bool)  # frame 5: a short dip, neither
    original = np.array([0.3, 0.4, 0.6, 0.0, 0.1, 0.9, 0.2])
    m = C.pair_metrics(dubbed, original, dubbed, silent, speech)
    assert m["opening_silent"] == pytest.approx(0.015) and m["opening_speech"] == pytest.approx(0.8 / 3)
    assert m["original_silent"] == pytest.approx(1.3 / 3) and m["original_speech"] == pytest.approx(0.1)
    assert m["silent_frames"] == 3 and m["speech_frames"] == 3
    assert np.isnan(C.pair_metrics(dubbed, dubbed, dubbed, np.zeros(7, bool), speech)["opening_silent"])


def test_means_skip_pairs_without_a_measure_and_count_pairs_closed_in_silence():
    pairs = [dict.fromkeys(C.MEASURES, 0.2), dict.fromkeys(C.MEASURES, 0.4), dict.fromkeys(C.MEASURES, 0.6)]
    pairs[0].update(opening_silent=0.01, opening_speech=0.05)  # closed in silence
    pairs[1].update(opening_silent=0.09, opening_speech=0.05)  # open in silence
    pairs[2].update(opening_silent=np.nan, r_speaker=np.nan)  # no silence; r unmeasurable
    m = C.mean_metrics(pairs)
    assert m["r_speaker"] == pytest.approx(0.3) and m["r_original"] == pytest.approx(0.4)
    assert m["detail_lips"] == pytest.approx(0.4) and m["detail_rest"] == pytest.approx(0.4)
    assert m["pairs"] == 3 and m["pairs_with_silence"] == 2 and m["pairs_closed_in_silence"] == 1


def test_the_table_names_a_speech_clip_whose_own_sound_is_out_of_step_with_its_mouth(capsys):
    pair = {**dict.fromkeys(C.MEASURES, 0.2), "lag_best": 0, "silent_frames": 0, "speech_frames": 9}
    pairs = [{**pair, "video": "a.mp4", "speech": "b.mp4",
              "speech_sync": {"status": "out of sync", "delay_frames": 3, "delay_ms": 100.0}},
             {**pair, "video": "b.mp4", "speech": "a.mp4",
              "speech_sync": {"status": "unclear", "delay_frames": 5, "delay_ms": 200.0}}]
    C.print_table({"pairs": pairs, "mean": {**C.mean_metrics(pairs)}})
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: b.mp4's own mouth moves +3 frames (+100 ms)")


# ----------------------------------------------------------------------------- pairing, audio, time axes


def test_pairs_are_a_cycle_each_clip_dubbed_with_the_next_and_the_last_with_the_first():
    assert C.cycle_pairs(["a", "b", "c"]) == [("a", "b"), ("b", "c"), ("c", "a")]
    assert C.cycle_pairs(["a", "b"]) == [("a", "b"), ("b", "a")]
    with pytest.raises(ValueError, match="at least two"):
        C.cycle_pairs(["a"])


def test_speech_is_trimmed_or_padded_with_silence_to_the_videos_length():
    wave = torch.rand(50_000) + 0.5  # never zero
    long = C.fit_speech(wave, 75, 25.0)  # 3 s
    assert len(long) == 48_000 and torch.equal(long, wave[:48_000])
    short = C.fit_speech(wave, 150, 29.97)  # 5.005 s: round(150 / 29.97 * 16000) samples
    assert len(short) == 80_080 and torch.equal(short[:50_000], wave) and not short[50_000:].any()


def test_speaker_series_is_resampled_to_the_dubbed_videos_frame_times():
    t_src = np.arange(50) / 25.0
    opening = 0.1 + 0.02 * t_src  # linear in time: linear interpolation is exact
    out = C.resample_series(opening, 25.0, 70, 29.97)
    t_out = np.arange(70) / 29.97
    inside = t_out <= t_src[-1]
    np.testing.assert_allclose(out[inside], 0.1 + 0.02 * t_out[inside], rtol=1e-9)
    assert np.isnan(out[~inside]).all() and (~inside).sum() == 70 - 59  # past the speaker's last frame (1.96 s)
    np.testing.assert_allclose(C.resample_series(opening, 30.0, 50, 30.0), opening)  # same rate: unchanged
    down = C.resample_series(opening, 30.0, 40, 25.0)  # 30 -> 25 fps: frame j at j / 25 s = source frame 1.2 j
    np.testing.assert_allclose(down, np.interp(np.arange(40) * 1.2, np.arange(50), opening))


@pytest.mark.parametrize("fps,shortest", [(25.0, 8), (30.0, 9)])
def test_silences_are_quiet_runs_of_at_least_0_3_seconds(fps, shortest):
    """A quiet run of shortest - 1 frames is no silence, one of shortest frames (>= 0.3 s) is; frames are quiet
    when their 40 ms window holds only zeros."""
    n, spf = 80, 16000 / fps
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(int(n * spf)).astype(np.float32)

    def quiet(first, last):  # zero every sample that frames first..last read
        wave[int(first * spf) - 320:int(last * spf) + 320] = 0

    quiet(10, 10 + shortest - 2)
    quiet(40, 40 + shortest - 1)
    silent, speech = C.silences(wave, n, fps)
    assert not silent[:30].any() and silent[40:40 + shortest].all() and silent.sum() == shortest
    assert not speech[10:10 + shortest - 1].any() and speech[:9].all()


# ----------------------------------------------------------------------------- the reference rule reaches the UNet


@pytest.mark.usefixtures("one_thread")
def test_dub_gives_the_unet_each_frames_masked_self_and_the_reference_rules_frame(spied_dub):
    frames, track, model, calls = spied_dub
    n = len(frames)
    wave = C.fit_speech(torch.zeros(1), n, 25.0)
    C.dub_clip(model, frames, 25.0, wave, track, batch_size=n)
    C.dub_clip(model, frames, 25.0, wave, track, reference=lambda t: np.arange(len(t))[::-1].copy(), batch_size=n)
    own_row, reversed_row = calls
    with torch.no_grad():
        own = model.face.unet_input(crop_faces(frames, track.boxes, 64))
    torch.testing.assert_close(own_row, own, atol=1e-5, rtol=0)  # infer.py's rule: [masked i, i]
    torch.testing.assert_close(reversed_row[:, :4], own[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(reversed_row[:, 4:], own.flip(0)[:, 4:], atol=1e-5, rtol=0)  # [masked i, n - 1 - i]
    assert (own[:, 4:] - own.flip(0)[:, 4:]).abs().amax() > 1e-3  # the frames differ: a wrong rule would show


# ----------------------------------------------------------------------------- montage and the CLI


def test_montage_rows_are_original_dubbed_speaker_at_the_same_times_and_black_past_the_speakers_end():
    a_frames = np.zeros((10, 40, 40, 3), np.uint8)
    a_frames[..., 0] = 100  # original: red
    dubbed = np.zeros_like(a_frames)
    dubbed[..., 1] = 150  # dubbed: green
    b_frames = np.zeros((10, 30, 30, 3), np.uint8)
    b_frames[..., 2] = (50 + 10 * np.arange(10))[:, None, None]  # speaker: blue, brighter with each frame
    a = {"fps": 25.0, "squares": np.tile([5, 5, 25, 25], (10, 1))}
    b = {"fps": 50.0, "squares": np.tile([0, 0, 30, 30], (10, 1))}  # twice A's rate: 0.2 s of video
    img = C.montage(a_frames, dubbed, b_frames, a, b, side=8)
    assert img.shape == (24, 64, 3)
    assert (img[:8, :, 0] == 100).all() and (img[8:16, :, 1] == 150).all()
    speaker = img[16:].reshape(8, 8, 8, 3).transpose(1, 0, 2, 3)  # (tile, y, x, rgb)
    # A's 8 frames are 0 1 3 4 5 6 8 9, at 0 .. 0.36 s: B's frames 0 2 6 8, then past its end
    assert [int(t[..., 2].mean()) for t in speaker[:4]] == [50, 70, 110, 130] and not speaker[4:].any()


def test_crossdub_cli_dubs_a_cycle_and_writes_json_and_montages(tmp_path):
    pytest.importorskip("mediapipe")
    import soundfile as sf
    from lipsync.tools import eval as evaluate
    frames, fps = read_video(VIDEO)
    wave, sr = sf.read(SPEECH, dtype="float32")
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    write_video(a, frames[:16], fps, audio=wave[:int(16 / fps * sr)])  # 25 fps, 0.64 s of speech
    b_speech = np.concatenate([wave[sr * 5:sr * 5 + sr // 10], np.zeros(sr * 3 // 10, np.float32)])
    write_video(b, frames[60:72], 30.0, audio=b_speech)  # 30 fps, 0.4 s: 0.1 s of speech, then 0.3 s of silence
    res = evaluate.main(["--ckpt", str(ROOT / "assets" / "demo.pt"), "--crossdub", str(a), str(b), "--out",
                         str(tmp_path / "out"), "--device", "cpu", "--threads", "1", "--audio-guidance", "1.5"])
    assert [(p["video"], p["speech"]) for p in res["pairs"]] == [(str(a), str(b)), (str(b), str(a))]
    first, second = res["pairs"]
    assert first["frames"] == 16 and second["frames"] == 12
    assert first["speaker_measured"] == 10  # a's frames j at j / 25 s within b's 12 frames at 30 fps: j <= 9
    assert second["speaker_measured"] == 12
    assert first["silent_frames"] >= 10 and second["silent_frames"] == 0  # a is dubbed with b's speech, padded
    for p in res["pairs"]:
        assert all(-1 <= p[k] <= 1 for k in ("r_speaker", "r_speaker_best", "r_original", "r_chance"))
    for p in res["pairs"]:  # the dubbed video against its own source frames
        assert 0 < p["detail_lips"] < 10 and 0 < p["detail_rest"] < 10
    saved = json.loads((tmp_path / "out" / "crossdub.json").read_text())
    assert saved["guidance"] == 1.5 and saved["reference"] == "audio"  # how it was dubbed: the flag reached the model,
    # and the bundled model's own rule (the speech picks the reference)
    assert saved["mean"]["r_original"] == pytest.approx(np.mean([p["r_original"] for p in res["pairs"]]))
    assert all(p["speech_sync"]["status"] in ("in sync", "out of sync", "unclear") for p in saved["pairs"])
    assert saved["mean"]["detail_lips"] == pytest.approx(np.mean([p["detail_lips"] for p in res["pairs"]]))
    import imageio.v3 as iio
    assert iio.imread(tmp_path / "out" / "0_a_with_b.png").shape == (3 * 96, 8 * 96, 3)
    assert iio.imread(tmp_path / "out" / "1_b_with_a.png").shape == (3 * 96, 8 * 96, 3)


def test_lse_of_a_dubbed_clip_scores_its_25_fps_frames_cropped_around_the_source_track(spied_dub):
    """--crossdub with --syncnet-weights: the dubbed frames, resampled from 30 to 25 fps, cropped where the source
    track put each face, against the speech the clip was dubbed with."""
    from lipsync.tools import lse
    frames, track, _, _ = spied_dub
    loop = np.tile(np.arange(len(frames)), 4)  # 32 frames at 30 fps
    dubbed, track = frames[loop, ::-1].copy(), track.select(loop)  # any frames: what matters is which and where
    torch.manual_seed(0)
    net = lse.SyncNetV2().eval()
    wave = np.random.default_rng(0).standard_normal(len(loop) * 16000 // 30).astype(np.float32) * 0.1
    idx = np.round(1.2 * np.arange(27)).astype(int)  # 27 frames at 25 fps, each the nearest 30 fps one in time
    want = lse.lse(net, lse.syncnet_crops(dubbed[idx], track.landmarks[idx]), wave)
    assert want["windows"] > 15 and C.dubbed_lse(net, dubbed, 30.0, track, wave) == want
    assert C.dubbed_lse(net, dubbed, 30.0, track, wave[::-1].copy()) != want  # the speech is read


def test_still_holds_the_first_frame_and_its_measures_for_the_clips_length_and_dubs_that(monkeypatch):
    from lipsync.tools import crossdub as cd
    n = 6
    frames = np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3)
    info = {"fps": 25.0, "wave": np.zeros(4000, np.float32), "opening": np.linspace(0.1, 0.6, n),
            "squares": np.arange(n * 4).reshape(n, 4), "rects": np.arange(n * 4).reshape(n, 4) + 1,
            "face": np.array([True, False, True, True, True, True]),
            "sync": {"status": "in sync", "delay_frames": 0, "delay_ms": 0.0}}
    held, still = cd.as_still(frames, info)
    assert held.shape == frames.shape and (held == frames[0]).all()
    assert (still["opening"] == 0.1).all() and (still["squares"] == info["squares"][0]).all()
    assert (still["rects"] == info["rects"][0]).all() and still["face"].all() and still["wave"] is info["wave"]
    seen = []
    monkeypatch.setattr(cd.Clips, "get", lambda self, path: (frames.copy(), dict(info)))
    monkeypatch.setattr(cd, "face_track", lambda f, geometry: None)
    monkeypatch.setattr(cd, "dub_clip", lambda model, f, *a, **k: seen.append(f.copy()) or f)
    monkeypatch.setattr(cd, "mesh_points", lambda f: np.zeros((len(f), 478, 3)))
    monkeypatch.setattr(cd, "lip_opening_468", lambda mesh: np.linspace(0, 1, len(mesh)))
    monkeypatch.setattr(cd, "detail_ratios", lambda *a: {"detail_lips": 1.0, "detail_rest": 1.0})
    model = type("M", (), {"geometry": "square", "reference": "self", "guidance": 1.0})()
    for still_flag in (False, True):
        seen.clear()
        res = cd.crossdub(model, ["a.mp4", "b.mp4"], progress=False, still=still_flag)
        assert res["still"] is still_flag and len(seen) == 2
        assert all((f == frames[0]).all() for f in seen) is still_flag
        assert all(p["r_original"] == 0 == p["r_chance"] for p in res["pairs"]) is still_flag  # a constant mouth


def test_still_needs_crossdub(capsys):
    from lipsync.tools import eval as evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", "x.pt", "--reenact", "a.mp4", "--still"])
    assert "--still goes with --crossdub" in capsys.readouterr().err
