"""Image pyramid, SSIM, VGG19 layout, perceptual loss, patch discriminator, GAN losses, mouth crops
(lipsync/losses.py). Oracles: scipy.ndimage for blur and SSIM, torchvision's vgg19 layout as hard-coded shapes."""

import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from scipy.ndimage import gaussian_filter

from lipsync.training.losses import (VGG19, PatchDiscriminator, PerceptualLoss, antialias_downsample, feature_matching,
                            image_pyramid, lsgan_d_loss, lsgan_g_loss, mouth_crops, ssim)

# torchvision.models.vgg19().features: conv index -> weight shape (16 convs; ReLU/MaxPool have no parameters).
VGG19_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512), 25: (512, 512), 28: (512, 512),
    30: (512, 512), 32: (512, 512), 34: (512, 512),
}


def checkerboard(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return ((i.view(-1, 1) + i.view(1, -1)) % 2 * 2 - 1).float().expand(1, 3, n, n).clone()


def test_pyramid_resizes_then_halves():
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert [tuple(p.shape) for p in image_pyramid(x)] == [(2, 3, s, s) for s in (224, 112, 56, 28)]
    assert [p.shape[-1] for p in image_pyramid(x[..., :64, :64], size=None)] == [64, 32, 16, 8]


def test_pyramid_antialiasing_removes_checkerboard_energy_but_keeps_smooth_content():
    levels = image_pyramid(checkerboard(64), size=None)
    energy = [p.pow(2).mean().item() for p in levels]
    assert energy[0] == pytest.approx(1.0)
    assert checkerboard(64)[..., ::2, ::2].pow(2).mean() == 1  # plain subsampling would alias it to a constant
    assert energy[1] < 0.15 and energy[2] < 1e-6 and energy[3] < 1e-6, energy  # sigma 0.5 at s=.5 is a mild blur
    u = torch.arange(64.0)
    smooth = torch.sin(2 * np.pi * u / 64).view(1, 1, 1, -1).expand(1, 3, 64, 64)
    half = antialias_downsample(smooth, 0.5)
    assert half.pow(2).mean() > 0.9 * smooth.pow(2).mean()


@pytest.mark.parametrize("scale", [0.5, 0.25, 0.125])
def test_antialias_downsample_matches_scipy_gaussian(scale):
    x = torch.rand(1, 2, 48, 40, generator=torch.Generator().manual_seed(0))
    sigma = (1 / scale - 1) / 2
    radius = round(4 * sigma)  # kernel 2 * round(4 sigma) + 1
    ref = gaussian_filter(x.double().numpy(), (0, 0, sigma, sigma), mode="mirror", truncate=radius / sigma)
    step = round(1 / scale)
    np.testing.assert_allclose(antialias_downsample(x, scale).numpy(), ref[..., ::step, ::step], atol=1e-5)


def ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. SSIM with scipy's Gaussian (sigma 1.5, radius 5 = 11 taps), mean over the valid region."""
    blur = lambda a: gaussian_filter(a, (0, 0, 1.5, 1.5), truncate=5 / 1.5)[..., 5:-5, 5:-5]  # noqa: E731
    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("noise", [0.1, 0.5, 2.0])
def test_ssim_matches_scipy_reference(noise):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 36, generator=g) * 2 - 1
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ref = ssim_reference(x.numpy(), y.numpy(), 2.0)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-4)
    assert ref < 0.99  # the case is not trivially near 1


def test_vgg19_keys_and_shapes_match_torchvision_features_layout():
    sd = VGG19().state_dict()
    expected = {}
    for i, (cout, cin) in VGG19_CONVS.items():
        expected[f"features.{i}.weight"] = (cout, cin, 3, 3)
        expected[f"features.{i}.bias"] = (cout,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def fake_torchvision_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (cout, cin) in VGG19_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    sd["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # ignored (real one: 4096 x 25088)
    sd["classifier.0.bias"] = torch.zeros(8)
    return sd


def test_vgg19_loads_torchvision_state_dict_and_features_only_dict(tmp_path):
    sd = fake_torchvision_state_dict()
    torch.save(sd, tmp_path / "vgg19.pth")
    vgg = VGG19().load(str(tmp_path / "vgg19.pth"))
    torch.testing.assert_close(vgg.features[34].weight, sd["features.34.weight"])
    torch.save({k[9:]: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "f.pth")
    torch.testing.assert_close(VGG19().load(str(tmp_path / "f.pth")).features[0].bias, sd["features.0.bias"])
    feats = vgg(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                                   (512, 2, 2)]


def test_vgg19_maps_minus_one_one_to_unit_range_and_musetalk_quirk_does_not():
    torch.manual_seed(0)
    correct, quirk = VGG19(), VGG19(musetalk_range=True)
    quirk.load_state_dict(correct.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(correct(x)[1], quirk((x + 1) / 2)[1])
    assert not torch.allclose(correct(x)[1], quirk(x)[1])


def test_default_perceptual_loss_is_l1_ssim_pyramid_and_says_so():
    loss = PerceptualLoss(size=64)
    assert "ssim" in loss.name and "vgg" not in loss.name.lower().replace("no vgg", "")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    pred = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    value = loss(pred, x)
    levels = zip(image_pyramid(pred, size=64), image_pyramid(x, size=64))
    manual = sum((p - t).abs().mean() + (1 - ssim(p, t) if p.shape[-1] >= 11 else 0) for p, t in levels)
    torch.testing.assert_close(value, manual)
    value.backward()
    assert pred.grad.abs().sum() > 0


def test_vgg_perceptual_loss_uses_loaded_weights(tmp_path):
    torch.save(fake_torchvision_state_dict(), tmp_path / "vgg19.pth")
    loss = PerceptualLoss(str(tmp_path / "vgg19.pth"), size=32, scales=(1, 0.5))
    assert loss.name.startswith("vgg19") and not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(1, 3, 40, 40) * 2 - 1
    y = x.flip(-1)
    manual = 0
    for p, t in zip(image_pyramid(x, (1, 0.5), 32), image_pyramid(y, (1, 0.5), 32)):
        manual = manual + sum((a - b).abs().mean() for a, b in zip(loss.vgg(p), loss.vgg(t))) / 5
    torch.testing.assert_close(loss(x, y), manual)
    assert loss(x, x).item() == 0
    with pytest.raises(ValueError, match="16 px"):
        PerceptualLoss(str(tmp_path / "vgg19.pth"), size=64)(x, y)  # 8 px at scale 1/8 has no relu5_1


def test_patch_discriminator_default_gives_26x26_patches_at_256_with_spectral_norm():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    convs = [b.conv for b in d.blocks] + [d.conv]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert [c.weight.shape[:2] for c in convs] == [(64, 3), (128, 64), (256, 128), (512, 256), (1, 512)]
    with torch.no_grad():
        feats, logits = d(torch.randn(1, 3, 256, 256))
        assert logits.shape == (1, 1, 26, 26)
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 126, 126), (128, 61, 61), (256, 29, 29), (512, 26, 26)]
        assert d(torch.randn(1, 3, 224, 224))[1].shape == (1, 1, 22, 22)


def test_spectral_norm_keeps_largest_singular_value_near_one():
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=(8, 16, 16, 32))
    for _ in range(30):  # power iteration advances once per training-mode forward
        d(torch.randn(1, 3, 64, 64))
    for conv in [b.conv for b in d.blocks] + [d.conv]:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    assert d(torch.randn(2, 3, 64, 64))[1].shape == (2, 1, 2, 2)


def test_lsgan_losses_on_known_logits():
    ones, zeros, half = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    assert lsgan_d_loss(ones, zeros).item() == 0
    assert lsgan_d_loss(zeros, ones).item() == 2
    assert lsgan_d_loss(half, half).item() == pytest.approx(0.5)
    assert lsgan_g_loss(zeros).item() == 1 and lsgan_g_loss(ones).item() == 0
    assert lsgan_g_loss(torch.full((3, 1, 2, 2), 3.0)).item() == 4


def test_feature_matching_zero_for_identical_and_weighted_l1_otherwise():
    feats = [torch.randn(2, c, 5, 5) for c in (4, 8, 8, 16)]
    assert feature_matching(feats, [f.clone() for f in feats]).item() == 0
    shifted = [f + 0.5 for f in feats]
    assert feature_matching(feats, shifted, (1, 2, 0, 1)).item() == pytest.approx(0.5 * 4)


def test_mouth_crops_cut_the_box_per_sample_and_pass_gradients():
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, 20:30, 40:50] = 1
    images[1, :, 8:24, 4:20] = torch.arange(16.0).view(1, 1, 16)
    images.requires_grad_(True)
    boxes = torch.tensor([[40.0, 20, 50, 30], [4, 8, 20, 24]])
    crops = mouth_crops(images, boxes, 10)
    assert crops.shape == (2, 3, 10, 10)
    torch.testing.assert_close(crops[0], torch.ones(3, 10, 10))
    crops16 = mouth_crops(images, boxes, 16)
    torch.testing.assert_close(crops16[1], images[1, :, 8:24, 4:20].detach())
    crops.sum().backward()
    grad = images.grad[0, 0]
    assert grad[20:30, 40:50].sum() > 0 and grad.sum() == grad[20:30, 40:50].sum()

