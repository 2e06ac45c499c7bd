"""The whole generator: audio encoder -> per-frame tokens (+ PE) -> UNet on [masked, reference] latents -> VAE decode.

`LipSync` bundles the three trained parts (UNet, VAE, audio encoder) with MuseTalk's conventions so that training,
inference, evaluation and the benchmark all call the same code. Our own checkpoint is one file holding the three
configs and state dicts (`export` / `load_lipsync`) and the crop geometry it was trained on
(lipsync.tracking.GEOMETRIES; "square" when absent); the published MuseTalk UNet + sd-vae-ft-mse + whisper-tiny load
through `from_published` and use MuseTalk's own crop ("musetalk", docs/geometry.md).
"""

import dataclasses
import os
import tempfile

import torch
import torch.nn as nn

from .audio import PositionalEncoding, encode_windows, frame_windows
from .blocks import config_from_dict
from .mel_encoder import MelEncoder, MelEncoderConfig
from .tracking import GEOMETRIES
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, FaceVAE, VAEConfig
from .weights import CheckpointError, assign_weights, load_unet, load_vae, read_tensors

FORMAT = "lipsync-v1"


class LipSync(nn.Module):
    def __init__(self, unet: UNet, vae: AutoencoderKL, audio: nn.Module, crop_size: int, left: int = 2,
                 right: int = 2, geometry: str = "square"):
        super().__init__()
        if audio.dim != unet.config.cross_attention_dim:
            raise ValueError(f"audio features are {audio.dim}-dim but the UNet attends to "
                             f"{unet.config.cross_attention_dim}-dim context")
        self.unet, self.vae, self.audio = unet, vae, audio
        self.face = FaceVAE(vae)
        self.pe = PositionalEncoding(audio.dim)
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown crop geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
        self.crop_size, self.left, self.right, self.geometry = crop_size, left, right, geometry

    @property
    def trainable_audio(self) -> bool:
        return isinstance(self.audio, MelEncoder)

    # ---- audio -> per-frame audio features (windows); the positional encoding is added in forward
    def span_windows(self, mel_spans: torch.Tensor, context: int, n: int) -> torch.Tensor:
        """Training: mel spans (B, 80, 2 (n + 2 context)) -> windows (B, n L, D) of their middle n steps."""
        return encode_windows(self.audio, mel_spans, context, n)

    @torch.no_grad()
    def audio_windows(self, wave: torch.Tensor, n_frames: int, fps: float) -> torch.Tensor:
        """Inference: a whole 16 kHz wave -> per-frame windows (n_frames, n L, D)."""
        feats = self.audio.encode(wave)  # (1, L, T, D)
        return frame_windows(feats, n_frames, fps, self.left, self.right)

    # ---- the MuseTalk step
    def forward(self, unet_in: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """UNet image input (B, 8, s, s) from `self.face.unet_input` and audio windows (B, N, D) -> generated faces
        (B, 3, S, S) in [-1, 1]. One UNet pass at t = 0 predicts the scaled latents; no diffusion sampling."""
        w = self.unet.conv_in.weight
        tokens = self.pe(windows.to(w.device, w.dtype))  # (B, N, D) + sinusoidal PE
        return self.face.decode(self.unet(unet_in, 0, tokens))  # (B, 4, s, s) -> (B, 3, S, S)

    # ---- checkpoints
    def configs(self) -> dict:
        audio = dataclasses.asdict(self.audio.cfg) if self.trainable_audio else None
        return {"unet": dataclasses.asdict(self.unet.config), "vae": dataclasses.asdict(self.vae.config),
                "audio": audio, "crop_size": self.crop_size, "left": self.left, "right": self.right,
                "geometry": self.geometry}


def build(unet_cfg: UNetConfig, vae_cfg: VAEConfig, audio_cfg: MelEncoderConfig, crop_size: int) -> LipSync:
    return LipSync(UNet(unet_cfg), AutoencoderKL(vae_cfg), MelEncoder(audio_cfg), crop_size)


def compile_for_inference(model: LipSync) -> LipSync:
    """torch.compile the UNet and the VAE decoder in place; on CUDA with CUDA graphs ("reduce-overhead"), which
    need fixed shapes: generate with static=True so every call sees the same batch size."""
    mode = "reduce-overhead" if next(model.unet.parameters()).is_cuda else None
    model.unet = torch.compile(model.unet, mode=mode)
    model.vae.decoder = torch.compile(model.vae.decoder, mode=mode)
    return model


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
    """Our checkpoint -> LipSync in eval mode. A checkpoint trained on frozen whisper features needs `whisper`."""
    obj = read_checkpoint(path)
    cfg = obj["config"]
    with torch.device("meta"):
        unet = UNet(config_from_dict(UNetConfig, cfg["unet"]))
        vae = AutoencoderKL(config_from_dict(VAEConfig, cfg["vae"]))
        audio = MelEncoder(config_from_dict(MelEncoderConfig, cfg["audio"])) if cfg["audio"] else None
    parts = [(unet, "unet"), (vae, "vae")] + ([(audio, "audio")] if audio is not None else [])
    for module, key in parts:
        assign_weights(module, obj[key], dtype, device, f"{path} [{key}]")
    if audio is None:
        if whisper is None:
            raise CheckpointError(f"{path} was trained on whisper features: pass the whisper-tiny folder")
        from .whisper import load_whisper_encoder
        audio = load_whisper_encoder(whisper, device).to(dtype)
    return LipSync(unet, vae, audio.eval(), cfg["crop_size"], cfg["left"], cfg["right"],
                   cfg.get("geometry", "square")).to(device).eval()


def from_published(unet: str, vae: str, whisper: str, device="cpu", dtype=torch.float32) -> LipSync:
    """Official MuseTalk UNet + sd-vae-ft-mse + whisper-tiny from local folders/files, used unchanged."""
    from .whisper import load_whisper_encoder
    return LipSync(load_unet(unet, device, dtype), load_vae(vae, device, dtype),
                   load_whisper_encoder(whisper, device).to(dtype), crop_size=256,
                   geometry="musetalk").to(device).eval()
