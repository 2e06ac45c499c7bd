"""train.py --personalize: a person's video or photo -> puppet clips -> VAE decoder, then stage 1, fine-tuned from
--init -> lipsync.pt."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import soundfile as sf
import torch

import train
from lipsync.tools import personalize
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.checkpoint import export, load_lipsync
from lipsync.model import LipSync
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig
from lipsync.video import read_video, write_video
from media import VIDEO

pytest.importorskip("mediapipe")  # the face tracker: a test dependency (requirements-dev.txt), so this runs in CI


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    model = LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()), MelEncoder(MelEncoderConfig.tiny()), 64)
    path = tmp_path_factory.mktemp("init") / "init.pt"
    export(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["video", "photo"])
def test_personalize_fine_tunes_the_init_model_on_puppets_of_the_face(tmp_path, init, kind, monkeypatch):
    frames, _ = read_video(VIDEO)
    if kind == "video":  # a silent 10-frame clip of the demo face
        source = tmp_path / "me.mp4"
        write_video(source, frames[:10], 25.0)
    else:
        source = tmp_path / "me.jpg"
        iio.imwrite(source, frames[0])
    monkeypatch.setattr(personalize, "CLIPS", dict(clips=2, seconds=0.6))
    out = tmp_path / "run"
    train.main(["--personalize", str(source), "--out", str(out), "--init", str(init), "--decoder.steps", "2",
                "--decoder.batch", "2", "--stage1.steps", "3", "--stage1.batch", "2", "--log_every", "1"])

    clips = sorted((out / "clips").iterdir())
    assert [c.name for c in clips] == ["me_0000", "me_0001"]
    for c in clips:  # puppets at the init model's crop size, each with its own synthesised speech
        meta = json.loads((c / "meta.json").read_text())
        assert meta["tracker"] == "puppet" and meta["crop_size"] == 64 and meta["frames"] == 15
        assert np.load(c / "crops.npy").shape == (15, 64, 64, 3)
        assert np.abs(sf.read(c / "audio.wav")[0]).max() > 0.01
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["stage"] == "decoder"] == [1, 2]  # the VAE decoder first
    assert [s["step"] for s in steps if s["stage"] == "stage1"] == [1, 2, 3]
    assert all(s["keep"] >= 0 for s in steps if s["stage"] == "stage1")  # held near --init in infer.py's mode

    before, after = load_lipsync(str(init)), load_lipsync(str(out / "lipsync.pt"))
    assert after.crop_size == 64
    vae = after.vae.state_dict()
    for name, p in before.vae.state_dict().items():  # the encoder is the init's: the UNet's latents mean the same
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(p, vae[name]), name
    assert any(not torch.equal(p, vae[k]) for k, p in before.vae.state_dict().items() if k.startswith("decoder."))
    moved = [(after.unet.state_dict()[k] - p).abs().max().item() for k, p in before.unet.state_dict().items()]
    assert max(moved) > 0  # trained ...
    assert max(moved) < 0.01  # ... from the init weights (3 steps at lr 2e-4), not from a fresh random UNet


def ckpt(rule, whisper=False):
    """What personalize reads of an --init checkpoint: its config's rule and crop, its opening head (if any)."""
    opening = {"config": {}, "state": {}, **({"whisper": {"config": {}, "state": {}}} if whisper else {})}
    return {"config": {"reference": rule, "crop_size": 128}, "opening": opening if rule == "audio" else None}


def test_personalize_trains_with_the_init_models_rule_when_it_keeps_the_videos_mouth_out_of_view():
    """A model that dubs with closed_pose, or with audio through a head on a whisper of its own (which the fine-tune
    keeps), is personalised with that rule; MuseTalk's own rule (self), a head the fine-tune drops, and an explicit
    --reference leave the flag as it is."""
    cfg = train.TrainConfig()
    default = cfg.reference
    assert personalize.fine_tune_reference(cfg, ckpt("audio", whisper=True)) == "audio"
    assert personalize.fine_tune_reference(cfg, ckpt("closed_pose")) == "closed_pose"
    assert personalize.fine_tune_reference(cfg, ckpt("audio", whisper=False)) == default
    assert personalize.fine_tune_reference(cfg, ckpt("self")) == default
    assert personalize.fine_tune_reference(cfg, {"config": {"crop_size": 128}}) == default  # older files: no rule
    chosen = train.TrainConfig(reference="closed_pose")
    assert personalize.fine_tune_reference(chosen, ckpt("audio", whisper=True)) == "closed_pose"


def test_personalize_run_hands_the_fine_tune_the_rule_it_chose(tmp_path, monkeypatch):
    """personalize_run passes fine_tune_reference's choice on to the run (the fine-tune and the exported rule)."""
    (tmp_path / "me.jpg").write_bytes(b"")
    (tmp_path / "init.pt").write_bytes(b"")
    monkeypatch.setattr(personalize, "read_checkpoint", lambda path: ckpt("audio", whisper=True))
    monkeypatch.setattr(personalize, "make_clips", lambda *args, **kwargs: tmp_path / "clips")
    cfg = train.TrainConfig(personalize=str(tmp_path / "me.jpg"), init=str(tmp_path / "init.pt"), out=str(tmp_path))
    run = personalize.personalize_run(cfg, ("decoder", "stage1"), "unused.pt")
    assert run.reference == "audio" and run.data == str(tmp_path / "clips")
    assert run.stage == "decoder"  # an audio-rule model keeps its UNet: stage 1 on puppets brought the copying back
    monkeypatch.setattr(personalize, "read_checkpoint", lambda path: ckpt("self"))
    assert personalize.personalize_run(cfg, ("decoder", "stage1"), "unused.pt").stage == "decoder,stage1"
