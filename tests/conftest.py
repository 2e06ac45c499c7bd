"""Fixtures shared by several test files."""

import itertools
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from lipsync.tools.synthetic import SR
from lipsync.tracking import crop_faces
from lipsync.video import iter_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SOURCE = 40


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """A prepared real clip (256 px crops) from the first frames of the bundled demo and its mediapipe track."""
    path = tmp_path_factory.mktemp("src") / "demo"
    path.mkdir()
    frames = np.stack(list(itertools.islice(iter_frames(os.path.join(ROOT, "assets", "demo.mp4")), N_SOURCE)))
    with np.load(os.path.join(ROOT, "assets", "demo.track.npz")) as t:
        track = {k: t[k][:N_SOURCE] for k in t.files}
    np.save(path / "crops.npy", crop_faces(frames, track["boxes"], 256))
    np.savez(path / "track.npz", **track)
    sf.write(path / "audio.wav", np.zeros(N_SOURCE * SR // 25, np.float32), SR)
    (path / "meta.json").write_text(json.dumps({"version": 1, "fps": 25.0, "frames": N_SOURCE, "size": [608, 352],
                                                "crop_size": 256, "source": "demo.mp4", "tracker": "mediapipe",
                                                "audio": "audio.wav", "sr": SR}))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on the shared 2-core test box run ~3x faster on one thread than on two contending ones."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
