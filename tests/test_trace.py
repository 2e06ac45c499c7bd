"""README.md's "One frame, traced", run step by step on the tiny preset with random weights.

Each numbered step calls the function the README names for it, in the README's order, and checks the shape the
README states; at the end the hand-run frame must equal what pipeline.avatar_frames makes of the same inputs, so the
trace is the pipeline and not a paraphrase of it. Renaming or reshaping anything on the path breaks this test, which
is the point: fix the README with the code.

The README gives its sizes for the bundled face128 model (S = 128, s = 32, D = 128, L = 5) and MuseTalk's weights
(S = 256, s = 32, D = 384, L = 5). Here they are the tiny preset's, derived from its configs below.
"""

import importlib
import itertools
import math
import re

import numpy as np
import pytest
import torch

from lipsync import audio, blend, melspec, pipeline, references, texture, tracking, vae, video, windows
from lipsync.avatar import Avatar
from lipsync.track import read_track, track_file
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.model import build
from lipsync.unet import UNetConfig
from lipsync.vae import VAEConfig
from media import ROOT, VIDEO

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

UNET_CFG, VAE_CFG, AUDIO_CFG = UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny()
S = 64  # crop side: the tiny preset's (VAEConfig.tiny().sample_size); face128: 128, MuseTalk: 256
s = S // VAE_CFG.downscale  # latent side: 64 // 4 = 16 (face128: 128 // 4 = 32, MuseTalk: 256 // 8 = 32)
D = AUDIO_CFG.dim  # audio feature width = the UNet's cross_attention_dim: 128 (MuseTalk's whisper-tiny: 384)
L = AUDIO_CFG.blocks + 1  # encoder hidden states: 5, as in both README models
FPS = 25.0
STEPS = windows.window_layout(FPS)[0]  # 10 steps of 50 Hz audio features per frame at 25 fps
N_SOURCE = 4  # source frames: output frame OUT plays source frame 2 N - 1 - OUT = 1 on the way back (ping-pong)
OUT = 6  # the output frame traced


def readme_trace():
    text = (ROOT / "README.md").read_text()
    return text[text.index("## One frame, traced"): text.index("\nWhy:")]


def test_every_name_in_the_readme_trace_exists():
    """Each `module.function`, `Class.method`, `model.attribute` or bare name the trace mentions resolves in lipsync."""
    model = build(UNET_CFG, VAE_CFG, AUDIO_CFG, S)
    roots = {"model": model, "LipSync": model, "avatar": Avatar}  # instances hold model.audio, .face, .vae
    product = [importlib.import_module(f"lipsync.{p.stem}") for p in sorted((ROOT / "lipsync").glob("*.py"))]
    names = [n for n in re.findall(r"`([^`]+)`", readme_trace()) if not re.search(r"^--|/|\.(npz|mp4|py)$", n)]
    assert len(names) >= 30
    for name in names:
        first, *rest = re.sub(r"\(.*\)$", "", name).split(".")
        if first in roots:
            obj = roots[first]
        elif any(m.__name__ == f"lipsync.{first}" for m in product):
            obj = importlib.import_module(f"lipsync.{first}")
        elif hasattr(VAE_CFG, first):  # a config field: scaling_factor
            obj = VAE_CFG
            rest = [first] + rest
        else:
            owners = [m for m in product if hasattr(m, first)]
            assert owners, f"README names {name!r}: no lipsync module has {first!r}"
            obj = getattr(owners[0], first)
        for part in rest:
            assert hasattr(obj, part), f"README names {name!r}: {obj!r} has no {part!r}"
            obj = getattr(obj, part)


def test_sizes_are_the_tiny_presets():
    assert (S, s, D, L, STEPS) == (VAE_CFG.sample_size, 16, 128, 5, 10)
    assert UNET_CFG.cross_attention_dim == D and STEPS * L == 50  # "10 audio steps x 5 states = 50 tokens"


def test_one_frame_traced_as_the_readme_tells_it(tmp_path):
    torch.manual_seed(0)
    model = build(UNET_CFG, VAE_CFG, AUDIO_CFG, S).eval()

    # ---- once per source frame (pipeline.prepare_avatar does steps 3-5 for every frame)
    # 1. frame (H, W, 3) uint8 RGB: video.iter_frames
    frames = np.stack(list(itertools.islice(video.iter_frames(VIDEO), N_SOURCE)))
    H, W = video.video_info(VIDEO).size
    assert frames.shape[1:] == (H, W, 3) and frames.dtype == np.uint8

    # 2. face track from the video's track file (track.read_track) -> landmarks (68, 2), face flag, box (4,)
    track = read_track(track_file(VIDEO)).select(np.arange(N_SOURCE))
    assert track.landmarks.shape[1:] == (68, 2) and track.face.shape == (N_SOURCE,) and track.boxes.shape[1:] == (4,)
    assert track.face.all()

    # 3. crop (S, S, 3) uint8: tracking.crop_faces; the nose point is on the crop's midline
    crops = tracking.crop_faces(frames, track.boxes, S)
    assert crops.shape == (N_SOURCE, S, S, 3) and crops.dtype == np.uint8
    nose = tracking.to_crop_coords(track.landmarks[:, 29:30], track.boxes, S)[:, 0]
    assert np.abs(nose[:, 1] - S / 2).max() < 1

    # 4. UNet image input (8, s, s): FaceVAE.unet_input (LipSync.face) = [masked crop, reference crop] latents
    unet_in = model.face.unet_input(crops)
    assert unet_in.shape == (N_SOURCE, 8, s, s)
    with torch.no_grad():
        x = vae.to_model_images(crops)  # uint8 -> [-1, 1]
        masked = vae.mask_lower_half(x)
        assert (masked[..., S // 2:, :] == -1).all() and torch.equal(masked[..., : S // 2, :], x[..., : S // 2, :])
        scale = VAE_CFG.scaling_factor  # posterior mean x scaling_factor, (4, s, s) each
        torch.testing.assert_close(unet_in[:, :4], model.vae.encode(masked).mean * scale, atol=1e-5, rtol=0)
        torch.testing.assert_close(unet_in[:, 4:], model.vae.encode(x).mean * scale, atol=1e-5, rtol=0)
    ref = references.pick(model.reference, track.landmarks, track.face)  # "self": each frame is its own reference
    assert model.reference == "self" and np.array_equal(ref, np.arange(N_SOURCE))
    closed = references.pick("closed_pose", track.landmarks, track.face)  # the other rule swaps references in
    swapped = pipeline.with_references(unet_in, closed)
    assert swapped.shape == unet_in.shape and torch.equal(swapped[:, :4], unet_in[:, :4])
    assert torch.equal(swapped[:, 4:], unet_in[closed, 4:])

    # 5. blend mask: blend.make_blend, a soft mask inside the frame
    blends = [blend.make_blend(track.landmarks[j], track.boxes[j], (H, W)) for j in range(N_SOURCE)]
    for b in blends:
        top, left, bottom, right = b.rect
        assert 0 <= top < bottom <= H and 0 <= left < right <= W
        assert b.mask.shape == (bottom - top, right - left) and 0 <= b.mask.min() and b.mask.max() <= 1
    #    faces pasted over 1.25 S: the mouth texture bank, for the whole video (texture.texture_bank)
    bank = texture.texture_bank(frames, track, S)
    assert bank.coarse.shape == (N_SOURCE, S, S) and bank.fine.shape[0] == N_SOURCE

    avatar = pipeline.prepare_avatar(frames, FPS, track, model)  # all of 3-5, as infer.py runs it
    assert torch.equal(avatar.latents, unet_in)
    assert all(a.rect == b.rect and np.array_equal(a.mask, b.mask) for a, b in zip(avatar.blends, blends))
    assert torch.equal(avatar.texture.coarse, bank.coarse) and torch.equal(avatar.texture.fine, bank.fine)

    # ---- once per audio file
    # 6. wave: audio.load_audio -> 16 kHz mono float32
    wave = audio.load_audio(ROOT / "assets" / "demo.wav")
    assert wave.ndim == 1 and wave.dtype == torch.float32 and len(wave) == 7 * audio.SAMPLE_RATE
    seconds = len(wave) / audio.SAMPLE_RATE

    # 7. features (1, L, T, D), 50 steps/s: model.audio.encode (the MelEncoder here: convolutions over
    #    melspec.log_mel), every hidden state stacked
    with torch.no_grad():
        features = model.audio.encode(wave)
        mel = melspec.log_mel(wave, dynamic_floor=False)  # (80, 100 frames/s): whisper's log-mel, per-frame floor
        assert torch.equal(features, model.audio(mel[None]))
    T = len(wave) // (audio.SAMPLE_RATE // 50)
    assert features.shape == (1, L, T, D) and mel.shape == (80, 2 * T)

    # 8. windows (n_frames, 10 L, D): LipSync.audio_windows -> windows.frame_windows; frame f reads steps
    #    [2f - 4, 2f + 6) at 25 fps, zeros beyond the file, row = L t + layer
    n_frames = math.floor(seconds * FPS)
    win = model.audio_windows(wave, n_frames, FPS)
    assert win.shape == (n_frames, STEPS * L, D)
    assert torch.equal(win, windows.frame_windows(features, n_frames, FPS))
    for f in (0, OUT, n_frames - 1):
        rows = win[f].view(STEPS, L, D)  # [t, layer]
        for t, step in enumerate(range(2 * f - 4, 2 * f + 6)):
            assert torch.equal(rows[t], features[0, :, step] if 0 <= step < T else torch.zeros(L, D)), (f, step)

    # ---- per output frame, batched in pipeline.avatar_frames -> LipSync.forward
    # 9. source frame avatar.source_index(i) (forward, then backward) with audio window i; tokens (50, D) = the
    #    window + the sinusoidal position code (windows.PositionalEncoding, LipSync.pe)
    src = int(avatar.source_index(OUT))
    assert src == 2 * N_SOURCE - 1 - OUT
    assert isinstance(model.pe, windows.PositionalEncoding)
    tokens = model.pe(win[OUT:OUT + 1])
    assert tokens.shape == (1, STEPS * L, D)
    torch.testing.assert_close(tokens - win[OUT:OUT + 1], model.pe.pe[None, : STEPS * L], atol=1e-6, rtol=0)

    # 10. UNet(unet_in, 0, tokens) -> latent (4, s, s), one pass at t = 0; FaceVAE.decode -> (3, S, S) (it divides
    #     by scaling_factor first: the UNet's latents are scaled); vae.to_uint8_images -> (S, S, 3) uint8
    with torch.no_grad():
        latent = model.unet(avatar.latents[src:src + 1], 0, tokens)
        assert latent.shape == (1, 4, s, s)
        face = model.face.decode(latent)
        assert face.shape == (1, 3, S, S)
        torch.testing.assert_close(face, model.vae.decode(latent / scale), atol=1e-6, rtol=0)
        assert torch.equal(face, model(avatar.latents[src:src + 1], win[OUT:OUT + 1]))  # = LipSync.forward
    crop = vae.to_uint8_images(face)[0]
    assert crop.shape == (S, S, 3) and crop.dtype == np.uint8

    # 11. blend.paste -> frame (H, W, 3) uint8, the source's exact pixels where the mask is 0; video.write_video;
    #     with the mouth texture the avatar's bank lends for this face (the demo's 129 px faces are over 1.25 S)
    assert avatar.texture is not None
    #     (in frame pixels: its corner and the detail over the face's mouth area)
    lent = avatar.texture.detail(vae.to_pixels(face), [src], track.boxes[src:src + 1])[0]
    assert lent[2].shape == texture.area_window(avatar.texture.area, track.boxes[src], S)[1] + (3,)
    out = blend.paste(avatar.frames[src], crop, avatar.blends[src], texture=lent)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    top, left, bottom, right = avatar.blends[src].rect
    outside = np.ones((H, W), bool)
    outside[top:bottom, left:right] = avatar.blends[src].mask == 0
    assert np.array_equal(out[outside], frames[src][outside]) and not np.array_equal(out, frames[src])
    assert video.write_video(tmp_path / "out.mp4", [out], FPS, audio=wave[: audio.SAMPLE_RATE // 25]) == 1
    info = video.video_info(tmp_path / "out.mp4")
    assert info.size == (H, W) and info.has_audio

    # the pipeline makes the very same frame
    made = next(pipeline.avatar_frames(model, avatar, win[OUT:OUT + 1], batch_size=1, start=OUT))
    assert np.array_equal(made, out)
