"""The whole generator: audio encoder -> per-frame tokens (+ PE) -> UNet on [masked, reference] latents -> VAE decode.

`LipSync` bundles the three trained parts (UNet, VAE, audio encoder) with MuseTalk's conventions so that training,
inference, evaluation and the benchmark all call the same code. Saving and loading it (our checkpoint format, the
published weights) is lipsync.checkpoint.

One frame (S crop side, s latent side, D audio width, L encoder states; the bundled face128 model: 128, 32, 128, 5;
the MuseTalk weights: 256, 32, 384, 5):

    frame (H, W, 3) uint8 -> landmarks (68, 2), box (4,)   track.track_frames / read_track
    -> crop (S, S, 3) uint8                                tracking.crop_faces
    -> [masked crop, reference crop] latents (8, s, s)     LipSync.face.unet_input (+ references.pick)
    file -> wave (16 kHz mono)                             audio.load_audio
    -> features (1, L, T at 50/s, D)                       LipSync.audio.encode (MelEncoder, WhisperEncoder)
    -> windows (n_frames, 10 L, D) at 25 fps               LipSync.audio_windows -> windows.frame_windows
    forward: + sinusoidal PE = tokens -> UNet at t = 0     LipSync.forward (pipeline.avatar_frames batches it)
    (inference: with audio guidance g != 1, z(silence) + g (z(audio) - z(silence))   LipSync.generate)
    -> scaled latent (4, s, s) -> (3, S, S) about [-1, 1]  LipSync.face.decode (FaceVAE: / scaling_factor, decode)
    (optional, faces larger than S px: -> (3, 2S, 2S)      LipSync.restorer, lipsync.restore)
    -> pasted through the soft lower-face mask             blend.paste -> frame (H, W, 3) uint8

One UNet pass is enough: the UNet is trained to output the frame's clean latent at t = 0, so there is no noise to
remove. In training the reference is another frame (a visible target mouth would be copied); at inference
`LipSync.reference` names the rule (lipsync.references): "self" as in MuseTalk, or "closed_pose".

Audio guidance (ours; MuseTalk has none, g = 1 is its behaviour and costs nothing): a small generator trained with L1
draws a muted mouth for speech unlike its training voices, moving in time but a fraction as far as the speaker's.
`generate` also runs the UNet on the same faces with the tokens of silence and moves the latent g times as far from
that silent face as the speech took it (classifier-free guidance, with silence as the "no audio" condition): what the
audio changes is amplified, what it leaves alone (the face, its colours) is not. Two UNet passes per frame, batched.
Given the frame's lips (the pipeline passes them) only the mouth is guided (`mouth_weights`, a Gaussian over the
latent grid centred on the lips): amplified four times, the audio's small changes to the jaw line and the cheeks drew
a pale streak along the demo's jaw and blotches on a bearded face; the one-pass face is kept there instead.
"""

import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn

from .audio import SAMPLE_RATE
from .mel_encoder import MelEncoder, MelEncoderConfig
from .opening import quiet_frames
from .references import RULES as REFERENCE_RULES
from .tracking import GEOMETRIES
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, FaceVAE, VAEConfig
from .windows import PositionalEncoding, frame_windows, steady_windows


def check_guidance(g: float, error=ValueError, flag: str = "--audio-guidance") -> float:
    """An audio guidance scale must be a finite number >= 0 (0 = the silent face, 1 = none)."""
    if not (math.isfinite(g) and g >= 0):
        raise error(f"{flag} must be a number >= 0 (1 = none), not {g}")
    return g


def mouth_weights(lips: torch.Tensor, s: int, size: int) -> torch.Tensor:
    """Lip landmarks (B, K, 2) in the pixels of a size-px crop -> (B, 1, s, s) weights on its s x s latent grid: a
    Gaussian centred on the lips' box, sigma half the lips' width across and max(0.35 width, 0.6 height) down (about
    the mouth box training's mouth losses use, lipsync.training.data.mouth_box); 1 at the centre, ~0 at the jaw."""
    lips = torch.as_tensor(lips, dtype=torch.float32)
    lo, hi = lips.amin(-2), lips.amax(-2)  # (B, 2)
    centre, extent = (lo + hi) / 2, (hi - lo).clamp(min=1.0)
    sx = 0.5 * extent[:, 0]
    sy = torch.maximum(0.35 * extent[:, 0], 0.6 * extent[:, 1])
    cell = (torch.arange(s, dtype=torch.float32) + 0.5) * size / s  # latent cell centres in crop pixels
    dx = (cell[None, None, :] - centre[:, 0, None, None]) / sx[:, None, None]  # (B, 1, s)
    dy = (cell[None, :, None] - centre[:, 1, None, None]) / sy[:, None, None]  # (B, s, 1)
    return torch.exp(-0.5 * (dx ** 2 + dy ** 2))[:, None]


class LipSync(nn.Module):
    def __init__(self, unet: UNet, vae: AutoencoderKL, audio: nn.Module, crop_size: int, left: int = 2,
                 right: int = 2, geometry: str = "square", reference: str = "self", guidance: float = 1.0):
        super().__init__()
        if audio.dim != unet.config.cross_attention_dim:
            raise ValueError(f"audio features are {audio.dim}-dim but the UNet attends to "
                             f"{unet.config.cross_attention_dim}-dim context")
        # one VAE, two handles that differ by the latent scale (vae.config.scaling_factor, 0.18215 for sd-vae-ft-mse):
        # `vae` (AutoencoderKL) works on raw latents -- its own training stage, the avatar fingerprint; `face`
        # (FaceVAE over the same weights) on the UNet's scaled latents = raw x scaling_factor. The UNet's latents go
        # to face.decode, never to vae.decode.
        self.unet, self.vae, self.audio = unet, vae, audio
        self.face = FaceVAE(vae)
        self.pe = PositionalEncoding(audio.dim)
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown crop geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
        if reference not in REFERENCE_RULES:
            raise ValueError(f"unknown reference rule {reference!r}; choose from {', '.join(REFERENCE_RULES)}")
        self.crop_size, self.left, self.right, self.geometry = crop_size, left, right, geometry
        self.reference = reference  # the reference rule infer.py uses by default: the one the model was trained for
        self.guidance = guidance  # the audio guidance infer.py uses by default (1 = none; see generate)
        self._silence = None  # (L, T, D) the audio encoder's features of 1 s of silence, made on first use
        self.restorer = None  # optional lipsync.restore.Restorer: generated faces at 2S px for the paste's mouth
        self.opening = None  # optional lipsync.opening.OpeningHead: the opening the speech asks for ("audio" rule)

    @property
    def trainable_audio(self) -> bool:
        return isinstance(self.audio, MelEncoder)

    # ---- audio -> per-frame windows (lipsync.windows); forward adds the positional encoding, making them tokens
    @torch.no_grad()
    def audio_windows(self, wave: torch.Tensor, n_frames: int, fps: float) -> torch.Tensor:
        """Inference: a whole 16 kHz wave -> per-frame windows (n_frames, n L, D). Training cuts mel spans instead
        (windows.span_windows); streaming audio goes through streaming.WindowStream (pipeline.stream_windows)."""
        feats = self.audio.encode(wave)  # (1, L, T, D)
        return frame_windows(feats, n_frames, fps, self.left, self.right)

    def set_guidance(self, g: float) -> None:
        """An explicit audio guidance (infer.py / eval --audio-guidance): everywhere, on faces whose mouth never
        opens too (it replaces the opening head's shut_guidance, pipeline.shut_guidance)."""
        self.guidance = g
        if self.opening is not None:
            self.opening.cfg.shut_guidance = g

    def require_opening(self) -> None:
        """The "audio" reference rule's one check: a ValueError unless the checkpoint carries an opening head."""
        if self.opening is None:
            raise ValueError("the audio reference rule needs a checkpoint with an opening head (train.py --stage "
                             "opening); use --reference self or closed_pose")

    @torch.no_grad()
    def opening_windows(self, wave: torch.Tensor, n_frames: int, fps: float) -> torch.Tensor:
        """The windows (n_frames, 10 L, D) the opening head reads, the 25 fps layout at any frame rate
        (windows.steady_windows): from its own encoder (on the CPU) when it has one, else the generator's."""
        self.require_opening()
        enc = self.opening.encoder
        feats = self.audio.encode(wave) if enc is None else enc.encode(wave.float().cpu())
        return steady_windows(feats, n_frames, fps, self.left, self.right)  # the head's 10 steps at any fps

    def openings(self, wave: torch.Tensor, n_frames: int, fps: float):
        """The "audio" reference rule's input: the lip gap the speech asks for at each output frame -> (n_frames,)
        float64 (lipsync.opening); -inf in the speech's pauses (opening.quiet_frames: show the most closed mouth)."""
        predicted = self.opening(self.opening_windows(wave, n_frames, fps))
        predicted[quiet_frames(wave.detach().float().cpu().numpy(), n_frames, fps, SAMPLE_RATE)] = -np.inf
        return predicted

    # ---- the MuseTalk step
    def forward(self, unet_in: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """UNet image input (B, 8, s, s) from `self.face.unet_input` and audio windows (B, N, D) -> generated faces
        (B, 3, S, S) in [-1, 1]. One UNet pass at t = 0 predicts the scaled latents; no diffusion sampling."""
        w = self.unet.conv_in.weight
        tokens = self.pe(windows.to(w.device, w.dtype))  # (B, N, D) windows + sinusoidal PE
        latents = self.unet(unet_in, 0, tokens)  # (B, 4, s, s), scaled (x scaling_factor) like unet_in
        return self.face.decode(latents)  # / scaling_factor, then the VAE decoder -> (B, 3, S, S)

    @torch.no_grad()
    def silence_windows(self, n_tokens: int) -> torch.Tensor:
        """One frame's window (n_tokens, D) of silence: the middle n_tokens / L steps of the encoder's features of
        1 s of zeros, rows ordered like frame_windows (L t + layer)."""
        if self._silence is None:
            p = next(self.audio.parameters())
            self._silence = self.audio.encode(torch.zeros(SAMPLE_RATE, device=p.device))[0]  # (L, T, D)
        L, T, D = self._silence.shape
        steps = n_tokens // L
        first = (T - steps) // 2
        return self._silence[:, first: first + steps].transpose(0, 1).reshape(steps * L, D)

    def generate(self, unet_in: torch.Tensor, windows: torch.Tensor, guidance: float | None = None,
                 lips: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: forward with audio guidance g (default self.guidance). g = 1 is forward itself; otherwise the
        latent is z + (g - 1) m (z - z0), z and z0 with the audio and with silence from one batched UNet pass, m the
        mouth's weights (mouth_weights) for lips (B, K, 2) in crop pixels, or 1 everywhere without them
        (z0 + g (z - z0)) -> faces (B, 3, S, S)."""
        g = self.guidance if guidance is None else guidance
        if g == 1:
            return self(unet_in, windows)
        w = self.unet.conv_in.weight
        quiet = self.silence_windows(windows.shape[1]).to(windows)[None].expand_as(windows)
        tokens = self.pe(torch.cat([windows, quiet]).to(w.device, w.dtype))  # (2B, N, D)
        z, z0 = self.unet(torch.cat([unet_in, unet_in]), 0, tokens).chunk(2)  # (B, 4, s, s) each
        m = 1.0 if lips is None else mouth_weights(lips, z.shape[-1], self.crop_size).to(z)  # (B, 1, s, s)
        return self.face.decode(z + (g - 1) * m * (z - z0))

    # ---- what a checkpoint stores besides the weights (lipsync.checkpoint)
    def configs(self) -> dict:
        audio = dataclasses.asdict(self.audio.cfg) if self.trainable_audio else None
        return {"unet": dataclasses.asdict(self.unet.config), "vae": dataclasses.asdict(self.vae.config),
                "audio": audio, "crop_size": self.crop_size, "left": self.left, "right": self.right,
                "geometry": self.geometry, "reference": self.reference, "guidance": self.guidance}


def build(unet_cfg: UNetConfig, vae_cfg: VAEConfig, audio_cfg: MelEncoderConfig, crop_size: int) -> LipSync:
    return LipSync(UNet(unet_cfg), AutoencoderKL(vae_cfg), MelEncoder(audio_cfg), crop_size)


def compile_for_inference(model: LipSync) -> LipSync:
    """torch.compile the UNet and the VAE decoder in place; on CUDA with CUDA graphs ("reduce-overhead"), which
    need fixed shapes: generate with static=True so every call sees the same batch size."""
    mode = "reduce-overhead" if next(model.unet.parameters()).is_cuda else None
    model.unet = torch.compile(model.unet, mode=mode)
    model.vae.decoder = torch.compile(model.vae.decoder, mode=mode)
    return model
