"""Whisper's audio encoder, weight-compatible with Hugging Face and OpenAI checkpoints (whisper-tiny by default).

Attribute names are those of transformers' `WhisperEncoder` (`conv1`, `layers.N.self_attn.q_proj`, `layer_norm`, ...),
so a Hugging Face state dict loads after stripping its `model.encoder.` / `encoder.` prefix; OpenAI's `tiny.pt`
(`encoder.blocks.N.attn.query`, ...) is renamed with a small template table. The output stacks every hidden state,
(B, layers + 1, T, d), the last one after the final layer norm, as MuseTalk v1.5 uses them (docs/musetalk.md §4).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .melspec import CHUNK_SAMPLES, HOP, log_mel
from .weights import read_tensors


@dataclass
class WhisperEncoderConfig:
    n_mels: int = 80
    d_model: int = 384
    layers: int = 4
    heads: int = 6
    ffn: int = 1536
    positions: int = 1500  # 30 s at 50 steps/s

    @classmethod
    def from_hf(cls, cfg):
        return cls(cfg["num_mel_bins"], cfg["d_model"], cfg["encoder_layers"], cfg["encoder_attention_heads"],
                   cfg["encoder_ffn_dim"], cfg["max_source_positions"])

    @classmethod
    def from_openai(cls, dims):
        d = dims["n_audio_state"]
        return cls(dims["n_mels"], d, dims["n_audio_layer"], dims["n_audio_head"], 4 * d, dims["n_audio_ctx"])


class WhisperAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, d / H)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = WhisperAttention(cfg.d_model, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """log-mel (B, 80, 2T) -> hidden states (B, layers + 1, T, d); T <= positions (whisper itself wants 2T = 3000)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or WhisperEncoderConfig()
        self.dim, self.n_states = cfg.d_model, cfg.layers + 1
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.positions, cfg.d_model)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, mel):
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, 80, 2T) -> (B, T, d)
        assert x.shape[1] <= self.cfg.positions, f"{x.shape[1]} steps > {self.cfg.positions}: use encode() for long audio"
        x = x + self.embed_positions.weight[: x.shape[1]]
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        states[-1] = self.layer_norm(x)
        return torch.stack(states, dim=1)  # (B, layers + 1, T, d)

    @torch.no_grad()
    def encode(self, wave):
        """16 kHz wave (samples,) -> (1, layers + 1, samples // 320, d), in 30 s windows as MuseTalk v1.5 does."""
        p = next(self.parameters())
        wave = torch.as_tensor(wave, device=p.device)
        feats = [self(log_mel(wave[i: i + CHUNK_SAMPLES], pad_30s=True)[None].to(p.dtype))
                 for i in range(0, wave.shape[-1], CHUNK_SAMPLES)]
        return torch.cat(feats, dim=2)[:, :, : wave.shape[-1] // (2 * HOP)]


_OPENAI_NAMES = {  # OpenAI -> Hugging Face, "{}" = block index
    "blocks.{}.attn.query.": "layers.{}.self_attn.q_proj.",
    "blocks.{}.attn.key.": "layers.{}.self_attn.k_proj.",
    "blocks.{}.attn.value.": "layers.{}.self_attn.v_proj.",
    "blocks.{}.attn.out.": "layers.{}.self_attn.out_proj.",
    "blocks.{}.attn_ln.": "layers.{}.self_attn_layer_norm.",
    "blocks.{}.mlp.0.": "layers.{}.fc1.",
    "blocks.{}.mlp.2.": "layers.{}.fc2.",
    "blocks.{}.mlp_ln.": "layers.{}.final_layer_norm.",
    "ln_post.": "layer_norm.",
    "positional_embedding": "embed_positions.weight",
}
_OPENAI_RULES = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)")), v.replace("{}", r"\1"))
                 for k, v in _OPENAI_NAMES.items()]


def _openai_to_hf(name):
    for pattern, repl in _OPENAI_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def _encoder_part(state, prefixes):
    for prefix in prefixes:
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return part
    raise ValueError(f"no encoder weights (keys starting with {' or '.join(prefixes)})")


def load_whisper_encoder(path, device="cpu"):
    """WhisperEncoder in eval mode from a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin)
    or an OpenAI checkpoint file (dict with `dims` and `model_state_dict`, e.g. tiny.pt). Decoder weights are ignored.
    """
    path = Path(path)
    if path.is_dir():
        cfg = WhisperEncoderConfig.from_hf(json.loads((path / "config.json").read_text()))
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
        state = read_tensors(str(found[0]))
        state = _encoder_part(state, ("model.encoder.", "encoder."))
    elif path.is_file():
        ckpt = read_tensors(str(path))
        if not (isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt):
            raise ValueError(f"{path}: not an OpenAI whisper checkpoint (needs 'dims' and 'model_state_dict')")
        cfg = WhisperEncoderConfig.from_openai(ckpt["dims"])
        state = {_openai_to_hf(k): v for k, v in _encoder_part(ckpt["model_state_dict"], ("encoder.",)).items()}
    else:
        raise FileNotFoundError(f"whisper checkpoint not found: {path}")
    model = WhisperEncoder(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
