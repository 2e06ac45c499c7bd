"""The lip gauge (--loss.lip's critic): its label, its loss, and that it learns to read openings it never saw."""

import numpy as np
import pytest
import torch

from lipsync.tools import synthetic
from lipsync.training.gauge import LipGauge, gauge_loss, lip_ratio, load_gauge, main, score_gauge


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("gauge_clips")
    for i, split in ((0, "train"), (1, "train"), (0, "heldout")):
        clip = synthetic.make_synthetic_clip(i, split, seconds=2.0, size=64, seed=3)
        synthetic.write_synthetic_clip(root, f"{split}_{i}", clip, split=split, seed=3)
    return root


def test_lip_ratio_is_the_inner_gap_of_the_facing_pairs_over_the_mouth_width():
    lips = np.zeros((20, 2), np.float32)  # iBUG points 48-67
    lips[0], lips[6] = (0, 0), (40, 0)  # mouth corners 48 and 54: width 40
    for upper, lower, x in ((13, 19, 15), (14, 18, 20), (15, 17, 25)):  # 61/67, 62/66, 63/65 face each other
        lips[upper], lips[lower] = (x, -2), (x, 4)
    assert lip_ratio(lips) == pytest.approx(6 / 40)
    assert lip_ratio(np.stack([lips, lips * 2])) == pytest.approx([6 / 40, 6 / 40])  # a ratio: scale-free


def test_gauge_loss_is_zero_on_the_target_and_trains_only_the_generated_face():
    torch.manual_seed(0)
    gauge = LipGauge().requires_grad_(False)
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    boxes = torch.tensor([[16.0, 36, 48, 52], [14, 34, 50, 54]])
    assert gauge_loss(gauge, target.clone(), target, boxes).item() == 0
    pred = torch.rand(2, 3, 64, 64, requires_grad=True)
    target.requires_grad_(True)
    loss = gauge_loss(gauge, pred, target, boxes)
    loss.backward()
    assert loss.item() > 0 and pred.grad.abs().sum() > 0
    assert target.grad is None  # the target's reading is the fixed answer
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[33:55, 13:51] = False  # pixels no box reaches (their bilinear taps included) get no gradient
    assert pred.grad[..., outside].abs().sum() == 0


def test_trained_gauge_reads_the_opening_of_a_face_it_never_saw(clips, tmp_path, capsys):
    out = tmp_path / "gauge.pt"
    main(["--data", str(clips), "--out", str(out), "--steps", "40", "--score", str(clips / "heldout_0")])
    assert "heldout_0: r +0." in capsys.readouterr().out
    gauge = load_gauge(out)
    assert not any(p.requires_grad for p in gauge.parameters())
    r, error = score_gauge(gauge, clips / "heldout_0")
    assert r > 0.7 and error < 0.4, (r, error)  # in ratio units: answering the mean would err ~0.75 std
