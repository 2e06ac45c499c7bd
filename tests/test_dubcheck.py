"""lipsync.tools.dubcheck: the mouth-follows-speech check on finished videos, on puppets whose mouth truth is known."""

import json

import numpy as np
import pytest

from lipsync.tools import dubcheck
from lipsync.tools import puppet as P
from lipsync.video import write_video


@pytest.fixture(scope="module")
def puppets(source):
    """Two 4 s puppets of the demo face at 256 px with their own (different) formant speech."""
    pytest.importorskip("mediapipe")  # the check's tracker; installed with the dev requirements, so CI runs these
    return [P.make_puppet_clip(source, i, "train", seconds=4.0, size=256, seed=3) for i in (0, 1)]


def test_a_mouth_that_follows_its_speech_scores_high_and_closes_in_silence(puppets, tmp_path):
    clip = puppets[0]
    video = tmp_path / "dubbed.mp4"
    write_video(str(video), clip["crops"], clip["fps"], audio=clip["wave"])
    out = tmp_path / "check.json"
    res = dubcheck.main([str(video), "--json", str(out)])
    print({k: v for k, v in res.items() if k != "opening"})
    assert res["frames"] == len(clip["crops"]) and res["face_frames"] > 0.95 * res["frames"]
    assert res["r_envelope"] > 0.5 and res["r_envelope_db"] > 0.5
    assert res["silent_frames"] > 0 and res["opening_silent"] < 0.5 * res["opening_speech"]
    saved = json.loads(out.read_text())
    assert saved["r_envelope"] == pytest.approx(res["r_envelope"]) and len(saved["opening"]) == res["frames"]


def test_the_same_mouth_with_other_speech_scores_near_zero(puppets, tmp_path):
    video = tmp_path / "mismatched.mp4"
    write_video(str(video), puppets[0]["crops"], puppets[0]["fps"])
    res = dubcheck.main([str(video), "--audio", _wav(puppets[1]["wave"], tmp_path)])
    assert abs(res["r_envelope"]) < 0.4  # seeded: -0.26 here, against 0.95 when matched


def test_lag_search_finds_a_delayed_mouth():
    rng = np.random.default_rng(0)
    env = np.convolve(rng.random(200), np.ones(5) / 5, "same")
    opening = np.roll(env, -2)  # the mouth moves 2 frames before the sound
    r = {lag: dubcheck.lagged_r(opening, env, lag) for lag in range(-3, 4)}
    assert max(r, key=r.get) == 2 and r[2] > 0.99


def test_no_face_is_one_clear_error(tmp_path):
    pytest.importorskip("mediapipe")
    video = tmp_path / "grey.mp4"
    write_video(str(video), np.full((10, 64, 64, 3), 128, np.uint8), 25.0, audio=np.zeros(6400, np.float32))
    with pytest.raises(SystemExit, match="dubcheck: a face was found in 0 of 10 frames"):
        dubcheck.main([str(video)])


def _wav(wave, folder):
    import soundfile as sf
    path = folder / "speech.wav"
    sf.write(path, wave, 16000)
    return str(path)
