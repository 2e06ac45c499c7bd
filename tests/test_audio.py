"""The audio path (lipsync.audio, melspec, windows, streaming) against independent oracles: transformers' whisper,
scipy's resample_poly, hand-computed indices."""

import math
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

import lipsync.streaming as streaming
import lipsync.windows as windows
from lipsync.audio import load_audio
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.melspec import log_mel, mel_filters
from lipsync.streaming import WindowStream
from lipsync.whisper import WhisperEncoder, load_whisper_encoder
from lipsync.windows import PositionalEncoding, frame_windows, span_windows, steady_windows
from media import SPEECH, SPEECH_48K, VIDEO


def oracle():
    """transformers' whisper: a dev-only oracle; without it only the tests that compare against it skip."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def eng():
    wave, sr = sf.read(SPEECH, dtype="float32")
    assert sr == 16000 and wave.ndim == 1
    return wave


def corr(a, b):
    n = min(len(a), len(b))
    return np.corrcoef(np.asarray(a)[:n], np.asarray(b)[:n])[0, 1]


def ffmpeg(*args):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True)


def test_exports_only_its_own_names():
    for module in (windows, streaming):
        assert all(getattr(module, name).__module__ == module.__name__ for name in module.__all__)
    assert {"frame_windows", "span_windows", "PositionalEncoding"} <= set(windows.__all__)
    assert streaming.__all__ == ["WindowStream"]


# ----------------------------------------------------------------------------- log-mel


def test_log_mel_matches_whisper_feature_extractor_on_padded_windows(eng):
    transformers = oracle()
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    assert torch.allclose(mel_filters(), torch.from_numpy(fe.mel_filters).T, atol=1e-12)
    for n in (480000, 116837):  # a full 30 s window and 7.3 s padded to 30 s
        x = eng[:n]
        ref = fe(x, sampling_rate=16000, return_tensors="np").input_features[0]  # float32 torch STFT
        ref64 = fe._np_extract_fbank_features(np.pad(x, (0, 480000 - n))[None], "cpu")[0]  # float64 numpy STFT
        ours = log_mel(torch.from_numpy(x), pad_30s=True).numpy()
        assert ours.shape == ref.shape == (80, 3000)
        assert np.abs(ours - ref).max() <= 2e-5
        assert np.abs(ours - ref64).max() <= 1e-6


def test_log_mel_unpadded_has_100_frames_per_second_and_matches_extractor_in_interior(eng):
    transformers = oracle()
    n = 116837
    ours = log_mel(torch.from_numpy(eng[:n])).numpy()
    assert ours.shape == (80, n // 160)
    ref = transformers.WhisperFeatureExtractor(feature_size=80)(eng[:n], sampling_rate=16000).input_features[0]
    last = (n - 200) // 160  # frames 2..last see no STFT padding in either version
    assert np.abs(ours[:, 2: last + 1] - ref[:, 2: last + 1]).max() <= 2e-5


def test_log_mel_without_dynamic_floor_only_skips_the_max_minus_8_clamp(eng):
    x = torch.from_numpy(eng[:160000])
    raw, clamped = log_mel(x, dynamic_floor=False), log_mel(x)
    assert (raw < raw.max() - 2).any()  # 8 log10 units = 2 after (x + 4) / 4: the clamp matters here
    assert raw.min() >= -1.5 - 1e-6
    assert torch.allclose(torch.maximum(raw, raw.max() - 2), clamped, atol=1e-6)
    assert torch.allclose(log_mel(x[16000:32000], dynamic_floor=False)[:, 3:-3], raw[:, 103:197], atol=1e-6)


def test_log_mel_rejects_more_than_30s_when_padding(eng):
    with pytest.raises(ValueError, match="30 s"):
        log_mel(torch.from_numpy(eng[:480001]), pad_30s=True)


# ----------------------------------------------------------------------------- whisper encoder


@pytest.fixture(scope="module")
def hf_whisper(tmp_path_factory):
    transformers = oracle()
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=100, max_target_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = transformers.WhisperModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # random biases and norms too, so a swapped name cannot pass
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(folder)
    return model, folder


def hf_states(model, mel):
    with torch.no_grad():
        return torch.stack(model.encoder(mel, output_hidden_states=True).hidden_states, dim=1)


@pytest.fixture(scope="module")
def mel30(eng):
    transformers = oracle()
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    return torch.from_numpy(fe(eng[:480000], sampling_rate=16000, return_tensors="np").input_features)


def test_whisper_encoder_from_hf_safetensors_matches_hidden_states(hf_whisper, mel30):
    model, folder = hf_whisper
    assert (folder / "model.safetensors").is_file()
    ours = load_whisper_encoder(folder)
    with torch.no_grad():
        got = ours(mel30)
    ref = hf_states(model, mel30)
    assert got.shape == ref.shape == (1, 3, 1500, 64)
    assert (got - ref).abs().max() <= 1e-4


def test_whisper_encoder_from_hf_bin_with_model_prefix_ignores_decoder(hf_whisper, mel30, tmp_path):
    model, folder = hf_whisper
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {"model." + k: v for k, v in model.state_dict().items()}  # WhisperForConditionalGeneration naming
    state["proj_out.weight"] = torch.zeros(100, 64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        got = load_whisper_encoder(tmp_path)(mel30)
    assert (got - hf_states(model, mel30)).abs().max() <= 1e-4


def test_whisper_encoder_from_openai_checkpoint_matches_hf(hf_whisper, mel30, tmp_path):
    model, _ = hf_whisper
    renames = [("encoder.layers.", "encoder.blocks."), ("self_attn_layer_norm", "attn_ln"),
               ("self_attn.q_proj", "attn.query"), ("self_attn.k_proj", "attn.key"),
               ("self_attn.v_proj", "attn.value"), ("self_attn.out_proj", "attn.out"), ("final_layer_norm", "mlp_ln"),
               (".fc1.", ".mlp.0."), (".fc2.", ".mlp.2."), ("encoder.layer_norm", "encoder.ln_post"),
               ("encoder.embed_positions.weight", "encoder.positional_embedding")]
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            for old, new in renames:
                k = k.replace(old, new)
            state[k] = v
    assert "encoder.blocks.1.attn.query.weight" in state and "encoder.blocks.0.mlp.2.bias" in state
    state["decoder.token_embedding.weight"] = torch.zeros(100, 64)
    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2, n_vocab=100,
                n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=1)
    torch.save({"dims": dims, "model_state_dict": state}, tmp_path / "tiny.pt")
    with torch.no_grad():
        got = load_whisper_encoder(tmp_path / "tiny.pt")(mel30)
    assert (got - hf_states(model, mel30)).abs().max() <= 1e-4


def test_whisper_encode_long_audio_in_30s_windows_trimmed_to_50_steps_per_second(hf_whisper, eng):
    transformers = oracle()
    model, folder = hf_whisper
    n = 37 * 16000 + 123
    got = load_whisper_encoder(folder).encode(torch.from_numpy(eng[:n]))
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    mels = fe([eng[:480000], eng[480000:n]], sampling_rate=16000, return_tensors="pt").input_features
    ref = torch.cat([hf_states(model, m[None]) for m in mels], dim=2)[:, :, : math.floor(n / 16000 * 50)]
    assert got.shape == ref.shape == (1, 3, 1850, 64)
    assert (got - ref).abs().max() <= 1e-4


def test_whisper_encoder_defaults_are_whisper_tiny():
    enc = WhisperEncoder()
    assert (enc.dim, enc.n_states, enc.embed_positions.num_embeddings) == (384, 5, 1500)
    assert enc.layers[0].self_attn.k_proj.bias is None and enc.layers[0].fc1.out_features == 1536


# ----------------------------------------------------------------------------- mel encoder and windows


def test_mel_encoder_is_small_and_keeps_the_output_contract():
    enc = MelEncoder()
    assert sum(p.numel() for p in enc.parameters()) <= 3_000_000
    assert (enc.dim, enc.n_states, enc.context) == (384, 5, 4)
    assert MelEncoder(MelEncoderConfig.tiny()).dim == 128
    assert enc(torch.randn(2, 80, 2 * 37 + 1)).shape == (2, 5, 37, 384)


def test_span_windows_equals_frame_windows_of_whole_file_in_interior(eng):
    torch.manual_seed(0)
    enc = MelEncoder(MelEncoderConfig.tiny()).eval()
    mel = log_mel(torch.from_numpy(eng[:4 * 16000]), dynamic_floor=False)  # (80, 400)
    with torch.no_grad():
        whole = frame_windows(enc(mel[None]), 100)  # (100, 50, 128)
        frames = [5, 17, 60, 95]
        c, n = enc.context, 10
        spans = torch.stack([mel[:, 2 * (2 * f - 4 - c): 2 * (2 * f - 4 + n + c)] for f in frames])
        got = span_windows(enc, spans, c, n)
    assert got.shape == (4, 50, 128)
    assert torch.allclose(got, whole[frames], atol=1e-5)


def step_features(L=5, T=50, D=3):
    """feats[l, t, :] = 100 * (t + 1) + l, so every row names its (step, layer)."""
    t = torch.arange(T, dtype=torch.float32)[None, :, None]
    return (100 * (t + 1) + torch.arange(L, dtype=torch.float32)[:, None, None]).expand(L, T, D).clone()


def expected_window(start, n, L=5, T=50):
    return torch.tensor([100 * (s + 1) + l if 0 <= s < T else 0.0 for s in range(start, start + n) for l in range(L)])


def test_frame_windows_25fps_indices_and_edge_zero_padding_match_hand_computed():
    feats = step_features()
    win = frame_windows(feats, 25)  # 1 s of audio at 25 fps
    assert win.shape == (25, 50, 3)
    hand = {0: [-4, -3, -2, -1, 0, 1, 2, 3, 4, 5], 7: list(range(10, 20)), 24: [44, 45, 46, 47, 48, 49, 50, 51, 52, 53]}
    for f, steps in hand.items():
        assert torch.equal(win[f, :, 0], expected_window(steps[0], 10))
    assert torch.equal(win[0, :20], torch.zeros(20, 3)) and torch.equal(win[24, 30:], torch.zeros(20, 3))
    assert torch.equal(win[0, 20 + 3, 0], torch.tensor(100.0 * 1 + 3))  # row = L * t + layer: step 0, layer 3
    assert torch.equal(frame_windows(feats[None], 25), win)


def test_frame_windows_index_by_time_at_other_frame_rates():
    feats = step_features()
    win30 = frame_windows(feats, 30, fps=30)
    for f, start in zip(range(6), [-4, -3, -1, 1, 2, 4]):  # floor(f * 5 / 3) - 4
        assert torch.equal(win30[f, :, 0], expected_window(start, 10))
    assert torch.equal(win30[29, :, 0], expected_window(44, 10))
    win12 = frame_windows(feats, 12, fps=12.5)  # 4 steps per frame: 20-step windows from 4f - 8
    assert win12.shape == (12, 100, 3)
    assert torch.equal(win12[3, :, 0], expected_window(4, 20))


def test_steady_windows_keep_the_25_fps_layout_at_any_frame_rate():
    feats = step_features()
    assert torch.equal(steady_windows(feats, 25, 25.0), frame_windows(feats, 25))
    assert torch.equal(steady_windows(feats, 30, 30.0), frame_windows(feats, 30, fps=30))
    win10 = steady_windows(feats[None], 10, 10.0)  # frame_windows: 25 steps from 5f - 10
    assert win10.shape == (10, 50, 3)
    for f in (0, 3, 9):
        assert torch.equal(win10[f, :, 0], expected_window(5 * f - 4, 10))  # the 10 steps from 5f - 4
    assert torch.equal(win10, frame_windows(feats, 10, fps=10)[:, 6 * 5:16 * 5])  # the middle of the long window


def test_positional_encoding_adds_musetalk_sinusoids_without_parameters():
    pe = PositionalEncoding(384)
    assert list(pe.parameters()) == [] and pe.state_dict() == {}
    p, i = np.arange(50)[:, None], np.arange(0, 384, 2)[None, :]
    ref = np.zeros((50, 384))
    ref[:, 0::2], ref[:, 1::2] = np.sin(p / 10000 ** (i / 384)), np.cos(p / 10000 ** (i / 384))
    x = torch.randn(2, 50, 384)
    assert torch.allclose(pe(x) - x, torch.from_numpy(ref).float().expand(2, 50, 384), atol=1e-5)


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("fps", [25, 30])
def test_window_stream_windows_equal_offline_windows_for_random_chunks(eng, fps):
    torch.manual_seed(0)
    enc = MelEncoder(MelEncoderConfig.tiny()).eval()
    x = torch.from_numpy(eng[: 2 * 16000 + 5377])
    with torch.no_grad():
        offline = frame_windows(enc.encode(x), math.floor(len(x) / 16000 * fps), fps=fps)
    rng = np.random.default_rng(fps)
    stream, outs, i = WindowStream(enc, fps=fps), [], 0
    while i < len(x):
        k = int(rng.choice([1, 3, 159, 161, 640, 2000, 4321]))
        outs.append(stream.push(x[i: i + k]))
        i += k
    early = sum(len(o) for o in outs)
    outs.append(stream.finish())
    got = torch.cat(outs)
    assert got.shape == offline.shape
    assert torch.allclose(got, offline, atol=1e-5, rtol=1e-5)
    assert early >= len(offline) - 6  # frames come out while audio arrives, only ~200 ms behind
    assert stream.wave.numel() < 2000 and stream.feats.shape[1] <= 20  # bounded buffers


# ----------------------------------------------------------------------------- loading


def test_load_audio_resamples_44k_and_48k_stereo_like_scipy(eng, tmp_path):
    x = eng[: 10 * 16000]
    for rate, up, down, subtype in ((44100, 441, 160, "PCM_24"), (48000, 3, 1, "PCM_16")):
        left = resample_poly(x, up, down)
        stereo = np.stack([left, 0.5 * np.roll(left, 100)], axis=1)
        path = tmp_path / f"stereo{rate}.wav"
        sf.write(path, stereo, rate, subtype=subtype)
        data, _ = sf.read(path, dtype="float64")
        ref = resample_poly(data.mean(axis=1), down, up)
        got = load_audio(path)
        assert got.dtype == torch.float32 and got.shape == (len(ref),)
        assert corr(got.numpy(), ref) >= 0.9999


def test_load_audio_real_48k_file_agrees_with_scipy_in_band_and_is_anti_aliased():
    data, rate = sf.read(SPEECH_48K, dtype="float64")
    assert rate == 48000 and data.shape[1] == 2
    got, ref = load_audio(SPEECH_48K).numpy(), resample_poly(data.mean(axis=1), 1, 3)

    def below_7k(v):
        spec = np.fft.rfft(v)
        spec[np.fft.rfftfreq(len(v), 1 / 16000) > 7000] = 0
        return np.fft.irfft(spec, len(v))

    assert corr(below_7k(got), below_7k(ref)) >= 0.9999  # scipy's own filter lets 8-9 kHz alias, so full band differs
    t = np.arange(48000) / 48000
    for hz, gain in ((5000, 1.0), (9000, 0.0), (12000, 0.0)):
        y = load_audio((np.sin(2 * np.pi * hz * t), 48000)).numpy()[1000:-1000]
        assert abs(np.sqrt(2) * y.std() - gain) <= 1e-3


def test_load_audio_reads_flac_ogg_int_and_float_formats(eng, tmp_path):
    x = eng[: 2 * 16000]
    sf.write(tmp_path / "a.flac", x, 16000, subtype="PCM_16")
    sf.write(tmp_path / "a.ogg", x, 16000)
    sf.write(tmp_path / "a.wav", np.stack([x, x], 1), 16000, subtype="FLOAT")
    assert torch.equal(load_audio(tmp_path / "a.flac"), torch.from_numpy(x))
    assert torch.equal(load_audio(tmp_path / "a.wav"), torch.from_numpy(x))
    assert corr(load_audio(tmp_path / "a.ogg"), x) >= 0.99
    pcm = (x * 32768).astype(np.int16)
    assert torch.allclose(load_audio(pcm), torch.from_numpy(x), atol=1e-7)
    assert torch.allclose(load_audio(torch.from_numpy(np.stack([x, -x]))), torch.zeros(len(x)))  # (channels, n)
    up = load_audio((x, 8000))  # the upsampling path
    assert up.shape == (2 * len(x),) and corr(up, resample_poly(x, 2, 1)) >= 0.9999


def test_load_audio_decodes_m4a_and_mp4_with_bundled_ffmpeg(eng, tmp_path):
    sf.write(tmp_path / "eng.wav", eng[: 3 * 16000], 16000)
    ffmpeg("-i", tmp_path / "eng.wav", "-c:a", "aac", "-b:a", "128k", tmp_path / "eng.m4a")
    got = load_audio(tmp_path / "eng.m4a")
    assert abs(len(got) - 3 * 16000) <= 1024 and corr(got, eng[: 3 * 16000]) >= 0.99
    ffmpeg("-i", VIDEO, "-i", SPEECH_48K, "-t", "2", "-map", "0:v", "-map", "1:a",
           "-c:v", "copy", "-c:a", "aac", tmp_path / "clip.mp4")
    got = load_audio(tmp_path / "clip.mp4")
    ref = load_audio(SPEECH_48K)[: len(got)]
    assert abs(len(got) - 2 * 16000) <= 1024 and corr(got, ref) >= 0.99
    assert abs(got.std() / ref.std() - 1) < 0.05  # channels averaged, not ffmpeg's louder -ac 1 downmix


def test_load_audio_bad_inputs_raise_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "notes.wav").write_text("not audio at all\n" * 50)
    with pytest.raises(ValueError, match="notes.wav.*cannot decode"):
        load_audio(tmp_path / "notes.wav")
    with pytest.raises(ValueError, match="demo.mp4.*no audio stream"):
        load_audio(VIDEO)
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="nan.wav.*NaN"):
        load_audio(tmp_path / "nan.wav")
