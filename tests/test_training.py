"""lipsync.training: the loss is exactly the documented weighted sum (stubbed perceptual loss, discriminators and
SyncNet with known outputs), the GAN terms switch on at start_gan, and training feeds the UNet what inference does."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import train
from lipsync.tools import synthetic
from lipsync.training import steps
from lipsync.training.data import Stage1Dataset, Stage2Dataset
from lipsync.training.generator import onto_whisper
from lipsync.training.loop import batch_at
from lipsync.training.losses import mouth_crops
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.audio import load_audio
from lipsync.training.prepare import add_whisper_features
from lipsync.whisper import WhisperEncoder, WhisperEncoderConfig
from lipsync.model import LipSync
from lipsync.training.steps import discriminator_loss, frames_of, generate_batch, generator_losses, keep_loss, vae_step
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WEIGHTS = dict(loss=train.LossWeights(l1=1.3, lower=2.5, mouth=0.45, perceptual=0.7, gan=0.11, mouth_gan=0.23, fm=0.05,
                                      sync=0.31),
               start_gan=3, augment=train.AugmentRates(mel=0.0))
PERCEPTUAL, COS = 0.37, 0.8  # what the stubs return
LOGITS = {"face": 0.2, "mouth": 0.6}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i in (0, 1):
        synthetic.write_synthetic_clip(root, f"train_{i}", synthetic.make_synthetic_clip(i, "train", seconds=2.0, size=64, seed=5),
                             split="train", seed=5)
    return root


def tiny_model():
    torch.manual_seed(0)
    return LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()).requires_grad_(False),
                   MelEncoder(MelEncoderConfig.tiny()), 64)


def stub_perceptual(pred, target):
    return PERCEPTUAL + 0 * (pred - target).sum()


class StubDisc(torch.nn.Module):
    """Features: the per-sample image mean times 1..4; logits: a constant (generator side) or, with logit=None,
    the per-sample mean (so the discriminator loss can tell real from fake)."""

    def __init__(self, logit=None):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))  # (N,)
        feats = [k * m[:, None] for k in (1.0, 2.0, 3.0, 4.0)]
        logits = m[:, None, None, None].expand(-1, 1, 2, 2)
        if self.logit is not None:
            logits = self.logit + 0 * logits
        return feats, logits


class StubSyncNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, frames, mel):
        self.calls.append((frames, mel))
        return COS + 0 * frames.sum() + torch.zeros(len(frames))


def by_hand_l1(pred, target, lower_weight):
    """Mean |pred - target| with rows >= S/2 counted lower_weight times, normalised by the mean row weight."""
    S = pred.shape[-2]
    d = (pred - target).abs()
    upper, lower = d[..., :S // 2, :].mean(), d[..., S // 2:, :].mean()
    return (upper + lower_weight * lower) / (1 + lower_weight)


def mouth_by_hand(pred, target, boxes):
    """The mouth L1: mean |pred - target| over each sample's mouth box, both resampled to S/2 x S/2."""
    S = pred.shape[-1]
    return (mouth_crops(pred, boxes, S // 2) - mouth_crops(target, boxes, S // 2)).abs().mean()


def fm_by_hand(real, fake):
    """feature_matching of StubDisc: sum over k = 1..4 of mean |k m(real) - k m(fake)| = 10 mean |dm|."""
    return 10 * (real.mean(dim=(1, 2, 3)) - fake.mean(dim=(1, 2, 3))).abs().mean()


@pytest.mark.parametrize("step", [2, 3])
def test_stage2_generator_loss_is_the_documented_weighted_sum_with_gan_from_start_gan(data, step):
    cfg = train.TrainConfig(**WEIGHTS)
    batch = batch_at(Stage2Dataset(data, "train", T=5, seed=0), 0, 2, seed=0, rank=0)
    model, sync = tiny_model(), StubSyncNet()
    discs = {k: StubDisc(v) for k, v in LOGITS.items()}
    loss, logs, pred, target = generator_losses(model, batch, cfg, stub_perceptual, step, discs, sync)

    flat = frames_of(batch)
    boxes, S = flat["mouth_box"], target.shape[-1]
    torch.testing.assert_close(target, flat["target"])
    w = cfg.loss
    l1 = by_hand_l1(pred, target, w.lower)
    g = {k: (1 - v) ** 2 for k, v in LOGITS.items()}  # LSGAN generator term on constant logits
    fm = {"face": fm_by_hand(target, pred),
          "mouth": fm_by_hand(mouth_crops(target, boxes, S), mouth_crops(pred, boxes, S))}
    gan = w.gan * g["face"] + w.mouth_gan * g["mouth"] + w.fm * (fm["face"] + fm["mouth"])
    gate = 1.0 if step >= cfg.start_gan else 0.0
    mouth = mouth_by_hand(pred, target, boxes)
    expect = w.l1 * l1 + w.mouth * mouth + w.perceptual * PERCEPTUAL + gate * gan + w.sync * -math.log(COS)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert gan.item() > 0.01 * loss.item()  # the GAN part is large enough to see
    assert logs["l1"] == pytest.approx(l1.item(), rel=1e-6) and logs["perceptual"] == pytest.approx(PERCEPTUAL)
    assert logs["mouth"] == pytest.approx(mouth.item(), rel=1e-6)
    assert logs["g_face"] == pytest.approx(g["face"]) and logs["g_mouth"] == pytest.approx(g["mouth"])
    assert logs["fm_face"] == pytest.approx(fm["face"].item(), rel=1e-5)
    assert logs["fm_mouth"] == pytest.approx(fm["mouth"].item(), rel=1e-5)
    assert logs["sync"] == pytest.approx(-math.log(COS), rel=1e-6)
    # the SyncNet scores the generated lower halves, clip by clip, against the clips' sync mel
    (frames, mel), = sync.calls
    torch.testing.assert_close(frames, pred.view(2, 5, 3, S, S)[:, :, :, S // 2:], rtol=0, atol=0)
    assert torch.equal(mel, batch["sync_mel"])


@pytest.mark.parametrize("mouth", [0.0, 0.45])
def test_stage1_loss_is_weighted_l1_plus_mouth_l1_plus_perceptual_only(data, mouth):
    cfg = train.TrainConfig(**{**WEIGHTS, "loss": dataclasses.replace(WEIGHTS["loss"], mouth=mouth)})
    batch = batch_at(Stage1Dataset(data, "train", seed=0), 0, 3, seed=0, rank=0)
    loss, logs, pred, target = generator_losses(tiny_model(), batch, cfg, stub_perceptual, 10)
    m = mouth_by_hand(pred, target, batch["mouth_box"])
    assert m > 0.01  # the generated mouth differs from the real one: the term would show
    expect = cfg.loss.l1 * by_hand_l1(pred, target, cfg.loss.lower) + mouth * m + cfg.loss.perceptual * PERCEPTUAL
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert set(logs) == ({"l1", "perceptual", "mouth"} if mouth else {"l1", "perceptual"})


def test_keep_loss_is_l1_to_the_init_models_faces_on_frames_that_are_their_own_reference(data):
    """--loss.keep: the fine-tune's and --init's faces on infer.py's inputs (reference = the frame itself), first half
    of the batch, face L1 + mouth-weighted mouth L1; zero while the fine-tune equals --init."""
    cfg = train.TrainConfig(**{**WEIGHTS, "loss": dataclasses.replace(WEIGHTS["loss"], keep=0.6)})
    batch = batch_at(Stage1Dataset(data, "train", seed=0), 0, 4, seed=0, rank=0)
    assert not torch.equal(batch["reference"], batch["target"])  # else "own reference" would go untested
    model, teacher = tiny_model(), tiny_model()
    assert keep_loss(model, teacher, batch, cfg.mel_context, cfg.loss.mouth, 2).item() < 1e-5  # float noise only
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    own = {k: batch[k][:2] for k in ("target", "mel", "mouth_box")}
    own["reference"] = own["target"]
    got, want = generate_batch(model, own, cfg.mel_context), generate_batch(teacher, own, cfg.mel_context)
    expect = (got - want).abs().mean() + cfg.loss.mouth * mouth_by_hand(got, want, own["mouth_box"])
    assert expect > 1e-3
    keep = keep_loss(model, teacher, batch, cfg.mel_context, cfg.loss.mouth, 2)
    assert keep.item() == pytest.approx(expect.item(), rel=1e-5)
    # generator_losses adds it, weighted, to the stage-1 loss (on half of the 4 frames) and logs it
    loss, logs, *_ = generator_losses(model, batch, cfg, stub_perceptual, 10, teacher=teacher)
    plain, _, *_ = generator_losses(model, batch, cfg, stub_perceptual, 10)
    assert logs["keep"] == pytest.approx(expect.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.6 * expect.item(), rel=1e-5)
    loss.backward()  # the teacher only sets the target: no gradient reaches it
    assert all(p.grad is None for p in teacher.parameters())


def test_mel_augmentation_draws_anew_each_step_and_seed_and_repeats_a_repeated_step(data, monkeypatch):
    """--augment.mel: every step, --seed, replica (rank) and micro-batch draws its own level/EQ/shift per sample, so
    the model never sees one fixed distortion twice; the same step draws the same again (a resumed run is exact)."""
    batch = batch_at(Stage1Dataset(data, "train", seed=0), 0, 3, seed=0, rank=0)
    seen = []
    real = steps.generate_batch
    monkeypatch.setattr(steps, "generate_batch", lambda model, b, c: seen.append(b["mel"].clone()) or real(model, b, c))
    model = tiny_model().eval()
    for seed, step, rank, micro in ((41, 0, 0, 0), (41, 1, 0, 0), (41, 0, 0, 0), (41, 7, 0, 0), (42, 0, 0, 0),
                                    (41, 0, 1, 0), (41, 0, 0, 1), (41, 0, 1, 0)):
        cfg = train.TrainConfig(seed=seed, augment=train.AugmentRates(mel=1.0))  # every sample augmented
        generator_losses(model, batch, cfg, stub_perceptual, step, rank=rank, micro=micro)
    s0, s1, again, s7, other_seed, rank1, micro1, rank1_again = seen
    assert torch.equal(s0, again) and torch.equal(rank1, rank1_again)
    pairs = {"input vs step 0": (batch["mel"], s0), "step 0 vs 1": (s0, s1), "step 1 vs 7": (s1, s7),
             "step 0 vs 7": (s0, s7), "seed 41 vs 42": (s0, other_seed), "rank 0 vs 1": (s0, rank1),
             "micro-batch 0 vs 1": (s0, micro1), "rank 1 vs micro-batch 1": (rank1, micro1)}
    for name, (a, b) in pairs.items():
        assert all(not torch.equal(a[i], b[i]) for i in range(3)), name  # each sample's draw differs
    cfg = train.TrainConfig(augment=train.AugmentRates(mel=0.0))
    generator_losses(model, batch, cfg, stub_perceptual, 3)
    assert torch.equal(seen[-1], batch["mel"])  # off means off


def test_discriminator_loss_is_lsgan_on_faces_and_mouths_with_the_fakes_detached():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    pred = (torch.rand(4, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    boxes = torch.tensor([[8.0, 16, 24, 24]]).repeat(4, 1)
    discs = {"face": StubDisc(), "mouth": StubDisc()}
    loss, logs = discriminator_loss(discs, pred, target, boxes)

    def lsgan(real, fake):  # mean (1 - D(real))^2 + mean D(fake)^2, D = per-sample mean here
        return ((1 - real.mean(dim=(1, 2, 3))) ** 2).mean() + (fake.mean(dim=(1, 2, 3)) ** 2).mean()
    d_face = lsgan(target, pred)
    d_mouth = lsgan(mouth_crops(target, boxes, 32), mouth_crops(pred, boxes, 32))
    assert loss.item() == pytest.approx((d_face + d_mouth).item(), rel=1e-6)
    assert logs["d_face"] == pytest.approx(d_face.item(), rel=1e-6)
    assert logs["d_mouth"] == pytest.approx(d_mouth.item(), rel=1e-6)
    assert not loss.requires_grad  # nothing flows back into the generator's output


def test_vae_loss_is_l1_plus_weighted_perceptual_plus_weighted_kl(data):
    batch = batch_at(Stage1Dataset(data, "train", seed=0), 0, 2, seed=0, rank=0)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny())
    loss, logs = vae_step(vae, batch, stub_perceptual, kl_weight=0.01, perceptual_weight=0.7)
    assert logs["perceptual"] == pytest.approx(PERCEPTUAL) and logs["kl"] > 1
    assert loss.item() == pytest.approx(logs["l1"] + 0.7 * PERCEPTUAL + 0.01 * logs["kl"], rel=1e-6)


def test_vae_step_reconstructs_from_the_posterior_mean(data):
    """The decoder is trained on what inference feeds it (FaceVAE.encode's mean), so the step draws no noise."""
    batch = batch_at(Stage1Dataset(data, "train", seed=0), 0, 2, seed=0, rank=0)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny())
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(vae_step(vae, batch, stub_perceptual)[1]["l1"])
    x = torch.cat([batch["target"], batch["reference"]])
    with torch.no_grad():
        expected = (vae.decode(vae.encode(x).mean) - x).abs().mean().item()
    assert losses[0] == losses[1] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- training feeds what inference feeds


def spy_unet(model, monkeypatch):
    calls = []
    forward = model.unet.forward

    def spy(x, t, ctx):
        calls.append((x.detach().clone(), ctx.detach().clone()))
        return forward(x, t, ctx)
    monkeypatch.setattr(model.unet, "forward", spy)
    return calls


def interior_items(ds, n, margin=8):
    """n dataset items whose audio windows (with context) lie inside the file."""
    items = []
    for i in range(200):
        item = ds[i]
        clip = ds.clips[int(item["clip"])]
        f = int(item["frame"]) if item["frame"].dim() == 0 else int(item["frame"][0])
        if margin <= f and f + ds.T + margin <= len(clip):
            items.append(item)
        if len(items) == n:
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    raise AssertionError("not enough interior items")


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_training_gives_the_unet_the_inference_image_input_and_audio_tokens(data, tmp_path, monkeypatch, fps):
    """generator_losses' UNet call equals inference's: image input = FaceVAE.unet_input(target crop, reference crop)
    ([masked, reference] order), tokens = PE + model.audio_windows over the whole file at the frame's index (interior
    frames, where the dataset's mel span and the whole-file encoding see the same audio)."""
    if fps != 25.0:  # the same clips, declared 30 fps: the audio windows must follow time, not frame counts
        for name in ("train_0", "train_1"):
            shutil.copytree(data / name, tmp_path / name)
            meta = json.loads((tmp_path / name / "meta.json").read_text())
            (tmp_path / name / "meta.json").write_text(json.dumps(dict(meta, fps=fps)))
    root = data if fps == 25.0 else tmp_path
    ds = Stage1Dataset(root, "train", seed=0, mel_context=4)
    batch = interior_items(ds, 3)
    model = tiny_model().eval()
    calls = spy_unet(model, monkeypatch)
    generator_losses(model, batch, train.TrainConfig(mel_context=4), stub_perceptual, 0)
    (unet_in, ctx), = calls
    for b in range(3):
        clip = ds.clips[int(batch["clip"][b])]
        f, r = int(batch["frame"][b]), int(batch["ref_frame"][b])
        with torch.no_grad():
            image = model.face.unet_input(np.array(clip.crops[[f]]), np.array(clip.crops[[r]]))[0]
            tokens = model.pe(model.audio_windows(clip.wave, len(clip), fps))[f]
        torch.testing.assert_close(unet_in[b], image, atol=1e-5, rtol=0)
        torch.testing.assert_close(ctx[b], tokens, atol=1e-4, rtol=0)


def test_every_generator_loss_term_sends_gradient_to_the_unet(data):
    """Each term alone (the others weighted 0) must reach the generator: a detached branch would leave the loss
    value unchanged and the term silently untrained. Real (tiny) critics and SyncNet, GAN on."""
    from lipsync.training.losses import PatchDiscriminator, PerceptualLoss
    from lipsync.training.syncnet import SyncNet, SyncNetConfig
    batch = batch_at(Stage2Dataset(data, "train", T=5, seed=0), 0, 1, seed=0, rank=0)
    torch.manual_seed(0)
    discs = torch.nn.ModuleDict({k: PatchDiscriminator(channels=(8, 16, 32, 32)) for k in ("face", "mouth")})
    discs.requires_grad_(False)
    syncnet = SyncNet(SyncNetConfig.tiny()).requires_grad_(False)
    perceptual = PerceptualLoss(None, size=None)
    zero = {k: 0.0 for k in ("l1", "perceptual", "gan", "mouth_gan", "fm", "sync")}
    for term in zero:
        model = tiny_model()
        cfg = train.TrainConfig(loss=train.LossWeights(**dict(zero, **{term: 1.0})), start_gan=0)
        loss, *_ = generator_losses(model, batch, cfg, perceptual, 0, discs, syncnet)
        loss.backward()
        grad = sum(p.grad.abs().sum() for p in model.unet.parameters() if p.grad is not None)
        assert grad > 0, term
        assert all(p.grad is None for p in discs.parameters())  # the critics are not trained by this loss


def test_training_on_precomputed_whisper_features_gives_the_inference_tokens(data, tmp_path, monkeypatch):
    """features="whisper": the dataset's slice of <clip>/whisper.npy, through training, reaches the UNet as the same
    tokens (PE included) that inference makes from the encoder's output on the whole file, at every frame."""
    rng = np.random.default_rng(0)
    feats = {}
    for name in ("train_0", "train_1"):
        shutil.copytree(data / name, tmp_path / name)
        feats[name] = rng.standard_normal((100, 5, 128)).astype(np.float32)  # (T50 = 2 s * 50, L, D)
        np.save(tmp_path / name / "whisper.npy", feats[name])
    ds = Stage1Dataset(tmp_path, "train", seed=0, features="whisper")
    batch = batch_at(ds, 0, 4, seed=0, rank=0)
    model = tiny_model().eval()
    calls = spy_unet(model, monkeypatch)
    generator_losses(model, batch, train.TrainConfig(), stub_perceptual, 0)
    (_, ctx), = calls
    for b in range(4):
        clip = ds.clips[int(batch["clip"][b])]
        whole = torch.from_numpy(feats[clip.name]).permute(1, 0, 2)[None]  # what an encoder gives: (1, L, T, D)
        monkeypatch.setattr(model.audio, "encode", lambda wave: whole)
        tokens = model.pe(model.audio_windows(clip.wave, len(clip), clip.fps))[int(batch["frame"][b])]
        torch.testing.assert_close(ctx[b], tokens, atol=1e-6, rtol=0)


def tiny_whisper(seed):
    torch.manual_seed(seed)
    return WhisperEncoder(WhisperEncoderConfig(n_mels=80, d_model=16, layers=1, heads=2, ffn=32)).eval()


def test_whisper_features_are_the_encoders_whole_file_states_and_are_redone_for_another_encoder(data, tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(data / "train_0", clip)
    quiet = lambda *_: None
    assert add_whisper_features([clip], tiny_whisper(0), say=quiet) == 1
    got = np.load(clip / "whisper.npy")
    wave = load_audio(clip / "audio.wav")
    want = tiny_whisper(0).encode(wave)[0].transpose(0, 1).numpy()  # (L, T, D) -> (T, L, D)
    assert got.dtype == np.float16 and got.shape == (len(wave) // 320, 2, 16) == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert add_whisper_features([clip], tiny_whisper(0), say=quiet) == 0  # cached: same encoder
    assert add_whisper_features([clip], tiny_whisper(1), say=quiet) == 1
    assert np.abs(np.load(clip / "whisper.npy").astype(np.float32) - want).max() > 0.1  # redone with the new one


def test_onto_whisper_keeps_every_unet_weight_but_the_cross_attention_keys_and_values():
    model, audio = tiny_model(), tiny_whisper(0)
    moved = onto_whisper(model, audio)
    assert moved.audio is audio and not moved.trainable_audio and moved.unet.config.cross_attention_dim == 16
    old, new = model.unet.state_dict(), moved.unet.state_dict()
    rewired = [k for k in old if "attn2.to_k." in k or "attn2.to_v." in k]
    assert rewired and set(old) == set(new)
    for k in old:
        if k in rewired:
            assert new[k].shape[1] == 16 and old[k].shape[1] != 16, k
        else:
            assert torch.equal(old[k], new[k]), k
    windows = torch.randn(2, 10 * 2, 16)  # (B, n L, D) of the 2-state encoder
    assert moved(moved.face.unet_input(torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1),
                 windows).shape == (2, 3, 64, 64)
