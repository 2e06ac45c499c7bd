"""train.py: resume is bit-exact (also after kill -9), checkpoints are atomic, DDP replicas agree, the critics learn
only from their own loss. The "reduces loss on a fixed batch" tests are smoke tests (each stage runs and its gradients
point somewhere useful); what each loss computes is pinned down exactly in test_training.py."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.checkpoint import atomic_save
from lipsync.model import LipSync
from lipsync.tools import synthetic
from lipsync.training.data import REFERENCE_RULES, Stage1Dataset, Stage2Dataset
from lipsync.training.flags import STAGES, parse_stages
from lipsync.training.generator import generator_data
from lipsync.training.loop import Run, batch_at, train_loop
from lipsync.training.losses import PatchDiscriminator, PerceptualLoss
from lipsync.training.steps import discriminator_loss, frames_of, generator_losses, lr_lambda, syncnet_step, vae_step
from lipsync.training.syncnet import SyncNet, SyncNetConfig, load_syncnet
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i, split in ((0, "train"), (1, "train"), (0, "heldout")):
        clip = synthetic.make_synthetic_clip(i, split, seconds=2.0, size=64, seed=3)
        synthetic.write_synthetic_clip(root, f"{split}_{i}", clip, split=split, seed=3)
    return str(root)


def fixed_batch(dataset, n):
    return batch_at(dataset, 0, n, seed=0, rank=0)


def optimise(params, loss_fn, steps=8, lr=1e-3):
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_model():
    torch.manual_seed(0)
    return LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()).requires_grad_(False),
                   MelEncoder(MelEncoderConfig.tiny()), 64)


def test_vae_stage_reduces_loss_on_a_fixed_batch(data):
    batch = fixed_batch(Stage1Dataset(data, "train"), 4)
    torch.manual_seed(0)
    vae, perceptual = AutoencoderKL(VAEConfig.tiny()), PerceptualLoss(None, size=None)
    losses = optimise(vae.parameters(), lambda: vae_step(vae, batch, perceptual)[0], lr=2e-3)
    assert losses[-1] < 0.9 * losses[0]


def test_syncnet_stage_reduces_loss_on_a_fixed_batch(data):
    batch = fixed_batch(Stage2Dataset(data, "train", T=5 + 2 * 4), 4)
    torch.manual_seed(0)
    net = SyncNet(SyncNetConfig.tiny())

    def loss():
        return syncnet_step(net, batch, 5, 4, generator=torch.Generator().manual_seed(0))[0]
    losses = optimise(net.parameters(), loss, steps=10, lr=3e-4)
    assert losses[-1] < losses[0]


def test_stage1_generator_reduces_loss_on_a_fixed_batch(data):
    cfg = train.TrainConfig()
    batch = fixed_batch(Stage1Dataset(data, "train"), 4)
    model, perceptual = tiny_model(), PerceptualLoss(None, size=None)
    losses = optimise(model.parameters(), lambda: generator_losses(model, batch, cfg, perceptual, 0)[0])
    assert losses[-1] < 0.9 * losses[0]


def test_stage2_generator_and_discriminators_learn_on_a_fixed_batch(data):
    cfg = train.TrainConfig(start_gan=0)
    batch = fixed_batch(Stage2Dataset(data, "train", T=5), 2)
    model, perceptual = tiny_model(), PerceptualLoss(None, size=None)
    discs = torch.nn.ModuleDict({k: PatchDiscriminator(channels=(8, 16, 32, 32)) for k in ("face", "mouth")})
    syncnet = SyncNet(SyncNetConfig.tiny()).requires_grad_(False)

    l1 = []

    def g_loss():
        discs.requires_grad_(False)
        loss, logs, *_ = generator_losses(model, batch, cfg, perceptual, 0, discs, syncnet)
        assert {"g_face", "g_mouth", "fm_face", "sync"} <= set(logs)
        l1.append(logs["l1"])
        return loss
    g = optimise(model.parameters(), g_loss, steps=12, lr=2e-3)
    discs.requires_grad_(True)
    with torch.no_grad():
        pred, target = generator_losses(model, batch, cfg, perceptual, 0)[2:]
    boxes = frames_of(batch)["mouth_box"]
    d = optimise(discs.parameters(), lambda: discriminator_loss(discs, pred, target, boxes)[0], lr=2e-3)
    assert g[-1] < 0.95 * g[0] and l1[-1] < 0.9 * l1[0]
    assert d[-1] < d[0]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def common_args(data, out):
    return ["--data", data, "--out", out, "--stage1.batch", "2", "--syncnet.batch", "2", "--vae.batch", "2",
            "--log_every", "1", "--optim.warmup", "2"]


@pytest.fixture(scope="module")
def vae_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vae_run"))
    train.main(common_args(data, out) + ["--stage", "vae", "--vae.steps", "2"])
    return out


def assert_identical(a, b, where="checkpoint"):
    """Bit-for-bit equality of nested checkpoint contents."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(straight, resumed, stage, files, after):
    """Final checkpoints bit-identical (the run's own flags aside) and every loss logged after step `after`
    identical (the last record of each step: a killed run may have logged a step it then redid)."""
    for name in files:
        a, b = (torch.load(os.path.join(out, name), weights_only=True) for out in (straight, resumed))
        a.pop("config", None), b.pop("config", None)
        assert_identical(a, b, name)

    def losses(out):
        recs = {r["step"]: r for r in read_metrics(out) if r.get("stage") == stage}
        return {s: {k: v for k, v in r.items() if k not in ("time", "it_s")} for s, r in recs.items() if s > after}
    a, b = losses(straight), losses(resumed)
    assert a and a == b


# Resume runs: 4-5 steps with a 3-step warm-up, cut after step 2, so the cut falls inside the warm-up and the decay
# comes after it: the optimizer's moments, the scheduler's position and (in the vae stage, which samples the
# posterior) the global RNG all have to come back for the rest of the run to be the same.
RESUME = ["--optim.warmup", "3", "--log_every", "1"]


@pytest.fixture(scope="module")
def train_only(data, tmp_path_factory):
    """The training clips without the held-out one: a generator stage then skips its (slow) held-out check."""
    root = tmp_path_factory.mktemp("train_only")
    for name in os.listdir(data):
        if name.startswith("train_"):
            shutil.copytree(os.path.join(data, name), root / name)
    return str(root)


@pytest.mark.usefixtures("one_thread")
def test_stop_at_then_resume_is_bit_identical_to_an_uninterrupted_run(train_only, vae_run, tmp_path):
    for stage, steps, files in (("vae", "--vae.steps=5", ("vae.pt", "vae.final.pt")),
                                ("stage1", "--stage1.steps=4", ("stage1.pt", "lipsync.pt"))):
        outs = {}
        for name in ("straight", "resumed"):
            out = outs[name] = str(tmp_path / stage / name)
            os.makedirs(out)
            if stage == "stage1":
                shutil.copy(os.path.join(vae_run, "vae.final.pt"), out)
            args = common_args(train_only, out) + RESUME + ["--stage", stage, steps, "--ckpt_every", "100"]
            if name == "resumed":
                train.main(args + ["--stop_at", "2"])
                assert torch.load(os.path.join(out, f"{stage}.pt"), weights_only=True)["step"] == 2
                args = args + ["--resume"]
            train.main(args)
        assert_same_run(outs["straight"], outs["resumed"], stage, files, after=2)


KILLABLE = """
import os, sys, time
import train
real, calls = train.clip_and_step, [0]

def clip_and_step(*args):  # at optimizer step KILL_AT: say so, then hang until killed
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        open(os.environ["MARK"], "w").close()
        time.sleep(600)
    real(*args)
train.clip_and_step = clip_and_step
train.main(sys.argv[1:])
"""


def test_kill_9_mid_step_then_resume_is_bit_identical_to_an_uninterrupted_run(train_only, tmp_path):
    """A real SIGKILL from outside, in the middle of step 4 (after its backward pass, before the optimizer
    step), two steps after the last checkpoint: the resumed run redoes steps 3 and 4 and ends bit-identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT="0", MARK=str(tmp_path / "mark"))
    outs = {name: str(tmp_path / name) for name in ("straight", "killed")}

    def start(out, kill_at=0):
        args = common_args(train_only, out) + RESUME + ["--stage", "vae", "--vae.steps", "5", "--ckpt_every", "2"]
        return subprocess.Popen([sys.executable, "-c", KILLABLE, *args, "--resume"], cwd=ROOT,
                                env=dict(env, KILL_AT=str(kill_at)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    straight = start(outs["straight"])
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    victim = start(outs["killed"], kill_at=4)
    for _ in range(3000):
        if os.path.exists(env["MARK"]) or victim.poll() is not None:
            break
        time.sleep(0.1)
    assert os.path.exists(env["MARK"]), victim.stderr.read()[-2000:]
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    victim.stderr.close()
    assert torch.load(os.path.join(outs["killed"], "vae.pt"), weights_only=True)["step"] == 2
    assert not os.path.exists(os.path.join(outs["killed"], "vae.final.pt"))
    assert max(r["step"] for r in read_metrics(outs["killed"])) == 3  # step 3 ran, was logged, was not saved
    resumed = start(outs["killed"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert_same_run(outs["straight"], outs["killed"], "vae", ("vae.pt", "vae.final.pt"), after=2)


def test_batch_at_depends_on_step_and_rank_and_on_nothing_else(data):
    ds = Stage1Dataset(data, "train")
    a = batch_at(ds, 5, 4, seed=0, rank=0)
    assert all(torch.equal(a[k], batch_at(ds, 5, 4, seed=0, rank=0)[k]) for k in a)  # resumable
    for other in (dict(step=6, rank=0), dict(step=5, rank=1)):
        b = batch_at(ds, other["step"], 4, seed=0, rank=other["rank"])
        assert not torch.equal(torch.stack([a["clip"], a["frame"]]), torch.stack([b["clip"], b["frame"]])), other


def test_batches_draw_new_frames_and_references_as_the_steps_go_on(data):
    """Over 60 steps of 8 items (~5 passes over these 100 frames) nearly every frame is a target, and a frame drawn
    again mostly comes with another reference: an item's draws follow the step, not just its dataset index (which
    would fix each index's frame, reference and augmentation for the whole run and never show ~1/e of the frames)."""
    ds = Stage1Dataset(data, "train")
    refs = {}
    for step in range(60):
        b = batch_at(ds, step, 8, seed=0, rank=0)
        for c, f, r in zip(b["clip"].tolist(), b["frame"].tolist(), b["ref_frame"].tolist()):
            refs.setdefault((c, f), []).append(r)
    assert len(refs) >= 0.9 * sum(len(c) for c in ds.clips), len(refs)
    again = [set(r) for r in refs.values() if len(r) > 1]
    assert sum(len(r) > 1 for r in again) >= 0.8 * len(again)


@pytest.fixture(scope="module")
def stage1_run(train_only, vae_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1_run"))
    shutil.copy(os.path.join(vae_run, "vae.final.pt"), out)
    train.main(common_args(train_only, out) + ["--stage", "stage1", "--stage1.steps", "1"])
    return out


# what each stage trains (every parameter under these prefixes) and leaves frozen (every other one), per module
TRAINED = {"vae": {"vae": ("",)}, "syncnet": {"syncnet": ("",)}, "stage1": {"generator": ("unet.", "audio.")},
           "stage2": {"generator": ("unet.", "audio."), "discriminators": ("",)}}


@pytest.mark.usefixtures("one_thread")
def test_one_step_of_every_stage_moves_every_trained_weight_and_no_frozen_one(train_only, tmp_path, monkeypatch):
    """--stage all, one step each: every parameter tensor a stage trains has moved (an optimiser over part of the
    stage, e.g. the UNet without the audio encoder, leaves the rest at its init), and every frozen one is
    bit-identical: the VAE under the generator, and the SyncNet that scores stage 2."""
    seen, scorers = {}, []
    real_loop, real_syncnet = train.train_loop, train.load_stage_syncnet

    def loop(run, stage, modules, *args, **kwargs):
        before = {k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in modules.items()}
        real_loop(run, stage, modules, *args, **kwargs)
        seen[stage] = before, {k: dict(m.named_parameters()) for k, m in modules.items()}

    monkeypatch.setattr(train, "train_loop", loop)
    monkeypatch.setattr(train, "load_stage_syncnet", lambda run: scorers.append(real_syncnet(run)) or scorers[-1])
    out = str(tmp_path / "all")
    train.main(common_args(train_only, out) + ["--stage", "all", "--vae.steps", "1", "--syncnet.steps", "1",
                                               "--stage1.steps", "1", "--stage2.steps", "1", "--stage2.batch", "1",
                                               "--start_gan", "0"])
    assert set(seen) == set(TRAINED)
    for stage, (before, after) in seen.items():
        assert set(before) == set(TRAINED[stage]), stage
        for module, params in before.items():
            trained = [n for n in params if n.startswith(TRAINED[stage][module])]
            assert trained, (stage, module)
            for name, p in params.items():
                moved = not torch.equal(p, after[module][name].detach())
                assert moved == (name in trained), (stage, module, name, "a frozen weight moved" if moved else "never updated")
    saved = torch.load(os.path.join(out, "syncnet.final.pt"), weights_only=True)["state"]
    scorer, = scorers
    assert all(torch.equal(p.detach(), saved[n]) for n, p in scorer.named_parameters())


@pytest.mark.usefixtures("one_thread")
def test_stage2_critics_learn_only_from_their_own_loss_and_the_generator_uses_stage2_lr(train_only, stage1_run,
                                                                                       tmp_path):
    """One stage-2 step with and without the generator's adversarial terms: the critics' update must be the same
    (the generator's GAN loss must not train them), the generator's must not (it does see those terms)."""
    states = {}
    for name, extra in (("gan", []), ("no_gan", ["--loss.gan=0", "--loss.mouth_gan=0", "--loss.fm=0"])):
        out = str(tmp_path / name)
        shutil.copytree(stage1_run, out)
        train.main(common_args(train_only, out) + ["--stage", "stage2", "--stage2.steps", "1", "--stage2.batch", "1",
                                                   "--loss.sync", "0", "--start_gan", "0", "--stage2.lr", "3e-4"]
                   + extra)
        states[name] = torch.load(os.path.join(out, "stage2.pt"), weights_only=True)["modules"]
        record = [r for r in read_metrics(out) if r.get("stage") == "stage2"][-1]
        assert record["lr"] == pytest.approx(3e-4 * lr_lambda(2, 1, 0.1)(1))  # the generator's schedule
    assert_identical(states["gan"]["discriminators"], states["no_gan"]["discriminators"])
    unet = [k for k in states["gan"]["generator"] if k.startswith("unet.")]
    assert any(not torch.equal(states["gan"]["generator"][k], states["no_gan"]["generator"][k]) for k in unet)


@pytest.mark.usefixtures("one_thread")
def test_stage2_starts_from_the_stage1_generator(train_only, stage1_run, tmp_path):
    """With a zero learning rate the stage-2 generator stays exactly what stage 1 wrote."""
    out = str(tmp_path / "stage2")
    shutil.copytree(stage1_run, out)
    train.main(common_args(train_only, out) + ["--stage", "stage2", "--stage2.steps", "1", "--stage2.batch", "1",
                                               "--loss.sync", "0", "--stage2.lr", "0"])
    stage1 = torch.load(os.path.join(out, "stage1.pt"), weights_only=True)["modules"]["generator"]
    assert_identical(torch.load(os.path.join(out, "stage2.pt"), weights_only=True)["modules"]["generator"], stage1)


@pytest.mark.usefixtures("one_thread")
def test_stage2_exports_the_syncnet_even_when_a_lipsync_pt_stands_in_for_syncnet_final(train_only, stage1_run,
                                                                                       tmp_path):
    """A lipsync.pt copied to syncnet.final.pt (a stage 2 scored by another model's SyncNet; load_syncnet reads
    either) must reach the exported lipsync.pt as that SyncNet's {config, state}, not as the whole file nested."""
    out = str(tmp_path / "stage2")
    shutil.copytree(stage1_run, out)
    torch.manual_seed(0)
    critic = SyncNet(SyncNetConfig.tiny())
    donor = torch.load(os.path.join(out, "lipsync.pt"), weights_only=True)
    donor["syncnet"] = {"config": dataclasses.asdict(critic.config), "state": critic.state_dict()}
    torch.save(donor, os.path.join(out, "syncnet.final.pt"))
    train.main(common_args(train_only, out) + ["--stage", "stage2", "--stage2.steps", "1", "--stage2.batch", "1",
                                               "--loss.sync", "0", "--stage2.lr", "0"])
    entry = torch.load(os.path.join(out, "lipsync.pt"), weights_only=True)["syncnet"]
    assert set(entry) == {"config", "state"}
    assert_identical(entry["state"], critic.state_dict())
    exported = load_syncnet(os.path.join(out, "lipsync.pt"))
    assert exported.config == critic.config


@pytest.mark.usefixtures("one_thread")
def test_decoder_stage_tunes_only_the_decoder_and_stage1_and_its_keep_teacher_decode_with_it(train_only, stage1_run,
                                                                                            tmp_path):
    """--stage stage1,decoder on an --init model: the decoder stage runs first whatever the order given; the encoder
    (what the UNet's latents mean) stays --init's, the decoder moves, stage 1 and the exported lipsync.pt use the
    tuned VAE, and --loss.keep's frozen teacher decodes with it too (so keep is 0 before the first update: the same
    UNet behind the same decoder)."""
    init, out = os.path.join(stage1_run, "lipsync.pt"), str(tmp_path / "tuned")
    train.main(common_args(train_only, out) + ["--init", init, "--stage", "stage1,decoder", "--decoder.steps", "2",
                                               "--decoder.batch", "2", "--decoder.lr", "1e-2", "--stage1.steps", "1",
                                               "--loss.keep", "1"])
    before = torch.load(init, weights_only=True)["vae"]
    tuned = torch.load(os.path.join(out, "decoder.final.pt"), weights_only=True)["state"]
    exported = torch.load(os.path.join(out, "lipsync.pt"), weights_only=True)["vae"]
    for name, p in before.items():
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tuned[name], p), name
        assert torch.equal(exported[name], tuned[name]), name
    tunable = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert tunable and all(not torch.equal(tuned[k], before[k]) for k in tunable)  # every decoder weight trains
    records = read_metrics(out)
    assert [r["step"] for r in records if r["stage"] == "decoder"] == [1, 2]
    keep, = [r["keep"] for r in records if r["stage"] == "stage1"]
    assert keep < 1e-6


def test_stages_run_in_recipe_order_whatever_order_they_are_listed_in():
    assert parse_stages("stage2,decoder,vae") == ("vae", "decoder", "stage2")
    assert parse_stages("all") == STAGES
    with pytest.raises(SystemExit, match="unknown stage 'stage3'"):
        parse_stages("stage1,stage3")


@pytest.mark.usefixtures("one_thread")
def test_max_minutes_counts_from_the_start_of_the_command_over_all_stages(train_only, stage1_run, tmp_path,
                                                                          monkeypatch):
    """A command already 60 minutes old with --max_minutes 30: every stage stops after its first step (each stage's
    own clock would have let both run to the end)."""
    class LateRun(train.Run):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.started -= 3600
    monkeypatch.setattr(train, "Run", LateRun)
    out = str(tmp_path / "late")
    train.main(common_args(train_only, out) + ["--init", os.path.join(stage1_run, "lipsync.pt"), "--stage",
                                               "decoder,stage1", "--decoder.steps", "3", "--decoder.batch", "2",
                                               "--stage1.steps", "3", "--max_minutes", "30"])
    for stage in ("decoder", "stage1"):
        assert [r["step"] for r in read_metrics(out) if r["stage"] == stage] == [1], stage
        assert torch.load(os.path.join(out, f"{stage}.pt"), weights_only=True)["step"] == 1


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "stage1.pt")
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["stage1.pt"]


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    run = Run(train.TrainConfig(out=str(tmp_path)))
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(SystemExit, match="loss became nan .* at step 0"):
        train_loop(run, "stage1", {"w": torch.nn.Linear(1, 1)}, {"g": opt}, 5, lambda step: {"l1": float("nan")})
    assert not os.path.exists(run.path("stage1"))


def test_cli_lists_fields_and_rejects_unknown_ones(capsys, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--stage2.lr" in help_text and "peak learning rate" in help_text
    assert train.parse_args(["--stage1.lr=1e-4"]).stage1.lr == 1e-4
    assert train.parse_args(["--preset", "musetalk"]).stage1.batch == 32
    cfg = train.parse_args(["--preset", "musetalk", "--optim.warmup", "5"])  # a flag changes one field of a group
    assert cfg.optim.warmup == 5 and cfg.optim.lr_floor == 0.0 and cfg.optim.betas == (0.5, 0.999)
    (tmp_path / "c.json").write_text(json.dumps({"stage2": {"lr": 1e-3}, "T": 7}))
    cfg = train.parse_args(["--config", str(tmp_path / "c.json"), "--stage2.steps", "9"])
    assert (cfg.stage2.lr, cfg.stage2.steps, cfg.stage2.batch, cfg.T) == (1e-3, 9, 4, 7)
    for bad in (["--no_such_field", "1"], ["--config", str(tmp_path / "bad.json")]):
        (tmp_path / "bad.json").write_text(json.dumps({"stage1": {"nope": 1}}))
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_torchrun_two_ranks_keep_identical_weights(data, tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(ROOT, "train.py")] + common_args(data, out) + ["--stage", "vae", "--vae.steps", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    checks = [r for r in read_metrics(out) if "replicas_identical" in r]
    assert checks and checks[0]["replicas_identical"] is True
    assert len(checks[0]["checksums"]) == 2


def test_face128_preset_is_the_tiny_networks_on_128_px_crops_with_image_and_mel_augmentation():
    from lipsync.mel_encoder import MelEncoderConfig
    from lipsync.unet import UNetConfig
    from lipsync.vae import VAEConfig
    cfg = train.parse_args(["--preset", "face128"])
    unet, vae, mel, _ = train.model_configs(cfg)
    assert vae.sample_size == 128 and vae.block_out_channels == VAEConfig.tiny().block_out_channels
    assert unet == UNetConfig.tiny() and mel == MelEncoderConfig.tiny()
    assert cfg.augment.image == 0.8 and cfg.augment.mel == 0.5 and cfg.out == "runs/face128"
    assert train.model_configs(train.parse_args([]))[1].sample_size == 64


@pytest.mark.parametrize("rule", REFERENCE_RULES)
def test_the_reference_rule_reaches_the_generator_datasets(rule):
    from types import SimpleNamespace
    run = SimpleNamespace(cfg=train.TrainConfig(reference=rule))
    assert generator_data(run, SimpleNamespace(crop_size=64), "unused")["sample"] == rule
    if rule == "audio":
        run.cfg.audio_closed = 0.25
        assert generator_data(run, SimpleNamespace(crop_size=64), "unused")["closed_share"] == 0.25


def test_step_generators_differ_by_step_rank_and_stream_and_repeat_exactly():
    from lipsync.training.steps import MEL_AUGMENT, SYNC_NEGATIVES, step_generator

    def draw(*key):
        return torch.rand(8, generator=step_generator(*key))
    keys = [(7, 3, 0, SYNC_NEGATIVES), (7, 4, 0, SYNC_NEGATIVES), (7, 3, 1, SYNC_NEGATIVES), (7, 3, 0, MEL_AUGMENT),
            (8, 3, 0, SYNC_NEGATIVES), (7, 3, 0), (7, 3, 0, MEL_AUGMENT, 1)]
    draws = [draw(*k) for k in keys]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    assert torch.equal(draw(*keys[2]), draws[2])


@pytest.mark.usefixtures("one_thread")
def test_syncnet_stage_draws_its_negatives_per_step_and_rank(train_only, tmp_path, monkeypatch):
    """Replicas must not pair the same shifted negatives: the syncnet stage's draw is keyed by (seed, step, rank)."""
    from lipsync.training.steps import SYNC_NEGATIVES
    calls, real = [], train.step_generator
    monkeypatch.setattr(train, "step_generator", lambda *key: calls.append(key) or real(*key))

    class SecondReplica(train.Run):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.rank, self.main = 1, False
    monkeypatch.setattr(train, "Run", SecondReplica)
    train.main(common_args(train_only, str(tmp_path / "sync")) + ["--stage", "syncnet", "--syncnet.steps", "2",
                                                                  "--seed", "5"])
    assert calls == [(5, 0, 1, SYNC_NEGATIVES), (5, 1, 1, SYNC_NEGATIVES)]


@pytest.mark.usefixtures("one_thread")
def test_syncnet_stage_fine_tunes_the_syncnet_that_init_carries(train_only, stage1_run, tmp_path, monkeypatch):
    """--stage syncnet --init X: the stage starts from X's SyncNet when X carries one of this preset's design (a
    fine-tune on real speech refines the critic it already has), from random weights when X carries none."""
    import dataclasses
    cfg = SyncNetConfig.tiny()
    torch.manual_seed(123)
    planted = SyncNet(cfg).state_dict()
    ckpt = torch.load(os.path.join(stage1_run, "lipsync.pt"), weights_only=True)
    assert "syncnet" not in ckpt
    with_sync = str(tmp_path / "with_sync.pt")
    torch.save(dict(ckpt, syncnet={"config": dataclasses.asdict(cfg), "state": planted}), with_sync)
    starts = {}
    monkeypatch.setattr(train, "train_loop", lambda run, stage, modules, *a, **k: starts.setdefault(
        run.cfg.init, {n: t.clone() for n, t in modules["syncnet"].state_dict().items()}))
    for i, init in enumerate((with_sync, os.path.join(stage1_run, "lipsync.pt"))):
        train.main(common_args(train_only, str(tmp_path / f"run{i}")) + ["--stage", "syncnet", "--init", init])
    assert starts[with_sync].keys() == planted.keys()
    assert all(torch.equal(starts[with_sync][n], planted[n]) for n in planted)
    fresh = starts[os.path.join(stage1_run, "lipsync.pt")]
    assert not any(torch.equal(fresh[n], planted[n]) for n in planted if n.endswith("weight") and planted[n].dim() > 1)


@pytest.mark.usefixtures("one_thread")
def test_stage2_micro_batches_are_consecutive_batches_never_repeated_within_or_across_steps(train_only, stage1_run,
                                                                                            tmp_path, monkeypatch):
    """--grad_accum k: micro-batch m of step s trains on batch s k + m, so every micro-batch of the run is a batch of
    its own (step + m would train batch 1 in steps 0 and 1; step k alone would repeat one batch k times)."""
    calls, real = [], train.batch_at
    monkeypatch.setattr(train, "batch_at", lambda data, step, *a: calls.append((step,) + a) or real(data, step, *a))
    out = str(tmp_path / "accum")
    shutil.copytree(stage1_run, out)
    train.main(common_args(train_only, out) + ["--stage", "stage2", "--stage2.steps", "2", "--stage2.batch", "1",
                                               "--grad_accum", "2", "--loss.sync", "0", "--seed", "5"])
    assert calls == [(i, 1, 5, 0) for i in range(4)]  # (batch index, stage2.batch, seed, rank)


@pytest.mark.parametrize("preset,size", [("tiny", None), ("face128", None), ("musetalk", 224)])
def test_generator_perceptual_loss_is_on_the_crop_itself_except_musetalks_224_px_pyramid(preset, size):
    """Our presets' pyramids start at the crop's own size (64 or 128 px); only --preset musetalk resizes to 224 px
    first, as MuseTalk does (its VGG pyramid needs >= 16 px at 1/8 scale)."""
    from types import SimpleNamespace
    from lipsync.training.generator import generator_setup
    run = SimpleNamespace(cfg=train.parse_args(["--preset", preset]), device=torch.device("cpu"), world=1,
                          say=lambda *a: None)
    perceptual = generator_setup(run, "stage1", tiny_model(), 1e-4)[0]
    assert perceptual.size == size
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = x.flip(-1)
    assert torch.equal(perceptual(x, y), PerceptualLoss(None, size=size)(x, y))


@pytest.mark.usefixtures("one_thread")
def test_a_fine_tune_drops_a_stale_opening_head_and_the_opening_stage_fits_a_new_one(train_only, stage1_run, tmp_path):
    """--init's opening head reads its audio encoder's features: a run that trains that encoder must not export it
    (it would pick references from features that no longer mean the same), and --stage stage1,opening refits it."""
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.opening import OpeningConfig, OpeningHead
    model = load_lipsync(os.path.join(stage1_run, "lipsync.pt"))
    model.opening, model.reference = OpeningHead(OpeningConfig(10, 5, model.audio.dim)), "audio"
    model.opening.beta[:] = 7.0
    init = str(tmp_path / "with_head.pt")
    export(model, init)
    plain, refit = str(tmp_path / "plain"), str(tmp_path / "refit")
    train.main(common_args(train_only, plain) + ["--init", init, "--stage", "stage1", "--stage1.steps", "1"])
    assert load_lipsync(os.path.join(plain, "lipsync.pt")).opening is None
    train.main(common_args(train_only, refit) + ["--init", init, "--stage", "stage1,opening", "--stage1.steps", "1",
                                                 "--reference", "audio"])
    head = load_lipsync(os.path.join(refit, "lipsync.pt"))
    assert head.reference == "audio" and head.opening is not None and not np.allclose(head.opening.beta, 7.0)


@pytest.mark.usefixtures("one_thread")
def test_a_fine_tune_keeps_an_opening_head_that_reads_a_whisper_of_its_own(train_only, stage1_run, tmp_path):
    """A head fitted on its own frozen whisper encoder (--opening_whisper) reads none of the features a fine-tune
    changes: stage 1 must export it unchanged, encoder included, with the run's reference rule."""
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.opening import OpeningConfig, OpeningHead
    from lipsync.whisper import WhisperEncoder, WhisperEncoderConfig
    torch.manual_seed(3)
    encoder = WhisperEncoder(WhisperEncoderConfig(80, 16, 1, 2, 32, 1500)).eval()
    model = load_lipsync(os.path.join(stage1_run, "lipsync.pt"))
    model.opening, model.reference = OpeningHead(OpeningConfig(10, 2, 16), encoder=encoder), "audio"
    model.opening.beta[:] = 7.0
    init = str(tmp_path / "with_whisper_head.pt")
    export(model, init)
    out = str(tmp_path / "tuned")
    train.main(common_args(train_only, out) + ["--init", init, "--stage", "stage1", "--stage1.steps", "1",
                                               "--reference", "audio"])
    tuned = load_lipsync(os.path.join(out, "lipsync.pt"))
    assert tuned.reference == "audio" and tuned.opening is not None and np.allclose(tuned.opening.beta, 7.0)
    assert_identical(tuned.opening.encoder.state_dict(), load_lipsync(init).opening.encoder.state_dict())
