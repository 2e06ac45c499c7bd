"""One optimisation step's worth of maths for each training stage, kept out of train.py's bookkeeping.

Stages (docs/musetalk.md §7): `vae` (our own small AutoencoderKL, since sd-vae-ft-mse cannot be downloaded here),
`syncnet` (BCE on in-sync vs shifted audio), `stage1` (single frames: L1 + perceptual pyramid) and `stage2`
(T consecutive frames: + LSGAN on face and mouth crops with feature matching, + SyncNet loss from the frozen SyncNet).
Every function takes a batch dict from lipsync.training.data and returns (loss, {name: float}) for logging.
"""

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.training.losses import feature_matching, lsgan_d_loss, lsgan_g_loss, mouth_crops
from lipsync.training.syncnet import lower_half, sync_loss, sync_pairs, syncnet_bce
from lipsync.windows import span_windows


def lr_lambda(warmup: int, total: int, floor: float = 0.0):
    """Linear warm-up, then linear decay to `floor` x the base lr at `total` (diffusers' 'linear' when floor=0)."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(floor, 1.0 - (1.0 - floor) * (step - warmup) / max(1, total - warmup))
    return f


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, lower_weight: float) -> torch.Tensor:
    """Mean |pred - target| with the lower half (the inpainted rows) weighted `lower_weight`x, normalised."""
    S = pred.shape[-2]
    w = torch.ones(S, 1, device=pred.device, dtype=pred.dtype)
    w[S // 2:] = lower_weight
    return ((pred - target).abs() * w).mean() / w.mean()


PER_FRAME = ("target", "masked", "reference", "mel", "audio", "mouth_box")


def frames_of(batch: dict) -> dict:
    """Stage-2 batches hold (B, T, ...) per-frame tensors: flatten them to (B T, ...). Stage-1 batches pass."""
    if batch["target"].dim() == 4:
        return batch
    return {k: v.flatten(0, 1) if k in PER_FRAME else v for k, v in batch.items()}


class Objective(torch.nn.Module):
    """`fn(module, *args)` as a module's forward, so DistributedDataParallel sees every parameter use in forward."""

    def __init__(self, module: torch.nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


# ----------------------------------------------------------------------------- vae


def vae_step(vae, batch, perceptual, kl_weight=1e-6, perceptual_weight=0.1):
    x = torch.cat([batch["target"], batch["reference"]])  # (2B, 3, S, S)
    post = vae.encode(x)  # raw latents: this stage trains the AutoencoderKL itself, its scale is set after it
    # the posterior mean, as the UNet path sees it (FaceVAE.encode): with a 1e-6 KL weight, sampling buries the
    # low-variance latent channels (colour) in unit noise early on, and the decoder learns to ignore them
    rec = vae.decode(post.mean)
    rec_l1 = F.l1_loss(rec, x)
    p = perceptual(rec, x)
    kl = post.kl().mean()
    loss = rec_l1 + perceptual_weight * p + kl_weight * kl
    return loss, {"l1": rec_l1.item(), "perceptual": p.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scale(vae, batches) -> float:
    """1 / std of posterior means over a few batches: the scaling factor that gives unit-variance latents
    (sd-vae-ft-mse's 0.18215 was found the same way)."""
    z = torch.cat([vae.encode(b["target"]).mean.flatten() for b in batches])
    return float(1.0 / z.std())


# ----------------------------------------------------------------------------- syncnet


def syncnet_step(syncnet, batch, n_frames: int, context: int, generator=None):
    """batch from Stage2Dataset(T = n_frames + 2 context): the middle n_frames are the video, the whole mel span
    gives positives (centre) and same-clip shifted negatives."""
    frames = lower_half(batch["target"][:, context:context + n_frames])  # (B, T, 3, S/2, S)
    frames, mel, labels = sync_pairs(frames, batch["sync_mel"], n_frames, generator=generator)
    loss = syncnet_bce(syncnet, frames, mel, labels)
    with torch.no_grad():
        cos = syncnet(frames.repeat(2, 1, 1, 1, 1), mel)
        acc = ((cos > 0.5).float() == labels).float().mean()
    return loss, {"bce": loss.item(), "acc": acc.item()}


# ----------------------------------------------------------------------------- generator


def augment_mel(mel: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random per-sample changes that real speech brings and formant synthesis does not: level (+-10 dB), a smooth
    EQ tilt/bump (+-2 dB), a shift of up to 4 mel bins (speaker/formant scale) and a noise floor. mel (N, 80, M) is
    whisper-scaled log-mel ((log10 power + 4) / 4), applied to a fraction p of the samples."""
    N, B, _ = mel.shape

    def u(*shape):
        return torch.rand(*shape, generator=generator).to(mel.device, mel.dtype)
    on = (u(N) < p)[:, None, None]
    gain = (u(N) - 0.5) * 0.5  # +-10 dB in power = +-1 decade / 4
    f = torch.linspace(0, 1, B, device=mel.device, dtype=mel.dtype)
    eq = ((u(N, 1) - 0.5) * 0.1 * torch.cos(torch.pi * f) + (u(N, 1) - 0.5) * 0.1 * torch.cos(2 * torch.pi * f))
    shift = (torch.rand(N, generator=generator) * 9).long() - 4
    idx = (torch.arange(B)[None] - shift[:, None]).clamp(0, B - 1).to(mel.device)  # (N, 80)
    out = mel.gather(1, idx[:, :, None].expand_as(mel)) + gain[:, None, None] + eq[:, :, None]
    floor = mel.amin(dim=(1, 2), keepdim=True) + u(N, 1, 1) * 0.75
    out = torch.maximum(out, floor)
    return torch.where(on, out, mel)


def batch_windows(model, batch, mel_context: int):
    """The audio windows (N, n L, D) of a flattened batch (before the positional encoding, which LipSync.forward adds):
    its mel spans (N, 80, 2 (n + 2c)) through the model's trainable MelEncoder (windows.span_windows), or the
    precomputed whisper windows (N, n L, 384)."""
    if "mel" in batch:
        n = batch["mel"].shape[-1] // 2 - 2 * mel_context
        return span_windows(model.audio, batch["mel"], mel_context, n)
    return batch["audio"]


def generate_batch(model, batch, mel_context: int):
    """Flattened batch -> generated faces (N, 3, S, S). The frozen VAE encodes [masked target, reference]."""
    with torch.no_grad():
        unet_in = model.face.unet_input(batch["target"], batch["reference"])  # (N, 8, s, s), scaled latents
    return model(unet_in, batch_windows(model, batch, mel_context))


def mouth_l1(a, b, boxes) -> torch.Tensor:
    """L1 between the mouth crops (half the face's side) of two face batches (N, 3, S, S); boxes (N, 4)."""
    size = a.shape[-1] // 2
    return F.l1_loss(mouth_crops(a, boxes, size), mouth_crops(b, boxes, size))


def keep_loss(model, teacher, batch, mel_context: int, mouth_weight: float, n: int) -> torch.Tensor:
    """How far a fine-tune has drifted from its --init model (`teacher`) on infer.py's inputs: the first n frames
    of the batch, each its own reference (as infer.py dubs a video), with the batch's audio. L1 between the two
    generated faces (N, 3, S, S) plus mouth_weight x L1 between their mouth crops; the teacher's face is the
    target, the real frame is never seen (with itself as reference it would teach copying, not lip-sync).
    Both share one VAE encoding: a fine-tune's VAE is frozen, and the teacher decodes with it too (train.py)."""
    own = {k: batch[k][:n] for k in ("target", "mel", "audio", "mouth_box") if k in batch}
    with torch.no_grad():
        unet_in = model.face.unet_input(own["target"])  # (n, 8, s, s), reference = the frame itself
        want = teacher(unet_in, batch_windows(teacher, own, mel_context))
    got = model(unet_in, batch_windows(model, own, mel_context))
    return F.l1_loss(got, want) + mouth_weight * mouth_l1(got, want, own["mouth_box"])


# what a step draws besides its batch: each stream has its own generator per (seed, step, rank)
SYNC_NEGATIVES, MEL_AUGMENT = 1, 2


def step_generator(seed: int, step: int, rank: int, *stream: int) -> torch.Generator:
    """The generator for `stream` (ints: which draw, e.g. MEL_AUGMENT and the micro-batch) at `step` on `rank`: a
    function of those numbers alone (ints hash the same in every process), so replicas and micro-batches draw
    differently and a repeated or resumed step draws the same again."""
    return torch.Generator().manual_seed(hash((seed, step, rank) + stream) % (2 ** 63))


def generator_losses(model, batch, cfg, perceptual, step, discs=None, syncnet=None, teacher=None, rank=0, micro=0):
    """Stage 1 (discs/syncnet None) or stage 2 generator loss; with a teacher (the --init model of a fine-tune) and
    cfg.loss.keep > 0, + keep_loss on half the batch; mel augmentation drawn for (seed, step, rank, micro-batch).
    Returns (loss, logs, generated, target)."""
    B, T = batch["target"].shape[:2] if batch["target"].dim() == 5 else (batch["target"].shape[0], 1)
    batch = frames_of(batch)
    if cfg.augment.mel and "mel" in batch:
        g = step_generator(cfg.seed, step, rank, MEL_AUGMENT, micro)
        batch = dict(batch, mel=augment_mel(batch["mel"], cfg.augment.mel, g))
    pred, target = generate_batch(model, batch, cfg.mel_context), batch["target"]
    l1 = weighted_l1(pred, target, cfg.loss.lower)
    p = perceptual(pred, target)
    loss = cfg.loss.l1 * l1 + cfg.loss.perceptual * p
    logs = {"l1": l1.item(), "perceptual": p.item()}
    if cfg.loss.mouth > 0:  # the lips are a few % of the crop: an L1 of their own makes the audio matter
        m = mouth_l1(pred, target, batch["mouth_box"])
        loss = loss + cfg.loss.mouth * m
        logs["mouth"] = m.item()
    if teacher is not None and cfg.loss.keep > 0:
        k = keep_loss(model, teacher, batch, cfg.mel_context, cfg.loss.mouth, max(1, target.shape[0] // 2))
        loss = loss + cfg.loss.keep * k
        logs["keep"] = k.item()
    if discs is not None:
        gate = 1.0 if step >= cfg.start_gan else 0.0
        S = target.shape[-1]
        boxes = batch["mouth_box"]
        pairs = {"face": (pred, target),
                 "mouth": (mouth_crops(pred, boxes, S), mouth_crops(target, boxes, S))}
        for name, (fake, real) in pairs.items():
            fake_feats, fake_logits = discs[name](fake)
            with torch.no_grad():
                real_feats, _ = discs[name](real)
            g = lsgan_g_loss(fake_logits)
            fm = feature_matching(real_feats, fake_feats)
            weight = cfg.loss.gan if name == "face" else cfg.loss.mouth_gan
            loss = loss + gate * (weight * g + cfg.loss.fm * fm)
            logs[f"g_{name}"], logs[f"fm_{name}"] = g.item(), fm.item()
    if syncnet is not None and cfg.loss.sync > 0:
        s = sync_loss(syncnet, lower_half(pred.view(B, T, *pred.shape[1:])), batch["sync_mel"])
        loss = loss + cfg.loss.sync * s
        logs["sync"] = s.item()
    return loss, logs, pred, target


def discriminator_loss(discs, pred, target, boxes):
    """LSGAN discriminator loss on (target, generated) faces and mouth crops; boxes (N, 4) in crop pixels."""
    S = target.shape[-1]
    pairs = {"face": (pred.detach(), target),
             "mouth": (mouth_crops(pred.detach(), boxes, S), mouth_crops(target, boxes, S))}
    loss, logs = 0.0, {}
    for name, (fake, real) in pairs.items():
        d = lsgan_d_loss(discs[name](real)[1], discs[name](fake)[1])
        loss = loss + d
        logs[f"d_{name}"] = d.item()
    return loss, logs


# ----------------------------------------------------------------------------- samples


def sample_grid(batch, pred, rows: int = 4) -> np.ndarray:
    """uint8 (rows S, 4 S, 3) image: masked input | reference | generated | target."""
    b = frames_of(batch)
    cols = [b["masked"], b["reference"], pred, b["target"]]
    k = min(rows, pred.shape[0])
    grid = torch.cat([torch.cat([c[i].detach().float().cpu() for c in cols], dim=-1) for i in range(k)], dim=-2)
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
