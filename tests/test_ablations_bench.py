"""Smoke test of bench/ablations.py: two rows of the table at the smallest size, one JSON line, a markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ablations_quick_writes_the_table_and_one_json_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "ablations.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ablations.py"), "--quick", "--epochs", "2", "--out", str(out),
         "--options", "demo defaults", "β=0.3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "ablations" and list(result["results"]) == ["demo defaults", "β=0.3"]
    for row in result["results"].values():
        assert all(isinstance(v, float) for v in row.values()), row
    table = out.read_text().splitlines()
    rows = [line.split(" | ")[0] for line in table if line.startswith("| ") and not line.startswith("| option")]
    assert rows == ["| *base model (before)*", "| *world renders*", "| demo defaults", "| β=0.3"]


def test_ablations_rejects_an_unknown_option():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ablations.py"), "--options", "lr=1"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2 and "unknown option label" in proc.stderr
