"""Smoke test of bench/hacking.py: two rows at the smallest size, one JSON line, a markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hacking_quick_writes_the_table_and_one_json_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "hacking.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hacking.py"), "--quick", "--epochs", "2", "--out", str(out),
         "--rows", "no KL", "selective + dynamic"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "hacking" and list(result["results"]) == ["no KL", "selective + dynamic"]
    for row in result["results"].values():
        assert all(isinstance(v, float) for v in row.values()), row
    table = out.read_text().splitlines()
    rows = [line.split(" | ") for line in table if line.startswith("| ") and not line.startswith("| regularisation")]
    assert [r[0] for r in rows] == ["| no KL", "| selective + dynamic"]
    assert rows[0][-4].startswith("0.000 ± 0.000")  # no KL: the KL term covered nothing


def test_hacking_rejects_an_unknown_row():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "hacking.py"), "--rows", "KL=2"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2 and "unknown row label" in proc.stderr
