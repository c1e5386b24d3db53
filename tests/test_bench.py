"""Smoke test of the rollout benchmark script: the tiny CPU run emits one well-formed JSON line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "rollout.py"


def _measured(x) -> bool:
    """A timing or a memory figure: a finite number >= 0. Never > 0: a sub-millisecond step on a quiet machine is
    a valid measurement, and how fast a machine is belongs in a benchmark's JSON line, not in an assertion."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _positive(x) -> bool:
    """A figure that is zero only when nothing was measured (a rate over frames, a cache's size)."""
    return _measured(x) and x > 0


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
        for key in ("dit_s_median", "peak_mem_gb", "text_kv_s_median"):
            assert _measured(r[key]), (key, r)
        for key in ("dit_frames_per_s", "cache_kv_gb"):
            assert _positive(r[key]), (key, r)
        assert math.isclose(r["dit_frames_per_s"], r["batch"] * out["pixel_frames"] / r["dit_s_median"])


def test_gpu_suite_tiny_runs_on_a_cpu_and_prints_one_table():
    env = dict(os.environ, PYTHON=sys.executable, REWARDS="aesthetic")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu_suite on cpu") and "do not apply" in lines[1]
    table = {line[:36].strip(): line[36:].split() for line in lines[3:]}
    for measure in ("decode b8 s/video", "sampling-copy merge s", "train step s/sample", "reward aesthetic s/video",
                    "streaming 81 frames step s", "streaming 240 frames step s"):
        assert _measured(float(table[measure][0])), measure
    for measure in ("rollout b1 DiT frames/s", "rollout b8 end-to-end frames/s"):
        assert _positive(float(table[measure][0])), measure  # frames over a finite time
    # printed with significant digits, so a timing too small for three decimals still reads as what it is
    assert all(re.fullmatch(r"-?[\d.]+(e[-+]\d+)?|nan|inf", row[0]) for row in table.values()), table
    assert "x public" not in proc.stdout  # no anchor ratios for a tiny CPU run


def test_rollout_bench_recipe_path_is_the_merged_sampling_copy(monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import rollout as bench_rollout

    from astrolabe_rl.policy import Policy

    built = []
    real = Policy.sampling_model
    monkeypatch.setattr(Policy, "sampling_model", lambda self: built.append(real(self)) or built[-1])
    out = bench_rollout.main(["--tiny", "--repeats", "1", "--warmup", "0", "--batches", "1", "--decode", "none"])
    assert out["path"] == "recipe" and out["lora_rank"] == 4 and _measured(out["merge_s_median"])
    assert built  # the timed sampler ran through Policy.sampling_model
    base = bench_rollout.main(["--tiny", "--repeats", "1", "--warmup", "0", "--batches", "1", "--decode", "none",
                               "--path", "base"])
    assert base["path"] == "base" and "merge_s_median" not in base


def test_reward_bench_gives_every_call_a_fresh_video():
    sys.path.insert(0, str(ROOT / "bench"))
    import rewards as bench_rewards

    seen = []
    made = iter(range(100))

    def make():
        next(made)
        return torch.rand(1, 2, 3, 8, 8)

    bench_rewards.measure(lambda videos, prompts: seen.append(videos), make, ["p"], repeats=3, warmup=2)
    assert len(seen) == 5 and len({id(v) for v in seen}) == 5
    assert all(not torch.equal(seen[0], v) for v in seen[1:])
