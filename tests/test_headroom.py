"""What a reward can buy before RL (issue 27, items 1 and 3): reranking, within-group rank agreement and diversity
against hand computations, `bench/headroom.py --quick` end to end, and the demo's best-of-4 bar on made-up scores."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from astrolabe_rl.toy import headroom as hr

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "headroom.py"


def test_best_of_n_matches_a_hand_computation_with_ties_and_n_below_k():
    select = torch.tensor([[0.1, 0.9, 0.3, 0.95],   # best of 2: sample 1; of 3: 1; of 4: 3
                           [0.5, 0.5, 0.7, 0.7],    # ties: best of 2 -> sample 0 (the first); of 4 -> sample 2
                           [0.2, 0.2, 0.2, 0.2]])   # constant: always sample 0
    judge = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                          [10.0, 20.0, 30.0, 40.0],
                          [5.0, 6.0, 7.0, 8.0]])
    assert hr.best_of_n(select, judge, 1).tolist() == [1.0, 10.0, 5.0]
    assert hr.best_of_n(select, judge, 2).tolist() == [2.0, 10.0, 5.0]
    assert hr.best_of_n(select, judge, 3).tolist() == [2.0, 30.0, 5.0]
    assert hr.best_of_n(select, judge, 4).tolist() == [4.0, 30.0, 5.0]
    assert hr.best_of_n_index(select, 4).tolist() == [3, 2, 0]
    assert hr.best_of_n(judge, judge, 4).tolist() == [4.0, 40.0, 8.0]  # chosen by the judge: its maximum
    with pytest.raises(ValueError, match="1 <= n <= K = 4"):
        hr.best_of_n(select, judge, 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        hr.best_of_n(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2), 2)
    with pytest.raises(ValueError, match="same"):
        hr.best_of_n(select, judge[:, :3], 2)


def test_within_group_spearman_matches_a_hand_computation():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [4.0, 3.0, 2.0, 1.0],
                      [5.0, 5.0, 5.0, 5.0],      # no spread: skipped
                      [1.0, 1.0, 2.0, 3.0]])     # a tie: ranks 1.5, 1.5, 3, 4
    b = torch.tensor([[1.0, 3.0, 2.0, 4.0],      # 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/60 = 0.8
                      [1.0, 2.0, 3.0, 4.0],      # reversed: −1
                      [1.0, 2.0, 3.0, 4.0],
                      [10.0, 20.0, 30.0, 40.0]])  # Pearson of the ranks: 4.5 / √(4.5·5) = 0.948683
    got = hr.within_group_spearman(a, b)
    assert (got.used, got.skipped) == (3, 1)
    assert got.rho == pytest.approx((0.8 - 1.0 + 4.5 / math.sqrt(22.5)) / 3, abs=1e-9)
    assert hr.average_ranks(a[3]).tolist() == [1.5, 1.5, 3.0, 4.0]
    nothing = hr.within_group_spearman(torch.ones(2, 3), b[:2, :3])
    assert math.isnan(nothing.rho) and (nothing.used, nothing.skipped) == (0, 2)


def test_group_sds_and_pairwise_rms_match_hand_computations():
    within, between = hr.group_sds(torch.tensor([[1.0, 3.0], [5.0, 7.0]]))
    assert within == pytest.approx(math.sqrt(2.0)) and between == pytest.approx(math.sqrt(8.0))
    videos = torch.stack([torch.full((2, 3, 4, 4), v) for v in (0.0, 0.3, 0.5)])[None]  # [1, 3, T, 3, H, W]
    assert hr.pairwise_rms(videos).tolist() == pytest.approx([(0.3 + 0.5 + 0.2) / 3])
    with pytest.raises(ValueError, match="K >= 2"):
        hr.pairwise_rms(videos[:, :1])


def test_headroom_stats_on_made_up_scores():
    total = torch.tensor([[0.1, 0.9, 0.3, 0.95], [0.5, 0.5, 0.7, 0.7]])
    oracle = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.1, 0.3, 0.5, 0.9]])
    scores = {"total": total, "oracle/oracle": oracle, "oracle/agreement": oracle, "oracle/render": -oracle}
    out = hr.headroom_stats(scores, ns=(2, 4, 8))
    assert out["best_of"]["total"] == {"1": 0.15, "2": 0.25, "4": 0.65}  # n = 8 > K is left out
    assert out["best_of"]["oracle/oracle"] == {"1": 0.15, "2": 0.35, "4": 0.85}
    rho = hr.within_group_spearman(total, oracle).rho
    assert out["spearman"]["total"] == {"oracle": round(rho, 4), "agreement": round(rho, 4), "render": round(-rho, 4)}
    assert out["mean"]["oracle/oracle"] == pytest.approx(float(oracle.mean()), abs=1e-4)


def test_noise_seeds_are_the_demos_held_out_draws():
    assert [hr.noise_seed(i, s) for i in range(2) for s in range(3)] == [0, 10_000, 20_000, 1, 10_001, 20_001]
    with pytest.raises(ValueError, match="prompt indices"):
        hr.noise_seed(10_000, 0)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}


def test_headroom_quick_prints_one_json_line_and_a_table(tmp_path):
    table = tmp_path / "headroom.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--markdown", str(table)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{c} in the JSON line: write null"))
    assert (out["bench"], out["model"], out["prompts"], out["samples"]) == ("headroom", "toy", 2, 2)
    assert list(out["splits"]) == ["train", "test"]
    for split in out["splits"].values():
        assert {"mean", "sd_within", "sd_between", "spearman", "spearman_skipped", "best_of", "diversity",
                "renders_oracle", "first_noise_seeds"} <= set(split)
        assert split["first_noise_seeds"] == [hr.noise_seed(0, 0), hr.noise_seed(1, 0)]
        assert {"toy_quality", "toy_motion", "toy_text", "total", "toy_noise", "oracle/oracle", "oracle/agreement",
                "oracle/render"} <= set(split["mean"])
        assert set(split["spearman"]) == {"toy_quality", "toy_motion", "toy_text", "total"}
        assert all(set(v) == {"oracle", "agreement", "render"} for v in split["spearman"].values())
        assert set(split["best_of"]) == {"total", "oracle/oracle"}
        assert list(split["best_of"]["total"]) == ["1", "2"]  # K = 2: best-of-4 and 8 need more samples
        assert split["best_of"]["total"]["1"] == split["best_of"]["oracle/oracle"]["1"]  # one sample: nothing to pick
        by_oracle = split["best_of"]["oracle/oracle"]["2"]  # the oracle's own pick of 2 beats the total's and the mean
        assert by_oracle >= split["best_of"]["total"]["2"] and by_oracle >= split["mean"]["oracle/oracle"] - 1e-4
        assert split["diversity"]["renders"] > 0
        assert split["renders_oracle"] > 0.9  # the world's renders: the ceiling
    rows = [line for line in table.read_text().splitlines() if line.startswith("| toy |")]
    assert [r.split(" | ")[1] for r in rows] == ["train", "test"]


def _bench_module():
    spec = importlib.util.spec_from_file_location("headroom_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_markdown_table_replaces_a_models_rows_and_keeps_the_text(tmp_path):
    bench = _bench_module()
    path = tmp_path / "headroom.md"
    bench.update_markdown(path, ["| toy | train | a |", "| toy | test | b |"])
    bench.update_markdown(path, ["| toy_fm | test | c |"])
    path.write_text(path.read_text() + "\nNotes written by hand.\n")
    bench.update_markdown(path, ["| toy | test | d |"])
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| toy")]
    assert rows == ["| toy | train | a |", "| toy | test | d |", "| toy_fm | test | c |"]
    assert text.startswith("# Headroom") and text.endswith("Notes written by hand.\n")
    (tmp_path / "other.md").write_text("# something else\n")
    with pytest.raises(ValueError, match="no headroom table"):
        bench.update_markdown(tmp_path / "other.md", ["| toy | test | d |"])


# ------------------------------------------------------------------------------------------------ the demo's bar


def test_the_demos_best_of_4_reranks_by_the_training_total_never_the_oracle(monkeypatch):
    """`base_best_of` draws 3 more base samples per (prompt, seed) at fresh draws, picks by the training total (ties:
    the first), and never calls the oracle."""
    from astrolabe_rl.rewards.base import FunctionReward
    from astrolabe_rl.toy import demo, oracle

    prompts, seeds = ["p0", "p1"], [0, 1]
    draws = []

    def fake_videos(world, which, prompts_, seeds_):  # one constant video per (prompt, draw): its value = the draw
        assert which == "base"
        draws.append(list(seeds_))
        return torch.tensor([float(s % 3) for _ in prompts_ for s in seeds_]).view(-1, 1, 1, 1, 1).expand(-1, 2, 3, 4, 4)

    def no_oracle(*args, **kwargs):
        raise AssertionError("reranking read the oracle")

    monkeypatch.setattr(demo, "held_out_videos", fake_videos)
    monkeypatch.setattr(oracle, "oracle_scores", no_oracle)
    world = SimpleNamespace(rewards={"r": FunctionReward("r", lambda v, p: v.mean(dim=(1, 2, 3, 4)))},
                            monitors={}, weights={"r": 1.0})
    first = torch.full((4, 2, 3, 4, 4), 1.0)  # the `before` videos: value 1 for every (prompt, seed)
    best, chosen = demo.base_best_of(world, prompts, seeds, first)
    assert draws == [[2, 3], [4, 5], [6, 7]]  # draws s + j·(max(seeds) + 1), j = 1..3: none an evaluation seed
    # candidates' values per seed s: [1 (first), (s+2)%3, (s+4)%3, (s+6)%3] -> s=0: [1, 2, 1, 0]; s=1: [1, 0, 2, 1]
    assert chosen.tolist() == [1, 2, 1, 2]
    assert best.flatten(1).mean(1).tolist() == [2.0, 2.0, 2.0, 2.0]


def test_rl_minus_best_of_4_is_the_paired_oracle_difference():
    from astrolabe_rl.toy.demo import versus_best_of
    from astrolabe_rl.toy.oracle import ATTRIBUTES

    names = ["oracle/oracle", *(f"oracle/{a}" for a in (*ATTRIBUTES, "agreement", "render")), "total"]
    after = {n: torch.tensor([0.6, 0.5, 0.7, 0.4]) for n in names}
    best = {n: torch.tensor([0.5, 0.5, 0.6, 0.6]) for n in names}
    best["oracle/colour"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = versus_best_of(after, best, torch.tensor([0, 1, 3, 0]))
    delta = torch.tensor([0.1, 0.0, 0.1, -0.2], dtype=torch.float64)
    assert got["rl_minus_best_of_4"] == pytest.approx(-0.0, abs=1e-9)
    assert got["rl_minus_best_of_4_se"] == pytest.approx(float(delta.std() / 2), abs=1e-4)
    block = got["best_of_4"]
    assert block["oracle"] == {"after": 0.55, "best_of_4": 0.55, "delta": 0.0, "delta_se": round(float(delta.std() / 2), 4)}
    assert set(block["attributes"]) == {*ATTRIBUTES, "agreement", "render"}
    assert block["attributes"]["colour"]["delta"] == pytest.approx(0.05)
    assert block["first_candidate_chosen"] == 0.5 and block["selected_by"] == "total"
