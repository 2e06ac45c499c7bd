"""Sharpness ("detail", lipsync.tools.metrics.detail / detail_ratios, used by --reenact and --crossdub): hand-computed
Laplacian variances, the lips square left out of the rest of the lower face, and ratios that move the right way
under blurring and sharpening."""

import math

import numpy as np
import pytest

from lipsync.tools import metrics as M
from lipsync.tools import reenact

H, W = 300, 200
SQUARE = [68, 170, 132, 234]  # the mouth square of face_mesh(): side 1.6 x 40 px around (100, 201.5)
RECT = [30, 120, 170, 270]  # its lower-face rectangle: cheek 234 to 454, nose tip 1 to chin 152


def face_mesh(n=2):
    """A mesh (n, 468, 2) with the lips inside the lower face, as on a real face."""
    mesh = np.full((n, 468, 2), 100, np.float32)
    lips = np.array([[80, 200], [120, 200], [100, 190], [100, 216], [100, 198], [100, 204], [85, 200], [115, 200],
                     [95, 191], [105, 191], [95, 214], [105, 214]], np.float32)
    mesh[:, reenact.MOUTH_POINTS] = lips  # x 80..120 (40 px), y 190..216, mean (100, 201.5)
    mesh[:, 10], mesh[:, 152] = (100, 40), (100, 270)
    mesh[:, 234], mesh[:, 454], mesh[:, 1] = (170, 150), (30, 150), (100, 120)
    return mesh


def regions(n=2):
    mesh = face_mesh(n)
    return reenact.mouth_squares(mesh, (H, W)), reenact.lower_face_rects(mesh, (H, W))


def textured_frames(n=2, seed=0):
    """Frames (n, H, W, 3) uint8 of fine random texture (noise smoothed by a 2x2 box), colours differing by channel."""
    rng = np.random.default_rng(seed)
    x = rng.normal(128, 40, (n, H + 1, W + 1, 3))
    x = (x[:, 1:, 1:] + x[:, :-1, 1:] + x[:, 1:, :-1] + x[:, :-1, :-1]) / 4
    return np.clip(x * [1.0, 0.8, 1.2] + [0, 20, -20], 0, 255).round().astype(np.uint8)


def box_blur(frames, k=5):
    """k x k mean of each pixel's neighbourhood (edges replicated), uint8 -> uint8."""
    r = k // 2
    x = np.pad(frames.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    out = sum(x[:, dy:dy + H, dx:dx + W] for dy in range(k) for dx in range(k)) / k ** 2
    return out.round().astype(np.uint8)


def unsharp(frames, amount=1.0):
    x = frames.astype(np.float64)
    return np.clip(x + amount * (x - box_blur(frames, 3)), 0, 255).round().astype(np.uint8)


def checkerboard(h, w, low, high, channels=(1, 1, 1)):
    """(h, w, 3) float image: low where x + y is even, high where odd, on the given channels (0 elsewhere)."""
    odd = (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(bool)
    grey = np.where(odd, high, low).astype(np.float64)
    return grey[..., None] * np.asarray(channels, np.float64)


# ----------------------------------------------------------------------------- analytic values


def test_checkerboard_laplacian_variance_is_16_times_the_squared_luma_step():
    """Pixel values alternating a, b: the Laplacian is 4 (b - a) on a pixels and -4 (b - a) on b pixels; an even count
    of values, half of each: variance 16 (b - a)^2."""
    grey = checkerboard(10, 12, 40, 50)  # 8 x 10 = 80 valid values, 40 of each sign
    assert M.detail(grey, (0, 0, 12, 10)) == pytest.approx(16 * 10 ** 2, rel=1e-12)
    red = checkerboard(10, 12, 0, 100, channels=(1, 0, 0))  # luma step 0.299 x 100
    assert M.detail(red, (0, 0, 12, 10)) == pytest.approx(16 * 29.9 ** 2, rel=1e-12)
    green = checkerboard(10, 12, 0, 100, channels=(0, 1, 0))
    assert M.detail(green, (0, 0, 12, 10)) == pytest.approx(16 * 58.7 ** 2, rel=1e-12)


def test_ramps_have_zero_detail_and_a_constant_laplacian_shift_changes_nothing():
    y, x = np.mgrid[0:20, 0:30].astype(np.float64)
    linear = np.repeat((3 * x + 2 * y)[..., None], 3, -1)
    assert M.detail(linear, (0, 0, 30, 20)) == pytest.approx(0, abs=1e-18)
    bowl = np.repeat((x ** 2 + 0.5 * y ** 2)[..., None], 3, -1)  # Laplacian exactly 2 + 1 = 3 everywhere
    assert np.allclose(M.laplacian(M.luma(bowl)), 3.0, rtol=0, atol=1e-9)
    assert M.detail(bowl, (0, 0, 30, 20)) == pytest.approx(0, abs=1e-12)
    checks = bowl + checkerboard(20, 30, 0, 7)  # Laplacian 3 +- 28: variance 16 x 7^2, unchanged by the offset
    assert M.detail(checks, (0, 0, 30, 20)) == pytest.approx(16 * 49, rel=1e-9)


def test_detail_reads_only_its_region():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3)).astype(np.float64)
    img[5:15, 20:32] = checkerboard(10, 12, 0, 3)  # region x 20..32, y 5..15: noise all round it
    assert M.detail(img, (20, 5, 32, 15)) == pytest.approx(16 * 9, rel=1e-12)
    assert math.isnan(M.detail(img, (20, 5, 22, 15)))  # 2 px wide: no valid Laplacian value


def test_rest_of_the_lower_face_is_the_variance_over_values_that_read_no_lips_pixel():
    """By hand, one value at a time: the 5-point Laplacian centred on each pixel of the rectangle whose stencil lies
    in the rectangle, kept only when none of its 5 pixels is in the mouth square."""
    img = textured_frames(1)[0]
    g = M.luma(img)
    x1, y1, x2, y2 = RECT
    sx1, sy1, sx2, sy2 = SQUARE
    kept = []
    for y in range(y1 + 1, y2 - 1):
        for x in range(x1 + 1, x2 - 1):
            stencil = [(y, x), (y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
            if any(sy1 <= v < sy2 and sx1 <= u < sx2 for v, u in stencil):
                continue
            kept.append(g[y - 1, x] + g[y + 1, x] + g[y, x - 1] + g[y, x + 1] - 4 * g[y, x])
    assert len(kept) < (y2 - y1 - 2) * (x2 - x1 - 2) - (sy2 - sy1) * (sx2 - sx1)  # the square's rim is left out too
    assert M.detail(img, RECT, exclude=SQUARE) == pytest.approx(np.var(kept), rel=1e-12)


# ----------------------------------------------------------------------------- ratios


def test_a_frame_against_itself_gives_ratio_exactly_1():
    frames = textured_frames()
    squares, rects = regions()
    assert M.detail_ratios(frames, frames, squares, rects) == {"detail_lips": 1.0, "detail_rest": 1.0}


def test_a_blurred_copy_is_well_below_1_and_a_sharpened_one_above_1():
    frames = textured_frames()
    squares, rects = regions()
    blurred = M.detail_ratios(box_blur(frames), frames, squares, rects)
    assert blurred["detail_lips"] < 0.3 and blurred["detail_rest"] < 0.3
    sharper = M.detail_ratios(unsharp(frames), frames, squares, rects)
    assert sharper["detail_lips"] > 1.5 and sharper["detail_rest"] > 1.5


def test_blurring_only_the_lips_square_lowers_lips_and_leaves_the_rest_exactly_1():
    frames = textured_frames()
    squares, rects = regions()
    x1, y1, x2, y2 = SQUARE
    assert squares.tolist() == [SQUARE] * 2 and rects.tolist() == [RECT] * 2
    gen = frames.copy()
    gen[:, y1:y2, x1:x2] = box_blur(frames)[:, y1:y2, x1:x2]  # every pixel of the square, up to its edge
    got = M.detail_ratios(gen, frames, squares, rects)
    assert got["detail_lips"] < 0.3 and got["detail_rest"] == 1.0
    noisy = frames.copy()  # anything at all inside the square: the rest is untouched
    noisy[:, y1:y2, x1:x2] = np.random.default_rng(5).integers(0, 256, (2, y2 - y1, x2 - x1, 3))
    got = M.detail_ratios(noisy, frames, squares, rects)
    assert got["detail_lips"] > 2 and got["detail_rest"] == 1.0


def test_the_lips_are_measured_on_the_square_of_the_source_mesh_and_the_rest_sees_the_cheeks():
    frames = textured_frames()
    squares, rects = regions()
    gen = frames.copy()
    gen[:, 130:160, 35:60] = box_blur(frames)[:, 130:160, 35:60]  # a cheek patch inside the rectangle, off the lips
    got = M.detail_ratios(gen, frames, squares, rects)
    assert got["detail_lips"] == 1.0 and got["detail_rest"] < 0.99  # 750 of ~17000 px lose detail


def test_the_clip_ratio_is_the_ratio_of_the_summed_details_over_the_frames_scored():
    """Two frames, checkerboards of steps 1 and 2 (detail proportional to the squared step on any region); generated
    with step 2 on both: per-frame ratios 4 and 1, clip ratio (64 + 64) / (16 + 64) = 1.6 (not their mean, 2.5)."""
    source = np.stack([checkerboard(H, W, 0, 1), checkerboard(H, W, 0, 2)])
    gen = np.stack([checkerboard(H, W, 0, 2)] * 2)
    squares, rects = regions()
    got = M.detail_ratios(gen, source, squares, rects)
    assert got["detail_lips"] == pytest.approx(1.6, rel=1e-12) and got["detail_rest"] == pytest.approx(1.6, rel=1e-12)
    only_first = M.detail_ratios(gen, source, squares, rects, frames=[0])  # e.g. no face found on frame 1
    assert only_first["detail_lips"] == pytest.approx(4.0, rel=1e-12)
    flat = np.full_like(source, 77.0)  # no detail in the source: no ratio
    assert all(math.isnan(v) for v in M.detail_ratios(gen, flat, squares, rects).values())


def test_reenact_score_reports_detail_of_the_generated_frames_against_the_real_ones():
    frames = textured_frames()
    mesh = face_mesh()
    s = reenact.score(frames, frames, mesh, mesh)
    assert s["detail_lips"] == 1.0 and s["detail_rest"] == 1.0
    x1, y1, x2, y2 = SQUARE
    gen = frames.copy()
    gen[:, y1:y2, x1:x2] = box_blur(frames)[:, y1:y2, x1:x2]
    s = reenact.score(gen, frames, mesh, mesh)
    assert s["detail_lips"] < 0.3 and s["detail_rest"] == 1.0
    no_face = mesh.copy()
    no_face[1] = np.nan  # frame 1 unscored: only frame 0 counts
    gen[1] = box_blur(frames[1:])[0]
    gen[0] = frames[0]
    s = reenact.score(gen, frames, no_face, no_face)
    assert s["frames"] == 1 and s["detail_lips"] == 1.0 and s["detail_rest"] == 1.0
