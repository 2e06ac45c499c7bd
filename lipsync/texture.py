"""Mouth texture from the video's own frames: example-based detail for the generated mouth (ours; MuseTalk has none).

The generator draws the face at S px and the paste scales it 2-4x, so the mouth it pastes is soft: lip lines, teeth
edges and the skin's grain are finer than S px can hold (blend.py keeps the source's own detail outside the mouth;
inside, the source shows the original mouth, which must not come back). But the video holds the same person's mouth,
sharp, in many shapes. Example-based super-resolution (Freeman, Jones and Pasztor, "Example-Based Super-Resolution",
IEEE CG&A 2002) borrows it: find the frame whose coarse picture of the mouth area (at S px) looks most like the
generated face's, also a few pixels off its place, and add that frame's fine detail there: its own pixels minus what
its crop holds at S px, in frame pixels, moved by whole pixels and never resampled (a trip through a crop of
ceil(face / S) x S px and back keeps under half of the lips' Laplacian energy on held-out 480-512 px videos:
docs/results.md). The coarse picture decides, so the detail follows the generated mouth's shape; and frames near the
one being drawn are never used (EXCLUDE), so the original mouth's own lines cannot come back through it. One frame
lends the whole area: its lip lines and teeth edges stay continuous. Lent patch by patch from different frames, the
overlapping patches averaged each other's lines away (a quarter to three fifths of the borrowed detail was left on
held-out people, docs/results.md). Where the checkpoint has a restorer (lipsync.restore), the paste then takes from
the restored face only what the crop can hold: the detail finer than that is the video's own.

    bank = texture_bank(frames, track, S)  # per avatar: coarse keys + fine detail of up to MAX_FRAMES frames
    lent = bank.detail(faces, shown, boxes)          # generated faces (B, 3, S, S) for source frames shown (B,) with
                                                     # crop boxes (B, 4) -> B x (top, left, (h, w, 3) frame px detail)
    paste(frame, crop, blend, texture=lent[k])       # added where the source's own detail is not (blend.keep_weight)

The keys are compared as zero-mean 8 x 8 luma patches, summed over the area, so the VAE's colour drift and a slow
change of light do not count.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .blend import place, round_trip
from .restore import MIN_UPSCALE
from .tracking import box_patch, pixel_box, to_crop_coords

PATCH = 8  # key patch side, S px
STRIDE = 4  # key patch step, S px; also the width, at S px, of the fade at the lent area's edges
SHIFT = 1  # S px: each patch is also looked up this far off its place, in each direction (the same mouth, moved)
EXCLUDE = 12  # frames within this many of the drawn one are never a source of detail (half a second at 25 fps)
MAX_FRAMES = 256  # frames in a bank, spread evenly over the video
LIPS = slice(48, 60)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) RGB -> (B, h, w) Rec. 601 luma."""
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def fade(n: int, edge: int) -> torch.Tensor:
    """(n,) weights: 1 inside, rising from 0 over `edge` samples at each end (the lent detail's border)."""
    i = torch.arange(n) + 0.5
    return torch.minimum(i, n - i).div(edge).clamp(max=1)


@dataclass
class TextureBank:
    frames: np.ndarray  # (N,) int64: the source frame of each entry
    coarse: torch.Tensor  # (N, S, S) float16 luma of each entry's crop
    fine: torch.Tensor  # (N, h, w, 3) float16 fine detail in frame px: a window centred on the entry's area
    area: tuple  # (top, left, gh, gw): the key patches' grid, its corner in S px and its size in patches
    margin: int  # frame px in `fine` beyond the largest face's area on each side, room for the moves
    shift: int = SHIFT
    _keys: torch.Tensor | None = field(default=None, repr=False)

    def patches(self, coarse: torch.Tensor, dy: int = 0, dx: int = 0) -> torch.Tensor:
        """Luma (B, S, S) -> (B, P, PATCH^2) zero-mean patches of the area moved by (dy, dx) px."""
        top, left, gh, gw = self.area
        k = coarse[:, top + dy: top + dy + (gh - 1) * STRIDE + PATCH, left + dx: left + dx + (gw - 1) * STRIDE + PATCH]
        p = F.unfold(k[:, None].float(), PATCH, stride=STRIDE).transpose(1, 2)  # (B, P, PATCH^2)
        return p - p.mean(-1, keepdim=True)

    def moves(self) -> list:
        """[(dy, dx), ...]: the M places, in S px, where each patch is looked up."""
        r = range(-self.shift, self.shift + 1)
        return [(dy, dx) for dy in r for dx in r]

    def keys(self) -> tuple:
        """Every entry's area at every move, as patches, made on first use (not stored on disk): (M N, P PATCH^2)
        float16, row m N + n for move m of entry n, and their squared norms (M N,) float32."""
        if self._keys is None:
            keys = torch.cat([self.patches(self.coarse, dy, dx).flatten(1) for dy, dx in self.moves()])
            self._keys = keys.half().contiguous(), (keys * keys).sum(-1)
        return self._keys

    def choose(self, faces: torch.Tensor, shown, exclude: int = EXCLUDE) -> torch.Tensor:
        """Faces (B, 3, S, S) in [0, 255] drawn for source frames shown (B,) -> (B,): the nearest entry and move,
        as m * N + n, among entries more than `exclude` frames away from the shown one (all entries when none is
        that far)."""
        q = self.patches(luma(faces.float())).flatten(1)  # (B, P PATCH^2)
        keys, norms = self.keys()
        n = len(self.frames)
        d = torch.cat([norms[k: k + n] - 2 * q @ keys[k: k + n].float().T
                       for k in range(0, len(keys), n)], -1)  # (B, M N): |key - q|^2 - |q|^2, a move at a time
        near = np.abs(self.frames[None, :] - np.asarray(shown)[:, None]) <= exclude  # (B, N)
        near[near.all(1)] = False
        near = torch.from_numpy(np.tile(near, len(self.moves())))  # (B, M N)
        return d.masked_fill(near, float("inf")).argmin(-1)

    def detail(self, faces: torch.Tensor, shown, boxes, exclude: int = EXCLUDE) -> list:
        """Faces (B, 3, S, S) in [0, 255] for source frames shown (B,) with crop boxes (B, 4) -> for each,
        (top, left, float (h, w, 3)): the chosen entry's fine detail over the face's area in frame pixels, moved as
        matched (to the nearest pixel) and faded out over its last STRIDE S px, with its corner at frame pixel
        (top, left)."""
        pick = self.choose(faces, shown, exclude)  # (B,)
        n, hs, ws, _ = self.fine.shape
        size, m, moves, out = self.coarse.shape[-1], self.margin, self.moves(), []
        for k, box in zip(pick.tolist(), boxes):
            (cy, cx), (h, w) = area_window(self.area, box, size)
            h, w = min(h, hs - 2 * m), min(w, ws - 2 * m)
            _, _, bw, bh = pixel_box(box)
            ky, kx = bh / size, bw / size  # frame px per S px
            dy, dx = moves[k // n]
            y = hs // 2 - h // 2 + int(np.clip(round(dy * ky), -m, m))  # the move, within the stored margin
            x = ws // 2 - w // 2 + int(np.clip(round(dx * kx), -m, m))
            weight = torch.outer(fade(h, STRIDE * ky), fade(w, STRIDE * kx))[..., None]  # (h, w, 1)
            out.append((*corner((cy, cx), h, w), self.fine[k % n, y: y + h, x: x + w].float() * weight))
        return out


def area_size(area) -> tuple:
    """The key area (top, left, gh, gw) -> its (height, width) in S px."""
    return (area[2] - 1) * STRIDE + PATCH, (area[3] - 1) * STRIDE + PATCH


def area_window(area, box, size: int) -> tuple:
    """The key area (top, left, gh, gw) in S px, on a face with crop box `box` -> its centre (y, x) in frame pixels
    and its size (h, w) in frame pixels, rounded."""
    top, left = area[:2]
    x0, y0, w, h = pixel_box(box)
    ah, aw = area_size(area)
    centre = y0 + (top + ah / 2) * h / size, x0 + (left + aw / 2) * w / size
    return centre, (round(ah * h / size), round(aw * w / size))


def corner(centre, h: int, w: int) -> tuple:
    """The integer corner (top, left) of an (h, w) window centred on `centre` (y, x): the bank's stored windows and
    the lent ones share it, so a frame's own detail lands on its own pixels."""
    return round(centre[0]) - h // 2, round(centre[1]) - w // 2


def texture_bank(frames, track, size: int, max_frames: int = MAX_FRAMES) -> TextureBank | None:
    """Source frames (N, H, W, 3) uint8 and their face track -> the avatar's TextureBank for crops of `size` px, or
    None when the faces are pasted at most MIN_UPSCALE times the crop (no detail finer than the crop to borrow)."""
    good = np.flatnonzero(track.face)
    sides = np.array([pixel_box(b)[2:] for b in track.boxes[good]], np.float64).reshape(-1, 2)  # (n, 2) w, h
    if not len(good) or float(np.median(sides[:, 1])) <= MIN_UPSCALE * size:
        return None
    pick = good[np.unique(np.linspace(0, len(good) - 1, min(max_frames, len(good))).round().astype(np.int64))]

    # the area: every frame's lips with the margins of blend.make_blend's mouth box and its fade, in crop px, with
    # room for the moves
    lips = to_crop_coords(track.landmarks[good][:, LIPS], track.boxes[good], size)  # (n, 12, 2)
    mw = float((lips[..., 0].max(1) - lips[..., 0].min(1)).max())
    lo, hi = SHIFT, size - PATCH - SHIFT  # the range of patch corners
    top = int(np.clip(np.floor(lips[..., 1].min() - 0.3 * mw), lo, hi))
    left = int(np.clip(np.floor(lips[..., 0].min() - 0.35 * mw), lo, hi))
    gh = int(np.clip(np.ceil((lips[..., 1].max() + 0.8 * mw - top - PATCH) / STRIDE) + 1, 1, (hi - top) // STRIDE + 1))
    gw = int(np.clip(np.ceil((lips[..., 0].max() + 0.35 * mw - left - PATCH) / STRIDE) + 1, 1,
                     (hi - left) // STRIDE + 1))
    area = (top, left, gh, gw)

    # every entry's fine detail in frame px (its pixels minus their trip through the crop, as blend.paste splits the
    # source), in a window as large as the largest face's area plus the moves, centred on the entry's own area
    margin = int(np.ceil(SHIFT * sides.max() / size))
    ah, aw = area_size(area)
    hs = round(ah * sides[:, 1].max() / size) + 2 * margin + 1
    ws = round(aw * sides[:, 0].max() / size) + 2 * margin + 1
    coarse, fine = [], torch.zeros(len(pick), hs, ws, 3, dtype=torch.float16)
    for k, i in enumerate(pick):
        x = torch.from_numpy(np.ascontiguousarray(box_patch(frames[i], track.boxes[i]))).permute(2, 0, 1)[None].float()
        small, low = round_trip(x, size, size)  # the crop at S px (1, 3, S, S), and back up (1, 3, h, w)
        coarse.append(luma(small)[0].half())
        top, left = corner(area_window(area, track.boxes[i], size)[0], hs, ws)
        x0, y0 = pixel_box(track.boxes[i])[:2]
        place(fine[k], (x - low)[0].permute(1, 2, 0).half(), y0 - top, x0 - left)
    return TextureBank(pick, torch.stack(coarse), fine, area, margin)
