"""Evaluation metrics on cases with known answers, and `python -m lipsync.tools.eval` end to end on a tiny model."""

import dataclasses
import json
import math
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipsync.tools import eval as ev
from lipsync.tools import metrics
from lipsync.tools.eval_report import to_json
from lipsync.training.data import MIN_GAP, load_clip
from lipsync.training.losses import ssim
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.checkpoint import export, load_lipsync
from lipsync.model import build
from lipsync.training.syncnet import SyncNet, SyncNetConfig, load_syncnet, syncnet_from_entry
from lipsync.tools.synthetic import SR, make_synthetic_clip, write_synthetic_clip
from lipsync.unet import UNetConfig
from lipsync.vae import VAEConfig

N_CLIPS, SECONDS, S = 3, 1.2, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """3 held-out synthetic clips (30 frames, 64 px) and a random micro model with a tiny SyncNet, exported."""
    root = tmp_path_factory.mktemp("eval")
    for i in range(N_CLIPS):
        clip = make_synthetic_clip(i, "heldout", SECONDS, frame=96, size=S)
        write_synthetic_clip(root / "data", f"heldout_{i:04d}", clip, split="heldout")
    torch.manual_seed(0)
    model = build(UNetConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, attention_head_dim=2,
                             cross_attention_dim=32, norm_num_groups=8),
                  VAEConfig(block_out_channels=(16, 16, 16), layers_per_block=1, norm_num_groups=8),
                  MelEncoderConfig(dim=32, blocks=1), S)
    cfg = SyncNetConfig.tiny()
    ckpt = root / "lipsync.pt"
    export(model, str(ckpt), extra={"syncnet": {"config": dataclasses.asdict(cfg), "state": SyncNet(cfg).state_dict()}})
    return SimpleNamespace(root=root, data=root / "data", ckpt=ckpt, model=load_lipsync(str(ckpt)))


# ----------------------------------------------------------------------------- image metrics


def test_psnr_is_inf_for_identical_and_exact_for_known_noise():
    x = np.random.default_rng(0).integers(10, 245, (4, 16, 16, 3)).astype(np.uint8)
    assert metrics.psnr(x, x) == math.inf
    signs = np.where(np.random.default_rng(1).random(x.shape) < 0.5, -5, 5)
    y = (x.astype(int) + signs).astype(np.uint8)  # |error| = 5 everywhere -> MSE 25
    assert metrics.psnr(x, y) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)


def test_region_ssim_is_one_for_identical_and_equals_full_ssim_on_the_interior_box():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (S, S, 3)).astype(np.uint8)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert metrics.region_ssim(x, x, (20, 30, 31, 38)) == pytest.approx(1.0, abs=1e-6)
    # a box whose window centres are exactly the 'valid' map of the whole image gives the whole-image SSIM
    full = ssim(*(torch.from_numpy(v).permute(2, 0, 1)[None].float() for v in (x, y)), data_range=255.0)
    assert metrics.region_ssim(x, y, (5, 5, S - 5, S - 5)) == pytest.approx(float(full), abs=1e-5)
    assert metrics.region_ssim(x, y, (20, 30, 31, 38)) < 0.99


def test_mouth_metrics_only_see_the_mouth_box():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (2, S, S, 3)).astype(np.uint8)
    boxes = np.array([[20, 36, 40, 46], [22, 38, 42, 48]])
    far = truth.copy()
    far[:, :20] = 0  # rows more than half an SSIM window above every box
    m = metrics.mouth_metrics(far, truth, boxes)
    assert np.all(m["psnr"] == math.inf) and np.allclose(m["ssim"], 1) and np.all(m["l1"] == 0)
    near = truth.copy()
    near[0, 40, 30] = 255 - near[0, 40, 30]  # one pixel inside frame 0's box
    m = metrics.mouth_metrics(near, truth, boxes)
    assert np.isfinite(m["psnr"][0]) and m["psnr"][1] == math.inf
    changed = np.abs(near[0, 40, 30].astype(int) - truth[0, 40, 30].astype(int)).sum()
    assert m["l1"][0] == pytest.approx(changed / 255 / (20 * 10 * 3)) and m["l1"][1] == 0


def test_mouth_boxes_cover_the_lips_in_whole_pixels():
    lips = np.array([[[20.3, 40.2], [35.7, 40.0], [28.0, 37.5], [28.0, 43.1]]], np.float32)
    (x1, y1, x2, y2), = metrics.mouth_boxes(lips, S)
    assert x1 <= 20 and x2 >= 36 and y1 <= 37 and y2 >= 44
    assert all(isinstance(v, np.integer) for v in (x1, y1, x2, y2))


# ----------------------------------------------------------------------------- silence


def test_silence_masks_find_the_silent_stretch_and_ignore_short_dips():
    fps, n = 25.0, 50
    t = np.arange(int(n / fps * SR)) / SR
    wave = 0.5 * np.sin(2 * np.pi * 220 * t)
    wave[int(0.8 * SR):int(1.4 * SR)] = 0  # frames 20..34 silent
    wave[int(0.3 * SR):int(0.34 * SR)] = 0  # a 40 ms dip around frame 8
    silent, speech, _ = metrics.silence_masks(wave, n, fps, threshold_db=-30, min_frames=3)
    assert silent[21:34].all() and not silent[:19].any() and not silent[36:].any()
    assert speech[:7].all() and speech[10:19].all() and speech[36:].all() and not speech[21:34].any()


def test_silence_threshold_is_an_amplitude_ratio_on_quiet_but_not_digitally_silent_pauses():
    """-30 dB means frame RMS below 10^(-30/20) = 0.032 of the clip's loud level: pauses 40 or 35 dB down (room
    tone, not zeros) are silent, ones 25 or 20 dB down are speech. Read as power (/10) the line would sit at -60 dB."""
    fps, per = 25.0, 8  # 8 frames per stretch
    order = [0, -40, 0, -35, 0, -25, 0, -20, 0]  # each stretch's level, dB below the loud one
    frame_db = np.repeat(order, per)
    n = len(frame_db)
    noise = np.random.default_rng(0).standard_normal(n * SR // 25)
    wave = np.repeat(10 ** (frame_db / 20), SR // 25) * noise / noise.std()  # RMS = the stretch's level
    silent, speech, rms = metrics.silence_masks(wave, n, fps, threshold_db=-30, min_frames=3)
    assert rms.min() > 1e-3  # no digital silence anywhere
    for k, db in enumerate(order):
        mid = slice(k * per + 1, (k + 1) * per - 1)  # frames whose 40 ms window lies inside this stretch
        quiet = db < -30
        assert (silent[mid] == quiet).all() and (speech[mid] == (not quiet)).all(), db


# ----------------------------------------------------------------------------- sync offsets with a known embedding


class BrightnessSync(nn.Module):
    """SyncNet stand-in whose embeddings are known: a window's per-frame lower-half brightness (visual) or per-frame
    mel mean (audio), centred and L2-normalised, so in-sync windows of the same signal embed identically."""

    def __init__(self, size=S, n_frames=5):
        super().__init__()
        self.config = SimpleNamespace(n_frames=n_frames, mel_per_frame=4, crop_size=size)

    def embed_visual(self, frames):  # (B, T, 3, S/2, S) -> (B, T)
        return F.normalize(frames.mean((2, 3, 4)) - frames.mean((1, 2, 3, 4))[:, None], dim=-1)

    def embed_audio(self, mel):  # (B, 80, 4T) -> (B, T)
        e = mel.mean(1).unflatten(-1, (-1, 4)).mean(-1)
        return F.normalize(e - e.mean(-1, keepdim=True), dim=-1)


def brightness_clip(n=60, seed=0):
    """uint8 crops whose lower-half brightness follows a random signal, and a mel carrying the same signal."""
    s = np.random.default_rng(seed).uniform(0.2, 0.8, n)
    crops = np.full((n, S, S, 3), 128, np.uint8)
    crops[:, S // 2:] = (s * 255).astype(np.uint8)[:, None, None, None]
    mel = torch.from_numpy(np.repeat(s, 4)).float().expand(80, -1)
    return crops, mel


def test_sync_score_of_an_in_sync_copy_is_offset_zero_at_distance_zero():
    crops, mel = brightness_clip()
    r = metrics.sync_score(BrightnessSync(), crops, mel)
    assert r["offset"] == 0 and r["dist"] < 0.02 and r["conf"] > 0.5
    assert len(r["dists"]) == 31


@pytest.mark.parametrize("shift", [3, -4, 11])
def test_sync_score_of_a_shifted_copy_finds_that_shift(shift):
    crops, mel = brightness_clip()
    late = metrics.sync_score(BrightnessSync(), crops, torch.roll(mel, 4 * shift, -1))  # audio lags by `shift`
    assert late["offset"] == shift
    moved = metrics.sync_score(BrightnessSync(), np.roll(crops, shift, 0), mel)  # video lags by `shift`
    assert moved["offset"] == -shift


def test_sync_score_resizes_crops_to_the_syncnet_size():
    crops, mel = brightness_clip()
    big = crops.repeat(2, 1).repeat(2, 2)  # 128 px crops for a 64 px SyncNet
    assert metrics.sync_score(BrightnessSync(), big, torch.roll(mel, 8, -1))["offset"] == 2


# ----------------------------------------------------------------------------- pieces of the evaluation


def test_holdout_references_come_from_the_head_far_from_the_target_and_have_faces():
    n, cut = 50, 40
    face = np.ones(n, bool)
    face[[3, 4, 5]] = False
    refs = ev.holdout_references(n, cut, face, np.random.default_rng(0))
    assert (refs < cut).all() and face[refs].all()
    assert (np.abs(refs - np.arange(n)) >= MIN_GAP).all()
    assert np.array_equal(refs, ev.holdout_references(n, cut, face, np.random.default_rng(0)))


def test_regenerated_frames_see_their_own_masked_crop_and_their_references_crop(setup, monkeypatch):
    """regenerate_crops: target k's UNet input is [its own crop, lower half masked; the crop of refs[k]], so the mouth
    can only come from the audio (a swapped or own reference would measure copying)."""
    model = setup.model
    crops = np.random.default_rng(0).integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    targets, refs = np.array([0, 1, 2, 5]), np.array([3, 4, 5, 0])
    calls, forward = [], model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda x, t, ctx: calls.append(x.clone()) or forward(x, t, ctx))
    windows = torch.zeros(4, 10 * model.audio.n_states, model.unet.config.cross_attention_dim)
    ev.regenerate_crops(model, crops, targets, refs, windows, batch_size=3)
    got = torch.cat(calls)
    with torch.no_grad():
        own = model.face.unet_input(crops)  # (6, 8, s, s): [masked crop i, crop i] for every frame
    torch.testing.assert_close(got[:, :4], own[targets, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 4:], own[refs, 4:], atol=1e-5, rtol=0)
    assert (own[targets, 4:] - own[refs, 4:]).abs().max() > 1e-2  # own and far references differ: visible


def test_clip_evaluation_guides_around_each_targets_own_lips(setup, monkeypatch):
    """evaluate_clip gives regenerate_crops the clip's lips in the model's crop pixels (points 48-67), and
    regenerate_crops hands each batch its targets' lips to LipSync.generate, as infer.py's pipeline does."""
    from lipsync.model import LipSync
    from lipsync.tracking import to_crop_coords
    clip = load_clip(setup.data / "heldout_0000")
    seen, real = [], LipSync.generate
    monkeypatch.setattr(LipSync, "generate", lambda self, u, w, g=None, lips=None:
                        seen.append(np.asarray(lips)) or real(self, u, w, g, lips))
    ev.evaluate_clip(setup.model, load_syncnet(str(setup.ckpt)), clip, seed=0, batch_size=4)
    n, S = len(clip), setup.model.crop_size
    assert len(seen) == -(-n // 4)
    want = to_crop_coords(clip.landmarks[:, 48:68], clip.boxes, S)
    np.testing.assert_allclose(np.concatenate(seen), want, atol=1e-4)


def test_syncnet_loads_from_config_and_state_or_a_bare_tiny_state(setup, tmp_path):
    net = load_syncnet(str(setup.ckpt))
    assert net.config == SyncNetConfig.tiny()
    bare = syncnet_from_entry(net.state_dict(), "bare")
    x, mel = torch.rand(2, 5, 3, 32, 64) * 2 - 1, torch.randn(2, 80, 20)
    assert torch.equal(net(x, mel), bare(x, mel))
    with pytest.raises(ValueError, match="neither the tiny nor the default"):
        syncnet_from_entry({"w": torch.zeros(3)}, "junk")


def test_oracle_generator_scores_perfectly_and_matches_ground_truth(setup, monkeypatch):
    """A generator that returns the real frames: inf PSNR, SSIM 1, L1 0, and the real video's r and sync."""
    monkeypatch.setattr(ev, "regenerate_crops", lambda model, crops, targets, refs, windows, *a, **k: crops[targets])
    clip = load_clip(setup.data / "heldout_0000")
    r = ev.evaluate_clip(setup.model, load_syncnet(str(setup.ckpt)), clip, seed=0)
    b = r["b"]["generated"]
    assert len(b["psnr"]) == 6 and np.all(b["psnr"] == math.inf) and np.allclose(b["ssim"], 1) and not b["l1"].any()
    assert np.isfinite(r["b"]["copy_reference"]["psnr"]).all()
    assert r["c"]["generated"] == r["c"]["ground_truth"]
    s = ev.summarise([r])["synthetic"]
    assert s["a"]["r"]["generated"] == s["a"]["r"]["ground_truth"] > 0.9
    assert json.loads(json.dumps(to_json(s), allow_nan=False))["b"]["generated"]["psnr"] == "inf"


def test_synthetic_sync_keeps_train_learning_check_contract(setup):
    res = ev.synthetic_sync(setup.model, sorted(setup.data.iterdir()), seed=41, max_frames=20)
    assert res["clips"] == N_CLIPS and res["frames"] == N_CLIPS * 20
    assert -1 <= res["r"] <= 1 and -1 <= res["r_reference"] <= 1


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_strip_with_all_four_groups(setup, capsys):
    out = setup.root / "out"
    ev.main(["--ckpt", str(setup.ckpt), "--data", str(setup.data), "--out", str(out)])
    printed = capsys.readouterr().out
    for group in ("(a)", "(b)", "(c)", "(d)", "copy_reference", "OUR SyncNet"):
        assert group in printed
    report = json.loads((out / "eval.json").read_text())
    s = report["summary"]["synthetic"]
    assert s["clips"] == N_CLIPS and set(s) >= {"a", "b", "c", "d"}
    assert s["a"]["r"]["ground_truth"] > 0.9 and s["a"]["r"]["mean_mouth"] is None
    assert s["b"]["frames"] == N_CLIPS * 6
    assert s["d"]["ground_truth"]["silent"] < s["d"]["ground_truth"]["speech"]  # synthetic silence = closed lips
    assert len(report["per_clip"]) == N_CLIPS
    strip = iio.imread(out / "heldout_strip.png")
    tile = 128  # 64 px crops are shown at 2x
    assert strip.shape == (N_CLIPS * 3 * tile + (N_CLIPS - 1) * 4 * 2, 6 * tile, 3)


def test_cli_errors_are_clear(setup, tmp_path):
    with pytest.raises(SystemExit, match="not a complete prepared clip"):
        ev.main(["--ckpt", str(setup.ckpt), "--clip", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="cannot load"):
        ev.main(["--ckpt", str(tmp_path / "missing.pt"), "--data", str(setup.data), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no complete 'val' clips"):
        ev.main(["--ckpt", str(setup.ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
