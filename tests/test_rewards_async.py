"""AsyncScorer: background scoring equals synchronous scoring, overlaps with the caller, isolates failures, and
applies back-pressure."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from astrolabe_rl.rewards import build_reward
from astrolabe_rl.rewards.async_ import AsyncScorer
from astrolabe_rl.rewards.base import FunctionReward


def brightness(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return videos.mean(dim=(1, 2, 3, 4))


def videos(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_async_scores_equal_sync_scores_and_carry_extras():
    rewards = {"bright": FunctionReward("bright", brightness),
               "flow": build_reward("flow", backend="lk", size=16, frames=4)}
    v, prompts = videos(), ["a", "b", "c"]
    with AsyncScorer(rewards) as scorer:
        result = scorer.submit(v, prompts).result(timeout=60)
    sync = AsyncScorer(rewards, enabled=False).submit(v, prompts)
    assert sync.done()
    for key in ("bright", "flow", "flow/magnitude", "flow/smoothness", "flow/jitter"):
        torch.testing.assert_close(result[key], sync.result()[key])
    torch.testing.assert_close(result["bright"], v.mean(dim=(1, 2, 3, 4)))


def test_scoring_overlaps_with_the_caller():
    release = threading.Event()

    def waits(v: torch.Tensor, p: list[str]) -> torch.Tensor:
        assert release.wait(timeout=10), "the caller never got control back while scoring"
        return torch.zeros(v.shape[0])

    with AsyncScorer({"waits": FunctionReward("waits", waits)}) as scorer:
        future = scorer.submit(videos(), ["a", "b", "c"])
        assert not future.done()  # submit returned while the reward is still running
        release.set()  # "the next rollout" runs here
        assert future.result(timeout=10)["waits"].tolist() == [0.0, 0.0, 0.0]


def test_a_failing_reward_gives_nan_and_reports_without_losing_the_others():
    def picky(v: torch.Tensor, p: list[str]) -> torch.Tensor:
        if "bad" in p:
            raise ValueError("cannot score 'bad'")
        return torch.ones(v.shape[0])

    seen = []
    rewards = {"picky": FunctionReward("picky", picky), "bright": FunctionReward("bright", brightness)}
    with AsyncScorer(rewards, on_error=lambda name, msg: seen.append((name, msg))) as scorer:
        out = scorer.submit(videos(), ["ok", "bad", "ok"]).result(timeout=30)
    assert out["picky"][[0, 2]].tolist() == [1.0, 1.0] and torch.isnan(out["picky"][1])
    assert not torch.isnan(out["bright"]).any()
    assert seen and seen[0][0] == "picky" and "cannot score" in seen[0][1]


def test_submit_blocks_when_too_many_batches_are_pending():
    gate = threading.Event()

    def gated(v: torch.Tensor, p: list[str]) -> torch.Tensor:
        gate.wait(timeout=10)
        return torch.zeros(v.shape[0])

    scorer = AsyncScorer({"gated": FunctionReward("gated", gated)}, max_pending=1)
    first = scorer.submit(videos(), ["a", "b", "c"])
    blocked = threading.Event()

    def second() -> None:
        scorer.submit(videos(1), ["a", "b", "c"]).result(timeout=10)
        blocked.set()

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    assert not blocked.is_set()  # the second submit waits for a free slot
    gate.set()
    first.result(timeout=10)
    thread.join(timeout=10)
    assert blocked.is_set()
    scorer.close()


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="workers and max_pending"):
        AsyncScorer({}, workers=0)
