"""Image losses and the patch discriminator for MuseTalk v1.5 training (docs/musetalk.md §7).

- `image_pyramid`: bilinear resize to 224 (configurable), then scales [1, .5, .25, .125], each made by a Gaussian blur
  (sigma = (1/s - 1)/2, kernel 2*round(4 sigma) + 1, reflect padding) and taking every (1/s)-th pixel
  (first-order-motion-model's AntiAliasInterpolation2d, which MuseTalk copies; it zero-pads instead).
- `VGG19`: the torchvision vgg19 `features` stack with the same module indices, so a local torchvision state dict
  loads into it unchanged; returns relu1_1 .. relu5_1.
- `PerceptualLoss`: with VGG weights, MuseTalk's VGG19 pyramid loss; without them (the default, since nothing is
  downloaded here) a multi-scale L1 + SSIM pyramid. `.name` says which one runs.
- `PatchDiscriminator` (pix2pix-style, spectral norm), LSGAN losses, feature matching, differentiable `mouth_crops`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from lipsync.blend import gaussian_kernel

PYRAMID_SCALES = (1.0, 0.5, 0.25, 0.125)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision vgg19 ("E") layout: numbers are 3x3 conv widths (each followed by ReLU), "M" is a 2x2 max pool.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG19_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))  # features[a:b] ends at relu1_1 .. relu5_1


# ----------------------------------------------------------------------------- blur, pyramid, SSIM


def _separable(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Depthwise 'valid' convolution of (B, C, H, W) with the outer product k x k."""
    C = x.shape[1]
    k = k.to(x.device, x.dtype)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)


def antialias_downsample(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Gaussian blur (sigma = (1/s - 1)/2, kernel 2*round(4 sigma) + 1) then keep every (1/s)-th pixel."""
    if scale == 1:
        return x
    step = round(1 / scale)
    sigma = (1 / scale - 1) / 2
    size = 2 * round(4 * sigma) + 1
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return _separable(x, gaussian_kernel(sigma, size // 2))[..., ::step, ::step]


def image_pyramid(x: torch.Tensor, scales=PYRAMID_SCALES, size: int | None = 224) -> list[torch.Tensor]:
    """(B, C, H, W) -> [(B, C, size*s, size*s) for s in scales]; size=None keeps H x W."""
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return [antialias_downsample(x, s) for s in scales]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) over channels and the 'valid' region of a Gaussian window; computed in float32.
    data_range = 2 for images in [-1, 1]. Needs H, W >= window."""
    x, y = x.float(), y.float()
    k = gaussian_kernel(sigma, window // 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _separable(x, k), _separable(y, k)
    vx = _separable(x * x, k) - mx * mx
    vy = _separable(y * y, k) - my * my
    cxy = _separable(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()


# ----------------------------------------------------------------------------- VGG19 perceptual loss


class VGG19(nn.Module):
    """torchvision vgg19 `features` (keys features.{i}.weight/bias, 16 convs) -> [relu1_1, ..., relu5_1].

    Input is an image in [-1, 1]. musetalk_range=False maps it to [0, 1] and then applies ImageNet mean/std, which is
    what the weights expect. musetalk_range=True reproduces MuseTalk's quirk of applying ImageNet mean/std to the
    [-1, 1] image directly (darker, lower-contrast input than the network was trained on).
    """

    def __init__(self, musetalk_range: bool = False):
        super().__init__()
        layers, c = [], 3
        for v in VGG19_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.musetalk_range = musetalk_range
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load(self, path: str) -> "VGG19":
        """Load a torchvision vgg19 state dict (full model: features.* kept, classifier.* ignored; or features only)."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if any(k.startswith("features.") for k in sd):
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        self.features.load_state_dict(sd, strict=True)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.musetalk_range:
            x = (x + 1) / 2
        h, out = (x - self.mean) / self.std, []
        for a, b in VGG19_SLICES:
            h = self.features[a:b](h)  # (B, 3, H, W) -> (B, 64, H, W) -> ... -> (B, 512, H/16, W/16)
            out.append(h)
        return out


class PerceptualLoss(nn.Module):
    """Pyramid perceptual loss between pred and target images in [-1, 1] (target is detached).

    vgg_path given: MuseTalk's loss, sum over pyramid scales of mean_l |VGG_l(pred) - VGG_l(target)| (relu1_1..5_1,
    equal layer weights). MuseTalk weights it 0.01 next to pixel L1.
    vgg_path None: no pretrained network; sum over scales of L1 + (1 - SSIM) on the pyramid images (SSIM skipped at
    scales smaller than its 11-px window). Its magnitude is ~0.1-1, far below VGG feature distances, so the weight
    that suits the VGG loss is not the right one for it.
    """

    def __init__(self, vgg_path: str | None = None, size: int | None = 224, scales=PYRAMID_SCALES,
                 musetalk_range: bool = False):
        super().__init__()
        self.size, self.scales = size, tuple(scales)
        self.vgg = None
        if vgg_path is not None:
            self.vgg = VGG19(musetalk_range).load(vgg_path).requires_grad_(False).eval()
            rng = ", musetalk [-1,1] input quirk" if musetalk_range else ""
            self.name = f"vgg19 pyramid ({vgg_path}{rng})"
        else:
            self.name = "l1+ssim pyramid (no VGG weights)"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pp = image_pyramid(pred, self.scales, self.size)
        tp = image_pyramid(target.detach(), self.scales, self.size)
        loss = pred.new_zeros(())
        if self.vgg is not None and min(pp[-1].shape[-2:]) < 16:
            raise ValueError(f"the VGG pyramid needs >= 16 px at its smallest scale (relu5_1 is 1/16), got "
                             f"{tuple(pp[-1].shape[-2:])}: use size=224 (MuseTalk) or at least 128")
        for p, t in zip(pp, tp):
            if self.vgg is not None:
                fp, ft = self.vgg(p), self.vgg(t)
                loss = loss + sum(F.l1_loss(a, b.detach()) for a, b in zip(fp, ft)) / len(fp)
            else:
                loss = loss + F.l1_loss(p, t)
                if min(p.shape[-2:]) >= 11:
                    loss = loss + 1 - ssim(p, t)
        return loss


# ----------------------------------------------------------------------------- GAN


class DownBlock(nn.Module):
    """conv 4x4 (no padding, spectral norm) -> InstanceNorm(affine) unless first -> LeakyReLU(0.2) -> AvgPool 2."""

    def __init__(self, cin: int, cout: int, norm: bool, pool: bool):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(cin, cout, 4))
        self.norm = nn.InstanceNorm2d(cout, affine=True) if norm else nn.Identity()
        self.pool = pool

    def forward(self, x):
        x = F.leaky_relu(self.norm(self.conv(x)), 0.2)
        return F.avg_pool2d(x, 2) if self.pool else x


class PatchDiscriminator(nn.Module):
    """pix2pix-style PatchGAN (MuseTalk/FOMM `Discriminator`). 256 px input -> 26 x 26 logits (224 -> 22 x 22).
    Returns (list of the 4 block outputs, logits (B, 1, h, w))."""

    def __init__(self, in_channels: int = 3, channels=(64, 128, 256, 512)):
        super().__init__()
        cins = (in_channels,) + tuple(channels[:-1])
        n = len(channels)
        self.blocks = nn.ModuleList(DownBlock(a, b, norm=i > 0, pool=i < n - 1)
                                    for i, (a, b) in enumerate(zip(cins, channels)))
        self.conv = spectral_norm(nn.Conv2d(channels[-1], 1, 1))

    def forward(self, x: torch.Tensor):
        feats = []
        for block in self.blocks:
            x = block(x)  # (B, 3, 256, 256) -> (B, 64, 126, 126) -> ... -> (B, 512, 26, 26)
            feats.append(x)
        return feats, self.conv(x)


def lsgan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean (1 - D(real))^2 + mean D(fake)^2 (pass fake images detached)."""
    return ((1 - real_logits) ** 2).mean() + (fake_logits ** 2).mean()


def lsgan_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """mean (1 - D(fake))^2."""
    return ((1 - fake_logits) ** 2).mean()


def feature_matching(real_feats, fake_feats, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """sum_i w_i mean |F_i(real) - F_i(fake)|, real features detached."""
    return sum(w * F.l1_loss(f, r.detach()) for w, r, f in zip(weights, real_feats, fake_feats))


# ----------------------------------------------------------------------------- mouth crops


def mouth_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable per-sample crop + bilinear resize. images (B, C, H, W); boxes (B, 4) float x1, y1, x2, y2
    in pixel-edge coordinates (pixel i spans [i, i+1)). -> (B, C, size, size); outside the image repeats the edge.
    Bilinear sampling does not anti-alias, so boxes much larger than `size` alias (mouth boxes are usually smaller)."""
    B, _, H, W = images.shape
    x1, y1, x2, y2 = boxes.to(images).unbind(1)
    zero = torch.zeros_like(x1)
    # affine map from output [-1, 1] coords to input coords: u_in = u_out * (x2 - x1) / W + (x1 + x2) / W - 1
    theta = torch.stack([torch.stack([(x2 - x1) / W, zero, (x1 + x2) / W - 1], -1),
                         torch.stack([zero, (y2 - y1) / H, (y1 + y2) / H - 1], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, 1, size, size], align_corners=False)  # (B, size, size, 2) in [-1, 1]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
