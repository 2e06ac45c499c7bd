"""bench.py runs end to end on the tiny preset and reports every measurement, with the diffusers ratio."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_reports_speeds_and_diffusers_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--preset", "tiny", "--batch", "1,2", "--iters", "2",
           "--frames", "6", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and "cores" in report["hardware"]
    whats = {(r["what"], r["batch"]) for r in report["rows"]}
    for b in (1, 2):
        assert ("unet forward", b) in whats and ("vae decode", b) in whats
    unet = [r for r in report["rows"] if r["what"] == "unet forward"]
    assert all(r["ratio"] > 0 and r["ms"] > 0 for r in unet)  # diffusers is installed with the dev requirements
    loops = [r for r in report["rows"] if r["what"].startswith("realtime loop")]
    assert loops and all(0 <= r["outside_unet_decoder"] < 1 for r in loops)
    assert any(r["what"] == "infer.py end to end" and r["per_s"] > 0 for r in report["rows"])
    assert "ratio" in result.stdout and "hardware:" in result.stdout
