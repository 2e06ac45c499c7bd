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


@pytest.fixture
def spied_dub():
    """8 demo frames 0.2 s apart (mouths differ) at 176x304 with a fixed-box track, and a tiny model whose UNet
    records every image input it is given: (frames, track, model, calls)."""
    from lipsync.track import track_frames
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.model import build
    from lipsync.tracking import BoxTracker, parse_bbox
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig

    frames = np.stack(list(itertools.islice(iter_frames(os.path.join(ROOT, "assets", "demo.mp4")), 0, 40, 5)))
    frames = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=(304, 176),
                                             mode="bilinear", antialias=True).permute(0, 2, 3, 1).contiguous().numpy()
    track = track_frames(frames, BoxTracker(parse_bbox("55,78,115,131")))
    torch.manual_seed(0)
    model = build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64).eval()
    calls, forward = [], model.unet.forward
    model.unet.forward = lambda x, t, ctx: calls.append(x.clone()) or forward(x, t, ctx)
    return frames, track, model, calls
