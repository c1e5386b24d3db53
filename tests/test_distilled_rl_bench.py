"""Smoke test of bench/distilled_rl.py: one row at the smallest size, its state file, the resume that skips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "distilled_rl.py"), "--quick", "--models", "student",
                           "--state", str(tmp_path / "state.jsonl"), "--out", str(tmp_path / "table.md"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0]), proc.stderr


def test_distilled_rl_quick_logs_the_update_and_resumes_from_its_state(tmp_path):
    result, log = _bench(tmp_path, "--options", "noise=rollout")
    assert result["bench"] == "distilled_rl" and result["runs_in_state"] == 1 and "student / noise=rollout" in log
    (row,) = [json.loads(line) for line in (tmp_path / "state.jsonl").read_text().splitlines()]
    assert row["option"] == "noise=rollout" and len(row["weights"]) == 12 and row["epochs"] == 2
    assert row["loss_by_sigma"] and all(v >= 0 for v in row["loss_by_sigma"].values())
    assert row["old_deviate"] >= 0 and row["v_norm_ratio"] > 0 and row["train_reward_last"] is not None
    table = (tmp_path / "table.md").read_text()
    assert "| student (" in table and "| noise=rollout | 1 |" in table

    again, log = _bench(tmp_path, "--options", "noise=rollout")  # the finished run is in the state: nothing reruns
    assert again["runs_in_state"] == 1 and "student / noise=rollout" not in log


def test_distilled_rl_rejects_an_unknown_option(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "distilled_rl.py"), "--options", "lr=1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2 and "unknown option label" in proc.stderr
