"""bench.py runs end to end on the tiny preset and reports every measurement, with the diffusers ratio when the
dev-only diffusers is installed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny-preset bench.py run: (its JSON report, its stdout)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--preset", "tiny", "--batch", "1,2", "--iters", "2",
           "--frames", "6", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text()), result.stdout


def test_bench_tiny_reports_hardware_and_every_speed(bench):
    report, stdout = bench
    assert report["dtype"] == "float32" and "cores" in report["hardware"]
    whats = {(r["what"], r["batch"]) for r in report["rows"]}
    for b in (1, 2):
        assert ("unet forward", b) in whats and ("vae decode", b) in whats
    assert all(r["ms"] > 0 for r in report["rows"] if r["what"] in ("unet forward", "vae decode"))
    loops = [r for r in report["rows"] if r["what"].startswith("realtime loop")]
    assert loops and all(0 <= r["outside_unet_decoder"] < 1 for r in loops)
    assert any(r["what"] == "infer.py end to end" and r["per_s"] > 0 for r in report["rows"])
    assert "hardware:" in stdout


def test_bench_tiny_reports_the_ratio_to_diffusers_on_the_same_weights(bench):
    pytest.importorskip("diffusers", reason="diffusers (requirements-dev.txt) is the oracle the ratio is taken against")
    report, stdout = bench
    timed = [r for r in report["rows"] if r["what"] in ("unet forward", "vae decode")]
    assert timed and all(r["ratio"] > 0 and r["diffusers_ms"] > 0 for r in timed)
    assert "ratio" in stdout
