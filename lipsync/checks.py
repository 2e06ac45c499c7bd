"""Checks on what the user typed, shared by infer.py, train.py, bench.py and lipsync.prepare.

Each raises ValueError with one line that says what is wrong; the scripts print it as `error: ...`.
"""

import math
import os
from pathlib import Path

import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp"}


def same_file(a, b) -> bool:
    """True when a and b name the same file or folder: equal resolved paths (./x, symlinks) or a hard link."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def within(path, folder) -> bool:
    """True when path is folder or lies somewhere inside it (resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return folder in path.parents or same_file(path, folder)


def refuse_overwrite(output, inputs: dict, flag="--out"):
    """ValueError when writing `output` (a file, or a folder that gets replaced) would destroy one of the inputs.

    inputs: {what: path or None}, e.g. {"video": "talk.mp4", "audio": None}.
    """
    for what, path in inputs.items():
        if path is not None and within(path, output):
            raise ValueError(f"{flag} {output} would overwrite the {what} {path}; pick another output path")


def creatable(folder):
    """ValueError unless folder is a folder or could be made (its nearest existing parent is a writable folder).
    Creates nothing."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write to {folder}/: it is a file, not a folder")
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir():
        raise ValueError(f"cannot write to {folder}/: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {folder}/: permission denied on {parent}")


def positive(value, flag):
    """value as a finite float > 0, else ValueError naming the flag."""
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} must be a number > 0, not {value:g}")
    return float(value)


def devices_here() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def pick_device(name: str) -> torch.device:
    """--device: 'auto' (cuda when available, else cpu), or a device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = f"devices here: {', '.join(devices_here())}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name} is not a device (auto, cpu, cuda, cuda:N); {here}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device; {here}")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there is no CUDA device {device.index}; {here}")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"--device {name} is not available; {here}")
