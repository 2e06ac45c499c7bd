import math

import numpy as np
import pytest
import soundfile as sf

from lipsync.audio import delay
from lipsync.tools import avsync as A
from lipsync.training import prepare as P
from lipsync import tracking as T
from test_prepare import BBOX, make_video


def speechlike(n, seed=0):
    """A loudness-like series (n,): smoothed noise, so neighbouring frames are alike as in speech."""
    x = np.random.default_rng(seed).normal(size=n + 8)
    return np.convolve(x, np.ones(5) / 5, "valid")[:n]


def test_a_mouth_three_frames_after_its_sound_peaks_at_plus_3_and_asks_for_the_audio_100_ms_later():
    loud = speechlike(300)
    opening = np.full(300, np.nan)
    opening[3:] = loud[:-3]  # the mouth at f shows the sound of f - 3
    res = A.verdict(A.delay_curve(opening, loud), fps=30.0)
    assert res["delay_frames"] == 3 and res["status"] == "out of sync"
    assert res["delay_ms"] == pytest.approx(100.0) and res["r_peak"] == pytest.approx(1.0)
    early = A.verdict(A.delay_curve(loud[2:], loud[:-2]), fps=25.0)  # the mouth at f shows the sound of f + 2
    assert early["delay_frames"] == -2 and early["delay_ms"] == pytest.approx(-80.0) and early["status"] == "out of sync"


def test_in_step_speech_is_in_sync_and_a_flat_or_edge_curve_is_unclear():
    loud = speechlike(300, 1)
    assert A.verdict(A.delay_curve(loud, loud), 25.0)["status"] == "in sync"
    lead = A.verdict(A.delay_curve(loud[1:], loud[:-1]), 25.0)  # lips a frame before their sound: ordinary speech
    assert lead["delay_frames"] == -1 and lead["status"] == "in sync"
    noise = A.verdict(A.delay_curve(speechlike(300, 2), loud), 25.0)
    assert noise["status"] == "unclear"
    edge = np.full(300, np.nan)
    edge[9:] = loud[:-9]  # 9 frames late: beyond the 6 looked at, the curve still rises at the edge
    assert A.verdict(A.delay_curve(edge, loud), 25.0)["status"] == "unclear"


def test_a_peak_barely_above_a_flat_curve_is_not_called_out_of_sync():
    curve = {k: 0.15 for k in range(-6, 7)}
    curve[4] = 0.26  # over MIN_PEAK and MIN_GAIN above r(0), but only 0.11 above the median
    assert A.verdict(curve, 25.0)["status"] == "unclear"
    curve[4] = 0.31
    assert A.verdict(curve, 25.0)["status"] == "out of sync"
    weak = {k: -0.2 for k in range(-6, 7)}
    weak[0] = 0.05  # a peak in the ordinary place, but mouth and sound barely related
    assert A.verdict(weak, 25.0)["status"] == "unclear"


def test_delay_puts_silence_in_front_or_drops_the_start():
    wave = np.arange(1, 11, dtype=np.float32)
    assert delay(wave, 3 / 16000).tolist() == [0, 0, 0] + wave.tolist()
    assert delay(wave, -2 / 16000).tolist() == wave[2:].tolist()
    assert delay(wave, 0.0).tolist() == wave.tolist()


def test_prepare_audio_delay_moves_the_clips_speech_and_keeps_its_length(tmp_path):
    video = make_video(tmp_path / "talk.mp4", n=15, fps=25.0)
    box = T.parse_bbox(BBOX)
    base = P.prepare_clip(video, tmp_path / "a", bbox=box, crop_size=16, progress=False)
    late = P.prepare_clip(video, tmp_path / "b", bbox=box, crop_size=16, progress=False, audio_delay=0.1)
    a, _ = sf.read(base.path / "audio.wav", dtype="int16")
    b, _ = sf.read(late.path / "audio.wav", dtype="int16")
    assert len(a) == len(b) == 15 * 640
    assert (b[:1600] == 0).all() and np.array_equal(b[1600:], a[:-1600])
    assert P.main([str(video), "--out", str(tmp_path / "c"), "--bbox", BBOX, "--audio-delay", "nan"]) == 1


def test_avsync_refuses_a_clip_without_sound_in_one_line(tmp_path):
    video = make_video(tmp_path / "mute.mp4", n=4, audio=False)
    with pytest.raises(SystemExit, match="has no audio track"):
        A.main([str(video)])
