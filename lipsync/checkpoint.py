"""Checkpoints: our one-file format for a trained LipSync, and the published MuseTalk weights as a LipSync.

Our checkpoint (`export` / `load_lipsync`) is one torch file: {"format": FORMAT, "config": LipSync.configs(), "unet",
"vae", "audio": state dicts (audio None for a model on frozen whisper features; then "whisper" holds that encoder's
config and weights, so the checkpoint runs with nothing else)} plus an optional "restorer" (lipsync.restore: its
config and weights), an optional "opening" (lipsync.opening: the "audio" reference rule's head in float64, with its
own whisper encoder's config and weights when it has one) and any `extra` entries (train.py adds its SyncNet). The
config holds the crop geometry the model was trained on (lipsync.tracking.GEOMETRIES; "square" when absent) and the
reference rule infer.py gives it by default (lipsync.references; "self" when absent). The published MuseTalk UNet +
sd-vae-ft-mse + whisper-tiny load through `from_published`, unchanged, and use MuseTalk's own crop ("musetalk",
docs/geometry.md).
"""

import dataclasses
import os
import tempfile

import torch

from .blocks import config_from_dict
from .mel_encoder import MelEncoder, MelEncoderConfig
from .model import LipSync
from .opening import OpeningConfig, OpeningHead
from .restore import Restorer, RestorerConfig
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import CheckpointError, assign_weights, load_unet, load_vae, read_tensors
from .whisper import WhisperEncoder, WhisperEncoderConfig, load_whisper_encoder

FORMAT = "lipsync-v1"


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export(model: LipSync, path: str, dtype=torch.float32, extra: dict | None = None) -> None:
    """Write the generator (and anything in `extra`, e.g. a SyncNet) as one self-describing checkpoint."""
    def sd(m):
        return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in m.state_dict().items()}
    obj = {"format": FORMAT, "config": model.configs(), "unet": sd(model.unet), "vae": sd(model.vae),
           "audio": sd(model.audio) if model.trainable_audio else None}
    if not model.trainable_audio:  # the frozen whisper encoder travels along (tiny.en's own weights are fp16)
        obj["whisper"] = {"config": dataclasses.asdict(model.audio.cfg), "state": sd(model.audio)}
    if model.restorer is not None:
        obj["restorer"] = {"config": dataclasses.asdict(model.restorer.cfg), "state": sd(model.restorer)}
    if model.opening is not None:  # float64 whatever `dtype`: the ridge's standardisation needs the precision
        obj["opening"] = {"config": dataclasses.asdict(model.opening.cfg), "state": model.opening.state_dict()}
        if (enc := model.opening.encoder) is not None:  # its own whisper encoder travels along
            obj["opening"]["whisper"] = {"config": dataclasses.asdict(enc.cfg), "state": sd(enc)}
    obj.update(extra or {})
    atomic_save(obj, path)


def read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    obj = read_tensors(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lipsync checkpoint (use --unet/--vae/--whisper for published weights)")
    return obj


def load_lipsync(path: str, device="cpu", dtype=torch.float32, whisper: str | None = None) -> LipSync:
    """Our checkpoint -> LipSync in eval mode. A checkpoint on frozen whisper features uses the encoder stored in it,
    or `whisper` (a folder or file for load_whisper_encoder) when given."""
    obj = read_checkpoint(path)
    cfg = obj["config"]
    with torch.device("meta"):
        unet = UNet(config_from_dict(UNetConfig, cfg["unet"]))
        vae = AutoencoderKL(config_from_dict(VAEConfig, cfg["vae"]))
        audio = MelEncoder(config_from_dict(MelEncoderConfig, cfg["audio"])) if cfg["audio"] else None
    parts = [(unet, "unet"), (vae, "vae")] + ([(audio, "audio")] if audio is not None else [])
    for module, key in parts:
        assign_weights(module, obj[key], dtype, device, f"{path} [{key}]")
    if audio is None and whisper is not None:  # an explicit encoder wins over the one inside
        audio = load_whisper_encoder(whisper, device).to(dtype)
    elif audio is None:
        if obj.get("whisper") is None:
            raise CheckpointError(f"{path} was trained on whisper features: pass the whisper-tiny folder")
        with torch.device("meta"):
            audio = WhisperEncoder(config_from_dict(WhisperEncoderConfig, obj["whisper"]["config"]))
        assign_weights(audio, obj["whisper"]["state"], dtype, device, f"{path} [whisper]")
    model = LipSync(unet, vae, audio.eval(), cfg["crop_size"], cfg["left"], cfg["right"],
                    cfg.get("geometry", "square"), cfg.get("reference", "self"), cfg.get("guidance", 1.0))
    if obj.get("restorer") is not None:
        with torch.device("meta"):
            model.restorer = Restorer(config_from_dict(RestorerConfig, obj["restorer"]["config"]))
        assign_weights(model.restorer, obj["restorer"]["state"], dtype, device, f"{path} [restorer]")
    if obj.get("opening") is not None:
        encoder = None
        if (own := obj["opening"].get("whisper")) is not None:
            with torch.device("meta"):
                encoder = WhisperEncoder(config_from_dict(WhisperEncoderConfig, own["config"]))
            assign_weights(encoder, own["state"], torch.float32, "cpu", f"{path} [opening whisper]")
            encoder.eval()
        model.opening = OpeningHead(config_from_dict(OpeningConfig, obj["opening"]["config"]),
                                    {k: v.numpy() for k, v in obj["opening"]["state"].items()}, encoder)
    return model.to(device).eval()


def from_published(unet: str, vae: str, whisper: str, device="cpu", dtype=torch.float32) -> LipSync:
    """Official MuseTalk UNet + sd-vae-ft-mse + whisper-tiny from local folders/files, used unchanged."""
    return LipSync(load_unet(unet, device, dtype), load_vae(vae, device, dtype),
                   load_whisper_encoder(whisper, device).to(dtype), crop_size=256,
                   geometry="musetalk").to(device).eval()
