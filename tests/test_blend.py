import numpy as np
import pytest
import torch
from scipy import ndimage

from lipsync.blend import feather, gaussian_kernel, inside_polygon, make_blend, match_colour, paste
from lipsync.tracking import crop_box, crop_face, pixel_box, template_landmarks

H, W = 240, 200


def face(box=(50, 40, 150, 170)):
    lm = template_landmarks(box)
    return lm, crop_box(lm)


def full_mask(blend, shape=(H, W)):
    """The blend's mask placed in a frame-sized array."""
    m = np.zeros(shape, np.float32)
    t, left, b, r = blend.rect
    m[t:b, left:r] = blend.mask
    return m


def skin_frame(seed=0, texture=6.0):
    """A smooth skin-coloured frame with some texture, so colour statistics are meaningful."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([190 + 0.1 * x, 140 + 0.05 * y, 120 + 0.05 * x], -1)
    return np.clip(base + rng.normal(0, texture, (H, W, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("box", [(50, 40, 150, 170), (-30, 100, 60, 230), (120, -20, 230, 120)])
def test_mask_is_zero_above_the_crop_midline_and_outside_the_crop(box):
    lm, cbox = face(box)
    blend = make_blend(lm, cbox, (H, W))
    x0, y0, w, h = pixel_box(cbox)
    m = full_mask(blend)
    rows, cols = np.nonzero(m)
    assert len(rows) > 100
    assert rows.min() >= y0 + h / 2  # never above the midline (the nose point)
    assert rows.max() < y0 + h and cols.min() >= x0 and cols.max() < x0 + w
    assert 0 <= m.min() and m.max() <= 1


def test_mask_covers_mouth_and_chin_but_not_the_nose_or_the_background_beside_the_jaw():
    lm, cbox = face()
    m = full_mask(make_blend(lm, cbox, (H, W)))
    at = lambda p: m[int(p[1]), int(p[0])]  # noqa: E731
    for k in (48, 51, 54, 57, 62):  # mouth corners, lips
        assert at(lm[k]) > 0.99
    assert at(0.5 * (lm[57] + lm[8])) > 0.99  # between lower lip and chin
    assert at(lm[33]) < 0.5  # nostril base: the source's nose stays
    jaw_left = lm[4] - (12, 0)  # background just outside the jaw line
    assert at(jaw_left) < 0.05


def test_mask_edges_are_feathered_not_hard():
    lm, cbox = face()
    m = full_mask(make_blend(lm, cbox, (H, W)))
    col = m[:, int(lm[51][0])]  # a column through the upper lip: 0 above, ramping to 1
    assert np.abs(np.diff(col)).max() < 0.3
    assert ((col > 0.05) & (col < 0.95)).sum() >= 6


def test_feather_equals_a_separable_gaussian_convolution_with_zero_outside():
    hard = (torch.rand(30, 41, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    k = gaussian_kernel(5 / 3, 5, torch.float64).double().numpy()
    expected = ndimage.correlate1d(ndimage.correlate1d(hard.double().numpy(), k, axis=0, mode="constant"), k, axis=1,
                                   mode="constant")
    np.testing.assert_allclose(feather(hard, 5).numpy(), expected, atol=1e-6)
    dot = torch.zeros(21, 21)
    dot[10, 10] = 1
    support = np.nonzero(feather(dot, 4).numpy())
    assert support[0].min() == 6 and support[0].max() == 14  # grows by exactly the radius


def test_inside_polygon_fills_a_triangle_with_the_right_area():
    tri = np.array([[10.0, 10.0], [90.0, 10.0], [10.0, 70.0]])
    inside = inside_polygon(tri, np.arange(100) + 0.5, np.arange(100) + 0.5)
    assert abs(inside.sum() - 0.5 * 80 * 60) < 80
    assert inside[20, 20] and not inside[65, 80]


def test_paste_keeps_every_pixel_outside_the_mask_bit_identical():
    lm, cbox = face((-30, 100, 60, 230))  # partly outside the frame
    frame = skin_frame()
    blend = make_blend(lm, cbox, (H, W))
    crop = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = paste(frame, crop, blend)
    outside = full_mask(blend) == 0
    assert np.array_equal(out[outside], frame[outside])
    assert (out[~outside] != frame[~outside]).mean() > 0.5
    assert out.dtype == np.uint8 and out.shape == frame.shape


def test_colour_matching_removes_a_colour_cast_of_the_generated_face():
    lm, cbox = face()
    frame = skin_frame()
    blend = make_blend(lm, cbox, (H, W))
    crop = crop_face(frame, cbox, 96)
    cast = np.clip(crop.astype(int) + (35, -15, 10), 0, 255).astype(np.uint8)  # VAE-style colour drift
    region = full_mask(blend) > 0.5
    err = lambda out: np.abs(out[region].astype(float).mean(0) - frame[region].mean(0)).max()  # noqa: E731
    assert err(paste(frame, cast, blend, colour=False)) > 10
    assert err(paste(frame, cast, blend)) < 1.5


def test_colour_matching_maps_mean_and_std_and_bounds_the_gain():
    g = torch.tensor([[[10.0, 20, 30]], [[30.0, 40, 50]]]).expand(2, 3, 3).clone()  # std 10 per channel
    s = g * 1.1 + 5
    w = torch.ones(2, 3)
    out = match_colour(g, s, w, step=1)
    torch.testing.assert_close(out, s)
    flat = match_colour(g, g * 3, w, step=1)  # a 3x contrast change is clamped to the maximum gain
    assert torch.allclose(flat.std((0, 1), unbiased=False), g.std((0, 1), unbiased=False) * 1.25)


@pytest.mark.parametrize("colour", [False, True])
def test_the_generated_mouth_replaces_the_source_mouth_inside_the_mask_with_or_without_colour_matching(colour):
    """The mouth is what the paste is for: the generated face (here the source's own face with a dark open mouth drawn
    on it) must show on the lips, with colour matching on too. The mouth box is left out of the colour statistics
    only, never out of the mask: a mask aliased with its statistics copy would show the SOURCE mouth there."""
    lm, cbox = face()
    frame = skin_frame(texture=0.0)  # no pixel noise: the crop's resampling keeps the skin's statistics
    blend = make_blend(lm, cbox, (H, W))
    lips = inside_polygon(lm[48:60], np.arange(W) + 0.5, np.arange(H) + 0.5)  # outer lip contour, frame pixels
    dark = (40, 12, 25)
    dubbed = frame.copy()
    dubbed[lips] = dark
    crop = crop_face(dubbed, cbox, 128)  # the "generated" crop: same skin, new mouth
    out = paste(frame, crop, blend, colour)
    core = ndimage.binary_erosion(lips, iterations=3) & (full_mask(blend) > 0.99)  # clear of resampling blur
    assert core.sum() > 50
    assert np.abs(frame[core].astype(int) - dark).min(1).min() > 60  # the source mouth is far from the dark one
    err = np.abs(out[core].astype(int) - dark).max(1)  # the skin is the source's: colour matching maps ~identity
    assert err.max() < 20, err.max()


def test_source_detail_restores_the_texture_finer_than_the_crop_outside_the_mouth_and_never_inside_it():
    """paste(detail=True): where the mask is full and away from the mouth, a generated crop that is the source's own
    crop (all the detail a 64 px crop can hold) gives the source frame back nearly exactly, its texture finer than
    the crop coming from the source; inside the mouth box the output is the generated face alone, as without."""
    lm, cbox = face()
    frame = skin_frame(texture=12.0)  # pixel noise: detail a 64 px crop of a ~130 px face cannot hold
    blend = make_blend(lm, cbox, (H, W))
    crop = crop_face(frame, cbox, 64)
    t, left, b, r = blend.rect
    mt, ml, mb, mr = blend.mouth
    mouth = np.zeros((H, W), bool)
    mouth[t + mt:t + mb, left + ml:left + mr] = True
    radius = max(1, round(0.06 * pixel_box(cbox)[3]))
    full = full_mask(blend) > 0.999
    away = full & ~ndimage.binary_dilation(mouth, iterations=radius + 1)
    core = full & ndimage.binary_erosion(mouth, iterations=radius + 1)
    assert away.sum() > 60 and core.sum() > 50

    def err(out, where):
        return np.abs(out[where].astype(float) - frame[where]).mean()
    kept, soft = paste(frame, crop, blend, colour=False), paste(frame, crop, blend, colour=False, detail=False)
    assert err(soft, away) > 5 and err(kept, away) < 0.25 * err(soft, away)
    assert np.array_equal(kept[core], soft[core])  # the source mouth's detail never comes back
    outside = full_mask(blend) == 0
    assert np.array_equal(kept[outside], frame[outside])


def test_keep_weight_is_one_minus_the_feathered_mouth_box():
    """The detail weight's separable shortcut equals the 2-D route: 1 - feather(the mouth box's indicator)."""
    from lipsync.blend import feather, keep_weight
    shape, (mt, ml, mb, mr), r = (40, 56), (18, 12, 31, 43), 5
    box = torch.zeros(shape)
    box[mt:mb, ml:mr] = 1
    assert torch.allclose(keep_weight(shape, (mt, ml, mb, mr), r), 1 - feather(box, r), atol=1e-6)
