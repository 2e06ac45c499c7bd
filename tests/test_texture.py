"""The mouth texture (lipsync.texture): a generated face that matches a frame gets that frame's own fine detail in
frame pixels (never resampled), also when moved; one frame lends the whole area, faded in at its border; frames near
the drawn one are never used; small faces get no bank; the paste adds the texture only around the mouth, and with it
only the restored face's coarse part; avatars keep the bank on disk and infer.py's frames use it."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from lipsync import texture
from lipsync.avatar import load_avatar, save_avatar
from lipsync.blend import keep_weight, make_blend, paste, place, resize_crop, round_trip
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.model import LipSync
from lipsync.pipeline import avatar_frames, prepare_avatar
from lipsync.texture import EXCLUDE, texture_bank
from lipsync.track import Track
from lipsync.tracking import box_patch, crop_box, crop_face, pixel_box, template_landmarks
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig

S = 64


def noise_video(n=30, seed=0):
    """n frames (200, 200, 3) of noise (detail at every scale), one face box 184 px wide -> (frames, track)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, 200, 200, 3), dtype=np.uint8)
    lm = template_landmarks((40, 30, 160, 170))
    track = Track(np.repeat(lm[None], n, 0), np.ones(n, bool), np.repeat(crop_box(lm)[None], n, 0), "test")
    return frames, track


def box_pixels(frames, track, j):
    """Frame j's pixels in its face box, float (1, 3, h, w)."""
    return torch.from_numpy(np.ascontiguousarray(box_patch(frames[j], track.boxes[j]))).permute(2, 0, 1)[None].float()


def crops_of(frames, track, j):
    """Frame j's crop at S px as the bank's keys see it, float (1, 3, S, S)."""
    return round_trip(box_pixels(frames, track, j), S, S)[0]


def own_detail(frames, track, j):
    """Frame j's detail finer than the crop, in frame pixels (H, W, 3): its pixels minus their trip through the crop
    (what blend.paste keeps of the source outside the mouth), 0 outside its box."""
    x = box_pixels(frames, track, j)
    x0, y0 = pixel_box(track.boxes[j])[:2]
    return place(torch.zeros(frames.shape[1:]), (x - round_trip(x, S, S)[1])[0].permute(1, 2, 0), y0, x0)


def lent(bank, face, shown, frames, track):
    """The detail the bank lends a face (1, 3, S, S) drawn for frame `shown` (all frames share one box), placed in
    a frame (H, W, 3), and the (H, W) masks of its window and of the window's interior (less the faded border)."""
    top, left, d = bank.detail(face, [shown], track.boxes[:1])[0]
    h, w = d.shape[:2]
    inset = int(np.ceil(texture.STRIDE * pixel_box(track.boxes[0])[3] / S))
    window, inside = (torch.zeros(frames.shape[1:3], dtype=torch.bool) for _ in range(2))
    window[top: top + h, left: left + w] = True
    inside[top + inset: top + h - inset, left + inset: left + w - inset] = True
    return place(torch.zeros(frames.shape[1:]), d, top, left), window, inside


def test_a_face_that_is_a_frames_crop_gets_that_frames_own_fine_detail_unresampled_and_none_outside_the_area():
    frames, track = noise_video()
    bank = texture_bank(frames, track, S)
    assert len(bank.frames) == 30
    got, window, inside = lent(bank, crops_of(frames, track, 20), 0, frames, track)  # frame 0 drawn: 20 may lend
    want = own_detail(frames, track, 20)
    assert inside.sum() > 1500
    assert (got[inside] - want[inside]).abs().max() < 0.5  # the fine band is stored in float16, pixel for pixel
    assert want[inside].abs().mean() > 20
    assert got[~window].abs().max() == 0
    rim = window & ~torch.from_numpy(ndimage.binary_erosion(window.numpy()))  # outermost pixels: the detail fades in
    assert got[rim].abs().mean() < 0.2 * want[rim].abs().mean()


def test_a_moved_face_gets_the_detail_moved_with_it():
    """The face drawn 1 px lower and 1 px to the left: the lookup finds it SHIFT px off its place and lends the
    frame's detail from there, moved by the same amount in frame pixels (1 S px = 184 / 64 -> 3 frame px)."""
    frames, track = noise_video()
    bank = texture_bank(frames, track, S)
    got, _, inside = lent(bank, torch.roll(crops_of(frames, track, 20), (1, -1), (2, 3)), 0, frames, track)
    k = round(pixel_box(track.boxes[0])[3] / S)
    unmoved = own_detail(frames, track, 20)
    want = torch.roll(unmoved, (k, -k), (0, 1))
    assert (got[inside] - want[inside]).abs().max() < 0.5
    assert (got[inside] - unmoved[inside]).abs().mean() > 10


def test_one_frame_lends_the_whole_area():
    """A face whose left part is frame 20's crop and right part frame 25's: the detail is one of the two frames'
    fine band over the whole area (its lines stay continuous), not a patchwork of both."""
    frames, track = noise_video()
    bank = texture_bank(frames, track, S)
    small20, small25 = (crops_of(frames, track, j) for j in (20, 25))
    top, left, gh, gw = bank.area
    cut = left + ((gw - 1) * texture.STRIDE + texture.PATCH) * 2 // 5  # frame 20 holds less than half the area
    face = small25.clone()
    face[..., :cut] = small20[..., :cut]
    got, _, inside = lent(bank, face, 0, frames, track)
    want = own_detail(frames, track, 25)
    assert (got[inside] - want[inside]).abs().max() < 0.5


def test_the_nearest_patch_lends_not_the_one_most_alike_in_direction():
    """Frame 5 is frame 20 at twice the contrast: its patches point the same way, with a larger dot product with
    frame 20's, but they are farther; frame 20 must lend."""
    frames, track = noise_video()
    frames[20] = frames[20] // 2 + 64
    frames[5] = np.clip(2 * (frames[20].astype(int) - 128) + 128, 0, 255)
    bank = texture_bank(frames, track, S)
    small = crops_of(frames, track, 20)
    assert (bank.frames[bank.choose(small, [0], exclude=-1) % len(bank.frames)] == 20).all()


def test_frames_near_the_drawn_one_never_lend_their_detail():
    frames, track = noise_video()
    bank = texture_bank(frames, track, S)
    small = crops_of(frames, track, 20)
    n = len(bank.frames)
    lender = bank.frames[bank.choose(small, [20]) % n]  # (1,)
    assert np.abs(lender - 20).min() > EXCLUDE
    assert (bank.frames[bank.choose(small, [20], exclude=-1) % n] == 20).all()  # without the rule: its own detail
    few = texture_bank(frames[:10], Track(track.landmarks[:10], track.face[:10], track.boxes[:10], "test"), S)
    assert few.choose(small, [5]).shape == (1,)  # all within EXCLUDE: every frame may lend


def test_faces_pasted_at_most_1_25x_the_crop_get_no_bank():
    frames, track = noise_video(n=4)
    side = pixel_box(track.boxes[0])[3]
    assert texture_bank(frames, track, int(np.ceil(side / 1.25))) is None
    assert texture_bank(frames, track, int(np.ceil(side / 1.25)) - 2) is not None


def test_the_paste_adds_the_texture_around_the_mouth_only():
    """paste(texture=...): inside the mouth box (clear of its feather) the output moves by the texture; where the
    source's own detail is kept it is exactly the paste without it; outside the mask the source."""
    frames, track = noise_video(n=1)
    frame, cbox = frames[0] // 2 + 64, track.boxes[0]  # room for +30 levels
    blend = make_blend(track.landmarks[0], cbox, frame.shape[:2])
    crop = crop_face(frame, cbox, S)
    tex = (0, 0, torch.full(frame.shape, 30.0))  # detail over the whole frame, in frame pixels
    with_tex, without = paste(frame, crop, blend, texture=tex), paste(frame, crop, blend)
    t, left, b, r = blend.rect
    keep = np.ones(frame.shape[:2], np.float32)
    keep[t:b, left:r] = keep_weight(blend.mask.shape, blend.mouth, max(1, round(0.06 * pixel_box(cbox)[3]))).numpy()
    mask = np.zeros(frame.shape[:2], np.float32)
    mask[t:b, left:r] = blend.mask
    core = (mask > 0.999) & (keep < 1e-3)
    diff = with_tex.astype(int) - without
    assert core.sum() > 50
    assert np.abs(diff[core] - 30).max() <= 1
    assert np.array_equal(with_tex[keep == 1], without[keep == 1])
    assert np.array_equal(with_tex[mask == 0], frame[mask == 0])


def test_with_a_texture_the_restored_face_gives_only_what_the_crop_can_hold():
    """The texture lends the video's own detail finer than the crop, so of a restored face (lipsync.restore) the
    paste keeps only the face taken down to the crop's size: its contrast, not its invented fine band."""
    frames, track = noise_video(n=1)
    frame, cbox = frames[0] // 2 + 64, track.boxes[0]
    blend = make_blend(track.landmarks[0], cbox, frame.shape[:2])
    crop = crop_face(frame, cbox, S)
    fine = crop_face(frames[0], cbox, 2 * S)  # a restored face with detail finer than the crop
    got = paste(frame, crop, blend, fine=fine, texture=(0, 0, torch.zeros(frame.shape)))
    assert np.array_equal(got, paste(frame, crop, blend, fine=resize_crop(fine, S, S).numpy()))
    assert np.abs(got.astype(int) - paste(frame, crop, blend, fine=fine)).max() > 20


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LipSync(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()), MelEncoder(MelEncoderConfig.tiny()),
                   S).eval()


def test_avatars_keep_the_bank_on_disk_and_their_frames_use_it(tiny, tmp_path):
    frames, track = noise_video(n=16)
    avatar = prepare_avatar(frames, 25.0, track, tiny)
    assert avatar.texture is not None
    assert prepare_avatar(frames, 25.0, track, tiny, texture=False).texture is None
    loaded = load_avatar(save_avatar(avatar, tmp_path / "av"), tiny)
    for name in ("coarse", "fine"):
        assert torch.equal(getattr(loaded.texture, name), getattr(avatar.texture, name))
    assert np.array_equal(loaded.texture.frames, avatar.texture.frames) and loaded.texture.area == avatar.texture.area
    windows = tiny.audio_windows(torch.zeros(16000), 16, 25.0)
    on = np.stack(list(avatar_frames(tiny, loaded, windows)))
    off = np.stack(list(avatar_frames(tiny, loaded, windows, texture=False)))
    loaded.texture = None
    assert np.array_equal(off, np.stack(list(avatar_frames(tiny, loaded, windows))))
    changed = np.abs(on.astype(int) - off).max((0, 3)) > 0  # (H, W): pixels the texture moved in some frame
    blend = avatar.blends[0]
    t, left, b, r = blend.rect
    mt, ml, mb, mr = blend.mouth
    box = np.zeros_like(changed)
    box[t + mt:t + mb, left + ml:left + mr] = True
    reach = ndimage.binary_dilation(box, np.ones((3, 3)), iterations=max(1, round(0.06 * pixel_box(track.boxes[0])[3])) + 1)
    assert changed[box].mean() > 0.5 and not changed[~reach].any()
