"""What train.py's generator stages (stage 1, stage 2) build around the LipSync they train: the model (fresh on the
run's VAE, or --init's, optionally moved onto a frozen whisper encoder), its datasets' settings, its losses and
optimizer, its sample grids and the exported OUT/lipsync.pt that infer.py loads.

`cfg` is train.py's TrainConfig (run.cfg).
"""

import dataclasses
import os
import re

import imageio.v3 as iio
import torch
import torch.distributed as dist

from lipsync.blocks import config_from_dict
from lipsync.checkpoint import export, load_lipsync, read_checkpoint
from lipsync.mel_encoder import MelEncoder
from lipsync.model import LipSync
from lipsync.training.augment import AugmentConfig
from lipsync.training.data import list_clips
from lipsync.training.flags import clip_geometry
from lipsync.training.loop import Run, maybe_compile, optimizer, wrap
from lipsync.training.losses import PerceptualLoss
from lipsync.training.prepare import add_whisper_features
from lipsync.training.steps import generator_losses, sample_grid
from lipsync.training.syncnet import read_syncnet_entry
from lipsync.unet import UNet
from lipsync.vae import AutoencoderKL, VAEConfig
from lipsync.weights import load_vae
from lipsync.whisper import load_whisper_encoder


def build_generator(run: Run, configs) -> LipSync:
    """Fresh UNet and audio encoder (seeded; configs: train.py's model_configs) on the stage VAE, or --init's; crops
    are the VAE's sample size."""
    cfg = run.cfg
    if cfg.init:
        model = load_lipsync(cfg.init, whisper=cfg.whisper or None)
        if cfg.whisper and model.trainable_audio:
            model = onto_whisper(model, load_whisper_encoder(cfg.whisper).requires_grad_(False))
            run.say(f"[generator] {cfg.init}'s MelEncoder replaced by frozen whisper ({cfg.whisper}); "
                    f"cross-attention keys/values re-initialised at width {model.audio.dim}")
        model.geometry, model.reference = clip_geometry(cfg), inference_reference(cfg)
        if model.opening is not None and model.opening.encoder is None and model.trainable_audio:
            # the head reads the generator's own audio features, which this run changes (a head with a whisper
            # encoder of its own reads none of them: it stays, still predicting from the speech alone)
            model.opening = None
            run.say(f"[generator] {cfg.init}'s opening head dropped: the audio encoder trains (train.py --stage "
                    f"opening fits a new one)")
        if os.path.exists(decoder := run.path("decoder.final")):  # the decoder stage's VAE
            model.vae.load_state_dict(torch.load(decoder, map_location="cpu", weights_only=True)["state"])
            run.say(f"[generator] VAE decoder from {decoder}")
        model.vae.requires_grad_(False)
        model.unet.gradient_checkpointing = run.grad_ckpt
        return model.to(run.device)
    unet_cfg, _, audio_cfg, _ = configs
    torch.manual_seed(cfg.seed)
    vae = load_stage_vae(run)
    if cfg.whisper:
        audio = load_whisper_encoder(cfg.whisper, run.device).requires_grad_(False)
    else:
        audio_cfg.dim = unet_cfg.cross_attention_dim
        audio = MelEncoder(audio_cfg)
    model = LipSync(UNet(unet_cfg), vae, audio, vae.config.sample_size, geometry=clip_geometry(cfg),
                    reference=inference_reference(cfg)).to(run.device)
    model.unet.gradient_checkpointing = run.grad_ckpt
    return model


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


def onto_whisper(model: LipSync, audio) -> LipSync:
    """A MelEncoder model moved onto a frozen whisper encoder: every weight carries over except the cross-attention
    key/value projections (attn2.to_k / to_v), which read the context and are re-initialised at whisper's width."""
    unet = UNet(dataclasses.replace(model.unet.config, cross_attention_dim=audio.dim))
    keep = {k: v for k, v in model.unet.state_dict().items() if not re.search(r"attn2\.to_[kv]\.", k)}
    missing, unexpected = unet.load_state_dict(keep, strict=False)
    assert not unexpected and all(re.search(r"attn2\.to_[kv]\.", k) for k in missing), (missing, unexpected)
    return LipSync(unet, model.vae, audio, model.crop_size, model.left, model.right, model.geometry)


def inference_reference(cfg) -> str:
    """The reference rule infer.py uses by default for the exported model: closed_pose for a model trained with it,
    else MuseTalk's own inference (each frame its own reference)."""
    return cfg.reference if cfg.reference in ("closed_pose", "audio") else "self"


def augment_config(cfg) -> AugmentConfig | None:
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
                closed_share=cfg.audio_closed, features="whisper" if cfg.whisper else "mel",
                augment=augment_config(cfg), **kwargs)


def generator_setup(run: Run, stage: str, model: LipSync, lr: float):
    """Perceptual loss, the loss module (compiled / DDP-wrapped), trainable parameters and their optimizer, and the
    frozen --init model that --loss.keep holds the fine-tune to (None without it)."""
    cfg = run.cfg
    perceptual = PerceptualLoss(cfg.vgg or None, size=None if cfg.preset != "musetalk" else 224).to(run.device)
    teacher = load_lipsync(cfg.init).requires_grad_(False).to(run.device) if cfg.loss.keep > 0 else None
    if teacher is not None:  # one VAE (a decoder stage's, if any) decodes both models' faces: both handles, raw
        teacher.vae, teacher.face = model.vae, model.face  # (vae) and scaled (face), onto that one VAE
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
        if os.path.exists(sync):  # the syncnet stage's file, or a lipsync.pt put there: its SyncNet entry, as stored
            entry = read_syncnet_entry(sync)
            extra = {"syncnet": entry} if entry is not None else {}
        else:  # a fine-tune keeps --init's SyncNet, if it has one
            sync = read_checkpoint(run.cfg.init).get("syncnet") if run.cfg.init else None
            extra = {"syncnet": sync} if sync is not None else {}
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[run.cfg.export_dtype]
        export(model, os.path.join(run.cfg.out, "lipsync.pt"), dtype=dtype, extra=extra)
        run.say(f"[{stage}] generator written to {os.path.join(run.cfg.out, 'lipsync.pt')}")
