"""Self-reenactment metrics (lipsync.tools.reenact): known answers, hand-computed regions, and the CLI end to end."""

import json
import math


import numpy as np
import pytest
import torch

from lipsync.tools import reenact
from lipsync.tracking import crop_faces
from lipsync.tools.metrics import lip_opening_468
from lipsync.video import read_video, write_video
from media import ROOT, SPEECH, VIDEO


def flat_mesh(n=3):
    """A mesh (n, 468, 2) whose named points are placed by hand."""
    mesh = np.zeros((n, 468, 2), np.float32)
    mesh[:, :] = (100, 100)
    lips = np.array([[80, 200], [120, 200], [100, 190], [100, 216], [100, 198], [100, 204], [85, 200], [115, 200],
                     [95, 191], [105, 191], [95, 214], [105, 214]], np.float32)
    mesh[:, reenact.MOUTH_POINTS] = lips  # x 80..120 (40 px), y 190..216 (26 px), mean (100, 201.5)
    mesh[:, 10], mesh[:, 152] = (100, 100), (100, 160)  # face height 60
    mesh[:, 234], mesh[:, 454], mesh[:, 1] = (130, 150), (70, 150), (100, 140)
    return mesh


def test_mouth_square_is_centred_on_the_lips_with_side_1_6_times_their_extent():
    sq = reenact.mouth_squares(flat_mesh(), (480, 640))
    side = 1.6 * 40
    assert sq[0].tolist() == [round(100 - side / 2), round(201.5 - side / 2), round(100 + side / 2),
                              round(201.5 + side / 2)]


def test_lower_face_is_cheek_to_cheek_and_nose_to_chin():
    assert reenact.lower_face_rects(flat_mesh(), (480, 640))[0].tolist() == [70, 140, 130, 160]


def test_opening_is_the_inner_lip_gap_over_the_face_height():
    assert lip_opening_468(flat_mesh()) == pytest.approx([6 / 60] * 3)


def test_a_video_against_itself_gives_infinite_psnr_ssim_1_no_colour_error_and_r_1():
    pytest.importorskip("mediapipe")
    frames, _ = read_video(VIDEO)
    frames = frames[:40:2]
    mesh = reenact.mesh_points(frames)
    s = reenact.score(frames, frames, mesh, mesh)
    assert s["psnr"] == math.inf and s["ssim"] == pytest.approx(1.0) and s["colour"] == 0.0
    assert s["r"] == pytest.approx(1.0) and s["frames"] == len(frames)
    assert s["detail_lips"] == 1.0 and s["detail_rest"] == 1.0
    # and a known error: + 8 levels on every pixel of the generated frames
    brighter = np.clip(frames.astype(np.int16) + 8, 0, 255).astype(np.uint8)
    s = reenact.score(brighter, frames, mesh, mesh)
    assert s["colour"] == pytest.approx(8.0, abs=0.3) and s["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 64),
                                                                                      abs=0.3)
    # sharpness on real faces: a 5x5 box blur loses most of the detail, an unsharp mask adds some
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    blurred = blur.round().byte().permute(0, 2, 3, 1).numpy()
    s = reenact.score(blurred, frames, mesh, mesh)
    assert s["detail_lips"] < 0.5 and s["detail_rest"] < 0.5
    sharper = (2 * x - blur).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    s = reenact.score(sharper, frames, mesh, mesh)
    assert s["detail_lips"] > 1.2 and s["detail_rest"] > 1.2


def test_reenact_cli_scores_every_row_and_writes_a_montage(tmp_path):
    pytest.importorskip("mediapipe")
    import soundfile as sf
    from lipsync.tools import eval as evaluate
    frames, fps = read_video(VIDEO)
    wave, sr = sf.read(SPEECH, dtype="float32")
    clip = tmp_path / "talk.mp4"
    write_video(clip, frames[:20], fps, audio=wave[:int(20 / fps * sr)])
    res = evaluate.main(["--ckpt", str(ROOT / "assets" / "demo.pt"), "--reenact", str(clip), "--out",
                         str(tmp_path / "out"), "--device", "cpu"])
    rows = res[str(clip)]
    assert set(rows) == {"model, infer.py's reference (audio)", "model, own frame as reference", "model, far reference",
                         "ceiling: VAE round trip of the real crop", "baseline: first frame's mouth on every frame"}
    for v in rows.values():
        assert 10 < v["psnr"] < 60 and 0 < v["ssim"] <= 1 and v["colour"] >= 0 and v["frames"] == 20
        assert 0 < v["detail_lips"] < 10 and 0 < v["detail_rest"] < 10
    saved = json.loads((tmp_path / "out" / "reenact.json").read_text())
    assert saved["mean"]["model, far reference"]["psnr"] == pytest.approx(rows["model, far reference"]["psnr"])
    assert saved["mean"]["model, far reference"]["detail_lips"] == pytest.approx(
        rows["model, far reference"]["detail_lips"])
    import imageio.v3 as iio
    assert iio.imread(tmp_path / "out" / "talk_mouths.png").shape == (6 * 96, 8 * 96, 3)  # the real mouth + 5 rows


@pytest.mark.usefixtures("one_thread")
def test_far_reference_row_gives_the_unet_each_frames_masked_self_and_the_far_frames_reference(spied_dub):
    """The far-reference row must measure lip-sync, not copying: frame i's UNet input is [its own masked crop, the
    reference crop of the frame half a clip away], never its own reference. The own-frame row is [masked i, i]."""
    frames, track, model, calls = spied_dub
    n = len(frames)
    rows = reenact.reenact_clip(model, frames, 25.0, torch.zeros(n * 640), track, batch_size=n)
    assert all(len(r) == n for r in rows.values())
    own_row, far_row = calls  # one UNet call per model row
    with torch.no_grad():  # [masked, reference] latents of each crop, straight from the VAE
        own = model.face.unet_input(crop_faces(frames, track.boxes, 64))
    masked, reference = own[:, :4], own[:, 4:]
    assert (reference - reference.roll(n // 2, 0)).abs().amax((1, 2, 3)).min() > 1e-3  # frames differ: visible
    torch.testing.assert_close(own_row, own, atol=1e-5, rtol=0)
    torch.testing.assert_close(far_row[:, :4], masked, atol=1e-5, rtol=0)
    for i in range(n):
        j = int(np.argmin([(far_row[i, 4:] - reference[k]).abs().max() for k in range(n)]))
        torch.testing.assert_close(far_row[i, 4:], reference[j], atol=1e-5, rtol=0)
        assert min(abs(i - j), n - abs(i - j)) == n // 2, (i, j)  # half a clip away, wrapping round


def test_reenact_with_the_public_syncnet_scores_each_rows_frames_against_the_clips_own_speech(tmp_path, monkeypatch):
    """--reenact --syncnet-weights: every row gets the LSE-D / LSE-C of ITS frames (crossdub.dubbed_lse, the papers'
    protocol) against the clip's speech, and the means carry them."""
    pytest.importorskip("mediapipe")
    import soundfile as sf
    from lipsync.tools import crossdub, lse
    frames, fps = read_video(VIDEO)
    frames = frames[:30]
    wave, sr = sf.read(SPEECH, dtype="float32")
    wave = wave[:int(30 / fps * sr)]
    clip = tmp_path / "talk.mp4"
    write_video(clip, frames, fps, audio=wave)
    frames, _ = read_video(clip)
    rows = {"a": frames, "b": np.ascontiguousarray(frames[::-1])}  # two rows whose mouths move differently
    seen = {}
    monkeypatch.setattr(reenact, "reenact_clip", lambda model, f, fps, w, track, bs: seen.update(track=track, wave=w)
                        or rows)
    torch.manual_seed(0)
    net = lse.SyncNetV2().eval()
    model = type("M", (), {"geometry": "square"})()
    res = reenact.reenact(model, [clip], progress=False, syncnet=net)
    for name, gen in rows.items():
        want = crossdub.dubbed_lse(net, gen, fps, seen["track"], seen["wave"].numpy())
        got = res[str(clip)][name]
        assert (got["lse_d"], got["lse_c"]) == (want["lse_d"], want["lse_c"])
        assert res["mean"][name]["lse_d"] == pytest.approx(want["lse_d"])
    assert res[str(clip)]["a"]["lse_d"] != res[str(clip)]["b"]["lse_d"]
