"""Core models against diffusers (the oracle): same state-dict names and shapes, same outputs, strict loading."""


import numpy as np
import pytest
import torch

import lipsync
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, FaceVAE, VAEConfig, to_uint8_images
from lipsync.weights import CheckpointError, convert_legacy_vae
from media import UNET_KEYS, VAE_KEYS


def oracle():
    """diffusers: a dev-only oracle (requirements-dev.txt); without it only the tests that compare against it skip."""
    return pytest.importorskip("diffusers")


TINY_UNET = dict(
    in_channels=8, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=4,
    cross_attention_dim=384, norm_num_groups=8, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)


def reference_shapes(path):
    shapes = {}
    with open(path) as f:
        for line in f:
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(int(s) for s in shape.strip("()\n ,").split(",") if s.strip())
    return shapes


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def randomize(model, seed=0):
    """diffusers zero-inits some output convs; give every tensor random values so the comparison means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_unet_folder(tmp_path_factory):
    diffusers = oracle()
    torch.manual_seed(0)
    ref = randomize(diffusers.UNet2DConditionModel(**TINY_UNET)).eval()
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder / "st", safe_serialization=True)
    ref.save_pretrained(folder / "bin", safe_serialization=False)
    return ref, folder


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    diffusers = oracle()
    torch.manual_seed(0)
    ref = randomize(diffusers.AutoencoderKL(**TINY_VAE), seed=1).eval()
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder / "st", safe_serialization=True)
    ref.save_pretrained(folder / "bin", safe_serialization=False)
    return ref, folder


def test_default_unet_has_musetalk_keys_and_shapes():
    with torch.device("meta"):
        ours = UNet(UNetConfig())
    assert shapes_of(ours) == reference_shapes(UNET_KEYS)


def test_default_vae_has_sd_vae_ft_mse_keys_and_shapes():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
    assert shapes_of(ours) == reference_shapes(VAE_KEYS)


def test_default_configs_match_diffusers_built_on_meta():
    diffusers = oracle()
    cfg = dict(TINY_UNET, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32)
    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel(**cfg)
        ref_vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4)
        ours_unet, ours_vae = UNet(UNetConfig()), AutoencoderKL(VAEConfig())
    assert shapes_of(ours_unet) == shapes_of(ref_unet)
    assert shapes_of(ours_vae) == shapes_of(ref_vae)


@pytest.mark.parametrize("layout", ["st", "bin"])
def test_unet_matches_diffusers_outputs(tiny_unet_folder, layout):
    ref, folder = tiny_unet_folder
    ours = lipsync.load_unet(str(folder / layout))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 16, 24, generator=g)  # non-square: any H, W divisible by 8
    ctx = torch.randn(2, 50, 384, generator=g)
    with torch.no_grad():
        expected = ref(x, torch.tensor([0]), encoder_hidden_states=ctx).sample
        got = ours(x, 0, ctx)
        got_again = ours(x, torch.tensor([0]), ctx)  # a one-element tensor: embedded once, broadcast
        got_t = ours(x, torch.tensor([7, 7]), ctx)
        expected_t = ref(x, torch.tensor([7, 7]), encoder_hidden_states=ctx).sample
    assert got.shape == (2, 4, 16, 24)
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(got, got_again)
    assert (got_t - expected_t).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_unet_cpu_matmul_conv_path_matches_diffusers(tiny_unet_folder, layout, monkeypatch):
    """Force every conv of the UNet through blocks.Conv2d's unfold + GEMM path (normally only wide, small-map convs)."""
    from lipsync import blocks
    monkeypatch.setattr(blocks, "GEMM_MIN_WEIGHTS", 0)
    monkeypatch.setattr(blocks, "GEMM_MAX_POSITIONS", 10 ** 9)
    calls = []
    unfold = blocks.F.unfold
    monkeypatch.setattr(blocks.F, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    ref, folder = tiny_unet_folder
    ours = lipsync.load_unet(str(folder / "st"))  # loads channels-last conv weights
    if layout == "contiguous":
        ours = ours.to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 8, 16, 24, generator=g), torch.randn(2, 50, 384, generator=g)
    with torch.no_grad():
        expected = ref(x, torch.tensor([0]), encoder_hidden_states=ctx).sample
        got = ours(x, 0, ctx)
    n_convs = sum(isinstance(m, blocks.Conv2d) for m in ours.modules())
    assert len(calls) == n_convs > 40
    assert (got - expected).abs().max() <= 1e-4


def test_matmul_conv_gives_conv2d_gradients(monkeypatch):
    from lipsync import blocks
    monkeypatch.setattr(blocks, "GEMM_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    for stride, padding, k in [(1, 1, 3), (2, 1, 3), (2, 0, 3), (1, 0, 1)]:
        ours = blocks.Conv2d(6, 5, k, stride=stride, padding=padding)
        ref = torch.nn.Conv2d(6, 5, k, stride=stride, padding=padding)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(2, 6, 7, 7, requires_grad=True)
        y, y_ref = ours(x), ref(x)
        assert y.shape == y_ref.shape and (y - y_ref).abs().max() < 1e-5
        gx, gw = torch.autograd.grad(y.square().sum(), (x, ours.weight))
        gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), (x, ref.weight))
        assert (gx - gx_ref).abs().max() < 1e-4 and (gw - gw_ref).abs().max() < 1e-4


def test_unet_time_embedding_follows_weight_changes(tiny_unet_folder):
    _, folder = tiny_unet_folder
    ours = lipsync.load_unet(str(folder / "st"))
    x, ctx = torch.randn(1, 8, 16, 16), torch.randn(1, 5, 384)
    with torch.no_grad():
        before = ours(x, 0, ctx)
        ours.time_embedding.linear_2.bias.add_(1.0)
        after = ours(x, 0, ctx)
    assert not torch.allclose(before, after)


def test_unet_trains_with_gradients_through_time_embedding():
    model = UNet(UNetConfig.tiny())
    x, ctx = torch.randn(2, 8, 16, 16), torch.randn(2, 10, 128)
    model(x, 0, ctx).square().mean().backward()
    assert model.time_embedding.linear_1.weight.grad is not None
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["st", "bin"])
def test_vae_matches_diffusers_encode_and_decode(tiny_vae_folder, layout):
    ref, folder = tiny_vae_folder
    ours = lipsync.load_vae(str(folder / layout))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist
        post = ours.encode(x)
        z = post.mean
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert (post.mean - ref_post.mean).abs().max() <= 1e-4
    assert (post.std - ref_post.std).abs().max() <= 1e-4
    assert (got - expected).abs().max() <= 1e-4
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(post.sample(generator=g1), post.sample(generator=g2))


def test_vae_loads_legacy_attention_names(tiny_vae_folder, tmp_path):
    ref, folder = tiny_vae_folder
    legacy = {}
    for k, v in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if v.dim() == 2:
                    v = v[:, :, None, None]  # the 1x1-conv layout of older conversions
        legacy[k] = v.clone()
    assert any(".query." in k for k in legacy)
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "st" / "config.json").read_text())
    ours = lipsync.load_vae(str(tmp_path))
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert set(convert_legacy_vae(legacy)) == set(ref.state_dict())


def test_single_file_checkpoint_with_musetalk_json_beside_it(tiny_unet_folder, tmp_path):
    ref, folder = tiny_unet_folder
    torch.save(ref.state_dict(), tmp_path / "unet.pth")
    (tmp_path / "musetalk.json").write_text((folder / "st" / "config.json").read_text())
    ours = lipsync.load_unet(str(tmp_path / "unet.pth"), dtype=torch.bfloat16)
    assert ours.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(ours.conv_in.weight.float(), ref.conv_in.weight.bfloat16().float())


def test_mismatched_checkpoint_gives_one_clear_error(tiny_unet_folder, tmp_path):
    ref, folder = tiny_unet_folder
    sd = dict(ref.state_dict())
    sd.pop("conv_in.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_out.weight"] = torch.zeros(5, 32, 3, 3)
    torch.save(sd, tmp_path / "unet.pth")
    (tmp_path / "config.json").write_text((folder / "st" / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        lipsync.load_unet(str(tmp_path / "unet.pth"))
    msg = str(e.value)
    assert "1 missing" in msg and "conv_in.bias" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 misshaped" in msg and "conv_out.weight" in msg


def test_corrupted_checkpoint_gives_one_clear_error(tmp_path):
    bad = tmp_path / "diffusion_pytorch_model.safetensors"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        lipsync.load_vae(str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        lipsync.load_unet(str(tmp_path / "nope.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        lipsync.load_unet(str(tmp_path / "empty"))


def test_face_vae_masks_lower_half_and_orders_masked_first():
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    face = FaceVAE(vae)
    crops = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    refs = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = face.unet_input(crops, refs)
        imgs = crops.permute(0, 3, 1, 2).float() / 127.5 - 1
        masked = imgs.clone()
        masked[:, :, 32:] = -1
        expected_masked = vae.encode(masked).mean * 0.18215
        expected_ref = vae.encode(refs.permute(0, 3, 1, 2).float() / 127.5 - 1).mean * 0.18215
        out = to_uint8_images(face.decode(x[:, 4:]))
    assert x.shape == (2, 8, 16, 16)
    assert torch.allclose(x[:, :4], expected_masked, atol=1e-5)
    assert torch.allclose(x[:, 4:], expected_ref, atol=1e-5)
    assert out.shape == (2, 64, 64, 3) and out.dtype.name == "uint8"


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).train()
    x, ctx = torch.randn(2, 8, 16, 16), torch.randn(2, 10, 128)
    model(x, 0, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, 0, ctx).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_lipsync_forward_adds_the_sinusoidal_position_code_once_and_runs_the_unet_at_t0():
    """LipSync.forward = decode(UNet(unet_in, t=0, windows + PE)), PE[p, 2i] = sin(p / 10000^(2i/d)), cos for 2i+1."""
    import numpy as np
    from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
    from lipsync.model import LipSync
    torch.manual_seed(0)
    model = LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()), MelEncoder(MelEncoderConfig.tiny()),
                    64).eval()
    unet_in, windows = torch.randn(2, 8, 16, 16), torch.randn(2, 50, 128)
    p, i = np.arange(50)[:, None], np.arange(0, 128, 2)[None]
    pe = np.zeros((50, 128))
    pe[:, 0::2], pe[:, 1::2] = np.sin(p / 10000 ** (i / 128)), np.cos(p / 10000 ** (i / 128))
    with torch.no_grad():
        expected = model.face.decode(model.unet(unet_in, torch.zeros(2), windows + torch.tensor(pe).float()))
        got = model(unet_in, windows)
    # the PE is built in float64 here and in float32 by the model: ~1e-5 apart after the UNet and decoder, while a
    # missing, doubled or sin/cos-swapped code, another base or t = 1 moves the output by 0.16 to 1.6
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


def test_bundled_face_vae_128_loads_as_the_face128_presets_vae_and_reconstructs_a_face():
    """assets/face_vae_128 (the any-face model's VAE, trained by train.py) keeps loading through load_vae with the
    face128 architecture, and it is a trained VAE: a random one gives ~10 dB on a face crop."""
    import dataclasses

    import numpy as np
    import train
    from lipsync.tools.metrics import psnr
    from lipsync.weights import load_vae
    from lipsync.tracking import crop_faces
    from lipsync.vae import FaceVAE, to_model_images, to_uint8_images
    from lipsync.video import read_video
    from media import ROOT, VIDEO
    vae = load_vae(ROOT / "assets" / "face_vae_128")
    expected = train.model_configs(train.parse_args(["--preset", "face128"]))[1]
    assert dataclasses.replace(vae.config, scaling_factor=expected.scaling_factor) == expected
    frames, _ = read_video(VIDEO)
    track = np.load(ROOT / "assets" / "demo.track.npz")
    crops = crop_faces(frames[:4], track["boxes"][:4], 128)
    face = FaceVAE(vae)
    with torch.no_grad():
        back = to_uint8_images(face.decode(face.encode(to_model_images(crops))))
    assert psnr(back, crops) > 22


def _tiny_lipsync(seed=0):
    from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
    from lipsync.model import LipSync
    torch.manual_seed(seed)
    return LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()), MelEncoder(MelEncoderConfig.tiny()),
                   64).eval()


def test_silence_windows_are_a_frames_window_of_silent_audio_in_frame_windows_row_order():
    model = _tiny_lipsync()
    one_second = model.audio_windows(torch.zeros(16000), 25, 25.0)  # (25, 10 L, D)
    torch.testing.assert_close(model.silence_windows(one_second.shape[1]), one_second[12], rtol=0, atol=0)


def test_audio_guidance_scales_the_latents_change_from_the_silent_face():
    """generate: g = 1 is forward itself (one UNet pass); otherwise decode(z0 + g (z - z0)) with z0 the UNet's latent
    for the same faces with silence; g = 0 gives the silent face."""
    model = _tiny_lipsync()
    calls = []
    model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    unet_in, windows = torch.randn(3, 8, 16, 16), torch.randn(3, 50, 128)
    quiet = model.silence_windows(50)[None].expand(3, -1, -1)
    with torch.no_grad():
        plain, silent = model(unet_in, windows), model(unet_in, quiet)
        z = model.unet(unet_in, 0, model.pe(windows))
        z0 = model.unet(unet_in, 0, model.pe(quiet))
        assert not torch.allclose(z, z0, atol=1e-3)  # the audio changes the latent: scaling it would show
        calls.clear()
        assert torch.equal(model.generate(unet_in, windows), plain) and calls == [3]  # default guidance 1
        for g in (0.0, 2.5):
            calls.clear()
            got = model.generate(unet_in, windows, g)
            assert calls == [6]  # one batched pass: speech and silence
            torch.testing.assert_close(got, model.face.decode(z0 + g * (z - z0)), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.generate(unet_in, windows, 0.0), silent, atol=1e-5, rtol=0)
        model.guidance = 2.5
        torch.testing.assert_close(model.generate(unet_in, windows), model.generate(unet_in, windows, 2.5))


def test_audio_guidance_given_the_lips_moves_only_the_mouth(monkeypatch):
    """generate with lips: z + (g - 1) m (z - z0), m = mouth_weights: the full guided latent at the lips' centre,
    the one-pass latent far from them (the jaw, the cheeks); mouth_weights follows the lips across the crop."""
    from lipsync.model import mouth_weights
    model = _tiny_lipsync()
    monkeypatch.setattr(model.face, "decode", lambda z: z)  # the latent itself, to compare cell by cell
    S, s = model.crop_size, 16
    unet_in, windows = torch.randn(2, 8, s, s), torch.randn(2, 50, 128)
    quiet = model.silence_windows(50)[None].expand(2, -1, -1)
    lips = torch.tensor([[[0.33, 0.70], [0.53, 0.66], [0.73, 0.70], [0.53, 0.76]],
                         [[0.12, 0.20], [0.27, 0.17], [0.42, 0.20], [0.27, 0.26]]]) * S  # (2, 4, 2) crop pixels
    with torch.no_grad():
        z = model.unet(unet_in, 0, model.pe(windows))
        z0 = model.unet(unet_in, 0, model.pe(quiet))
        got = model.generate(unet_in, windows, 3.0, lips)
    m = mouth_weights(lips, s, S)  # (2, 1, s, s)
    assert m.shape == (2, 1, s, s) and float(m.max()) <= 1
    for b, (cx, cy) in enumerate(((0.53, 0.71), (0.27, 0.215))):
        i, j = int(cy * s), int(cx * s)  # the cell holding the lips' centre
        assert m[b, 0, i, j] > 0.9 and m[b, 0].argmax() == i * s + j
    assert m[0, 0, 1, 1] < 1e-3 and m[1, 0, s - 2, s - 2] < 1e-3
    cell = (np.arange(s) + 0.5) * S / s  # cell centres, crop pixels; face 0: lips 25.6 px wide, 6.4 px tall
    cx, cy, sx, sy = 0.53 * S, 0.71 * S, 0.5 * 25.6, max(0.35 * 25.6, 0.6 * 6.4)
    want = np.exp(-0.5 * ((cell[None, :] - cx) / sx) ** 2 - 0.5 * ((cell[:, None] - cy) / sy) ** 2)
    np.testing.assert_allclose(m[0, 0].numpy(), want, atol=1e-5)
    torch.testing.assert_close(got, z + 2.0 * m * (z - z0), atol=1e-5, rtol=0)
    far = m[:, 0] < 1e-3  # (2, s, s)
    near = m[:, 0] > 0.9
    diff = (got - z).abs().amax(1)  # (2, s, s)
    assert diff[far].max() < 1e-3 and diff[near].min() > 0  # unguided far off, guided at the lips


def test_checkpoint_keeps_the_audio_guidance_and_older_ones_load_without_it(tmp_path):
    from lipsync.checkpoint import export, load_lipsync, read_checkpoint
    from lipsync.model import check_guidance
    model = _tiny_lipsync()
    model.guidance = 2.0
    export(model, str(tmp_path / "g.pt"))
    assert load_lipsync(str(tmp_path / "g.pt")).guidance == 2.0
    obj = read_checkpoint(str(tmp_path / "g.pt"))
    del obj["config"]["guidance"]
    torch.save(obj, tmp_path / "old.pt")
    assert load_lipsync(str(tmp_path / "old.pt")).guidance == 1.0
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--audio-guidance"):
            check_guidance(bad)
