"""lipsync.tools.audio_probe: the ridge probe finds an opening planted in the features and nothing in noise."""

import numpy as np
import pytest

from lipsync.tools import audio_probe, synthetic
from lipsync.tools.metrics import lip_opening_68
from lipsync.training.data import load_clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root, test = tmp_path_factory.mktemp("probe_train"), tmp_path_factory.mktemp("probe_test")
    for i, out, split in ((0, root, "train"), (1, root, "train"), (2, test, "train")):
        synthetic.write_synthetic_clip(out, f"c{i}", synthetic.make_synthetic_clip(i, split, seconds=3.0, size=64,
                                                                                   seed=4), split=split, seed=4)
    return root, test / "c2"


def plant(clip_dir, signal: bool, seed: int):
    """whisper.npy (T50, 5, 8): the frame's lip opening along a fixed direction (+ a little noise), or noise only."""
    clip = load_clip(clip_dir)
    y = lip_opening_68(clip.landmarks)
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(0).standard_normal((5, 8))
    steps = np.repeat(y, 2)  # 50 Hz steps: two per 25 fps frame
    feats = 0.01 * rng.standard_normal((len(steps), 5, 8)) + (steps[:, None, None] * direction if signal else 0)
    np.save(clip.path / "whisper.npy", feats.astype(np.float16))


@pytest.mark.parametrize("signal", [True, False])
def test_probe_reads_an_opening_planted_in_the_features_and_nothing_from_noise(clips, signal, capsys):
    root, test = clips
    for i, clip in enumerate(sorted(root.iterdir()) + [test]):
        plant(clip, signal, seed=i)
    audio_probe.main(["--train", str(root), "--test", str(test), "--lam", "1"])
    r = float(capsys.readouterr().out.split("mean r ")[1].split()[0])
    assert (r > 0.9) if signal else (abs(r) < 0.5), r
