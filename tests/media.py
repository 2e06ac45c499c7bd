"""Files the tests read, all inside the checkout (tests/data/README.md says where each comes from)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SPEECH = DATA / "speech16k.wav"  # 38 s of English speech, 16 kHz mono PCM16
SPEECH_48K = DATA / "speech48k_stereo.wav"  # 2.5 s, 48 kHz stereo PCM16
VIDEO = ROOT / "assets" / "demo.mp4"  # 175 frames of a talking head, 352x608, 25 fps, no audio stream
UNET_KEYS, VAE_KEYS = DATA / "unet_keys.txt", DATA / "vae_keys.txt"  # diffusers state-dict names and shapes
