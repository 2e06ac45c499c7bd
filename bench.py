"""Speed of lipsync, measured honestly: warm-up, synchronised clocks, medians, and diffusers in the same run.

    python bench.py --preset tiny                  # tiny demo sizes (64 px crops)
    python bench.py --preset musetalk --batch 1    # published sizes: 850 M UNet at (B, 8, 32, 32), 256 px VAE
    python bench.py --preset musetalk --device cuda --dtype fp16 --compile --json gpu.json

Times per batch size and dtype: UNet forward, VAE decode, audio features per second of audio (our MelEncoder and a
whisper-tiny-sized encoder), the realtime avatar loop (cached inputs: UNet + decode + blend, as infer.py --avatar
runs it) and the full infer.py path (read, track, prepare, generate, encode mp4). When diffusers is installed, its
UNet2DConditionModel / AutoencoderKL run on the same weights and inputs, interleaved with ours, and the ratio
ours / diffusers is printed (< 1 = we are faster). Weights are random: speed does not depend on their values.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lipsync import checks
from lipsync.mel_encoder import MelEncoder, MelEncoderConfig
from lipsync.checkpoint import export
from lipsync.model import LipSync
from lipsync.pipeline import avatar_frames, prepare_avatar
from lipsync.track import read_track
from lipsync.unet import UNet, UNetConfig
from lipsync.vae import AutoencoderKL, VAEConfig, to_uint8_images
from lipsync.video import read_video
from lipsync.whisper import WhisperEncoder

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_VIDEO = os.path.join(ROOT, "assets", "demo.mp4")
DEMO_AUDIO = os.path.join(ROOT, "assets", "demo.wav")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, device, iters: int, warmup: int = 2) -> dict:
    """Median seconds per call for each function, calls interleaved (alternating order) so drift hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync(device)
    times = {k: [] for k in fns}
    for i in range(iters):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def preset_configs(preset: str):
    if preset == "tiny":
        return UNetConfig.tiny(), VAEConfig.tiny(), MelEncoderConfig.tiny(), 64
    return UNetConfig(), VAEConfig(), MelEncoderConfig(), 256


def diffusers_twins(unet: UNet, vae: AutoencoderKL):
    """diffusers models with our weights, or (None, None) when diffusers is not installed."""
    try:
        import diffusers
    except ImportError:
        return None, None
    uc, vc = unet.config, vae.config
    ref_unet = diffusers.UNet2DConditionModel(
        in_channels=uc.in_channels, out_channels=uc.out_channels, block_out_channels=uc.block_out_channels,
        down_block_types=uc.down_block_types, up_block_types=uc.up_block_types, layers_per_block=uc.layers_per_block,
        attention_head_dim=uc.attention_head_dim, cross_attention_dim=uc.cross_attention_dim,
        norm_num_groups=uc.norm_num_groups)
    ref_vae = diffusers.AutoencoderKL(
        block_out_channels=vc.block_out_channels, layers_per_block=vc.layers_per_block,
        latent_channels=vc.latent_channels, norm_num_groups=vc.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * len(vc.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vc.block_out_channels))
    ref_unet.load_state_dict(unet.state_dict())
    ref_vae.load_state_dict(vae.state_dict())
    return ref_unet.eval(), ref_vae.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "musetalk"],
                   help="model sizes: tiny (the demo's, 64 px crops) or musetalk (the published UNet and VAE)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8,32; musetalk on CPU: 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp32 on CPU, fp16 on GPU")
    p.add_argument("--channels-last", default="on", choices=["on", "off"],
                   help="channels-last memory layout for our UNet and VAE")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and decoder (ours)")
    p.add_argument("--iters", type=int, default=7, help="timed calls per measurement after warm-up, median reported "
                   "(audio and the realtime loop: half as many, at least 3)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames in the realtime-loop measurement (default 48; musetalk on CPU: 4)")
    p.add_argument("--no-infer", action="store_true", help="skip the full infer.py measurement")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    try:
        device = checks.pick_device(args.device)
    except ValueError as err:
        p.exit(2, f"error: {err}\n")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    batches = [int(b) for b in (args.batch or ("1" if args.preset == "musetalk" and device.type == "cpu"
                                               else "1,8,32")).split(",")]
    args.frames = args.frames or (4 if args.preset == "musetalk" and device.type == "cpu" else 48)
    unet_cfg, vae_cfg, audio_cfg, crop = preset_configs(args.preset)
    torch.manual_seed(0)
    unet, vae, audio = UNet(unet_cfg).eval(), AutoencoderKL(vae_cfg).eval(), MelEncoder(audio_cfg).eval()
    ref_unet, ref_vae = diffusers_twins(unet, vae)
    layout = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
    unet, vae = unet.to(device, dtype, memory_format=layout), vae.to(device, dtype, memory_format=layout)
    if ref_unet is not None:
        ref_unet, ref_vae = ref_unet.to(device), ref_vae.to(device)
        if dtype != torch.float32:
            ref_unet, ref_vae = ref_unet.to(dtype), ref_vae.to(dtype)
    unet_fn = torch.compile(unet) if args.compile else unet
    decode_fn = torch.compile(vae.decode) if args.compile else vae.decode
    s = crop // vae_cfg.downscale
    tokens_per_frame = 10 * audio.n_states
    results = {"hardware": hardware(device), "torch": torch.__version__, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "preset": args.preset, "channels_last": args.channels_last,
               "compile": args.compile, "rows": []}
    print(f"hardware: {results['hardware']}\ntorch {torch.__version__}, {results['dtype']}, preset {args.preset}, "
          f"channels-last {args.channels_last}, compile {args.compile}")

    def row(name, batch, sec, per, ref=None):
        r = {"what": name, "batch": batch, "ms": round(sec * 1000, 3), "per_s": round(per / sec, 2)}
        if ref is not None:
            r["diffusers_ms"], r["ratio"] = round(ref * 1000, 3), round(sec / ref, 3)
        results["rows"].append(r)
        extra = f"  diffusers {ref * 1000:9.2f} ms  ratio {sec / ref:.3f}" if ref is not None else ""
        print(f"{name:<22} batch {batch:>3}  {sec * 1000:9.2f} ms  {per / sec:9.1f} /s{extra}")

    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, unet_cfg.in_channels, s, s, device=device, dtype=dtype)
            ctx = torch.randn(b, tokens_per_frame, unet_cfg.cross_attention_dim, device=device, dtype=dtype)
            z = torch.randn(b, vae_cfg.latent_channels, s, s, device=device, dtype=dtype)
            fns = {"ours": lambda: unet_fn(x, 0, ctx)}
            if ref_unet is not None:
                t0 = torch.zeros(1, device=device, dtype=torch.long)
                fns["diffusers"] = lambda: ref_unet(x, t0, encoder_hidden_states=ctx).sample
            t = timed(fns, device, args.iters)
            row("unet forward", b, t["ours"], b, t.get("diffusers"))
            fns = {"ours": lambda: decode_fn(z)}
            if ref_vae is not None:
                fns["diffusers"] = lambda: ref_vae.decode(z).sample
            t = timed(fns, device, args.iters)
            row("vae decode", b, t["ours"], b, t.get("diffusers"))

        wave = torch.randn(16000 * 10) * 0.1
        audio_fp32 = audio.to(device)
        whisper = WhisperEncoder().eval().to(device)
        t = timed({"mel": lambda: audio_fp32.encode(wave), "whisper": lambda: whisper.encode(wave)}, device,
                  max(3, args.iters // 2))
        row("audio: MelEncoder", 1, t["mel"], 10.0)
        row("audio: whisper-tiny", 1, t["whisper"], 10.0)
        results["audio_note"] = "per_s = seconds of audio encoded per second"

        if os.path.exists(DEMO_VIDEO):
            model = LipSync(unet, vae, audio_fp32.to(dtype), crop).to(device)
            realtime(model, args, device, dtype, batches, row, results)

    if not args.no_infer and os.path.exists(DEMO_VIDEO) and args.preset == "tiny":
        full_infer(model, args, row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


def realtime(model, args, device, dtype, batches, row, results):
    """The cached avatar loop (what infer.py --avatar runs per frame), and how much of it is not UNet + decoder."""
    frames, fps = read_video(DEMO_VIDEO)
    frames = frames[:args.frames]
    track = read_track(os.path.splitext(DEMO_VIDEO)[0] + ".track.npz").select(slice(0, args.frames))
    avatar = prepare_avatar(frames, fps, track, model)
    n = args.frames
    windows = torch.randn(n, 10 * model.audio.n_states, model.audio.dim, device=device, dtype=dtype)
    for b in batches:
        def loop():
            for _ in avatar_frames(model, avatar, windows, batch_size=b):
                pass

        def core():
            for i in range(0, n, b):
                to_uint8_images(model(avatar.latents[i:i + b], windows[i:i + b]))
        t = timed({"loop": loop, "core": core}, device, max(3, args.iters // 2), warmup=1)
        row(f"realtime loop {frames.shape[2]}x{frames.shape[1]}", b, t["loop"], n)
        outside = max(0.0, 1 - t["core"] / t["loop"])
        results["rows"][-1]["outside_unet_decoder"] = round(outside, 3)
        print(f"{'':<22} {100 * outside:.1f} % of the loop is outside UNet + decoder")


def full_infer(model, args, row):
    """infer.py end to end in a fresh process (model load, read, track, prepare, generate, blend, mp4 encode)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = os.path.join(tmp, "bench.pt"), os.path.join(tmp, "out.mp4")
        export(model.float().cpu(), ckpt)
        cmd = [sys.executable, os.path.join(ROOT, "infer.py"), "--video", DEMO_VIDEO, "--audio", DEMO_AUDIO,
               "--ckpt", ckpt, "--out", out]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        sec = time.perf_counter() - t
        frames = len(read_video(out)[0])
    row("infer.py end to end", 8, sec, frames)


if __name__ == "__main__":
    main()
