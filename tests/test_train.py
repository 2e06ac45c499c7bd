"""train.py: every stage learns on a fixed batch, resume is exact, checkpoints are atomic, DDP replicas agree."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from lipsync.tools import synthetic
from lipsync.training.data import Stage1Dataset, Stage2Dataset
from lipsync.training.losses import PatchDiscriminator, PerceptualLoss
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.model import LipSync, atomic_save
from lipsync.training.syncnet import SyncNet, SyncNetConfig
from lipsync.training.steps import discriminator_loss, frames_of, generator_losses, syncnet_step, vae_step
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
    return train.batch_at(dataset, 0, n, seed=0, rank=0)


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


def test_resume_continues_with_the_same_next_step_loss(data, vae_run, tmp_path):
    runs = {}
    for name in ("straight", "resumed"):
        out = str(tmp_path / name)
        os.makedirs(out)
        shutil.copy(os.path.join(vae_run, "vae.final.pt"), out)
        args = common_args(data, out) + ["--stage", "stage1", "--stage1.steps", "3", "--ckpt_every", "100"]
        if name == "resumed":
            train.main(args + ["--stop_at", "2"])
            assert torch.load(os.path.join(out, "stage1.pt"), weights_only=True)["step"] == 2
            args = args + ["--resume"]
        train.main(args)
        runs[name] = {r["step"]: r for r in read_metrics(out) if r.get("stage") == "stage1"}
    assert runs["resumed"][3]["l1"] == runs["straight"][3]["l1"]
    assert runs["resumed"][3]["perceptual"] == runs["straight"][3]["perceptual"]
    assert os.path.exists(os.path.join(tmp_path / "resumed", "lipsync.pt"))


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
    run = train.Run(train.TrainConfig(out=str(tmp_path)))
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(SystemExit, match="loss became nan .* at step 0"):
        train.train_loop(run, "stage1", {"w": torch.nn.Linear(1, 1)}, {"g": opt}, 5, lambda step: {"l1": float("nan")})
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
