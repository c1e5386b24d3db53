"""Smoke test of the reward benchmark: the tiny CPU run prints one well-formed JSON line."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "rewards.py"


def test_reward_bench_tiny_emits_one_json_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--rewards", "clipscore,flow,videoalign",
                                      "--repeats", "1", "--warmup", "0"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    out = json.loads(lines[0])
    assert out["bench"] == "rewards" and out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["video"] == [9, 64, 64] and out["batch"] == 1
    assert [r["reward"] for r in out["results"]] == ["clipscore", "flow", "videoalign"]
    for r in out["results"]:
        for key in ("latency_s_per_video", "call_s_median", "peak_mem_gb"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)  # a fast machine may time ~0: issue 26
        assert r["weights_gb"] is None  # measured on CUDA only
