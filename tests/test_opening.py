"""The "audio" reference rule: the opening head (lipsync.opening) reads the speech, references.audio_match picks the
frames it documents, the UNet sees them, the checkpoint carries the head and train.py's opening stage fits it."""

import os

import numpy as np
import pytest
import torch

from lipsync import references
from lipsync.opening import OpeningConfig, OpeningHead
from lipsync.tracking import template_landmarks


def gap_track(gaps, shift=None):
    """Landmarks whose inner-lip gap (62 to 66) is gaps[i] pixels on frame i and whose jaw (0-16) is shifted
    sideways by shift[i] pixels (default 0: one pose): (landmarks (n, 68, 2), face (n,))."""
    n = len(gaps)
    base = template_landmarks((100, 100, 300, 340)).astype(np.float64)
    lm = np.repeat(base[None], n, 0)
    mid = (base[62, 1] + base[66, 1]) / 2
    lm[:, 62, 1], lm[:, 66, 1] = mid - np.asarray(gaps) / 2, mid + np.asarray(gaps) / 2
    if shift is not None:
        lm[:, 0:17, 0] += np.asarray(shift, np.float64)[:, None]
    return lm, np.ones(n, bool)


def test_audio_match_gives_each_frame_the_far_frame_whose_gap_is_at_its_predictions_rank(monkeypatch):
    """One pose, every frame a candidate (pool 1): the prediction's rank picks that quantile of the track's gaps, and
    the reference is the frame at least MIN_GAP away whose gap is nearest it."""
    monkeypatch.setattr(references, "MATCH_POOL", 1.0)
    n = 20
    lm, face = gap_track(np.arange(n) * 1.0)  # frame j's gap is j pixels: gaps rank like frame numbers
    gap = references.mouth_gap(lm)
    predicted = np.array([9, 0, 3, 19, 4, 12, 7, 1, 15, 2, 11, 5, 18, 6, 8, 14, 10, 16, 13, 17], float)
    ref = references.audio_match(lm, face, predicted)
    target = np.quantile(gap, np.argsort(np.argsort(predicted)) / (n - 1))  # = gap[predicted]: ranks are the values
    allowed = np.abs(np.arange(n)[:, None] - np.arange(n)[None]) >= references.MIN_GAP
    expected = np.where(allowed, np.abs(gap[None] - target[:, None]), np.inf).argmin(1)
    assert ref.tolist() == expected.tolist()
    assert ref[3] == 19 and ref[0] == 9  # the loudest moment shows the widest mouth; frame 0 asks for gap 9
    assert ref[1] == 6 and ref[19] == 14  # frame 1 asks for 0 and 19 for 17, both too near: the nearest far gaps
    assert (np.abs(ref - np.arange(n)) >= references.MIN_GAP).all()


def test_pauses_get_the_most_closed_mouth_and_the_speech_ranks_over_the_whole_range(monkeypatch):
    """-inf predictions (LipSync.openings' pauses) all ask for the track's most closed gap, however many there are;
    the speech frames' ranks spread over the whole range among themselves (the loudest still gets the widest)."""
    monkeypatch.setattr(references, "MATCH_POOL", 1.0)
    n = 20
    lm, face = gap_track(np.arange(n) * 1.0)
    predicted = np.full(n, -np.inf)
    predicted[:10] = np.arange(10.0)  # frames 0-9 speak (9 loudest), 10-19 are a pause
    ref = references.audio_match(lm, face, predicted)
    assert (ref[10:] == 0).all()  # the closed frame 0 is far enough from all of them
    assert ref[9] == 19 and ref[0] == 5  # rank 1 -> the widest gap; rank 0 -> gap 0, too near: the nearest far one
    assert ref[4] == 8 or ref[4] == 9  # rank 4/9 of the track's gaps (8.4): between frames 8 and 9, both far


def test_audio_match_uses_only_the_order_of_the_predictions_and_frames_without_a_face_keep_their_own():
    lm, face = gap_track(np.linspace(0, 12, 30), shift=np.arange(30) * 0.5)
    rng = np.random.default_rng(1)
    predicted = rng.normal(size=30)
    ref = references.audio_match(lm, face, predicted)
    assert references.audio_match(lm, face, np.exp(3 * predicted) - 7).tolist() == ref.tolist()
    face[[3, 4]] = False
    ref = references.audio_match(lm, face, predicted)
    assert face[ref[face]].all() and ref[3] == 3 and ref[4] == 4
    assert not np.isin(ref[face], [3, 4]).any()


def test_audio_match_takes_the_mouth_from_the_frames_nearest_in_pose():
    """Two poses (jaw 0 or 40 px sideways), gaps open and shut in both: every reference has its frame's pose, even
    where the other pose has a gap nearer the target."""
    n = 40
    shift = np.where(np.arange(n) < 20, 0.0, 40.0)
    gaps = np.tile(np.r_[np.linspace(0, 10, 10), np.linspace(10, 0, 10)], 2) + (np.arange(n) >= 20) * 0.3
    lm, face = gap_track(gaps, shift)
    ref = references.audio_match(lm, face, np.random.default_rng(2).normal(size=n))
    assert ((ref < 20) == (np.arange(n) < 20)).all()
    pool = int((n - 2 * references.MIN_GAP + 1) * references.MATCH_POOL)  # at least this many candidates each
    assert pool >= 5


def test_audio_match_follows_the_shown_source_frames_and_a_still_has_itself():
    lm, face = gap_track(np.arange(12) * 1.0)
    ref = references.audio_match(lm, face, np.arange(5.0), frames=np.array([0, 11, 11, 0, 6]))
    assert (np.abs(ref - np.array([0, 11, 11, 0, 6])) >= references.MIN_GAP).all()
    lm1, face1 = gap_track([3.0])
    assert references.audio_match(lm1, face1, np.array([0.0, 5.0, 1.0]), frames=np.zeros(3, int)).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="audio_match"):
        references.pick("audio", lm, face)


def test_the_head_averages_the_layers_of_each_step_and_fits_a_planted_line():
    cfg = OpeningConfig(steps=2, layers=3, dim=4, lam=1e-6)
    head = OpeningHead(cfg)
    w = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 6, 4)  # rows L t + layer
    feats = head.features(w)
    expected = np.concatenate([w[0, 0:3].mean(0).numpy(), w[0, 3:6].mean(0).numpy()])  # step 0's layers, then 1's
    np.testing.assert_allclose(feats[0], expected)
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(200, 6, 4))
    truth = rng.normal(size=8)
    y = head.features(windows) @ truth + 0.5
    head.fit(head.features(windows), y)
    np.testing.assert_allclose(head(windows), y, atol=1e-4)


def test_the_checkpoint_carries_the_head_in_float64_and_models_without_one_load_without(tmp_path):
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.model import build
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig
    model = build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64)
    export(model, tmp_path / "plain.pt", dtype=torch.float16)
    assert load_lipsync(str(tmp_path / "plain.pt")).opening is None
    rng = np.random.default_rng(0)
    head = OpeningHead(OpeningConfig(10, 5, 128))
    x = rng.normal(1e3, 1e-2, size=(300, 1280))  # a large mean with a tiny spread: fp16 would lose it
    head.fit(x, rng.normal(size=300))
    model.opening, model.reference = head, "audio"
    export(model, tmp_path / "m.pt", dtype=torch.float16)
    back = load_lipsync(str(tmp_path / "m.pt"))
    assert back.reference == "audio" and back.opening.cfg == head.cfg
    windows = torch.from_numpy(np.repeat(x[:7].reshape(7, 10, 1, 128), 5, 2).reshape(7, 50, 128))
    np.testing.assert_array_equal(back.opening(windows), head(windows))


@pytest.mark.usefixtures("one_thread")
def test_the_unet_sees_the_frame_the_speech_picks_and_the_audio_rule_needs_a_head_and_whole_speech(spied_dub):
    from lipsync import pipeline
    from lipsync.track import Track
    from lipsync.tracking import crop_faces
    frames, track, model, calls = spied_dub
    n = len(frames)
    lm, _ = gap_track(np.arange(n) * 2.0)
    track = Track(lm.astype(np.float32), track.face, track.boxes, track.tracker)
    with pytest.raises(ValueError, match="opening head"):
        pipeline.prepare_avatar(frames, 25.0, track, model, batch_size=n, reference="audio")
    model.opening = OpeningHead(OpeningConfig(10, 5, 128))
    model.opening.beta[:] = 1.0  # the prediction is the sum of the window's features
    model.reference = "audio"
    avatar = pipeline.prepare_avatar(frames, 25.0, track, model, batch_size=n)
    assert avatar.reference == "audio"
    windows = torch.arange(n, dtype=torch.float32)[[3, 0, 6, 1, 7, 2, 5, 4], None, None].expand(n, 50, 128)
    picked = references.audio_match(lm, track.face, model.opening(windows))
    assert len(set(picked.tolist())) > 2 and (picked != np.arange(n)).all()
    with pytest.raises(ValueError, match="openings"):
        list(pipeline.avatar_frames(model, avatar, windows, batch_size=3))
    list(pipeline.avatar_frames(model, avatar, windows, batch_size=3, openings=model.opening(windows)))  # 3, 3, 2
    with torch.no_grad():
        own = model.face.unet_input(crop_faces(frames, track.boxes, 64))  # (n, 8, s, s) [masked i, i]
    seen = torch.cat(calls[-3:])
    torch.testing.assert_close(seen[:, :4], own[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[:, 4:], own[picked, 4:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot stream"):
        list(pipeline.avatar_frames(model, avatar, iter([windows[:4], windows[4:]]), openings=np.zeros(n)))


@pytest.mark.usefixtures("one_thread")
def test_the_opening_stage_fits_the_head_on_the_clips_lips_and_changes_no_weight(tmp_path):
    import train
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.model import build
    from lipsync.tools.synthetic import make_synthetic_clip, write_synthetic_clip
    from lipsync.training.data import list_clips, load_clip
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig
    for i in range(2):
        write_synthetic_clip(tmp_path / "clips", f"c{i}", make_synthetic_clip(i, "train", seconds=2.0, size=64, seed=0),
                             split="train", seed=0)
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    export(build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64), str(init))
    out = tmp_path / "run"
    train.main(["--stage", "opening", "--init", str(init), "--data", str(tmp_path / "clips"), "--out", str(out),
                "--opening_lam", "10", "--opening_shut_guidance", "2.5"])
    before, after = load_lipsync(str(init)), load_lipsync(str(out / "lipsync.pt"))
    assert before.opening is None and after.opening.cfg.lam == 10 and after.opening.cfg.shut_guidance == 2.5
    assert after.reference == "self"  # the run's --reference (pose_mouth: self); --reference audio makes it "audio"
    for part in ("unet", "vae", "audio"):
        for k, v in getattr(before, part).state_dict().items():
            assert torch.equal(getattr(after, part).state_dict()[k], v), (part, k)
    xs, ys = [], []
    for path in list_clips(tmp_path / "clips", "train"):
        clip = load_clip(path)
        xs.append(after.opening.features(after.audio_windows(clip.wave, len(clip), clip.fps))[clip.face])
        ys.append(references.mouth_gap(clip.landmarks)[clip.face])
    x, y = np.concatenate(xs), np.concatenate(ys)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    beta = np.linalg.solve(z.T @ z + 10 * np.eye(z.shape[1]), z.T @ (y - y.mean()))  # the ridge, restated
    np.testing.assert_allclose(after.opening.beta, beta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(after.opening.predict(x), z @ beta + y.mean(), rtol=0, atol=1e-6)
    assert os.path.exists(out / "lipsync.pt")


def tiny_whisper_folder(folder):
    """A random 1-layer whisper encoder saved as a Hugging Face folder (config.json + pytorch_model.bin)."""
    import json
    from lipsync.whisper import WhisperEncoder, WhisperEncoderConfig
    torch.manual_seed(3)
    enc = WhisperEncoder(WhisperEncoderConfig(80, 16, 1, 2, 32, 1500))
    folder.mkdir()
    torch.save({"model.encoder." + k: v for k, v in enc.state_dict().items()}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"num_mel_bins": 80, "d_model": 16, "encoder_layers": 1,
                                                    "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
                                                    "max_source_positions": 1500}))
    return enc


@pytest.mark.usefixtures("one_thread")
def test_the_opening_stage_can_read_the_speech_with_a_whisper_encoder_of_its_own(tmp_path):
    """--opening_whisper: the head reads that encoder's windows (not the generator's MelEncoder), the checkpoint
    carries the encoder with the head, and the loaded model predicts exactly what the fitted one did."""
    import train
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.model import build
    from lipsync.tools.synthetic import make_synthetic_clip, write_synthetic_clip
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig
    from lipsync.windows import frame_windows
    for i in range(2):
        write_synthetic_clip(tmp_path / "clips", f"c{i}", make_synthetic_clip(i, "train", seconds=2.0, size=64, seed=0),
                             split="train", seed=0)
    enc = tiny_whisper_folder(tmp_path / "whisper")
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    export(build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64), str(init))
    out = tmp_path / "run"
    train.main(["--stage", "opening", "--init", str(init), "--data", str(tmp_path / "clips"), "--out", str(out),
                "--opening_whisper", str(tmp_path / "whisper"), "--opening_lam", "10", "--reference", "audio"])
    model = load_lipsync(str(out / "lipsync.pt"))
    head = model.opening
    assert model.reference == "audio" and head.encoder is not None and model.audio.dim == 128
    assert (head.cfg.steps, head.cfg.layers, head.cfg.dim) == (10, 2, 16)  # whisper's 1 layer + its input: 2 states
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(head.encoder.state_dict()[k], v, atol=1e-3, rtol=1e-3)  # stored in fp32 here
    wave = torch.randn(16000)
    with torch.no_grad():
        own = frame_windows(enc.encode(wave), 25, 25.0, 2, 2)  # (25, 10 x 2, 16): the whisper's windows
    torch.testing.assert_close(model.opening_windows(wave, 25, 25.0), own, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(model.openings(wave, 25, 25.0), head(own), rtol=1e-6, atol=1e-9)


def test_the_opening_stage_needs_a_generator_and_a_whisper_that_exists(tmp_path):
    import train
    with pytest.raises(SystemExit, match="opening stage adds an opening head"):
        train.main(["--stage", "opening", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--opening_whisper .* not found"):
        train.main(["--stage", "opening", "--init", "assets/demo.pt", "--opening_whisper", str(tmp_path / "none"),
                    "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.usefixtures("one_thread")
def test_the_reference_the_speech_picks_is_warped_onto_its_frames_eyes_and_nose(spied_dub):
    """Where the picked frame's face sits elsewhere in its crop (here: its eyes and nose 6 px lower, as a taller
    crop of an open mouth would), the UNet's reference half is that crop moved onto the frame (lipsync.align), not
    the crop as it was."""
    from lipsync import pipeline
    from lipsync.align import reference_maps, warp
    from lipsync.track import Track
    from lipsync.tracking import crop_faces, to_crop_coords
    from lipsync.vae import to_model_images
    frames, track, model, calls = spied_dub
    n = len(frames)
    lm, _ = gap_track(np.arange(n) * 2.0)
    lm[1::2, 27:48, 1] += 6.0  # odd frames: eyes and nose lower in the same box
    track = Track(lm.astype(np.float32), track.face, track.boxes, track.tracker)
    model.opening = OpeningHead(OpeningConfig(10, 5, 128))
    model.opening.beta[:] = 1.0
    avatar = pipeline.prepare_avatar(frames, 25.0, track, model, batch_size=n, reference="audio")
    windows = torch.arange(n, dtype=torch.float32)[[3, 0, 6, 1, 7, 2, 5, 4], None, None].expand(n, 50, 128)
    picked = references.audio_match(lm, track.face, model.opening(windows))
    assert ((picked - np.arange(n)) % 2 == 1).any()  # some frames get a reference of the other kind
    list(pipeline.avatar_frames(model, avatar, windows, batch_size=n, openings=model.opening(windows)))
    crop_lm = to_crop_coords(lm, track.boxes, 64)
    maps = reference_maps(crop_lm[picked], crop_lm)
    assert np.abs(maps[:, :, 2]).max() > 2  # crop pixels the warp moves by
    with torch.no_grad():
        moved = model.face.encode(warp(to_model_images(crop_faces(frames[picked], track.boxes[picked], 64)), maps, 64))
        as_is = model.face.unet_input(crop_faces(frames, track.boxes, 64))[picked, 4:]
    seen = calls[-1][:, 4:]
    torch.testing.assert_close(seen, moved, atol=1e-5, rtol=0)
    assert (seen - as_is).abs().amax((1, 2, 3))[(picked - np.arange(n)) % 2 == 1].min() > 1e-2


def test_quiet_frames_are_pauses_of_at_least_three_frames_far_under_the_loud_ones():
    from lipsync.opening import QUIET_RUN, quiet_frames
    sr, fps = 16000, 25.0
    t = np.arange(4 * sr) / sr
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)  # 4 s: 100 frames of 640 samples
    wave[sr:2 * sr] *= 1e-3  # -60 dB for 1 s (frames 25-49)
    wave[int(3 * sr):int(3 * sr) + 960] = 0  # a 60 ms gap (1.5 frames): a stop, not a pause
    wave[int(3.5 * sr):] *= 0.1  # -20 dB: quieter speech, not a pause
    quiet = quiet_frames(wave, 100, fps, sr)
    assert quiet[28:47].all() and not quiet[:22].any() and not quiet[53:].any()
    assert QUIET_RUN == 3 and quiet.sum() < 30
    assert not quiet_frames(wave * 0 + 0.3, 100, fps, sr).any()  # steady sound: nothing is far under itself



def test_openings_are_minus_infinity_exactly_in_the_speechs_pauses():
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.model import build
    from lipsync.opening import quiet_frames
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig
    torch.manual_seed(0)
    model = build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64).eval()
    model.opening = OpeningHead(OpeningConfig(10, 5, 128))
    model.opening.beta[:] = 1.0
    wave = torch.randn(32000) * 0.1
    wave[8000:24000] *= 1e-4  # a 1 s pause in 2 s
    got = model.openings(wave, 50, 25.0)
    quiet = quiet_frames(wave.numpy(), 50, 25.0)
    assert 20 <= quiet.sum() <= 26 and np.isneginf(got[quiet]).all() and np.isfinite(got[~quiet]).all()
    slow = model.openings(wave, 20, 10.0)  # 10 fps: longer UNet windows, the head still reads its 10 steps
    assert slow.shape == (20,) and np.isfinite(slow[~quiet_frames(wave.numpy(), 20, 10.0)]).all()


def test_a_track_is_shut_when_its_gaps_span_less_than_shut_range_between_5th_and_95th_percentiles():
    lm, face = gap_track(np.zeros(40))
    height = references.face_height(lm)[0]
    span = references.SHUT_RANGE * height  # pixels
    wide = np.linspace(0, 1.2 * span / 0.9, 40)  # 5th to 95th percentile: 0.9 of the span, 1.2 SHUT_RANGE
    narrow = np.linspace(0, 0.8 * span / 0.9, 40)
    assert not references.is_shut(gap_track(wide)[0], face)
    assert references.is_shut(gap_track(narrow)[0], face)
    outlier = np.zeros(40)
    outlier[0] = 10 * span  # one wide frame of 40 is outside the 5th-95th percentiles: still shut
    assert references.is_shut(gap_track(outlier)[0], face)
    one = np.zeros(40, bool)
    one[7] = True  # a photo: one face frame
    assert references.is_shut(gap_track(wide)[0], one)


@pytest.mark.usefixtures("one_thread")
def test_the_audio_rule_uses_the_heads_shut_guidance_only_on_a_shut_track(spied_dub):
    """Guidance != 1 runs the UNet on twice the faces (speech and silence in one batch): count what it is given."""
    from lipsync import pipeline
    from lipsync.track import Track
    frames, track, model, calls = spied_dub
    n = len(frames)
    model.opening = OpeningHead(OpeningConfig(10, 5, 128, shut_guidance=2.0))
    windows = torch.randn(n, 50, 128)
    for gaps, rule, rows in ((np.arange(n) * 8.0, "audio", n), (np.zeros(n), "audio", 2 * n),
                             (np.zeros(n), "self", n)):
        lm, _ = gap_track(gaps)
        shaped = Track(lm.astype(np.float32), track.face, track.boxes, track.tracker)
        avatar = pipeline.prepare_avatar(frames, 25.0, shaped, model, batch_size=n, reference=rule)
        assert pipeline.shut_guidance(model, avatar) == (2.0 if rows == 2 * n else None)
        calls.clear()
        list(pipeline.avatar_frames(model, avatar, windows, batch_size=n,
                                    openings=model.opening(windows) if rule == "audio" else None))
        assert sum(len(c) for c in calls) == rows, (gaps[:3], rule)


@pytest.mark.usefixtures("one_thread")
def test_guidance_is_given_each_frames_own_lips_in_crop_pixels(spied_dub, monkeypatch):
    """avatar_frames hands LipSync.generate each output frame's lips (the track's points 48-67 mapped into its crop
    box), in frame order across batches, so the audio guidance lands on that frame's mouth (model.mouth_weights)."""
    from lipsync import pipeline
    from lipsync.model import LipSync
    from lipsync.track import Track
    from lipsync.tracking import to_crop_coords
    frames, track, model, calls = spied_dub
    n = len(frames)
    seen, real = [], LipSync.generate
    monkeypatch.setattr(LipSync, "generate", lambda self, u, w, g=None, lips=None:
                        seen.append(np.asarray(lips)) or real(self, u, w, g, lips))
    lm = track.landmarks + (np.arange(n, dtype=np.float32) * 3)[:, None, None]  # each frame's lips elsewhere
    shaped = Track(lm, track.face, track.boxes, track.tracker)
    avatar = pipeline.prepare_avatar(frames, 25.0, shaped, model, batch_size=n, reference="self")
    model.guidance = 2.0
    list(pipeline.avatar_frames(model, avatar, torch.randn(n, 50, 128), batch_size=3))
    got = np.concatenate(seen)
    assert len(seen) == 3 and got.shape == (n, 20, 2)
    np.testing.assert_allclose(got, to_crop_coords(lm[:, 48:68], track.boxes, model.crop_size), atol=1e-4)
