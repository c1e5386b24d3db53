"""`astrolabe demo --long`: streaming RL of the long toy model, judged window by window on the oracle."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from astrolabe_rl.rewards.base import build_reward
from astrolabe_rl.toy import world
from astrolabe_rl.toy.model import LONG_WEIGHTS
from astrolabe_rl.train.dist import shutdown

needs_long_weights = pytest.mark.skipif(
    not LONG_WEIGHTS.is_file(), reason="the long toy model is not built: python -m astrolabe_rl.toy.distill --long")


@pytest.fixture
def _single_process():
    yield
    shutdown()


def test_demo_parser_takes_long():
    from astrolabe_rl.toy.demo import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--long", "--quick"])
    assert args.long and args.quick


def test_long_demo_config_is_streaming_on_the_long_model(tmp_path):
    from astrolabe_rl.toy.long_demo import long_demo_config

    cfg = long_demo_config(tmp_path, "quick", seed=3)
    assert (cfg.model.family, cfg.train.mode, cfg.train.seed) == ("toy_long", "streaming", 3)
    assert cfg.streaming.video_frames == cfg.rollout.num_frames == 45 and cfg.streaming.window == 9
    assert all(c >= 27 for c in cfg.streaming.choices)  # the late windows, past the extension's 27 frames
    assert "toy_oracle_long" in cfg.eval.monitors and not set(cfg.data.eval_inline) & set(world.split("test"))


def _fake_world(window=9):
    names = ("toy_quality_hackable",)
    return SimpleNamespace(cfg=SimpleNamespace(streaming=SimpleNamespace(window=window)),
                           rewards={n: build_reward(n) for n in names}, weights={n: 1.0 for n in names},
                           monitors={"toy_noise": build_reward("toy_noise")})


def test_the_late_window_headline_does_not_rise_for_a_run_that_only_hacks():
    """Long videos that only add noise to the base raise the hackable proxy, not the late windows' oracle."""
    from astrolabe_rl.toy.long_demo import compare_windows, summarise, window_table
    from astrolabe_rl.toy.oracle import degrade

    prompts, seeds = world.eval_prompts(2, split="test"), [0]
    real = world.render_long([[(0, p)] for p in prompts], seeds * len(prompts), 27)
    base = degrade(real, "blur")
    hacked = degrade(base, "noise", strength=0.5)
    fake = _fake_world()
    results = compare_windows(*(window_table(fake, v, prompts, seeds) for v in (base, hacked, real)))
    assert len(results["oracle/oracle"]["before"]) == 3  # 27 frames: three windows of 9
    assert results["total"]["late"]["delta"] > 0 and results["toy_noise"]["late"]["delta"] > 0
    fake.cfg.train, fake.cfg.streaming.window, fake.num_frames = SimpleNamespace(epochs=0, seed=0), 9, 27
    summary = summarise(fake, results, prompts, seeds, "quick")
    assert summary["late_oracle_gap_closed"] <= 0.0 and "render" in summary["late_oracle_worse"]
    assert summary["coherence"]["real"] > 0.9 and 0.5 < summary["boundary_jump"]["real"] < 1.1


def test_the_late_window_headline_rises_when_late_windows_are_mended():
    """A run whose late windows become the world's renders closes the late windows' oracle gap fully."""
    from astrolabe_rl.toy.long_demo import compare_windows, window_table
    from astrolabe_rl.toy.oracle import degrade

    prompts, seeds = world.eval_prompts(2, split="test"), [0]
    real = world.render_long([[(0, p)] for p in prompts], seeds * len(prompts), 27)
    base = torch.cat([real[:, :9], degrade(real[:, 9:], "blob")], dim=1)  # decays after the first window
    fake = _fake_world()
    results = compare_windows(*(window_table(fake, v, prompts, seeds) for v in (base, real, real)), late=2)
    assert results["oracle/oracle"]["late"]["gap_closed"] == pytest.approx(1.0)
    before = results["oracle/oracle"]["before"]
    assert before[0] > before[1] and before[0] > before[2]  # the decay the headline measures


@needs_long_weights
def test_reduced_long_quick_demo_trains_windows_and_reports_per_window(tmp_path, _single_process):
    from astrolabe_rl.toy.long_demo import run_long_demo

    summary = run_long_demo(tmp_path, quick=True, epochs=2, progress=False, test_prompts=2, eval_seeds=1,
                            overrides=["rollout.prompts_per_epoch=2", "rollout.candidates=4", "eval.every=1"])
    for name in ("strip-seed0.png", "windows.png", "curves.png", "long-0.mp4", "summary.json",
                 "run/adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert len(summary["per_window"]["oracle/oracle"]["after"]) == 5
    assert summary["late_oracle_gap_closed"] is not None and summary["peak_rss_mb"] > 0
    assert [c["epoch"] for c in summary["selected"]["dev_oracle_curve"]] == [0, 1, 2]
