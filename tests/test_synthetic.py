import json

import numpy as np
import pytest
import soundfile as sf

from lipsync.tools import synthetic
from lipsync.training.data import load_clip
from lipsync.tools.synthetic import SR, Voice, frame_envelope, make_synthetic_clip, random_sequence, synth_audio
from lipsync.tools.synthetic_face import dark_mouth_height
from lipsync.tracking import to_crop_coords


@pytest.fixture(scope="module")
def clips():
    return [make_synthetic_clip(0, "train", seconds=4),
            make_synthetic_clip(0, "heldout", seconds=4, frame=160, size=96)]


def test_measured_opening_tracks_ground_truth(clips):
    for clip in clips:
        r = np.corrcoef(dark_mouth_height(clip["crops"]), clip["opening"])[0, 1]
        assert r >= 0.98, r


def test_audio_envelope_follows_opening(clips):
    for clip in clips:
        env = frame_envelope(clip["wave"], len(clip["opening"]), 25.0)
        assert np.corrcoef(env, clip["opening"])[0, 1] > 0.6


def test_closed_mouth_is_silent_and_open_mouth_is_loud():
    opening = np.r_[np.zeros(50), np.ones(50), np.zeros(50)].astype(np.float32)
    wave = synth_audio(opening, np.zeros_like(opening), 100.0, Voice(), seed=0)
    assert len(wave) == int(1.5 * SR)
    rms = lambda a, b: np.sqrt(np.mean(wave[int(a * SR):int(b * SR)] ** 2))
    assert rms(0.6, 0.9) > 100 * rms(0.0, 0.4)
    assert rms(1.1, 1.5) < 0.01 * rms(0.6, 0.9)
    assert not synth_audio(np.zeros(20), np.zeros(20), 25.0).any()


def _spectral_peak(wave, lo, hi):
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freq = np.fft.rfftfreq(len(wave), 1 / SR)
    spec = np.convolve(spec, np.ones(301) / 301, mode="same")  # smooth away the harmonics -> envelope
    band = (freq >= lo) & (freq <= hi)
    return freq[band][np.argmax(spec[band])]


def test_formants_follow_mouth_shape():
    one = np.ones(100, np.float32)
    f1 = [_spectral_peak(synth_audio(a * one, 0.5 * one, 100.0, Voice(f0=100)), 200, 1100) for a in (0.2, 1.0)]
    f2 = [_spectral_peak(synth_audio(one, r * one, 100.0, Voice(f0=100)), 1000, 2600) for r in (0.0, 1.0)]
    assert f1[1] - f1[0] > 250  # F1 = 300 + 500 a
    assert f2[0] - f2[1] > 800  # F2 = 2200 - 1300 r


def test_sequence_has_pauses_closures_and_full_range():
    seq = random_sequence(60.0, np.random.default_rng(0))
    closed = (seq.opening < 0.02).mean()
    assert 0.15 < closed < 0.45
    assert seq.opening.max() > 0.9 and seq.roundness.min() < 0.1 and seq.roundness.max() > 0.9
    assert (seq.noise > 0.1).mean() > 0.02  # consonant noise exists


def test_landmarks_follow_the_rendered_mouth_and_crop_puts_nose_on_midline(clips):
    clip = clips[0]
    lm = clip["landmarks"]
    gap = lm[:, 66, 1] - lm[:, 62, 1]  # inner lips, bottom centre - top centre
    assert np.corrcoef(gap, clip["opening"])[0, 1] > 0.999
    S = clip["crops"].shape[1]
    nose = to_crop_coords(lm[:, 29:30], clip["boxes"], S)[:, 0]
    assert np.abs(nose[:, 1] - S / 2).max() < 1.0
    centre = to_crop_coords(lm[:, 60:68].mean(1, keepdims=True), clip["boxes"], S)[:, 0].round().astype(int)
    pix = clip["crops"][np.arange(len(lm)), centre[:, 1], centre[:, 0]].astype(float)
    wide = clip["opening"] > 0.5
    assert pix[wide].mean(1).max() < 60  # mouth interior is dark where the landmarks say it is


def test_a_2_s_clip_has_50_frames_and_32000_samples():  # speed belongs in bench.py, not here
    clip = make_synthetic_clip(3, "train", seconds=2)
    assert len(clip["crops"]) == len(clip["landmarks"]) == 50 and len(clip["wave"]) == 32000


def test_cli_writes_loadable_clips_skips_complete_and_replaces_incomplete(tmp_path):
    args = ["--out", str(tmp_path), "--clips", "3", "--seconds", "1", "--heldout", "0.34", "--workers", "1"]
    synthetic.main(args)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["heldout_0000", "train_0000", "train_0001"]
    for name in names:
        clip = load_clip(tmp_path / name)
        assert clip.crops.shape == (25, 64, 64, 3) and clip.crops.dtype == np.uint8
        assert clip.landmarks.shape == (25, 68, 2) and clip.boxes.shape == (25, 4) and clip.face.all()
        assert len(clip.wave) == SR and clip.truth["opening"].shape == (25,)
        assert clip.meta["tracker"] == "synthetic" and clip.meta["split"] == name.split("_")[0]
        assert sf.info(str(tmp_path / name / "audio.wav")).samplerate == SR
    meta = {n: json.loads((tmp_path / n / "meta.json").read_text()) for n in names}
    assert meta["heldout_0000"]["face"] not in {meta[n]["face"] for n in names if n.startswith("train")}
    assert len({meta[n]["speaker"] for n in names}) == 3

    done = (tmp_path / "train_0000" / "crops.npy").stat().st_mtime_ns
    (tmp_path / "train_0001" / "meta.json").unlink()  # interrupted clip: no meta.json
    (tmp_path / ".train_0001.partial").mkdir()
    synthetic.main(args)
    assert (tmp_path / "train_0000" / "crops.npy").stat().st_mtime_ns == done
    assert (tmp_path / "train_0001" / "meta.json").exists()
    assert not (tmp_path / ".train_0001.partial").exists()


def test_heldout_clips_have_new_faces_and_voices():
    a, b = make_synthetic_clip(0, "train", seconds=0.4), make_synthetic_clip(0, "heldout", seconds=0.4)
    assert a["id"] != b["id"]
    assert np.abs(a["crops"].astype(int) - b["crops"].astype(int)).mean() > 10
