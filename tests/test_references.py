"""The reference rules (lipsync.references) pick the frames they document, the avatar records its rule, infer.py's
--reference reaches the UNet, and a checkpoint carries the rule it was trained for."""

import numpy as np
import pytest
import torch

from lipsync import references
from lipsync.tracking import template_landmarks

CLOSED = [2, 5, 10, 18, 25, 26]  # 6 of 30 frames: the CLOSED_FRACTION (20 %) most closed; no frame has a tie


def synthetic_track(n=30, closed=CLOSED):
    """Landmarks whose inner lips (62, 66) are shut on CLOSED and open elsewhere by a distinct amount, and whose jaw
    (0-16) is shifted sideways by i pixels on frame i (a pose that changes steadily): (landmarks (n, 68, 2), face)."""
    base = template_landmarks((100, 100, 300, 340)).astype(np.float64)  # (68, 2)
    lm = np.repeat(base[None], n, 0)
    gaps = np.where(np.isin(np.arange(n), closed), 0.0, 4.0 + np.arange(n) * 0.5)  # pixels
    mid = (base[62, 1] + base[66, 1]) / 2
    lm[:, 62, 1], lm[:, 66, 1] = mid - gaps / 2, mid + gaps / 2
    lm[:, 0:17, 0] += np.arange(n)[:, None]
    return lm, np.ones(n, bool)


def test_closed_pose_gives_every_frame_the_closed_frame_nearest_in_pose():
    lm, face = synthetic_track()
    assert np.flatnonzero(references.closed_frames(lm, face)).tolist() == CLOSED
    ref = references.pick("closed_pose", lm, face)
    closed = np.array(CLOSED)
    apart = np.abs(np.arange(30)[:, None] - closed[None])  # jaw shift i: the pose distance is the index distance
    expected = closed[np.where(apart < references.MIN_GAP, 99, apart).argmin(1)]  # nearest at least 5 frames away
    assert ref.tolist() == expected.tolist()
    assert ref[0] == 5 and ref[7] == 2 and ref[20] == 25 and ref[29] == 18  # never itself, never within 5 frames

def test_closed_pose_on_a_track_longer_than_its_chunk_is_the_nearest_far_closed_frame_everywhere():
    """closed_pose works through a long track CHUNK frames at a time: every chunk must give the same rule (the
    chunk's own frame numbers for the 5-frame gap, candidates from the whole track)."""
    n = 4 * references.CHUNK + 17
    closed = np.sort(np.random.default_rng(0).choice(n, n // 5 + 1, replace=False))  # the quantile falls on a 0
    lm, face = synthetic_track(n, closed)
    assert np.flatnonzero(references.closed_frames(lm, face)).tolist() == closed.tolist()
    jaw = references.jaw_pose(lm)  # the rule restated for the whole track at once: nearest allowed closed pose
    dist = references.pose_distance(jaw, jaw[closed])
    dist[np.abs(np.arange(n)[:, None] - closed[None]) < references.MIN_GAP] = np.inf
    assert references.pick("closed_pose", lm, face).tolist() == closed[dist.argmin(1)].tolist()


def test_closed_pose_never_picks_a_frame_without_a_face_and_self_is_each_frame():
    lm, face = synthetic_track()
    face[[2, 5]] = False  # two closed frames lose their face: the rule must skip them
    ref = references.pick("closed_pose", lm, face)
    assert face[ref].all() and 2 not in ref and 5 not in ref
    assert references.pick("self", lm, face).tolist() == list(range(30))


def test_a_still_image_is_its_own_reference_and_unknown_rules_fail():
    lm, face = synthetic_track(1)
    assert references.pick("closed_pose", lm, face).tolist() == [0]
    with pytest.raises(ValueError, match="reference rule must be one of self, closed_pose"):
        references.pick("mouth", *synthetic_track())


@pytest.mark.usefixtures("one_thread")
def test_avatar_uses_the_models_rule_records_it_and_the_unet_sees_those_frames(spied_dub, tmp_path):
    from lipsync import pipeline
    from lipsync.avatar import load_avatar, save_avatar
    from lipsync.track import Track
    frames, track, model, calls = spied_dub
    n = len(frames)
    lm, _ = synthetic_track(n)
    track = Track(lm.astype(np.float32), track.face, track.boxes, track.tracker)
    closed = references.pick("closed_pose", lm, track.face)
    assert len(set(closed.tolist())) > 1 and (closed != np.arange(n)).any()
    model.reference = "closed_pose"
    avatar = pipeline.prepare_avatar(frames, 25.0, track, model, batch_size=n)  # the model's rule by default
    assert avatar.reference == "closed_pose"
    list(pipeline.avatar_frames(model, avatar, torch.zeros(n, 10, 128), batch_size=n))
    from lipsync.tracking import crop_faces
    with torch.no_grad():
        own = model.face.unet_input(crop_faces(frames, track.boxes, 64))  # (n, 8, s, s) [masked i, i]
    torch.testing.assert_close(calls[-1][:, :4], own[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(calls[-1][:, 4:], own[closed, 4:], atol=1e-5, rtol=0)
    saved = load_avatar(save_avatar(avatar, tmp_path / "av"), model)
    assert saved.reference == "closed_pose"
    torch.testing.assert_close(saved.latents, avatar.latents)
    selfish = pipeline.prepare_avatar(frames, 25.0, track, model, batch_size=n, reference="self")
    assert selfish.reference == "self"
    torch.testing.assert_close(selfish.latents, own, atol=1e-5, rtol=0)


def test_checkpoint_carries_the_reference_rule_and_old_ones_mean_self(tmp_path):
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.model import build
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig
    model = build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64)
    model.reference = "closed_pose"
    export(model, tmp_path / "m.pt")
    assert load_lipsync(str(tmp_path / "m.pt")).reference == "closed_pose"
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    del obj["config"]["reference"]  # checkpoints from before the rule was recorded
    torch.save(obj, tmp_path / "old.pt")
    assert load_lipsync(str(tmp_path / "old.pt")).reference == "self"


def test_train_exports_closed_pose_or_audio_only_for_a_model_trained_with_it():
    import train
    from lipsync.training.generator import inference_reference
    assert inference_reference(train.TrainConfig(reference="closed_pose")) == "closed_pose"
    assert inference_reference(train.TrainConfig(reference="audio")) == "audio"
    for rule in ("pose_mouth", "random"):
        assert inference_reference(train.TrainConfig(reference=rule)) == "self"
