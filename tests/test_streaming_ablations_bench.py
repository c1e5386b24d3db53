"""Smoke test of bench/streaming_ablations.py: one row at the smallest size, one JSON line, a markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from astrolabe_rl.toy.model import LONG_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not LONG_WEIGHTS.is_file(), reason="the long toy model is not built")
def test_streaming_ablations_quick_writes_the_table_and_one_json_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "streaming.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streaming_ablations.py"), "--quick", "--epochs", "1", "--out", str(out),
         "--options", "history_kv=old"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "streaming_ablations" and list(result["late_oracle_gap_closed"]) == ["history_kv=old"]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| history_kv=old")]
    assert len(rows) == 1 and rows[0].count("±") == 9
