"""train.py's command line: its config dataclass as flags, and the checks that stop a bad run before it writes.

Every field of the config is a flag, grouped ones (a dataclass inside the config) as --group.field; `flag()` puts each
field's --help line beside the field. Values stack: flags over a --config JSON file over the preset over the
dataclass defaults.
"""

import argparse
import dataclasses
import json
import os

from lipsync import checks
from lipsync.model import check_guidance
from lipsync.training.data import REFERENCE_RULES, list_clips
from lipsync.tracking import GEOMETRIES

STAGES = ("vae", "syncnet", "stage1", "stage2")  # --stage all: the whole recipe from random init
STAGE_NAMES = ("vae", "decoder", "syncnet", "stage1", "stage2", "restorer", "opening")  # run order; decoder, restorer
# and opening only by name: the decoder on an --init model, the others on the generator this run exports (or --init)


def flag(default, help=None):
    """A config field and its --help line. A group (a dataclass default) gets a fresh copy per config; its flags' help
    is the group's own fields' help, or `help` as {field: line} where one group class serves several groups."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help or {}})
    return dataclasses.field(default=default, metadata={"help": help})


def flag_help(cls) -> dict:
    """{flag name: help line} for every field of the config class cls, grouped ones as group.field."""
    lines, defaults = {}, cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(value):
            lines[f.name] = f.metadata["help"]
            continue
        for g in dataclasses.fields(value):
            lines[f"{f.name}.{g.name}"] = f.metadata["help"].get(g.name) or g.metadata["help"]
    return lines


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "")
    if isinstance(default, tuple):
        return lambda s: tuple(float(x) for x in s.split(","))
    return type(default)


def _merge(values: dict, update: dict) -> dict:
    """values updated by update, groups (dicts) merged key by key."""
    out = dict(values)
    for k, v in update.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def parse_flags(cls, presets: dict, argv, description: str, recipes: dict):
    """cls from flags (--field, --group.field) over a --config JSON file over the --preset (a key of presets) over
    cls's defaults; recipes {field: values} go over the preset when that field's flag is given (--personalize)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"JSON file of {cls.__name__} fields (groups as objects, e.g. "
                                    "{\"stage1\": {\"lr\": 1e-4}})")
    defaults, help_lines = cls(), flag_help(cls)
    for name, line in help_lines.items():
        group, _, key = name.partition(".")
        default = getattr(getattr(defaults, group), key) if key else getattr(defaults, name)
        nargs = "?" if isinstance(default, bool) else None
        p.add_argument(f"--{name}", type=_flag_type(default), nargs=nargs, const=True if nargs else None,
                       default=None, help=f"{line} (default {default!r})")
    args = vars(p.parse_args(argv))
    preset = args["preset"] or defaults.preset
    if preset not in presets:
        p.error(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    values = dict(presets[preset])
    for name, recipe in recipes.items():
        if args[name]:
            values = _merge(values, recipe)
    if config := args.pop("config"):
        try:
            with open(config) as f:
                values = _merge(values, json.load(f))
        except (OSError, ValueError) as err:
            p.error(f"--config {config}: {err}")
        print(f"config file: {config}")
    for name, v in args.items():
        if v is not None:
            group, _, key = name.rpartition(".")
            values = _merge(values, {group: {key: v}} if group else {name: v})
    try:
        return config_from_values(cls, values)
    except (TypeError, ValueError) as e:
        p.error(str(e))


def config_from_values(cls, values: dict):
    """cls from (nested) values over its defaults; unknown fields are an error."""
    cfg = cls()
    for name, v in values.items():
        if not hasattr(cfg, name) or name.startswith("_"):
            raise ValueError(f"unknown config field: {name}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ValueError(f"config field {name} is a group: give an object of {name}.* values")
            unknown = set(v) - {g.name for g in dataclasses.fields(current)}
            if unknown:
                raise ValueError(f"unknown config field: {name}.{sorted(unknown)[0]}")
            v = dataclasses.replace(current, **{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
        setattr(cfg, name, v)
    return cfg


def parse_stages(text: str) -> tuple:
    """--stage -> the stages to run, in STAGE_NAMES order whatever order they were listed in (the decoder stage must
    come before stage 1, which exports its VAE)."""
    names = STAGES if text == "all" else text.split(",")
    if bad := [s for s in names if s not in STAGE_NAMES]:
        raise SystemExit(f"error: unknown stage {bad[0]!r}; choose from all, {', '.join(STAGE_NAMES)}")
    return tuple(s for s in STAGE_NAMES if s in names)


# ----------------------------------------------------------------------------- checks (cfg: train.py's TrainConfig)


def check_settings(cfg):
    """Settings that cannot work, whatever the data: one ValueError."""
    if cfg.device != "auto":
        checks.pick_device(cfg.device)
    sizes = {f"{s}.batch": getattr(cfg, s).batch for s in STAGE_NAMES if s != "opening"}  # a closed-form fit
    sizes |= {"grad_accum": cfg.grad_accum, "T": cfg.T}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, not {value}")
    if cfg.loss.keep > 0 and not (cfg.init or cfg.personalize):
        raise ValueError("--loss.keep holds a fine-tune to its --init model; give --init")
    if "decoder" in parse_stages(cfg.stage) and not (cfg.init or cfg.personalize):
        raise ValueError("the decoder stage fine-tunes the VAE decoder of an --init model; give --init")
    if "restorer" in (stages := parse_stages(cfg.stage)) and not (cfg.init or {"stage1", "stage2"} & set(stages)):
        raise ValueError("the restorer stage adds a mouth restorer to a generator: give --init, or run stage1/stage2 "
                         "before it")
    if "opening" in stages and not (cfg.init or {"stage1", "stage2", "restorer"} & set(stages)):
        raise ValueError("the opening stage adds an opening head to a generator: give --init, or run stage1/stage2 "
                         "before it")
    if cfg.restorer_input not in ("generated", "vae"):
        raise ValueError(f"--restorer_input must be generated or vae, not {cfg.restorer_input!r}")
    if cfg.reference not in REFERENCE_RULES:
        raise ValueError(f"--reference must be one of {', '.join(REFERENCE_RULES)}, not {cfg.reference!r}")
    check_guidance(cfg.opening_shut_guidance, ValueError, "--opening_shut_guidance")
    if not 0 <= cfg.audio_closed <= 1 or (cfg.audio_closed and cfg.reference != "audio"):
        raise ValueError(f"--audio_closed is a share from 0 to 1 of --reference audio's references, not "
                         f"{cfg.audio_closed} with --reference {cfg.reference}")
    checks.creatable(cfg.out)


def check_config(cfg, stages):
    """check_settings, clips in --data, and an --out that would replace an input: one ValueError before anything is
    written."""
    check_settings(cfg)
    if cfg.data != type(cfg).data and not (os.path.isdir(cfg.data) and list_clips(cfg.data)):  # not the synthetic demo
        raise ValueError(f"no prepared clips in {cfg.data} (make them with python -m lipsync.training.prepare)")
    if checks.within(cfg.out, cfg.data):
        raise ValueError(f"--out {cfg.out} is inside --data {cfg.data}; keep runs apart from the prepared clips")
    inputs = {"--vae_path": cfg.vae_path, "--whisper": cfg.whisper, "--vgg": cfg.vgg, "--init": cfg.init,
              "--opening_whisper": cfg.opening_whisper}
    stages = [s for s in stages if not (s == "vae" and (cfg.vae_path or cfg.init))]  # the given VAE is used
    written = [f"{s}.pt" for s in stages] + [f"{s}.final.pt" for s in ("vae", "decoder", "syncnet") if s in stages]
    exports = {"stage1", "stage2", "restorer", "opening"} & set(stages)
    written += ["lipsync.pt", "metrics.jsonl", "samples"] if exports else ["metrics.jsonl"]
    for flag_name, path in inputs.items():
        if path and not os.path.exists(path):
            raise ValueError(f"{flag_name} {path} not found")
        if path and checks.same_file(path, cfg.out):
            raise ValueError(f"--out {cfg.out} is the {flag_name} folder; pick another --out")
        for name in written:
            checks.refuse_overwrite(os.path.join(cfg.out, name), {f"{flag_name} input": path or None})


def clip_geometry(cfg) -> str:
    """The crop geometry of the clips in cfg.data ("square" when meta.json has none); they must agree with each
    other and with --geometry unless it is auto. The exported checkpoint records it and infer.py crops the same way."""
    if cfg.geometry not in ("auto",) + GEOMETRIES:
        raise SystemExit(f"unknown --geometry {cfg.geometry!r}; choose from auto, {', '.join(GEOMETRIES)}")
    found = {json.loads((c / "meta.json").read_text()).get("geometry", "square") for c in list_clips(cfg.data)}
    if len(found) > 1:
        raise SystemExit(f"the clips in {cfg.data} mix crop geometries ({', '.join(sorted(found))}); "
                         f"prepare them with one --geometry")
    geometry = found.pop() if found else "square"
    if cfg.geometry not in ("auto", geometry):
        raise SystemExit(f"--geometry {cfg.geometry}, but the clips in {cfg.data} are {geometry} crops "
                         f"(make them with python -m lipsync.training.prepare --geometry {cfg.geometry})")
    return geometry
