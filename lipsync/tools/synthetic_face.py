"""Cartoon faces for lipsync.tools.synthetic: a random look, slow head motion, vectorised rendering, exact landmarks.

A face is a skin-coloured head ellipse (ears, neck, optional hair, shading towards the rim) with eyes that blink,
brows, a nose, and red lips around a dark mouth interior whose height follows the opening a(t) and whose width follows
1 - roundness. Every shape is drawn in head-local coordinates (so roll, translation and a sideways "yaw" shift of the
inner features come for free) over all frames of a chunk at once, and the iBUG-68 landmarks are the same shapes'
contour points. Colours are constrained so that, in the crop's lower half, only the mouth interior is darker than
DARK_HI: `dark_mouth_height` reads the opening back from that darkness.
"""

from dataclasses import dataclass

import numpy as np

MOUTH_RGB = np.array([52.0, 12.0, 16.0], np.float32)  # mouth interior, luma ~24
DARK_HI = 85.0  # every other colour that can appear in the crop's lower half has luma >= this
OPEN_MAX = 0.30  # interior height at opening 1, in head half-heights


def _luma(rgb):
    return np.asarray(rgb, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)


def _colour(rng, palette, spread, luma_lo, luma_hi):
    """A palette colour scaled to a random luma in [lo, hi], jittered per channel, luma kept in [lo, hi]."""
    c = np.asarray(palette[rng.integers(len(palette))], np.float32)
    c = np.clip(c * rng.uniform(luma_lo, luma_hi) / _luma(c) + rng.uniform(-spread, spread, 3), 1, 255)
    return np.clip(c * np.clip(_luma(c), luma_lo, luma_hi) / _luma(c), 0, 255).astype(np.float32)


@dataclass
class Face:
    skin: np.ndarray
    lips: np.ndarray
    bg_top: np.ndarray
    bg_bottom: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    hair_on: bool
    ry: float       # head half-height (px); the other lengths below are in units of ry
    aspect: float   # head half-width / ry
    cx: float       # head centre (px)
    cy: float
    eye_x: float
    eye_y: float
    eye_w: float
    eye_h: float
    brow_y: float
    mouth_y: float
    mouth_w: float  # lip half-width at the widest (unrounded) shape
    lip_up: float
    lip_low: float

    @classmethod
    def random(cls, rng, frame=128):
        skin = [(230, 190, 160), (205, 155, 115), (160, 110, 75), (235, 200, 170)]
        hair = [(30, 25, 20), (90, 60, 35), (200, 170, 110), (160, 160, 160), (150, 70, 30)]
        iris = [(90, 60, 30), (70, 110, 160), (80, 120, 70), (40, 30, 25)]
        bg = [(rng.uniform(0, 255), rng.uniform(0, 255), rng.uniform(0, 255))]
        eye_y = rng.uniform(-0.16, -0.08)
        return cls(skin=_colour(rng, skin, 15, 120, 210), lips=_colour(rng, [(195, 70, 80)], 25, 100, 135),
                   bg_top=_colour(rng, bg, 30, 110, 235), bg_bottom=_colour(rng, bg, 30, 110, 235),
                   hair=_colour(rng, hair, 15, 15, 180), iris=_colour(rng, iris, 15, 30, 110),
                   hair_on=bool(rng.random() < 0.8), ry=frame * 0.31 * rng.uniform(0.9, 1.1),
                   aspect=rng.uniform(0.74, 0.86), cx=frame * (0.5 + rng.uniform(-0.07, 0.07)),
                   cy=frame * (0.47 + rng.uniform(-0.04, 0.04)), eye_x=rng.uniform(0.27, 0.33), eye_y=eye_y,
                   eye_w=rng.uniform(0.12, 0.15), eye_h=rng.uniform(0.055, 0.075),
                   brow_y=eye_y - rng.uniform(0.15, 0.2), mouth_y=rng.uniform(0.57, 0.63),
                   mouth_w=rng.uniform(0.27, 0.33), lip_up=rng.uniform(0.06, 0.09), lip_low=rng.uniform(0.08, 0.11))


def _smooth_noise(rng, n, sigma):
    k = np.exp(-0.5 * (np.arange(-3 * sigma, 3 * sigma + 1) / sigma) ** 2)
    x = np.convolve(rng.normal(size=n + len(k) - 1), k / k.sum(), mode="valid")
    return (x / (x.std() + 1e-8)).astype(np.float32)


def random_motion(rng, n, fps, ry):
    """Per-frame head motion: translation (~1.5 px at ry=40), roll (~2.5 deg), yaw as a sideways shift of the inner
    features, and blinks every 2-6 s. -> dict of (n,) float32 arrays."""
    blink = np.zeros(n, np.float32)
    t = rng.uniform(0.5, 3.0)
    while t * fps < n + 3:
        blink = np.maximum(blink, np.clip(1 - np.abs(np.arange(n) - t * fps) / 2.5, 0, 1))
        t += rng.uniform(2.0, 6.0)
    return {"tx": 0.035 * ry * _smooth_noise(rng, n, 12), "ty": 0.025 * ry * _smooth_noise(rng, n, 12),
            "roll": np.radians(2.5) * _smooth_noise(rng, n, 20), "yaw": 0.05 * ry * _smooth_noise(rng, n, 25),
            "blink": blink.astype(np.float32)}


def _ellipse(u, v, x0, y0, rx, rt, rb=None):
    """Anti-aliased coverage of an ellipse (top/bottom half-heights rt/rb) via a first-order signed distance."""
    dv = v - y0
    r = np.maximum(np.where(dv < 0, rt, rt if rb is None else rb), 1e-3)
    qx, qy = (u - x0) / rx, dv / r
    d = np.sqrt(qx * qx + qy * qy)
    g = np.sqrt((qx / rx) ** 2 + (qy / r) ** 2) / np.maximum(d, 1e-6)
    return np.clip(0.5 - (d - 1) / np.maximum(g, 1e-6), 0, 1)


def _span(u, v, x0, y0, rx, rt, rb):
    """Coverage of the same shape that is exact along v: the overlap of each pixel's rows with the shape's column
    extent. Used for the mouth, so the rendered opening is linear in the area (thin shapes stay thin)."""
    q = np.sqrt(np.clip(1 - ((u - x0) / rx) ** 2, 0, None))
    return np.clip(np.minimum(v + 0.5, y0 + rb * q) - np.maximum(v - 0.5, y0 - rt * q), 0, 1)


class _Canvas:
    """Frames (n, H, W, 3) float; shapes are drawn in head-local coordinates (u right, v down, origin = head centre)."""

    def __init__(self, frame, cx, cy, roll, top, bottom):
        self.n, self.size = len(cx), frame
        self.cx, self.cy = cx[:, None, None], cy[:, None, None]
        self.c, self.s = np.cos(roll)[:, None, None], np.sin(roll)[:, None, None]
        ramp = np.linspace(0, 1, frame, dtype=np.float32)[:, None, None]
        self.img = np.repeat(((1 - ramp) * top + ramp * bottom)[None, :, :, :].repeat(frame, 2), self.n, 0)

    def window(self, x0, y0, hx, hy=None):
        """Pixel window holding the local rectangle (x0 +- hx, y0 +- hy) in every frame -> (rows, cols), u, v."""
        x0, y0 = (np.broadcast_to(np.asarray(a, np.float32).reshape(-1, 1, 1), (self.n, 1, 1)) for a in (x0, y0))
        hx = float(np.max(hx))
        hy = hx if hy is None else float(np.max(hy))
        fx, fy = self.cx + self.c * x0 - self.s * y0, self.cy + self.s * x0 + self.c * y0
        ex = float(np.max(np.abs(self.c) * hx + np.abs(self.s) * hy)) + 1.5
        ey = float(np.max(np.abs(self.s) * hx + np.abs(self.c) * hy)) + 1.5
        x1, x2 = (int(np.clip(f, 0, self.size)) for f in (np.floor(fx.min() - ex), np.ceil(fx.max() + ex)))
        y1, y2 = (int(np.clip(f, 0, self.size)) for f in (np.floor(fy.min() - ey), np.ceil(fy.max() + ey)))
        dx = np.arange(x1, x2, dtype=np.float32)[None, None, :] + 0.5 - self.cx
        dy = np.arange(y1, y2, dtype=np.float32)[None, :, None] + 0.5 - self.cy
        return (slice(y1, y2), slice(x1, x2)), self.c * dx + self.s * dy, self.c * dy - self.s * dx

    def fill(self, win, cov, colour):
        tile = self.img[:, win[0], win[1]]  # a view: blend in place
        delta = np.subtract(colour, tile, dtype=np.float32)
        delta *= cov[..., None]
        tile += delta


def face_landmarks(face, yaw, blink, opening, width):
    """Exact iBUG-68 landmarks in head-local pixels -> (n, 68, 2), plus the per-frame mouth geometry."""
    n, R = len(yaw), face.ry
    rx = face.aspect * R
    sh = yaw[:, None]
    lm = np.zeros((n, 68, 2), np.float32)
    phi = np.pi - np.arange(17) * np.pi / 16
    lm[:, 0:17] = np.stack([rx * np.cos(phi), R * np.sin(phi)], -1)
    t = np.array([-0.9, -0.45, 0.0, 0.45, 0.9])
    for side, sl in ((-1, slice(17, 22)), (1, slice(22, 27))):
        lm[:, sl, 0] = side * face.eye_x * R + sh + 0.16 * R * t
        lm[:, sl, 1] = face.brow_y * R - 0.035 * R * np.sqrt(1 - t ** 2)
    lm[:, 27:31, 0] = sh * np.array([1.0, 1.1, 1.2, 1.3])
    lm[:, 27:31, 1] = R * (face.eye_y + (0.28 - face.eye_y) * np.array([0, 1, 2, 3]) / 3)
    lm[:, 31:36, 0] = 1.3 * sh + R * np.array([-0.12, -0.06, 0, 0.06, 0.12])
    lm[:, 31:36, 1] = R * np.array([0.33, 0.345, 0.355, 0.345, 0.33])
    ang = np.array([np.pi, 4 * np.pi / 3, 5 * np.pi / 3, 0, np.pi / 3, 2 * np.pi / 3])
    eh = face.eye_h * R * (1 - blink)[:, None]
    for side, sl in ((-1, slice(36, 42)), (1, slice(42, 48))):
        lm[:, sl, 0] = side * face.eye_x * R + sh + face.eye_w * R * np.cos(ang)
        lm[:, sl, 1] = face.eye_y * R + eh * np.sin(ang)
    mouth = {"x": 1.1 * yaw, "y": np.full(n, face.mouth_y * R, np.float32),
             "w": face.mouth_w * R * (0.65 + 0.35 * width), "h": OPEN_MAX * R * opening}
    mouth.update(in_w=0.88 * mouth["w"], in_t=0.35 * mouth["h"], in_b=0.65 * mouth["h"])
    mouth.update(out_t=mouth["in_t"] + face.lip_up * R, out_b=mouth["in_b"] + face.lip_low * R)
    for sl, ang, hw, top, bot in ((slice(48, 60), np.arange(12) * np.pi / 6 + np.pi, "w", "out_t", "out_b"),
                                  (slice(60, 68), np.arange(8) * np.pi / 4 + np.pi, "in_w", "in_t", "in_b")):
        sin = np.sin(ang)
        lm[:, sl, 0] = mouth["x"][:, None] + mouth[hw][:, None] * np.cos(ang)
        lm[:, sl, 1] = mouth["y"][:, None] + np.where(sin < 0, mouth[top][:, None], mouth[bot][:, None]) * sin
    return lm, mouth


def _render_chunk(face, motion, opening, width, frame):
    R = face.ry
    rx, col = face.aspect * R, lambda x: np.asarray(x, np.float32).reshape(-1, 1, 1)
    cx, cy = face.cx + motion["tx"], face.cy + motion["ty"]
    cv = _Canvas(frame, cx, cy, motion["roll"], face.bg_top, face.bg_bottom)
    lm, mo = face_landmarks(face, motion["yaw"], motion["blink"], opening, width)
    skin, sh = face.skin, col(motion["yaw"])

    win, u, v = cv.window(0.0, 1.3 * R, 0.42 * rx, R)  # neck, down to the frame's edge
    cv.fill(win, np.clip(0.42 * rx + 0.5 - np.abs(u), 0, 1) * np.clip(v - 0.3 * R + 0.5, 0, 1), 0.82 * skin)
    for side in (-1, 1):  # ears
        win, u, v = cv.window(side * 0.97 * rx, -0.02 * R, 0.12 * R, 0.2 * R)
        cv.fill(win, _ellipse(u, v, side * 0.97 * rx, -0.02 * R, 0.12 * R, 0.2 * R), 0.88 * skin)
    win, u, v = cv.window(0.0, 0.0, rx, R)  # head, shaded towards the rim
    shade = 1 - 0.12 * np.minimum((u / rx) ** 2 + (v / R) ** 2, 1)
    cv.fill(win, _ellipse(u, v, 0.0, 0.0, rx, R), shade[..., None] * skin)
    if face.hair_on:  # above a hairline that curves down to the temples
        win, u, v = cv.window(0.0, -0.58 * R, 1.05 * rx, 0.5 * R)
        hairline = (-0.55 + 0.4 * (u / rx) ** 2) * R
        cv.fill(win, _ellipse(u, v, 0.0, -0.02 * R, 1.05 * rx, 1.05 * R) * np.clip(hairline - v + 0.5, 0, 1), face.hair)

    brow = 0.6 * face.hair if _luma(face.hair) < 100 else 0.5 * skin
    eh0, ew = face.eye_h * R, face.eye_w * R
    eh = col(eh0 * (1 - motion["blink"]))
    for side in (-1, 1):
        x0, y0 = side * face.eye_x * R + sh, face.eye_y * R
        win, u, v = cv.window(x0, face.brow_y * R, 0.16 * R, 0.035 * R)
        cv.fill(win, _ellipse(u, v, x0, face.brow_y * R, 0.16 * R, 0.035 * R), brow)
        win, u, v = cv.window(x0, y0, 1.25 * ew, 1.7 * eh0)
        cv.fill(win, _ellipse(u, v, x0, y0, 1.25 * ew, 1.7 * eh0), 0.88 * skin)
        white = _ellipse(u, v, x0, y0, ew, eh)
        cv.fill(win, white, np.array([236.0, 232, 226], np.float32))
        cv.fill(win, white * _ellipse(u, v, x0, y0, 0.95 * eh0, 0.95 * eh0), face.iris)
        cv.fill(win, white * _ellipse(u, v, x0, y0, 0.45 * eh0, 0.45 * eh0), np.array([15.0, 12, 12], np.float32))

    win, u, v = cv.window(1.2 * sh, 0.13 * R, 0.12 * R, 0.25 * R)  # nose: ridge, tip, nostrils
    cv.fill(win, _ellipse(u, v, 1.15 * sh, 0.08 * R, 0.05 * R, 0.2 * R), 0.93 * skin)
    cv.fill(win, _ellipse(u, v, 1.3 * sh, 0.27 * R, 0.1 * R, 0.065 * R), 0.97 * skin)
    for side in (-1, 1):
        cv.fill(win, _ellipse(u, v, 1.3 * sh + side * 0.065 * R, 0.33 * R, 0.035 * R, 0.02 * R), 0.75 * skin)

    x0, y0 = col(mo["x"]), col(mo["y"])  # lips (upper one darker) around the dark mouth interior
    win, u, v = cv.window(x0, y0, mo["w"], np.maximum(mo["out_t"], mo["out_b"]))
    cv.fill(win, _span(u, v, x0, y0, col(mo["w"]), col(mo["out_t"]), col(mo["out_b"])),
            np.where((v < y0)[..., None], 0.9 * face.lips, face.lips))
    cv.fill(win, _span(u, v, x0, y0, col(mo["in_w"]), col(mo["in_t"]), col(mo["in_b"])), MOUTH_RGB)

    c, s = np.cos(motion["roll"])[:, None], np.sin(motion["roll"])[:, None]
    world = np.stack([cx[:, None] + c * lm[..., 0] - s * lm[..., 1], cy[:, None] + s * lm[..., 0] + c * lm[..., 1]], -1)
    return np.clip(np.rint(cv.img), 0, 255).astype(np.uint8), world.astype(np.float32)


def render(face, motion, opening, width, frame=128, chunk=64):
    """Frames of `face` with the mouth at opening/width (both (n,) in [0, 1]) -> frames uint8 (n, frame, frame, 3),
    landmarks float32 (n, 68, 2) in frame pixels (pixel i spans [i, i+1))."""
    n = len(opening)
    frames, lms = np.empty((n, frame, frame, 3), np.uint8), np.empty((n, 68, 2), np.float32)
    for a in range(0, n, chunk):
        sl = slice(a, min(n, a + chunk))
        frames[sl], lms[sl] = _render_chunk(face, {k: v[sl] for k, v in motion.items()}, opening[sl], width[sl], frame)
    return frames, lms


def dark_height(crops, lo, hi, tallest, inside=None):
    """Height in pixels of the dark region of crops (N, H, W, 3) uint8: darkness = how far a pixel's luma is below
    `hi` towards `lo` (0..1), summed down each column (only where `inside` (N, H, W) is True, when given); the mean
    of the `tallest` tallest columns -> (N,) float32."""
    dark = np.clip((hi - _luma(crops)) / (hi - lo), 0, 1)
    if inside is not None:
        dark = dark * inside
    cols = np.sort(dark.sum(1), axis=1)  # (N, W) column heights in pixels
    return cols[:, -tallest:].mean(1)


def dark_mouth_height(crops):
    """Mouth opening of our cartoon faces read back from crops (N, S, S, 3) uint8: the dark interior's height in the
    lower half (luma from the lips' DARK_HI down to the interior's; two tallest columns) -> (N,) float32 as a fraction
    of the crop height."""
    crops = np.asarray(crops)
    S = crops.shape[1]
    return (dark_height(crops[:, S // 2:], _luma(MOUTH_RGB), DARK_HI, 2) / S).astype(np.float32)
