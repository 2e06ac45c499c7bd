"""Layers point one way: the product (lipsync/*.py, infer.py) imports neither lipsync.training nor lipsync.tools, and
lipsync.training does not import lipsync.tools. Checked in fresh interpreters, one module at a time."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    found[name] = sorted(m for m in sys.modules if m.split(".")[:2] in FORBIDDEN)
print(json.dumps(found))
"""


def imported_above(modules, forbidden):
    """{module: forbidden modules in sys.modules right after importing it}, in one fresh `python -c` process."""
    code = f"FORBIDDEN = {forbidden!r}\n" + CHECK
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def package_modules(folder, prefix):
    return [prefix + p.stem for p in sorted((ROOT / folder).glob("*.py")) if p.stem != "__init__"]


def test_product_modules_import_no_training_or_tools_module():
    product = ["lipsync"] + package_modules("lipsync", "lipsync.") + ["infer"]
    assert {"lipsync.model", "lipsync.checkpoint", "lipsync.pipeline"} <= set(product)
    found = imported_above(product, [["lipsync", "training"], ["lipsync", "tools"]])
    assert found == {m: [] for m in product}


def test_training_modules_import_no_tools_module():
    training = package_modules("lipsync/training", "lipsync.training.")
    assert "lipsync.training.steps" in training
    found = imported_above(training, [["lipsync", "tools"]])
    assert found == {m: [] for m in training}
