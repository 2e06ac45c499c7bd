"""The bundled demo checkpoint (made by our train.py, assets/README.md) loads and dubs the bundled clip."""

import os

import numpy as np
import soundfile as sf

import infer
from lipsync.checkpoint import load_lipsync
from lipsync.video import read_video, video_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_demo_checkpoint_dubs_the_bundled_clip(tmp_path, monkeypatch):
    model = load_lipsync(os.path.join(ROOT, "assets", "demo.pt"))
    assert model.crop_size >= 128 and model.trainable_audio  # issue 10: 64 px upscaled onto a real face is soft
    wave, sr = sf.read(os.path.join(ROOT, "assets", "demo.wav"), dtype="float32")
    sf.write(tmp_path / "short.wav", wave[: int(1.5 * sr)], sr)
    monkeypatch.chdir(ROOT)  # the demo's default paths are relative to the checkout
    out = tmp_path / "demo.mp4"
    assert infer.main(["--audio", str(tmp_path / "short.wav"), "--out", str(out)]) == 0
    frames, fps = read_video(str(out))
    source, _ = read_video(os.path.join(ROOT, "assets", "demo.mp4"))
    assert fps == 25 and len(frames) == 37 and frames.shape[1:] == source.shape[1:]
    assert video_info(str(out)).has_audio
    assert np.abs(frames[:, :100].astype(int) - source[:37, :100]).mean() < 2  # above the face: unchanged
