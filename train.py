"""Train lipsync from random init (MuseTalk's recipe, musetalk-notes §4-5).

    python train.py                                  # CPU demo: synthetic data -> vae -> syncnet -> stage1 -> stage2
    python train.py --preset musetalk --stage stage1 --data DIR --vae_path sd-vae-ft-mse/
    torchrun --nproc_per_node 8 train.py --preset musetalk --stage stage1 --data DIR --vae_path sd-vae-ft-mse/
    python train.py --config my.json --lr=1e-4 --resume

Every field of TrainConfig below is a command-line flag (`--help` lists them); a JSON --config file sets many at
once; the preset supplies the defaults. Each stage writes OUT/<stage>.pt (resumable, atomic), OUT/metrics.jsonl and
sample grids OUT/samples/<stage>_<step>.png; the finished generator is OUT/lipsync.pt, which infer.py loads. The
checkpoint records the crop geometry of the clips it was trained on (`--geometry`, docs/geometry.md): clips prepared
with `python -m lipsync.prepare --geometry musetalk` give a model that uses MuseTalk's own face box, in MuseTalk too.
"""

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass

import imageio.v3 as iio
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lipsync import checks
from lipsync.augment import AugmentConfig
from lipsync.data import Stage1Dataset, Stage2Dataset, list_clips
from lipsync.losses import PatchDiscriminator, PerceptualLoss
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.model import LipSync, atomic_save, export
from lipsync.syncnet import SyncNet, SyncNetConfig
from lipsync.tracking import GEOMETRIES
from lipsync.training import (Objective, discriminator_loss, frames_of, generator_losses, latent_scale, lr_lambda,
                              sample_grid, syncnet_step, vae_step)
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig
from lipsync.weights import load_vae

STAGES = ("vae", "syncnet", "stage1", "stage2")


@dataclass
class TrainConfig:
    preset: str = "tiny"  # tiny (CPU demo) | musetalk (published sizes and hyperparameters)
    stage: str = "all"  # all | vae | syncnet | stage1 | stage2 | comma list
    data: str = "data/synthetic"  # prepared clips (lipsync.prepare / lipsync.synthetic)
    out: str = "runs/tiny"
    synthetic_clips: int = 40  # generated into `data` when it holds no clips
    synthetic_seconds: float = 10.0
    crop_size: int = 64
    geometry: str = "auto"  # crop geometry of the clips (meta.json): auto (take theirs) | square | musetalk
    seed: int = 41
    resume: bool = False
    # models
    vae_path: str = ""  # a local sd-vae-ft-mse (skips the vae stage)
    whisper: str = ""  # a local whisper-tiny: frozen whisper features instead of our MelEncoder
    vgg: str = ""  # a local torchvision vgg19 state dict for MuseTalk's perceptual loss
    # optimisation (AdamW, linear warm-up + linear decay)
    lr: float = 5e-4  # stage 1 generator
    stage2_lr: float = 2e-4
    vae_lr: float = 1e-3
    syncnet_lr: float = 3e-4  # 1e-3 collapses the tiny SyncNet to a constant cos 0.5
    d_lr: float = 2e-4
    lr_floor: float = 0.1  # final lr as a fraction of the base lr
    betas: tuple = (0.5, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup: int = 30
    batch_size: int = 16
    vae_batch: int = 8  # x2: targets and references
    stage2_batch: int = 4  # clips per step in stage 2 (x T frames)
    grad_accum: int = 1  # stage 2 micro-batches per optimizer step
    vae_steps: int = 320
    syncnet_steps: int = 300
    stage1_steps: int = 500
    stage2_steps: int = 60
    # losses
    l1_weight: float = 1.0
    lower_weight: float = 3.0  # the inpainted lower half counts this much more in L1
    perceptual_weight: float = 0.1
    gan_weight: float = 0.01
    mouth_gan_weight: float = 0.01
    fm_weight: float = 0.1
    sync_weight: float = 0.05
    start_gan: int = 20  # stage-2 steps before the GAN terms switch on
    T: int = 5  # stage-2 consecutive frames (= SyncNet window)
    sync_context: int = 4  # frames of extra audio each side for shifted SyncNet negatives
    mel_context: int = 4  # 50 Hz steps of MelEncoder context around each window
    mel_augment: float = 0.0  # fraction of samples whose log-mel gets random level/EQ/shift/noise floor
    augment: float = 0.0  # fraction of items whose target and reference share one colour/geometry/blur/noise/JPEG draw
    # run
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    grad_ckpt: str = "auto"  # gradient checkpointing: on for GPU runs
    workers: int = 0
    log_every: int = 10
    sample_every: int = 200
    ckpt_every: int = 200
    max_minutes: float = 0.0  # stop a stage early after this long (0 = no limit)
    export_dtype: str = "fp32"  # fp32 | fp16 | bf16: precision of the exported lipsync.pt (fp16 halves its size)
    stop_at: int = 0  # stop each stage after this step, keeping its full-length schedule; continue with --resume


PRESETS = {
    "tiny": {},
    "musetalk": dict(
        out="runs/musetalk", crop_size=256, lr=2e-5, stage2_lr=5e-6, d_lr=5e-6, lr_floor=0.0, warmup=1000,
        batch_size=32, stage2_batch=2, grad_accum=8, T=16, stage1_steps=250_000, stage2_steps=250_000,
        lower_weight=1.0, perceptual_weight=0.01, gan_weight=0.01, mouth_gan_weight=0.01, fm_weight=1.0,
        sync_weight=0.05, start_gan=1000, log_every=50, vae_batch=8, sample_every=2000, ckpt_every=2000, vae_steps=100_000,
        syncnet_steps=100_000),
}


def model_configs(cfg: TrainConfig):
    if cfg.preset == "tiny":
        return UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), SyncNetConfig.tiny()
    return UNetConfig(), VAEConfig(), MelEncoderConfig(), SyncNetConfig()


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes", ""), tuple: lambda s: tuple(
            float(x) for x in s.split(","))}.get(type(f.default), type(f.default))
        nargs = "?" if type(f.default) is bool else None
        p.add_argument(f"--{f.name}", type=kind, nargs=nargs, const=True if nargs else None, default=None,
                       help=f"(default {f.default!r}; presets may change it)")
    args = vars(p.parse_args(argv))
    preset = args["preset"] or TrainConfig.preset
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if args.pop("config"):
        try:
            with open(args_config := p.parse_args(argv).config) as f:
                values.update(json.load(f))
        except (OSError, ValueError) as err:
            p.error(f"--config {args_config}: {err}")
        print(f"config file: {args_config}")
    values.update({k: v for k, v in args.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := set(values) - known:
        p.error(f"unknown config fields: {', '.join(sorted(unknown))}")
    return TrainConfig(**values)


def check_config(cfg: TrainConfig, stages):
    """Settings that cannot work, and an --out that would replace an input: one ValueError before anything is
    written."""
    if cfg.device != "auto":
        checks.pick_device(cfg.device)
    for name in ("batch_size", "vae_batch", "stage2_batch", "grad_accum", "T", "crop_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, not {getattr(cfg, name)}")
    if cfg.data != TrainConfig.data and not (os.path.isdir(cfg.data) and list_clips(cfg.data)):
        raise ValueError(f"no prepared clips in {cfg.data} (make them with python -m lipsync.prepare)")
    checks.creatable(cfg.out)
    if checks.within(cfg.out, cfg.data):
        raise ValueError(f"--out {cfg.out} is inside --data {cfg.data}; keep runs apart from the prepared clips")
    inputs = {"--vae_path": cfg.vae_path, "--whisper": cfg.whisper, "--vgg": cfg.vgg}
    stages = [s for s in stages if not (s == "vae" and cfg.vae_path)]  # skipped: the given VAE is used
    written = [f"{s}.pt" for s in stages] + [f"{s}.final.pt" for s in ("vae", "syncnet") if s in stages]
    written += ["lipsync.pt", "metrics.jsonl", "samples"] if {"stage1", "stage2"} & set(stages) else ["metrics.jsonl"]
    for flag, path in inputs.items():
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path} not found")
        if path and checks.same_file(path, cfg.out):
            raise ValueError(f"--out {cfg.out} is the {flag} folder; pick another --out")
        for name in written:
            checks.refuse_overwrite(os.path.join(cfg.out, name), {f"{flag} input": path or None})


# ----------------------------------------------------------------------------- run context


class Run:
    """Device, distributed rank, logging and checkpoint paths shared by the stages."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        if self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            dist.init_process_group("nccl" if cuda else "gloo")
            self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
            if cuda:
                torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cuda" if cuda else ("cpu" if cfg.device == "auto" else cfg.device))
        gpu = self.device.type == "cuda"
        self.autocast = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and gpu)) else None
        self.grad_ckpt = cfg.grad_ckpt == "on" or (cfg.grad_ckpt == "auto" and gpu)
        self.main = self.rank == 0
        os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
        self.metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if self.main else None

    def log(self, record: dict):
        if self.main:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def say(self, *a):
        if self.main:
            tqdm.write(" ".join(str(x) for x in a))

    def path(self, stage):
        return os.path.join(self.cfg.out, f"{stage}.pt")

    def amp(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)


def batch_at(dataset, step: int, batch_size: int, seed: int, rank: int) -> dict:
    """The batch of `step` on `rank`: indices drawn from (seed, step, rank) alone, so a resumed run sees exactly
    the batches the uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(hash((seed, step, rank)) % (2 ** 63))
    idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
    items = [dataset[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the loop shared by every stage


def train_loop(run: Run, stage: str, modules: dict, optims: dict, steps: int, step_fn, extra_state=None):
    """Run `step_fn(step) -> (logs, sample_png_or_None)` for steps [start, steps), with progress, metrics, NaN
    stop, periodic atomic checkpoints of modules/optimizers/schedulers/step/RNG, and --resume."""
    cfg = run.cfg
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg.warmup, steps, cfg.lr_floor))
              for k, o in optims.items()}
    start = 0
    path = run.path(stage)
    if cfg.resume and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in optims.items():
            o.load_state_dict(state["optims"][k])
            scheds[k].load_state_dict(state["scheds"][k])
        set_rng_state(state["rng"])
        start = state["step"]
        run.say(f"[{stage}] resumed from {path} at step {start}")
    if start >= steps:
        run.say(f"[{stage}] already finished ({steps} steps) in {path}")
        return

    def save(step):
        if run.main:
            atomic_save({"stage": stage, "step": step, "config": dataclasses.asdict(cfg),
                         "modules": {k: m.state_dict() for k, m in modules.items()},
                         "optims": {k: o.state_dict() for k, o in optims.items()},
                         "scheds": {k: s.state_dict() for k, s in scheds.items()}, "rng": rng_state(),
                         **(extra_state() if extra_state else {})}, path)

    for m in modules.values():
        m.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, disable=not run.main, dynamic_ncols=True)
    for step in bar:
        logs = step_fn(step)
        bad = [k for k, v in logs.items() if not torch.isfinite(torch.tensor(v))]
        if bad:
            last = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"
            raise SystemExit(f"[{stage}] loss became {logs[bad[0]]} ({bad[0]}) at step {step}; stopping — {last}")
        for s in scheds.values():
            s.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            rate = (done - start) / max(time.time() - t0, 1e-9)
            run.log({"stage": stage, "step": done, "time": round(time.time() - t0, 2), "it_s": round(rate, 3),
                     "lr": scheds[next(iter(scheds))].get_last_lr()[0], **logs})
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(logs.items())[:4]})
        if done % cfg.ckpt_every == 0 or done == steps:
            save(done)
        if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes or done == cfg.stop_at:
            run.say(f"[{stage}] stopping at step {done} of {steps}; continue with --resume")
            save(done)
            break
    bar.close()
    if run.world > 1:
        check_replicas(run, stage, modules)


def check_replicas(run: Run, stage: str, modules: dict):
    """DDP keeps replicas identical by construction; verify it: every rank's parameter checksum must agree."""
    total = torch.stack([p.detach().double().sum() for m in modules.values() for p in m.parameters()]).sum()
    sums = [torch.zeros_like(total) for _ in range(run.world)]
    dist.all_gather(sums, total)
    same = all(torch.equal(s, sums[0]) for s in sums)
    run.log({"stage": stage, "replicas_identical": same, "checksums": [float(s) for s in sums]})
    if not same:
        raise SystemExit(f"[{stage}] replicas diverged: {[float(s) for s in sums]}")


def optimizer(params, lr, cfg):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, eps=1e-8)


def clip_and_step(opt, params, cfg):
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def wrap(module, fn, run):
    """The stage's loss as a module (DDP-wrapped when distributed): calling it runs fn(module, ...)."""
    objective = Objective(module, fn)
    return DDP(objective) if run.world > 1 else objective


def maybe_compile(module, cfg):
    return torch.compile(module) if cfg.compile else module


# ----------------------------------------------------------------------------- stages


def stage_vae(run: Run, data):
    cfg = run.cfg
    _, vae_cfg, _, _ = model_configs(cfg)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(vae_cfg).to(run.device)
    perceptual = PerceptualLoss(cfg.vgg or None, size=None).to(run.device)
    run.say(f"[vae] perceptual loss: {perceptual.name}")
    net, opt = wrap(vae, vae_step, run), optimizer(vae.parameters(), cfg.vae_lr, cfg)

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.vae_batch, cfg.seed, run.rank), run.device)
        with run.amp():
            loss, logs = net(batch, perceptual)
        loss.backward()
        clip_and_step(opt, vae.parameters(), cfg)
        return logs

    train_loop(run, "vae", {"vae": vae}, {"vae": opt}, cfg.vae_steps, step_fn)
    vae.eval()
    batches = [to(batch_at(data, 10 ** 6 + i, cfg.batch_size, cfg.seed, 0), run.device) for i in range(4)]
    vae.config.scaling_factor = latent_scale(vae, batches)
    run.say(f"[vae] latent scaling factor {vae.config.scaling_factor:.4f}")
    if run.main:
        atomic_save({"config": dataclasses.asdict(vae.config), "state": vae.state_dict()}, run.path("vae.final"))


def load_stage_vae(run: Run) -> AutoencoderKL:
    cfg = run.cfg
    if cfg.vae_path:
        return load_vae(cfg.vae_path, run.device)
    path = run.path("vae.final")
    if not os.path.exists(path):
        raise SystemExit(f"error: no VAE: run the vae stage first (expected {path}) or pass --vae_path")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    vae = AutoencoderKL(VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj["config"].items()}))
    vae.load_state_dict(obj["state"])
    return vae.to(run.device).eval().requires_grad_(False)


def stage_syncnet(run: Run, root):
    cfg = run.cfg
    *_, sync_cfg = model_configs(cfg)
    torch.manual_seed(cfg.seed)
    c = cfg.sync_context
    data = Stage2Dataset(root, "train", T=sync_cfg.n_frames + 2 * c, seed=cfg.seed, crop_size=cfg.crop_size)
    syncnet = SyncNet(sync_cfg).to(run.device)
    net, opt = wrap(syncnet, syncnet_step, run), optimizer(syncnet.parameters(), cfg.syncnet_lr, cfg)

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.batch_size, cfg.seed, run.rank), run.device)
        g = torch.Generator().manual_seed(cfg.seed + step)
        with run.amp():
            loss, logs = net(batch, sync_cfg.n_frames, c, generator=g)
        loss.backward()
        clip_and_step(opt, syncnet.parameters(), cfg)
        return logs

    train_loop(run, "syncnet", {"syncnet": syncnet}, {"syncnet": opt}, cfg.syncnet_steps, step_fn)
    if run.main:
        atomic_save({"config": dataclasses.asdict(sync_cfg), "state": syncnet.state_dict()},
                    run.path("syncnet.final"))


def load_syncnet(run: Run) -> SyncNet:
    path = run.path("syncnet.final")
    if not os.path.exists(path):
        raise SystemExit(f"error: no SyncNet: run the syncnet stage first (expected {path})")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    net = SyncNet(SyncNetConfig(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                                   if isinstance(v, list) else v for k, v in obj["config"].items()}))
    net.load_state_dict(obj["state"])
    return net.to(run.device).eval().requires_grad_(False)


def build_generator(run: Run) -> LipSync:
    cfg = run.cfg
    unet_cfg, _, audio_cfg, _ = model_configs(cfg)
    torch.manual_seed(cfg.seed)
    vae = load_stage_vae(run)
    if cfg.whisper:
        from lipsync.audio import load_whisper_encoder
        audio = load_whisper_encoder(cfg.whisper, run.device).requires_grad_(False)
    else:
        from lipsync.mel_encoder import MelEncoder
        audio_cfg.dim = unet_cfg.cross_attention_dim
        audio = MelEncoder(audio_cfg)
    model = LipSync(UNet(unet_cfg), vae, audio, cfg.crop_size, geometry=clip_geometry(cfg)).to(run.device)
    model.unet.gradient_checkpointing = run.grad_ckpt
    return model


def augment_config(cfg: TrainConfig) -> AugmentConfig | None:
    return AugmentConfig(p=cfg.augment) if cfg.augment > 0 else None


def stage_generator(run: Run, root, stage: str):
    """stage1 (single frames, L1 + perceptual) or stage2 (T frames, + GAN, mouth GAN, sync)."""
    cfg = run.cfg
    model = build_generator(run)
    two = stage == "stage2"
    kwargs = dict(seed=cfg.seed, crop_size=cfg.crop_size, mel_context=cfg.mel_context,
                  features="whisper" if cfg.whisper else "mel", augment=augment_config(cfg))
    data = Stage2Dataset(root, "train", T=cfg.T, **kwargs) if two else Stage1Dataset(root, "train", **kwargs)
    if two:
        init = run.path("stage1")
        if not os.path.exists(init):
            raise SystemExit(f"error: stage2 starts from stage 1: expected {init}")
        state = torch.load(init, map_location="cpu", weights_only=True)["modules"]["generator"]
        model.load_state_dict(state)
    perceptual = PerceptualLoss(cfg.vgg or None, size=None if cfg.preset == "tiny" else 224).to(run.device)
    run.say(f"[{stage}] perceptual loss: {perceptual.name}; audio: {'whisper (frozen)' if cfg.whisper else 'MelEncoder'}")
    net = wrap(maybe_compile(model, cfg), generator_losses, run)
    params = list(model.unet.parameters()) + list(model.audio.parameters())
    opt = optimizer(params, cfg.stage2_lr if two else cfg.lr, cfg)
    modules, optims = {"generator": model}, {"generator": opt}
    discs, d_net, syncnet = None, None, None
    if two:
        torch.manual_seed(cfg.seed + 1)
        small = (32, 64, 128, 128) if cfg.preset == "tiny" else (64, 128, 256, 512)
        discs = torch.nn.ModuleDict({k: PatchDiscriminator(channels=small) for k in ("face", "mouth")}).to(run.device)
        d_net = wrap(discs, discriminator_loss, run)
        modules["discriminators"] = discs
        optims["discriminators"] = optimizer(discs.parameters(), cfg.d_lr, cfg)
        syncnet = load_syncnet(run) if cfg.sync_weight > 0 else None
    accum = cfg.grad_accum if two else 1
    bsz = cfg.stage2_batch if two else cfg.batch_size
    steps = cfg.stage2_steps if two else cfg.stage1_steps

    def step_fn(step):
        logs = {}
        for micro in range(accum):
            batch = to(batch_at(data, step * accum + micro, bsz, cfg.seed, run.rank), run.device)
            if two:
                discs.requires_grad_(False)  # the generator's adversarial terms must not train the critics
            with run.amp():
                loss, logs, pred, target = net(batch, cfg, perceptual, step, discs, syncnet)
            (loss / accum).backward()
            if two:
                discs.requires_grad_(True)
                with run.amp():
                    d_loss, d_logs = d_net(pred, target, frames_of(batch)["mouth_box"])
                (d_loss / accum).backward()
                logs.update(d_logs)
        clip_and_step(opt, params, cfg)
        if two:
            clip_and_step(optims["discriminators"], discs.parameters(), cfg)
        if run.main and ((step + 1) % cfg.sample_every == 0 or step + 1 == steps):
            iio.imwrite(os.path.join(cfg.out, "samples", f"{stage}_{step + 1:06d}.png"), sample_grid(batch, pred))
        return logs

    train_loop(run, stage, modules, optims, steps, step_fn)
    if run.main:
        sync = run.path("syncnet.final")
        extra = {"syncnet": torch.load(sync, map_location="cpu", weights_only=True)} if os.path.exists(sync) else {}
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.export_dtype]
        export(model, os.path.join(cfg.out, "lipsync.pt"), dtype=dtype, extra=extra)
        run.say(f"[{stage}] generator written to {os.path.join(cfg.out, 'lipsync.pt')}")
    return model


# ----------------------------------------------------------------------------- main


def clip_geometry(cfg: TrainConfig) -> str:
    """The crop geometry of the clips in cfg.data ("square" when meta.json has none); they must agree with each
    other and with --geometry unless it is auto. The exported checkpoint records it and infer.py crops the same way."""
    if cfg.geometry not in ("auto",) + GEOMETRIES:
        raise SystemExit(f"unknown --geometry {cfg.geometry!r}; choose from auto, {', '.join(GEOMETRIES)}")
    found = {json.loads((c / "meta.json").read_text()).get("geometry", "square") for c in list_clips(cfg.data)}
    if len(found) > 1:
        raise SystemExit(f"the clips in {cfg.data} mix crop geometries ({', '.join(sorted(found))}); "
                         f"prepare them with one --geometry")
    geometry = found.pop() if found else "square"
    if cfg.geometry not in ("auto", geometry):
        raise SystemExit(f"--geometry {cfg.geometry}, but the clips in {cfg.data} are {geometry} crops "
                         f"(make them with python -m lipsync.prepare --geometry {cfg.geometry})")
    return geometry


def ensure_data(run: Run):
    cfg = run.cfg
    if os.path.isdir(cfg.data) and list_clips(cfg.data):
        return
    if cfg.data != TrainConfig.data:
        raise SystemExit(f"error: no prepared clips in {cfg.data} (make them with python -m lipsync.prepare)")
    if cfg.geometry == "musetalk":
        raise SystemExit("error: the synthetic demo clips are square crops; for --geometry musetalk pass --data with clips "
                         "from python -m lipsync.prepare --geometry musetalk")
    run.say(f"no data in {cfg.data}: generating {cfg.synthetic_clips} synthetic clips")
    if run.main:
        from lipsync import synthetic
        synthetic.main(["--out", cfg.data, "--clips", str(cfg.synthetic_clips), "--seconds",
                        str(cfg.synthetic_seconds), "--size", str(cfg.crop_size), "--seed", str(cfg.seed)])
    if run.world > 1:
        dist.barrier()


def learning_check(run: Run, model: LipSync):
    """Held-out synthetic clips: does the generated mouth follow the audio? (Pearson r vs. ground truth)."""
    from lipsync.eval import synthetic_sync
    clips = [c for c in list_clips(run.cfg.data, "val")]
    if not clips or not run.main:
        return
    res = synthetic_sync(model.eval(), clips, seed=run.cfg.seed)
    if res is None:
        return
    run.say(f"[check] held-out mouth-opening r = {res['r']:.3f} (copy-reference baseline r = "
            f"{res['r_reference']:.3f}) over {res['clips']} clips, {res['frames']} frames")
    run.log({"stage": "check", **res})


def main(argv=None):
    cfg = parse_args(argv)
    stages = STAGES if cfg.stage == "all" else tuple(cfg.stage.split(","))
    if bad := [s for s in stages if s not in STAGES]:
        raise SystemExit(f"error: unknown stage {bad[0]!r}; choose from all, {', '.join(STAGES)}")
    try:
        check_config(cfg, stages)
        run_stages(cfg, stages)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # bad inputs: missing or unreadable files
        raise SystemExit(f"error: {' '.join(str(err).split())[:600]}") from None


def run_stages(cfg: TrainConfig, stages):
    run = Run(cfg)
    torch.manual_seed(cfg.seed + run.rank)
    ensure_data(run)
    geometry = clip_geometry(cfg)
    run.say(f"lipsync training: preset {cfg.preset}, stages {', '.join(stages)}, device {run.device}"
            f"{', bf16 autocast' if run.autocast else ''}, {run.world} process(es), {geometry} crops, out {cfg.out}")
    t0 = time.time()
    model = None
    for stage in stages:
        if stage == "vae":
            if cfg.vae_path:
                run.say(f"[vae] using {cfg.vae_path}; stage skipped")
                continue
            stage_vae(run, Stage1Dataset(cfg.data, "train", seed=cfg.seed, crop_size=cfg.crop_size,
                                         augment=augment_config(cfg)))
        elif stage == "syncnet":
            stage_syncnet(run, cfg.data)
        else:
            model = stage_generator(run, cfg.data, stage)
    if model is not None:
        learning_check(run, model)
    run.say(f"done in {(time.time() - t0) / 60:.1f} min. checkpoint: {os.path.join(cfg.out, 'lipsync.pt')}; "
            f"samples: {os.path.join(cfg.out, 'samples')}; metrics: {os.path.join(cfg.out, 'metrics.jsonl')}")
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
