"""The training augmentation: one draw, the same transform on target and reference, each part doing its job."""

import numpy as np
import pytest
import torch

from lipsync.training.augment import AugmentConfig, apply, draw, map_points

OFF = dict(hue=0, saturation=0, brightness=0, contrast=0, white_balance=0, scale=0, shift=0, rotate=0, flip=0,
           blur=0, noise=0, jpeg=0)


def face_like(seed=0, size=64):
    """A smooth random image (1, 3, S, S) in [-1, 1] with some structure, so warps and colour changes show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bilinear",
                                        align_corners=False)
    return x * 1.6 - 0.8


def test_target_and_reference_get_the_same_transform():
    img = face_like()
    for seed in range(6):
        params = draw(np.random.default_rng(seed), AugmentConfig(p=1.0, blur=1.0, jpeg=1.0))
        out = apply(torch.cat([img, img]), params)  # the target and a reference showing the same pixels
        assert torch.equal(out[0], out[1])
        assert (out[0] - img[0]).abs().mean() > 0.01  # and it did change the image


def test_the_transform_is_per_image_not_a_function_of_the_batch():
    a, b = face_like(1), face_like(2)
    params = draw(np.random.default_rng(3), AugmentConfig(p=1.0, blur=1.0, jpeg=0.0))
    pair = apply(torch.cat([a, b]), params)
    assert torch.allclose(pair[0], apply(a, params)[0], atol=1e-6)
    assert torch.allclose(pair[1], apply(b, params)[0], atol=1e-6)


def test_no_draw_leaves_the_images_alone():
    img = face_like()
    assert draw(np.random.default_rng(0), AugmentConfig(p=0.0)) is None
    assert torch.equal(apply(img, None), img)
    params = draw(np.random.default_rng(0), AugmentConfig(p=1.0, **OFF))
    assert torch.allclose(apply(img, params), img, atol=1e-5)


@pytest.mark.parametrize("name, value", [("hue", 0.1), ("saturation", 1.4), ("brightness", 0.2),
                                         ("contrast", 1.3), ("gains", np.array([1.1, 1.0, 0.9]))])
def test_each_colour_jitter_changes_colour_but_not_geometry(name, value):
    img = face_like()
    params = {**draw(np.random.default_rng(5), AugmentConfig(p=1.0, **OFF)), name: value}
    out = apply(img, params)
    assert (out - img).abs().mean() > 0.005
    # colour maps are per pixel: where the input is constant, so is the output
    flat = torch.full_like(img, 0.1)
    o = apply(flat, params)
    assert torch.allclose(o, o[:, :, :1, :1].expand_as(o), atol=1e-6)


def test_geometry_moves_points_where_map_points_says():
    size = 64
    for seed in range(4):
        params = draw(np.random.default_rng(seed), AugmentConfig(p=1.0, **{**OFF, "scale": 0.1, "shift": 0.05,
                                                                          "rotate": 8.0, "flip": 0.5}))
        x, y = 20, 27
        img = torch.full((1, 3, size, size), -1.0)
        img[:, :, y - 1:y + 2, x - 1:x + 2] = 1.0  # a 3 px bright dot
        out = apply(img, params)[0, 0]
        ys, xs = np.nonzero(out.numpy() > 0)
        w = out.numpy()[ys, xs] + 1
        found = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()]) + 0.5  # pixel i spans [i, i + 1)
        assert np.abs(found - map_points(params, np.array([x + 0.5, y + 0.5], np.float32), size)).max() < 0.75


def test_flip_mirrors_left_and_right():
    img = face_like()
    params = draw(np.random.default_rng(0), AugmentConfig(p=1.0, **{**OFF, "flip": 1.0}))
    assert params["flip"]
    assert torch.allclose(apply(img, params), img.flip(-1), atol=1e-5)


# ----------------------------------------------------------------------------- in the datasets


@pytest.fixture(scope="module")
def still_root(tmp_path_factory):
    """One synthetic clip whose frames are all the same picture: a reference shows exactly the target's pixels."""
    from lipsync.tools import synthetic
    root = tmp_path_factory.mktemp("still")
    synthetic.main(["--out", str(root), "--clips", "1", "--seconds", "2", "--heldout", "0", "--workers", "1"])
    clip = next(root.iterdir())
    crops = np.load(clip / "crops.npy")
    np.save(clip / "crops.npy", np.repeat(crops[:1], len(crops), 0))
    return root


def test_dataset_item_target_and_reference_get_the_same_draw(still_root):
    from lipsync.training.data import Stage1Dataset
    plain = Stage1Dataset(still_root, "train", seed=0)
    aug = Stage1Dataset(still_root, "train", seed=0, augment=AugmentConfig(p=1.0, blur=1.0, jpeg=1.0))
    changed = 0
    for i in range(6):
        a, p = aug[i], plain[i]
        assert a["ref_frame"] != a["frame"]
        assert torch.equal(a["target"], a["reference"])  # the same pixels in, the same pixels out
        lower = a["target"].shape[-1] // 2
        assert torch.equal(a["masked"][:, :lower], a["target"][:, :lower])  # masked = the augmented target ...
        assert (a["masked"][:, lower:] == -1).all()  # ... with its lower half blacked out
        changed += int((a["target"] - p["target"]).abs().mean() > 0.01)
    assert changed == 6


@pytest.mark.parametrize("stage", [1, 2])
def test_mouth_box_follows_a_flip(still_root, stage):
    from lipsync.training.data import Stage1Dataset, Stage2Dataset
    flip = AugmentConfig(p=1.0, **{**OFF, "flip": 1.0})
    make = (lambda **kw: Stage1Dataset(still_root, "train", seed=0, **kw)) if stage == 1 else \
        (lambda **kw: Stage2Dataset(still_root, "train", T=5, seed=0, **kw))
    a, b = make()[0], make(augment=flip)[0]
    size = a["target"].shape[-1]
    assert torch.allclose(b["target"], a["target"].flip(-1), atol=1e-5)
    x1, y1, x2, y2 = a["mouth_box"].unbind(-1)
    assert torch.allclose(b["mouth_box"], torch.stack([size - x2, y1, size - x1, y2], -1), atol=0.6)
