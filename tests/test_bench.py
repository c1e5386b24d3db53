"""Smoke test of the rollout benchmark script: the tiny CPU run emits one well-formed JSON line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "rollout.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_rollout_bench_tiny_emits_one_json_line():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--repeats", "1", "--warmup", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])

    assert out["bench"] == "rollout"
    assert out["model"] == "tiny"
    assert out["dtype"] == "float32"
    for key in ("device", "torch"):
        assert isinstance(out[key], str) and out[key]
    assert out["latent_frames"] == 9
    assert out["pixel_frames"] == 4 * (out["latent_frames"] - 1) + 1

    results = out["results"]
    assert [r["batch"] for r in results] == [1, 8]
    for r in results:
        for key in ("dit_s_median", "dit_frames_per_s", "peak_mem_gb", "cache_kv_gb", "text_kv_s_median"):
            assert _positive(r[key]), (key, r)
        assert math.isclose(r["dit_frames_per_s"], r["batch"] * out["pixel_frames"] / r["dit_s_median"])
