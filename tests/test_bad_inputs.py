"""A table of bad inputs to infer.py, lipsync.training.prepare and train.py.

Every row must end with its exit code and one `error:` line (argparse's usage errors keep argparse's format), no
traceback, nothing new on disk, and every file that was there before byte-identical afterwards.
"""

import hashlib
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import infer
import train
from lipsync import checks
from lipsync.training import prepare
from lipsync.video import write_video
from media import ROOT

ASSETS = ROOT / "assets"
BBOX = "107,137,236,266"  # the face in assets/demo.mp4
NO_CUDA = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device: never there
MARK = "pwned"  # written by the malicious pickle if it ever runs


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path(MARK),))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Inputs every row may name: the demo assets (copies), 1 s of speech, a talking clip with sound, an image,
    broken checkpoints and a prepared-clips folder for train.py."""
    d = tmp_path_factory.mktemp("inputs")
    for name in ("demo.mp4", "demo.track.npz", "demo.pt"):
        shutil.copy(ASSETS / name, d / name)
    wave, sr = sf.read(ASSETS / "demo.wav", dtype="float32")
    sf.write(d / "speech.wav", wave[:sr], sr)
    write_video(d / "talk.mp4", np.full((4, 64, 64, 3), 99, np.uint8), 25.0, audio=wave[:16000])
    import imageio.v3 as iio
    iio.imwrite(d / "face.png", np.full((64, 64, 3), 200, np.uint8))
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.wav").write_bytes(b"")
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4000))
    (d / "truncated.pt").write_bytes((d / "demo.pt").read_bytes()[:100_000])
    torch.save({"state_dict": {"w": torch.ones(2)}}, d / "foreign.pt")
    (d / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    (d / "folder").mkdir()
    (d / "a_file").write_text("not a folder")
    (d / "clips" / "c1").mkdir(parents=True)
    (d / "clips" / "c1" / "meta.json").write_text("{}")
    return d


# Each row: tool, argv (str.format'ted with d = the shared inputs, t = this row's folder), exit code, words the
# error line must contain, and an optional setup(d, t) that makes row-specific inputs in t.
def linked(kind):
    def setup(d, t):
        (os.symlink if kind == "symlink" else os.link)(d / "demo.mp4", t / "in.mp4")
    return setup


def old_avatar_holding_ckpt(d, t):
    (t / "av").mkdir()
    (t / "av" / "avatar_info.json").write_text("{}")
    shutil.copy(d / "demo.pt", t / "av" / "model.pt")


def audio_named_like_the_clip(d, t):
    (t / "out").mkdir()
    shutil.copy(d / "speech.wav", t / "out" / "demo")


def earlier_run(d, t):
    (t / "run").mkdir()
    shutil.copy(d / "demo.pt", t / "run" / "lipsync.pt")


INFER = ["--audio", "{d}/speech.wav", "--ckpt", "{d}/demo.pt", "--bbox", BBOX]
VIDEO = ["--video", "{d}/demo.mp4"]
OUT = ["--out", "{t}/out.mp4"]
PREP = ["{d}/demo.mp4", "--bbox", BBOX, "--crop-size", "16"]
TRAIN = ["--data", "{d}/clips", "--stage", "stage1", "--out", "{t}/run"]

ROWS = {
    # infer.py: outputs that name an input
    "infer --out is the --video": ("infer", VIDEO + INFER + ["--out", "{d}/demo.mp4"], 1, "would overwrite the video"),
    "infer --out is ./the video": ("infer", VIDEO + INFER + ["--out", "{d}/./folder/../demo.mp4"], 1, "overwrite"),
    "infer --out is a symlink to the video": (
        "infer", VIDEO + INFER + ["--out", "{t}/in.mp4"], 1, "would overwrite the video", linked("symlink")),
    "infer --video is a symlink, --out its target": (
        "infer", ["--video", "{t}/in.mp4"] + INFER + ["--out", "{d}/demo.mp4"], 1, "overwrite", linked("symlink")),
    "infer --out is a hard link of the video": (
        "infer", VIDEO + INFER + ["--out", "{t}/in.mp4"], 1, "would overwrite the video", linked("hardlink")),
    "infer --out is the --audio": (
        "infer", VIDEO + ["--audio", "{d}/talk.mp4", "--ckpt", "{d}/demo.pt", "--out", "{d}/talk.mp4"], 1,
        "would overwrite the audio"),
    "infer --avatar is the folder of the video": (
        "infer", ["--prepare-avatar", "{d}/demo.mp4", "--avatar", "{d}", "--ckpt", "{d}/demo.pt"], 1,
        "would overwrite the video"),
    "infer --avatar is the video": (
        "infer", ["--prepare-avatar", "{d}/demo.mp4", "--avatar", "{d}/demo.mp4", "--ckpt", "{d}/demo.pt"], 1,
        "would overwrite the video"),
    "infer --avatar is an old avatar holding the checkpoint": (
        "infer", ["--prepare-avatar", "{d}/demo.mp4", "--avatar", "{t}/av", "--ckpt", "{t}/av/model.pt"], 1,
        "would overwrite the checkpoint", old_avatar_holding_ckpt),
    # infer.py: impossible options
    "infer --fps 0 with an image": ("infer", ["--image", "{d}/face.png", "--fps", "0"] + INFER + OUT, 1, "--fps"),
    "infer --fps 0 with a video": ("infer", VIDEO + ["--fps", "0"] + INFER + OUT, 1, "--fps must be a number > 0"),
    "infer --fps -5": ("infer", ["--image", "{d}/face.png", "--fps", "-5"] + INFER + OUT, 1, "--fps must be"),
    "infer --fps nan": ("infer", VIDEO + ["--fps", "nan"] + INFER + OUT, 1, "--fps must be a number > 0"),
    "infer --batch-size 0": ("infer", VIDEO + ["--batch-size", "0"] + INFER + OUT, 1, "--batch-size must be >= 1"),
    "infer --device cuda without that device": (
        "infer", VIDEO + ["--device", "cuda" if not torch.cuda.is_available() else NO_CUDA] + INFER + OUT, 1,
        "devices here: cpu"),
    "infer --device cuda:N past the last": ("infer", VIDEO + ["--device", NO_CUDA] + INFER + OUT, 1, "devices here"),
    "infer --device bogus": ("infer", VIDEO + ["--device", "bogus"] + INFER + OUT, 1, "is not a device"),
    "infer --crf 99": ("infer", VIDEO + ["--crf", "99"] + INFER + OUT, 1, "--crf"),
    "infer --bbox with three numbers": ("infer", VIDEO + INFER + ["--bbox", "1,2,3"] + OUT, 1, "four numbers"),
    "infer --batch-size x (argparse)": ("infer", VIDEO + ["--batch-size", "x"] + INFER + OUT, 2, "--batch-size"),
    # infer.py: the wrong kind of file
    "infer a video to --image": ("infer", ["--image", "{d}/demo.mp4"] + INFER + OUT, 1, "is a video; pass it as --video"),
    "infer an image to --video": ("infer", ["--video", "{d}/face.png"] + INFER + OUT, 1, "is an image; pass it as"),
    "infer a wav to --image": ("infer", ["--image", "{d}/speech.wav"] + INFER + OUT, 1, "as an image"),
    "infer a folder to --video": ("infer", ["--video", "{d}/folder"] + INFER + OUT, 1, "is a folder"),
    "infer a folder to --audio": ("infer", VIDEO + INFER + ["--audio", "{d}/folder"] + OUT, 1, "is a folder"),
    "infer a folder to --ckpt": ("infer", VIDEO + INFER + ["--ckpt", "{d}/folder"] + OUT, 1, "is a folder"),
    "infer missing video": ("infer", ["--video", "{d}/nope.mp4"] + INFER + OUT, 1, "not found"),
    "infer missing --whisper": ("infer", VIDEO + INFER + ["--whisper", "{d}/nope"] + OUT, 1, "not found"),
    "infer empty video": ("infer", ["--video", "{d}/empty.mp4"] + INFER + OUT, 1, "empty.mp4"),
    "infer empty audio": ("infer", VIDEO + INFER + ["--audio", "{d}/empty.wav"] + OUT, 1, "empty.wav"),
    "infer empty checkpoint": ("infer", VIDEO + INFER + ["--ckpt", "{d}/empty.pt"] + OUT, 1, "cannot read checkpoint"),
    "infer garbage checkpoint": ("infer", VIDEO + INFER + ["--ckpt", "{d}/garbage.pt"] + OUT, 1, "cannot read"),
    "infer truncated checkpoint": ("infer", VIDEO + INFER + ["--ckpt", "{d}/truncated.pt"] + OUT, 1, "cannot read"),
    "infer foreign checkpoint": ("infer", VIDEO + INFER + ["--ckpt", "{d}/foreign.pt"] + OUT, 1, "not a lipsync"),
    "infer malicious pickle": ("infer", VIDEO + INFER + ["--ckpt", "{d}/evil.pt"] + OUT, 1, "never run"),
    "infer output folder is a file": ("infer", VIDEO + INFER + ["--out", "{d}/a_file/out.mp4"], 1, "cannot write"),
    "infer --out not .mp4": ("infer", VIDEO + INFER + ["--out", "{t}/out.avi"], 1, "must end in .mp4"),
    # lipsync.training.prepare
    "prepare --out is the video's folder": ("prepare", PREP + ["--out", "{d}"], 1, "is the folder of"),
    "prepare --out is the video": ("prepare", PREP + ["--out", "{d}/demo.mp4"], 1, "it is a file"),
    "prepare --out/<clip> is the --audio": (
        "prepare", PREP + ["--audio", "{t}/out/demo", "--out", "{t}/out"], 1, "would overwrite the audio",
        audio_named_like_the_clip),
    "prepare --out under a file": ("prepare", PREP + ["--out", "{d}/a_file/x"], 1, "cannot write"),
    "prepare --fps -5": ("prepare", PREP + ["--fps", "-5", "--out", "{t}/out"], 1, "--fps must be a number > 0"),
    "prepare --fps nan": ("prepare", PREP + ["--fps", "nan", "--out", "{t}/out"], 1, "--fps must be a number > 0"),
    "prepare --crop-size 0": ("prepare", PREP + ["--crop-size", "0", "--out", "{t}/out"], 1, "--crop-size"),
    "prepare a folder as VIDEO": ("prepare", ["{d}/folder", "--out", "{t}/out"], 1, "is a folder"),
    "prepare an empty audio file as VIDEO": ("prepare", ["{d}/empty.wav", "--bbox", BBOX, "--out", "{t}/out"], 1,
                                             "empty.wav"),
    "prepare missing VIDEO": ("prepare", ["{d}/nope.mp4", "--bbox", BBOX, "--out", "{t}/out"], 1, "nope.mp4"),
    "prepare --bbox with two numbers (argparse)": ("prepare", ["{d}/demo.mp4", "--bbox", "1,2", "--out", "{t}/o"], 2,
                                                   "four numbers"),
    # train.py
    "train --data missing": ("train", ["--data", "{d}/nope", "--out", "{t}/run"], 1, "no prepared clips in"),
    "train --data is a file": ("train", ["--data", "{d}/demo.mp4", "--out", "{t}/run"], 1, "no prepared clips"),
    "train --out is --data": ("train", ["--data", "{d}/clips", "--out", "{d}/clips"], 1, "inside --data"),
    "train --out inside --data": ("train", ["--data", "{d}/clips", "--out", "{d}/clips/c1"], 1, "inside --data"),
    "train --out is a file": ("train", ["--data", "{d}/clips", "--out", "{d}/demo.pt"], 1, "it is a file"),
    "train --out under a file": ("train", ["--data", "{d}/clips", "--out", "{d}/a_file/run"], 1, "cannot write"),
    "train --vae_path is OUT/lipsync.pt": (
        "train", TRAIN + ["--vae_path", "{t}/run/lipsync.pt"], 1, "would overwrite the --vae_path", earlier_run),
    "train --vae_path missing": ("train", TRAIN + ["--vae_path", "{d}/nope.pt"], 1, "not found"),
    "train --device without that device": (
        "train", TRAIN + ["--device", "cuda" if not torch.cuda.is_available() else NO_CUDA], 1, "devices here"),
    "train --device bogus": ("train", TRAIN + ["--device", "bogus"], 1, "is not a device"),
    "train --stage1.batch 0": ("train", TRAIN + ["--stage1.batch", "0"], 1, "--stage1.batch must be >= 1"),
    "train --reference bogus": ("train", TRAIN + ["--reference", "nearest"], 1, "--reference must be one of"),
    "train --audio_closed without the audio rule": ("train", TRAIN + ["--audio_closed", "0.3"], 1,
                                                    "--audio_closed is a share"),
    "train --loss.keep without --init": ("train", TRAIN + ["--loss.keep", "1"], 1, "--loss.keep holds a fine-tune"),
    "train --stage decoder without --init": (
        "train", ["--data", "{d}/clips", "--stage", "decoder", "--out", "{t}/run"], 1, "the decoder stage fine-tunes"),
    "train --stage bogus": ("train", TRAIN + ["--stage", "bogus"], 1, "unknown stage"),
    "train --config missing (argparse)": ("train", TRAIN + ["--config", "{d}/nope.json"], 2, "--config"),
}
MAINS = {"infer": infer.main, "prepare": prepare.main, "train": train.main}


def snapshot(*folders):
    """{path: sha1 (or a symlink's target)} of every file under the folders."""
    out = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                p = os.path.join(dirpath, name)
                out[p] = "-> " + os.readlink(p) if os.path.islink(p) else hashlib.sha1(Path(p).read_bytes()).hexdigest()
    return out


def run_main(tool, argv, capsys):
    """(exit code, stderr) of the tool's main(argv), as the shell would see them."""
    try:
        code = MAINS[tool](argv)
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):  # sys.exit("message"): Python prints it and exits with 1
            print(code, file=sys.stderr)
            code = 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_error_line_and_touches_nothing(row, shared, tmp_path, capsys, monkeypatch):
    tool, argv, want_code, words, *setup = ROWS[row]
    if setup:
        setup[0](shared, tmp_path)
    monkeypatch.chdir(tmp_path)  # where the malicious pickle would leave its mark
    before = snapshot(shared, tmp_path)
    code, err = run_main(tool, [a.format(d=shared, t=tmp_path) for a in argv], capsys)
    after = snapshot(shared, tmp_path)

    assert code == want_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if want_code == 2:  # argparse: usage, then "prog: error: ..."
        assert "error: " in lines[-1] and words in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert after == before  # no file written, none changed
    assert not (tmp_path / MARK).exists()


def test_the_table_covers_forty_bad_inputs_of_every_tool():
    tools = [r[0] for r in ROWS.values()]
    assert len(tools) >= 40 and {t: tools.count(t) >= 8 for t in MAINS} == {t: True for t in MAINS}


# ----------------------------------------------------------------------------- the shared checks


def test_same_file_sees_through_dots_symlinks_and_hard_links(tmp_path):
    a = tmp_path / "a.mp4"
    a.write_bytes(b"x")
    os.symlink(a, tmp_path / "sym.mp4")
    os.link(a, tmp_path / "hard.mp4")
    (tmp_path / "b.mp4").write_bytes(b"x")
    for same in (tmp_path / "." / "a.mp4", tmp_path / "sym.mp4", tmp_path / "hard.mp4"):
        assert checks.same_file(same, a)
    assert not checks.same_file(tmp_path / "b.mp4", a) and not checks.same_file(tmp_path / "new.mp4", a)


def test_writing_over_a_previous_output_is_allowed(tmp_path):
    old = tmp_path / "out.mp4"
    old.write_bytes(b"last run's result")
    checks.refuse_overwrite(old, {"video": tmp_path / "in.mp4", "audio": None})  # no error
    with pytest.raises(ValueError, match="would overwrite the video"):
        checks.refuse_overwrite(tmp_path, {"video": tmp_path / "in.mp4"})  # a folder holding the input


def test_pick_device_names_the_devices_that_exist():
    assert checks.pick_device("cpu") == torch.device("cpu")
    assert checks.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=f"devices here: cpu{', cuda:0' if torch.cuda.is_available() else '$'}"):
        checks.pick_device(NO_CUDA)
