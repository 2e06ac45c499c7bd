"""Reference alignment (lipsync.align): the similarity is fitted on the eyes and nose only, and the warp puts the
reference's pixels where that similarity sends them."""

import numpy as np
import torch

from lipsync.align import STABLE, reference_maps, similarity, warp
from lipsync.tracking import template_landmarks


def moved(points, scale, angle, shift):
    c, s = np.cos(angle), np.sin(angle)
    return scale * points @ np.array([[c, -s], [s, c]]).T + np.asarray(shift)


def test_the_similarity_is_recovered_and_ignores_everything_but_the_eyes_and_nose():
    ref = template_landmarks((10, 10, 110, 120)).astype(np.float64)
    frame = moved(ref, 0.8, 0.1, (5.0, -3.0))
    frame[48:68] += np.array([0.0, 9.0])  # the mouth opens
    frame[0:17] += np.array([0.0, 6.0])  # the jaw drops with it
    m = reference_maps(ref[None], frame[None])[0]
    np.testing.assert_allclose(m @ np.append(ref[30], 1.0), frame[30], atol=1e-9)  # the nose tip lands on the nose
    np.testing.assert_allclose(m, similarity(ref[STABLE], frame[STABLE]), atol=1e-12)
    expect = moved(np.eye(2), 0.8, 0.1, (0, 0)).T
    np.testing.assert_allclose(m[:, :2], expect, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], (5.0, -3.0), atol=1e-9)


def test_the_warp_puts_each_reference_pixel_where_the_map_sends_it():
    size = 32
    img = torch.zeros(2, 1, size, size)
    img[:, 0, 10, 12] = 1.0  # pixel (x 12, y 10): its centre is (12.5, 10.5)
    shift = np.array([[[1.0, 0, 3], [0, 1, -4]], [[2.0, 0, 0], [0, 2, 0]]])  # a shift; a 2x zoom about the corner
    out = warp(img, shift, size)
    assert out[0, 0, 6, 15] == 1.0 and out[0].sum() == 1.0  # (12.5, 10.5) + (3, -4) -> pixel (15, 6)
    assert out[1, 0, 20:22, 24:26].min() > 0.2  # the dot, 2x as wide, centred on (25, 21)
    assert np.unravel_index(out[1, 0].argmax(), (size, size)) in [(20, 24), (20, 25), (21, 24), (21, 25)]
    same = warp(img, np.tile(np.eye(2, 3), (2, 1, 1)), size)
    torch.testing.assert_close(same, img, atol=1e-6, rtol=0)
