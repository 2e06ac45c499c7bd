"""MuseTalk's crop geometry (docs/geometry.md): musetalk_box against hand-computed boxes and a plain re-statement of
MuseTalk's get_landmark_and_bbox, resize_lanczos4 against OpenCV, and the geometry carried from prepared clips through
train.py checkpoints to infer.py, with the published weights end to end."""

import itertools
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import infer
import train
from lipsync import pipeline as P
from lipsync import avatar as A
from lipsync import track as tracks
from lipsync.training import prepare
from lipsync.training.flags import clip_geometry
from lipsync import tracking as T
from lipsync.blend import inside_polygon, make_blend
from lipsync.mel_encoder import MelEncoderConfig
from lipsync.checkpoint import export, load_lipsync, read_checkpoint
from lipsync.model import build
from lipsync.unet import UNetConfig
from lipsync.vae import VAEConfig
from lipsync.video import iter_frames, read_video, write_video
from media import ROOT, SPEECH, VIDEO

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DEMO_H, DEMO_W = 608, 352  # assets/demo.mp4


def tilted_face():
    """Hand-made landmarks: the lowest point is the jaw (lm 4), not the chin (lm 8); one x is negative."""
    lm = np.full((68, 2), (200.6, 150.3), np.float32)  # int32: (200, 150)
    lm[29] = (201.9, 180.7)  # nose point -> (201, 180)
    lm[8] = (205.2, 300.9)  # chin -> y 300
    lm[4] = (150.4, 310.99)  # tilted jaw, the lowest point -> y 310 (truncated, not rounded to 311)
    lm[0] = (-3.7, 190.0)  # leftmost -> x -3 (truncated towards zero, not floored to -4)
    lm[16] = (280.9, 170.0)  # rightmost -> x 280
    return lm


@pytest.mark.parametrize("kwargs, expected", [
    # max y 310, nose 180: top = 180 - (310 - 180) = 50
    (dict(), (-3, 50, 280, 320)),  # v15: bottom = 310 + 10
    (dict(extra_margin=0), (-3, 50, 280, 310)),  # v1
    (dict(height=315), (-3, 50, 280, 315)),  # v15 box clipped at the frame's bottom edge
    (dict(extra_margin=0, height=310), (-3, 50, 280, 310)),  # v1 box ending exactly on the bottom edge
    (dict(bbox_shift=7), (-3, 64, 280, 320)),  # nose 187: top = 187 - 123
    (dict(bbox_shift=-7), (-3, 36, 280, 320)),  # nose 173: top = 173 - 137
    (dict(bbox_shift=-7, extra_margin=0, height=312), (-3, 36, 280, 310)),
    (dict(bbox_shift=2.5), (-3, 54, 280, 320)),  # int32 nose: 182.5 -> 182, top = 182 - 128
    (dict(bbox_shift=-2.5), (-3, 44, 280, 320)),  # 177.5 -> 177, top = 177 - 133
    (dict(bbox_shift=-100), (-3, 0, 280, 320)),  # 80 - 230 < 0: top clipped to 0
    (dict(bbox_shift=140), (-3, 320, 280, 330)),  # the moved nose (320) is the lowest point: MuseTalk's in-place shift
])
def test_musetalk_box_equals_hand_computed_boxes(kwargs, expected):
    box = T.musetalk_box(tilted_face(), **kwargs)
    assert box == expected and all(type(v) is int for v in box)


def musetalk_reference(landmarks, bbox_shift, extra_margin, height):
    """MuseTalk v1.5 restated plainly, one frame at a time: get_landmark_and_bbox, then inference.py's margin."""
    face_land_mark = landmarks.astype(np.int32)
    half_face_coord = face_land_mark[29]  # a view: the shift below moves landmark 29 itself
    if bbox_shift != 0:
        half_face_coord[1] = bbox_shift + half_face_coord[1]
    half_face_dist = np.max(face_land_mark[:, 1]) - half_face_coord[1]
    upper_bond = max(0, half_face_coord[1] - half_face_dist)
    x1, y1 = int(np.min(face_land_mark[:, 0])), int(upper_bond)
    x2, y2 = int(np.max(face_land_mark[:, 0])), int(np.max(face_land_mark[:, 1]))
    y2 = y2 + extra_margin
    if height is not None:
        y2 = min(y2, height)
    return x1, y1, x2, y2


def test_musetalk_box_equals_musetalks_formula_on_jittered_real_tracks():
    with np.load(ROOT / "assets" / "demo.track.npz") as z:
        lm = z["landmarks"]  # (175, 68, 2), a mediapipe track of the demo video
    rng = np.random.default_rng(0)
    tracks = [lm + rng.normal(0, 2.0, lm.shape),  # landmark jitter
              lm * 1.4 + (-180, -200) + rng.normal(0, 3.0, lm.shape)]  # bigger, across the left and top edges
    lm_bottom = max(t[..., 1].max() for t in tracks)
    checked = clipped = left = top = lowest_nose = 0
    for track, shift, margin, height in itertools.product(tracks, (0, 7, -7, 3, 2.5, -4.5, 70), (10, 0, 25),
                                                          (None, DEMO_H, int(lm_bottom) - 20)):
        track = track.astype(np.float32)
        batched = T.musetalk_box(track, shift, margin, height)
        assert batched.shape == (len(track), 4)
        for i in range(len(track)):  # every frame
            expected = musetalk_reference(track[i], shift, margin, height)
            assert tuple(batched[i]) == expected == T.musetalk_box(track[i], shift, margin, height)
            checked += 1
            clipped += height is not None and expected[3] == height
            left += expected[0] < 0
            top += expected[1] == 0
            lowest_nose += expected[1] + margin == expected[3]  # the moved nose point is the lowest landmark
    assert checked == 2 * 7 * 3 * 3 * 175 and min(clipped, left, top, lowest_nose) > 100


def test_musetalk_boxes_are_jaw_wide_not_square_and_put_the_nose_near_the_midline():
    with np.load(ROOT / "assets" / "demo.track.npz") as z:
        lm = z["landmarks"]
    boxes = T.musetalk_box(lm, 0, 10, DEMO_H)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (np.abs(w - h) >= 5).mean() > 0.5  # not square
    nose = lm[:, 29, 1].astype(np.int32)
    assert np.all(np.abs((boxes[:, 1] + boxes[:, 3]) / 2 - (nose + 5)) <= 0.5)  # midline 5 px below: 10 px margin / 2


# ----------------------------------------------------------------------------- crops


@pytest.mark.parametrize("hw", [(300, 220), (180, 140), (256, 256), (401, 397), (97, 310), (5, 3)])
def test_resize_lanczos4_equals_opencv_exactly(hw):
    cv2 = pytest.importorskip("cv2")  # test-only oracle (opencv comes with mediapipe)
    rng = np.random.default_rng(hw[0])
    noise = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2)
    for image in (noise, smooth):
        for size in ((256, 256), (64, 96)):
            expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LANCZOS4)
            assert np.array_equal(T.resize_lanczos4(image, *size), expected)


def test_musetalk_crop_is_the_whole_box_resized_to_a_square_with_lanczos():
    frame = next(iter_frames(VIDEO))
    with np.load(ROOT / "assets" / "demo.track.npz") as z:
        lm = z["landmarks"][0]
    x1, y1, x2, y2 = box = T.musetalk_box(lm, 0, 10, DEMO_H)
    crop = T.crop_face(frame, np.array(box, np.float32), 256, lanczos=True)
    assert np.array_equal(crop, T.resize_lanczos4(frame[y1:y2, x1:x2], 256, 256))
    assert T.pixel_box(np.array(box, np.float32)) == (x1, y1, x2 - x1, y2 - y1)
    nose = T.to_crop_coords(lm, np.array(box, np.float32), 256)[29]
    assert abs(nose[1] - 128 * (1 - 10 / (y2 - y1))) < 256 / (y2 - y1)  # the nose point sits 5 px above row 128


def test_blend_mask_covers_what_musetalks_jaw_mode_replaces_and_nothing_outside_its_box():
    """jaw mode changes pixels inside the face box below its middle row; there our mask must hold the lips, the chin
    and the skin inside the jaw line below the nostrils."""
    with np.load(ROOT / "assets" / "demo.track.npz") as z:
        track = z["landmarks"]
    for lm in track[::6]:
        box = T.musetalk_box(lm, 0, 10, DEMO_H)
        x1, y1, x2, y2 = box
        blend = make_blend(lm, np.array(box, np.float32), (DEMO_H, DEMO_W))
        m = np.zeros((DEMO_H, DEMO_W), np.float32)
        t, left, b, r = blend.rect
        m[t:b, left:r] = blend.mask
        rows, cols = np.nonzero(m)
        assert rows.min() >= (y1 + y2) / 2 and rows.max() < y2 and cols.min() >= x1 and cols.max() < x2
        at = lambda p: m[int(p[1]), int(p[0])]  # noqa: E731
        assert min(at(lm[k]) for k in range(48, 68)) > 0.99  # lips
        assert at(lm[8]) > 0.5  # chin
        top = (y1 + y2) // 2
        xs, ys = np.arange(x1, x2) + 0.5, np.arange(top, y2) + 0.5
        lower_face = inside_polygon(lm[:17].astype(np.float64), xs, ys) & (ys[:, None] > lm[31:36, 1].max())
        assert lower_face.sum() > 1000 and m[top:y2, x1:x2][lower_face].min() > 0


# ----------------------------------------------------------------------------- geometry of checkpoints and clips


def tiny_model(geometry="square"):
    torch.manual_seed(0)
    model = build(UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64).eval()
    model.geometry = geometry
    return model


def test_checkpoints_record_their_crop_geometry_and_old_ones_mean_square(tmp_path):
    export(tiny_model("musetalk"), tmp_path / "m.pt")
    assert read_checkpoint(tmp_path / "m.pt")["config"]["geometry"] == "musetalk"
    assert load_lipsync(tmp_path / "m.pt").geometry == "musetalk"
    old = torch.load(tmp_path / "m.pt", weights_only=True)
    del old["config"]["geometry"]  # a checkpoint from before the field existed
    torch.save(old, tmp_path / "old.pt")
    assert load_lipsync(tmp_path / "old.pt").geometry == "square"


def small_clip(n=6):
    frames = np.stack(list(itertools.islice(iter_frames(VIDEO), n)))
    with np.load(ROOT / "assets" / "demo.track.npz") as z:
        return frames, z["landmarks"][:n]


class FixedTracker:
    name = "fixed"

    def __init__(self, landmarks):
        self.landmarks, self.i = landmarks, 0

    def __call__(self, frame):
        self.i += 1
        return self.landmarks[self.i - 1]

    def close(self):
        pass


def test_a_musetalk_geometry_checkpoint_crops_with_musetalks_boxes_in_infer(tmp_path):
    frames, lm = small_clip()
    args = infer.parse_args(["--video", "x.mp4"])
    for version, margin in ((None, 10), ("v15", 10), ("v1", 0)):
        args.version = version
        track = tracks.track_frames(frames, FixedTracker(lm), **infer.box_options(args, "musetalk"))
        assert np.array_equal(track.boxes, T.musetalk_box(lm, 0, margin, DEMO_H))  # per frame: no smoothing
    args.version, args.smooth = None, 3.0
    smoothed = tracks.track_frames(frames, FixedTracker(lm), **infer.box_options(args, "musetalk")).boxes
    assert np.allclose(smoothed, T.smooth_boxes(T.musetalk_box(lm, 0, 10, DEMO_H), 3.0))
    args.smooth = None
    square = tracks.track_frames(frames, FixedTracker(lm), **infer.box_options(args, "square")).boxes
    assert np.array_equal(square, T.smooth_boxes(T.crop_box(lm), 2.0))  # our square crop, as before

    model = tiny_model("musetalk")
    track = tracks.track_frames(frames, FixedTracker(lm), **infer.box_options(args, "musetalk"))
    avatar = P.prepare_avatar(frames, 25.0, track, model)
    x1, y1, x2, y2 = (int(v) for v in track.boxes[2])
    expected = model.face.unet_input(T.resize_lanczos4(frames[2, y1:y2, x1:x2], 64, 64)[None])
    torch.testing.assert_close(avatar.latents[2], expected[0], atol=1e-5, rtol=0)  # of MuseTalk's Lanczos crop
    A.save_avatar(avatar, tmp_path / "av")
    assert A.load_avatar(tmp_path / "av", model).geometry == "musetalk"
    with pytest.raises(ValueError, match="different model"):
        A.load_avatar(tmp_path / "av", tiny_model("square"))  # same VAE, other crops: refused


def test_prepare_writes_musetalk_geometry_clips_and_records_it(tmp_path, monkeypatch):
    frames, lm = small_clip()
    write_video(tmp_path / "talk.mp4", frames, 25.0, audio=np.zeros(16000, np.float32))
    monkeypatch.setattr(prepare, "MeshTracker", lambda: FixedTracker(lm))
    assert prepare.main([str(tmp_path / "talk.mp4"), "--out", str(tmp_path / "clips"), "--geometry", "musetalk",
                         "--crop-size", "64"]) == 0
    clip = tmp_path / "clips" / "talk"
    meta = json.loads((clip / "meta.json").read_text())
    assert meta["geometry"] == "musetalk" and meta["margin"] == 10 and meta["smooth_sigma"] == 0
    track = np.load(clip / "track.npz")
    assert np.array_equal(track["boxes"], T.musetalk_box(track["landmarks"], 0, 10, DEMO_H))
    decoded, _ = read_video(tmp_path / "talk.mp4")
    x1, y1, x2, y2 = (int(v) for v in track["boxes"][3])
    assert np.array_equal(np.load(clip / "crops.npy")[3], T.resize_lanczos4(decoded[3, y1:y2, x1:x2], 64, 64))


def test_train_takes_the_geometry_of_its_clips_and_refuses_a_mismatch(tmp_path):
    for name, geometry in (("a", "musetalk"), ("b", "musetalk")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"geometry": geometry}))
    cfg = train.TrainConfig(data=str(tmp_path))
    assert clip_geometry(cfg) == "musetalk"
    with pytest.raises(SystemExit, match="are musetalk crops"):
        clip_geometry(train.TrainConfig(data=str(tmp_path), geometry="square"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "meta.json").write_text(json.dumps({}))  # an older clip: square
    with pytest.raises(SystemExit, match="mix crop geometries"):
        clip_geometry(cfg)


# ----------------------------------------------------------------------------- the published weights, end to end


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Random tiny weights in the published layouts: diffusers UNet and VAE folders, a transformers whisper folder."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        in_channels=8, out_channels=4, block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=4,
        cross_attention_dim=384, norm_num_groups=8, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(d / "unet")
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).save_pretrained(d / "vae")
    transformers.WhisperModel(transformers.WhisperConfig(
        d_model=384, encoder_layers=1, encoder_attention_heads=6, encoder_ffn_dim=256, decoder_layers=1,
        decoder_attention_heads=6, decoder_ffn_dim=256, vocab_size=100, max_target_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(d / "whisper")
    frames = np.stack(list(itertools.islice(iter_frames(VIDEO), 8)))
    x = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=(304, 176), mode="bilinear", antialias=True)
    write_video(d / "clip.mp4", x.permute(0, 2, 3, 1).contiguous().numpy(), 25.0)
    wave, sr = sf.read(SPEECH, dtype="float32")
    sf.write(d / "speech.wav", wave[3 * sr: 3 * sr + 3 * sr // 5], sr)  # 0.6 s -> 15 frames
    return d


@pytest.mark.parametrize("version, margin", [("v15", 10), ("v1", 0)])
def test_published_weights_run_end_to_end_on_musetalks_non_square_box(published, version, margin, capsys,
                                                                      monkeypatch):
    d = published
    bbox = "55,78,115,131"  # brows-to-chin box of the face in the 176 x 304 clip
    seen = []
    real_prepare = infer.prepare_avatar
    monkeypatch.setattr(infer, "prepare_avatar", lambda frames, fps, track, model, *a, **k: seen.append(
        (track, model)) or real_prepare(frames, fps, track, model, *a, **k))
    out = d / f"out_{version}.mp4"
    code = infer.main([str(a) for a in ["--video", d / "clip.mp4", "--audio", d / "speech.wav", "--unet", d / "unet",
                                        "--vae", d / "vae", "--whisper", d / "whisper", "--bbox", bbox,
                                        "--version", version, "--out", out]])
    assert code == 0, capsys.readouterr().err
    (track, model), = seen
    assert model.geometry == "musetalk" and model.crop_size == 256
    lm = T.template_landmarks(T.parse_bbox(bbox))
    box = T.musetalk_box(lm, 0, margin, 304)
    assert np.array_equal(track.boxes, np.tile(np.array(box, np.float32), (8, 1)))
    assert box[2] - box[0] != box[3] - box[1]  # a non-square face box
    frames, fps = read_video(out)
    assert fps == 25.0 and frames.shape == (15, 304, 176, 3)  # the input's size and fps, floor(0.6 s * 25) frames


def test_version_is_refused_for_a_square_geometry_checkpoint(tmp_path, capsys, published):
    export(tiny_model("square"), tmp_path / "sq.pt")
    code = infer.main(["--video", str(published / "clip.mp4"), "--audio", str(published / "speech.wav"),
                       "--ckpt", str(tmp_path / "sq.pt"), "--bbox", "55,78,115,131", "--version", "v1",
                       "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --version") and "square" in err
    assert not (tmp_path / "x.mp4").exists()
