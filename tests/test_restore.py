"""The mouth restorer (lipsync.restore, lipsync.training.restorer, train.py --stage restorer): an untrained one is the
bilinear upscale, the checkpoint carries it, the paste uses it only around the mouth, render only for faces pasted
larger than the crop, its training faces are only the large ones and its stage learns."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import train
from lipsync.blend import make_blend, paste, resize_crop
from lipsync.checkpoint import export, load_lipsync
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.model import LipSync
from lipsync.pipeline import restored
from lipsync.restore import Restorer, RestorerConfig
from lipsync.tracking import crop_box, crop_face, pixel_box, template_landmarks
from lipsync.training.data import write_clip
from lipsync.training.losses import PerceptualLoss
from lipsync.training.restorer import RestorerDataset, degrade, restorer_step
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig, to_uint8_images

SMALL = RestorerConfig(channels=8, blocks=1)


def tiny_lipsync():
    torch.manual_seed(0)
    return LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()), MelEncoder(MelEncoderConfig.tiny()),
                   64).eval()


def test_an_untrained_restorer_is_the_bilinear_upscale_and_a_trained_one_adds_to_it():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    r = Restorer(SMALL)
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert r(x).shape == (2, 3, 32, 32)
    torch.testing.assert_close(r(x), up, atol=0, rtol=0)
    torch.nn.init.normal_(r.tail.weight, std=0.1)
    assert (r(x) - up).abs().mean() > 1e-3


def test_the_checkpoint_carries_the_restorer_and_models_without_one_load_without(tmp_path):
    model = tiny_lipsync()
    export(model, str(tmp_path / "plain.pt"))
    assert load_lipsync(str(tmp_path / "plain.pt")).restorer is None
    model.restorer = Restorer(SMALL)
    torch.nn.init.normal_(model.restorer.tail.weight)
    export(model, str(tmp_path / "restored.pt"))
    loaded = load_lipsync(str(tmp_path / "restored.pt")).restorer
    assert loaded.cfg == SMALL
    for k, v in model.restorer.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_the_restored_face_shows_in_the_mouth_and_nowhere_away_from_it():
    """paste(fine=...): inside the mouth box (clear of its feather) the output is the restored face; away from the
    mouth it is exactly the paste without it (the source's own detail rules there); outside the mask the source."""
    lm = template_landmarks((50, 40, 150, 170))
    cbox = crop_box(lm)
    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal(150, 12, (240, 200, 3)), 0, 255).astype(np.uint8)
    blend = make_blend(lm, cbox, frame.shape[:2])
    crop = crop_face(frame, cbox, 64)
    fine = np.full((128, 128, 3), (40, 12, 25), np.uint8)  # a restored face that is dark everywhere
    with_fine, without = paste(frame, crop, blend, colour=False, fine=fine), paste(frame, crop, blend, colour=False)
    t, left, b, r = blend.rect
    mt, ml, mb, mr = blend.mouth
    mouth, mask = np.zeros(frame.shape[:2], bool), np.zeros(frame.shape[:2], np.float32)
    mouth[t + mt:t + mb, left + ml:left + mr] = True
    mask[t:b, left:r] = blend.mask
    radius = max(1, round(0.06 * pixel_box(cbox)[3]))
    core = (mask > 0.999) & ndimage.binary_erosion(mouth, iterations=radius + 1)
    away = ~ndimage.binary_dilation(mouth, np.ones((3, 3)), iterations=radius + 1)  # a square's feather: square
    assert core.sum() > 50 and (away & (mask > 0.5)).sum() > 100
    assert np.abs(with_fine[core].astype(int) - (40, 12, 25)).max() <= 1
    assert np.abs(without[core].astype(int) - (40, 12, 25)).min() > 60
    assert np.array_equal(with_fine[away], without[away])
    assert np.array_equal(with_fine[mask == 0], frame[mask == 0])


def test_colour_matching_matches_the_restored_face_by_its_own_colours():
    """A restored face whose colours are shifted from the generated crop's (the restorer is trained on real colours,
    the VAE drifts): with colour matching each is matched to the source on its own, so the mouth of a restored face
    that is the crop plus a colour cast comes out as the crop's, not cast (nor over-corrected)."""
    lm = template_landmarks((50, 40, 150, 170))
    cbox = crop_box(lm)
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:240, 0:200]
    frame = np.clip(np.stack([190 + 0.1 * x, 140 + 0.05 * y, 120 + 0.05 * x], -1) + rng.normal(0, 3, (240, 200, 3)),
                    0, 255).astype(np.uint8)
    blend = make_blend(lm, cbox, frame.shape[:2])
    crop = crop_face(frame, cbox, 64)
    big = crop_face(frame, cbox, 128).astype(float)
    cast = np.clip(big * [0.7, 1.2, 1.0] + [20, -20, 15], 0, 255).round().astype(np.uint8)
    plain = paste(frame, crop, blend, detail=False)
    restored_cast = paste(frame, crop, blend, detail=False, fine=cast)
    t, left, b, r = blend.rect
    mt, ml, mb, mr = blend.mouth
    mouth = np.zeros(frame.shape[:2], bool)
    mouth[t + mt:t + mb, left + ml:left + mr] = True
    diff = np.abs(restored_cast[mouth].astype(float) - plain[mouth]).mean(0)
    assert diff.max() < 3, diff
    uncorrected = paste(frame, crop, blend, colour=False, detail=False, fine=cast)
    assert np.abs(uncorrected[mouth].astype(float) - plain[mouth]).mean(0).max() > 10


def test_render_restores_only_faces_pasted_larger_than_the_crop():
    faces = torch.rand(3, 3, 16, 16) * 2 - 1
    blends = [SimpleNamespace(box=(0, 0, w, w)) for w in (20, 40, 12)]  # 20 = 1.25 x 16: hardly scaled up
    model = SimpleNamespace(restorer=Restorer(SMALL))
    out = restored(model, faces, blends)
    assert out[0] is None and out[2] is None and out[1].shape == (32, 32, 3) and out[1].dtype == np.uint8
    assert np.abs(out[1].astype(int) - to_uint8_images(model.restorer(faces[1:2]))[0]).max() == 0
    assert restored(SimpleNamespace(restorer=None), faces, blends) == [None, None, None]


def large_and_small_faces(root, side=128, n=4, widths=(150, 150, 100, 100)):
    """One clip of n frames of side px crops, from face boxes `widths` px wide (frames 0-1 large, 2-3 small)."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    widths = np.array(widths, np.float32)[:n]
    boxes = np.stack([np.zeros(n), np.zeros(n), widths, widths], 1).astype(np.float32)
    meta = {"version": 1, "fps": 25.0, "frames": n, "crop_size": side, "sr": 16000, "geometry": "square",
            "split": "train"}
    write_clip(root, "faces", meta, crops, boxes, np.ones(n, bool), np.zeros((n, 68, 2), np.float32),
               np.zeros(16000, np.float32))
    return crops


def test_training_faces_are_only_those_from_boxes_at_least_the_output_size(tmp_path):
    crops = large_and_small_faces(tmp_path)
    data = RestorerDataset(tmp_path, "train", size=128)
    assert data.items == [(0, 0), (0, 1)]
    got = {tuple(data[i]["target"].flatten()[:5].tolist()) for i in range(2) for data.epoch in range(8)}
    expected = torch.from_numpy(crops[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    plain = {tuple(e.flatten()[:5].tolist()) for e in expected}
    mirrored = {tuple(e.flip(-1).flatten()[:5].tolist()) for e in expected}
    assert got == plain | mirrored  # both frames, as they are and mirrored, never a small face
    with pytest.raises(ValueError, match="at least 256 px"):
        RestorerDataset(tmp_path, "train", size=256)


def test_generated_inputs_are_the_models_own_face_for_that_frame_and_flip_with_their_target(tmp_path):
    """add_generated: item i's input is the generator's face for its frame (the target taken down to the model's
    size, its own reference, the clip's audio window for that frame), mirrored together with the target."""
    crops = large_and_small_faces(tmp_path, widths=(100, 150, 100, 150))  # frames 1 and 3
    data = RestorerDataset(tmp_path, "train", size=128)
    model = tiny_lipsync()
    data.add_generated(model, batch_size=1)
    clip = data.clips[0]
    windows = model.audio_windows(clip.wave, len(clip), clip.fps)
    for item_index, i in enumerate((1, 3)):
        small = resize_crop(crops[i], 64, 64)[None]  # the crop at the model's size, as infer.py's crop_faces would
        with torch.no_grad():
            want = to_uint8_images(model(model.face.unet_input(small), windows[i: i + 1]))[0]
        for data.epoch in range(6):
            item = data[item_index]
            got = ((item["input"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            flipped = not torch.equal(item["target"], data.target(0, i))
            assert np.abs(got.astype(int) - (want[:, ::-1] if flipped else want)).max() <= 1


def test_the_restorer_learns_the_lower_face_through_the_vae(tmp_path):
    """degrade = down to S px and the VAE's round trip; restorer_step scores the lower face only and its loss falls
    on a fixed batch, below the bilinear upscale's L1."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).requires_grad_(False)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    target = torch.stack([torch.sin(9 * x + 3 * k) * torch.cos(7 * y) for k in range(3)])[None].repeat(2, 1, 1, 1)
    small = degrade(target, vae, 64)
    assert small.shape == (2, 3, 64, 64)
    torch.testing.assert_close(small, vae.decode(vae.encode(
        F.interpolate(target, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)).mean).clamp(-1, 1))
    restorer, perceptual = Restorer(SMALL), PerceptualLoss(None, size=None)
    _, logs, _, _ = restorer_step(restorer, {"target": target}, vae, perceptual, 64)
    opt = torch.optim.Adam(restorer.parameters(), lr=3e-3)
    first = logs["l1"]
    assert first == pytest.approx(logs["l1_bilinear"], abs=1e-6)  # untrained = bilinear
    for _ in range(60):
        loss, logs, _, _ = restorer_step(restorer, {"target": target}, vae, perceptual, 64)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["l1"] < 0.8 * first


@pytest.mark.usefixtures("one_thread")
def test_the_restorer_stage_adds_a_trained_restorer_to_the_init_model_and_changes_nothing_else(tmp_path):
    large_and_small_faces(tmp_path / "clips")
    init = tmp_path / "init.pt"
    export(tiny_lipsync(), str(init))
    out = tmp_path / "run"
    train.main(["--stage", "restorer", "--init", str(init), "--data", str(tmp_path / "clips"), "--out", str(out),
                "--restorer.steps", "2", "--restorer.batch", "2", "--log_every", "1"])
    before, after = load_lipsync(str(init)), load_lipsync(str(out / "lipsync.pt"))
    assert after.restorer is not None and before.restorer is None
    assert any(v.abs().sum() > 0 for k, v in after.restorer.state_dict().items() if k.startswith("tail."))
    for part in ("unet", "vae", "audio"):
        for k, v in getattr(before, part).state_dict().items():
            assert torch.equal(getattr(after, part).state_dict()[k], v), (part, k)
    assert os.path.exists(out / "restorer.pt")
