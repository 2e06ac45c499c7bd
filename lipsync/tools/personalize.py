"""Training clips of one person for `train.py --personalize`: their video or photo -> puppet clips with speech.

No speech of theirs is needed. The face is tracked once (lipsync.training.prepare, 256 px crops), then
`lipsync.tools.puppet` re-mouths it to random syllable sequences, each clip with its own synthesised voice, as the
any-face recipe does for its training people (assets/README.md).
"""

import dataclasses
import os
import time
from pathlib import Path

from tqdm import tqdm

from lipsync.checkpoint import read_checkpoint

from lipsync.tools.puppet import make_puppet_clip, write_puppet_clip
from lipsync.training.flags import check_settings
from lipsync.training.prepare import prepare_clip

MINUTES = 14.0  # the whole command: tracking + puppets + fine-tune (+ export) on 2 CPU cores
CLIPS = dict(clips=4, seconds=6.0)  # puppet clips made of the face
SOURCE_CROP = 256  # the puppet warp works on 256 px crops and writes the model's crop size


def make_clips(source, out, crop_size: int, clips: int = 4, seconds: float = 6.0, seed: int = 0, say=print) -> Path:
    """source video/photo -> out/source/<name> (tracked crops) and out/clips/<name>_NNNN (puppets at crop_size).
    Returns the clips folder. A rerun keeps what is complete."""
    t0, out, source = time.time(), Path(out), Path(source)
    # the puppets get their own speech, so the person's sound (if any) is not even decoded
    prepared = prepare_clip(source, out / "source", crop_size=SOURCE_CROP, silent=True)
    if prepared.no_face == prepared.frames:
        raise ValueError(f"{source}: no face found in any frame")
    say(f"[personalize] tracked {prepared.frames} frames of {source.name} in {time.time() - t0:.0f} s")
    folder = out / "clips"
    for i in tqdm(range(clips), desc="puppet clips", unit="clip"):
        name = f"{prepared.path.name}_{i:04d}"
        if not (folder / name / "meta.json").exists():
            clip = make_puppet_clip(prepared.path, i, "train", seconds, crop_size, seed)
            write_puppet_clip(folder, name, clip, prepared.path, "train", seed)
    say(f"[personalize] {clips} puppet clips of {seconds:g} s in {time.time() - t0:.0f} s -> {folder}")
    return folder


def personalize_run(cfg, stages, bundled):
    """train.py --personalize: make OUT/clips (puppets of the face at --init's crop size) and point the run at them --
    train.py's PERSONALIZE recipe (the decoder stage, then stage 1: `fine_tune_stages`) from --init (`bundled` by
    default), stopped in time for the whole command to fit MINUTES. cfg: train.TrainConfig -> the same with init,
    data, max_minutes, reference and stage."""
    t0 = time.time()
    if stages != ("decoder", "stage1"):
        raise ValueError("--personalize runs its own stages (decoder, stage1); leave --stage out")
    if not os.path.isfile(cfg.personalize):
        raise ValueError(f"--personalize {cfg.personalize}: no such file")
    init = cfg.init or bundled
    if not os.path.isfile(init):
        raise ValueError(f"--init {init} not found")
    check_settings(cfg)  # before the slow part; train.py checks the whole config once the clips exist
    ckpt = read_checkpoint(init)
    reference = fine_tune_reference(cfg, ckpt)
    data = make_clips(cfg.personalize, cfg.out, ckpt["config"]["crop_size"], seed=cfg.seed, say=tqdm.write, **CLIPS)
    left = MINUTES - (time.time() - t0) / 60 - 0.5  # 0.5 min for loading and the export
    minutes = min(cfg.max_minutes, left) if cfg.max_minutes else left
    return dataclasses.replace(cfg, init=init, data=str(data), max_minutes=max(minutes, 0.5), reference=reference,
                               stage=fine_tune_stages(reference))


def fine_tune_stages(reference: str) -> str:
    """The stages the fine-tune runs: the decoder alone for a model that dubs with the audio rule, else the decoder
    then stage 1. Stage 1 on the puppets brought the video's own mouth back into an audio-rule model's cross-dub
    (the bundled model on a held-out person: copying -0.18 -> +0.14 and -0.21 -> +0.05, r down 0.03-0.04; issue 24),
    which personalising must not do; the decoder alone leaves the UNet, and so what the mouth follows, as it is."""
    return "decoder" if reference == "audio" else "decoder,stage1"


def fine_tune_reference(cfg, ckpt: dict) -> str:
    """The reference rule the fine-tune trains with, which is also the one the result dubs with: --reference when it
    is set, else --init's own rule where that rule keeps the video's mouth out of view (closed_pose; audio when its
    opening head reads a whisper encoder of its own, which the fine-tune keeps). Personalising a model that follows
    new speech must not turn it back into one that copies the video's mouth (MuseTalk's rule, the flag's default)."""
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "reference")
    rule = ckpt["config"].get("reference", "self")
    own_head = (ckpt.get("opening") or {}).get("whisper") is not None
    if cfg.reference == default and (rule == "closed_pose" or (rule == "audio" and own_head)):
        return rule
    return cfg.reference
