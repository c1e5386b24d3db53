"""Loud reward failures (issue 15, item 1, reward side): NaN, ±inf and exceptions are all failures with a message;
per-reward failed shares add up over batches and ranks; `check_failures` stops a run over
``rewards.max_failed_frac``; an inf never reaches the combined reward."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.rewards import FailureReport, RewardFailureError, check_failures, combine_rewards, score_all
from astrolabe_rl.rewards.async_ import AsyncScorer
from astrolabe_rl.rewards.base import FunctionReward

INF = float("inf")


def videos(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def returns(values: list[float]) -> FunctionReward:
    """A reward that returns fixed values (one per video)."""
    return FunctionReward("fixed", lambda v, p: torch.tensor(values[: v.shape[0]]))


def always_raises(v: torch.Tensor, p: list[str]) -> torch.Tensor:
    raise RuntimeError("model weights missing")


@pytest.mark.parametrize("values, failed, words", [
    ([1.0, float("nan"), 2.0, 3.0], [1], ["1 NaN"]),
    ([1.0, INF, -INF, 3.0], [1, 2], ["1 +inf", "1 -inf"]),
    ([1.0, 2.0, 3.0, 4.0], [], []),
])
def test_nan_and_inf_scores_are_failures_with_a_message(values, failed, words):
    scores, errors = score_all({"r": returns(values)}, videos(), list("abcd"))
    got = scores["r"]
    assert torch.isnan(got).nonzero().flatten().tolist() == failed
    assert torch.isfinite(got[[i for i in range(4) if i not in failed]]).all()
    if failed:
        assert all(w in errors["r"] for w in words) and "of 4" in errors["r"], errors
    else:
        assert errors == {}


def test_an_exception_fails_every_sample_and_keeps_the_message():
    scores, errors = score_all({"broken": FunctionReward("broken", always_raises)}, videos(), list("abcd"))
    assert torch.isnan(scores["broken"]).all()
    assert errors == {"broken": "RuntimeError: model weights missing"}


def test_a_batch_that_raises_but_scores_alone_is_no_failure():
    def batch_only_fails(v: torch.Tensor, p: list[str]) -> torch.Tensor:
        if v.shape[0] > 1:
            raise RuntimeError("out of memory")
        return v.mean(dim=(1, 2, 3, 4))

    scores, errors = score_all({"m": FunctionReward("m", batch_only_fails)}, videos(), list("abcd"))
    assert torch.isfinite(scores["m"]).all() and errors == {}


def test_a_rewards_own_item_message_is_preferred_to_a_bare_nan():
    reward = returns([1.0, float("nan"), 2.0, 3.0])
    reward.extras = {"errors": {1: "HTTP 413: video too large"}}
    _, errors = score_all({"remote": reward}, videos(), list("abcd"))
    assert errors["remote"] == "HTTP 413: video too large"


def test_report_counts_merge_and_name_the_first_error():
    nan = float("nan")
    first = FailureReport.from_scores({"a": torch.tensor([1.0, nan]), "b": torch.tensor([1.0, 2.0])},
                                      {"a": "first message", "b": "ignored: b did not fail"})
    second = FailureReport.from_scores({"a": torch.tensor([nan, INF]), "b": torch.tensor([nan, 2.0])},
                                       {"a": "second message", "b": "b broke"})
    report = first.merge(second)
    assert report.scored == {"a": 4, "b": 4} and report.failed == {"a": 3, "b": 1}
    assert report.first_error == {"a": "first message", "b": "b broke"}
    assert report.metrics() == {"reward/a/failed_frac": 0.75, "reward/b/failed_frac": 0.25}
    text = report.warning(epoch=7)
    assert "reward a failed on 3 of 4 samples in epoch 7; first error: first message" in text
    assert "reward b failed on 1 of 4" in text and "b broke" in text
    assert FailureReport.from_scores({"a": torch.ones(3)}).warning(epoch=1) is None
    assert FailureReport.from_scores({"a": torch.ones(3)}).metrics() == {"reward/a/failed_frac": 0.0}


def test_check_failures_stops_over_the_limit_only():
    nan = float("nan")
    report = FailureReport.from_scores({"hps": torch.tensor([nan, nan, 1.0, 2.0]), "mon": torch.full((4,), nan)},
                                       {"hps": "CUDA error", "mon": "monitor broke"})
    check_failures(report, 0.5, names=["hps"])  # exactly at the limit: allowed
    with pytest.raises(RewardFailureError, match=r"reward hps failed on 2 of 4 samples \(50%\).*0\.4.*CUDA error"):
        check_failures(report, 0.4, names=["hps"])
    with pytest.raises(RewardFailureError, match="reward mon failed on 4 of 4.*monitor broke"):
        check_failures(report, 0.5)  # every reward when names is None
    check_failures(report, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_failures(report, 1.5)
    assert issubclass(RewardFailureError, ValueError)  # the CLI prints ValueErrors as one line


@pytest.mark.parametrize("enabled", [True, False])
def test_the_scorer_accumulates_failures_until_drained(enabled):
    calls = {"n": 0}

    def flaky(v: torch.Tensor, p: list[str]) -> torch.Tensor:
        calls["n"] += 1
        out = torch.ones(v.shape[0])
        out[0] = INF if calls["n"] == 1 else float("nan")
        return out

    seen: list[tuple[str, str]] = []
    fine = FunctionReward("fine", lambda v, p: torch.ones(v.shape[0]))
    rewards = {"flaky": FunctionReward("flaky", flaky), "fine": fine}
    with AsyncScorer(rewards, enabled=enabled, on_error=lambda n, m: seen.append((n, m))) as scorer:
        results = [scorer.submit(videos(4, s), list("abcd")).result(timeout=30) for s in range(3)]
        report = scorer.drain_failures()
        assert scorer.drain_failures().scored == {}  # drained: the next epoch starts from zero
    assert all(torch.isnan(r["flaky"][0]) and not torch.isnan(r["flaky"][1:]).any() for r in results)
    assert report.scored == {"flaky": 12, "fine": 12} and report.failed == {"flaky": 3, "fine": 0}
    assert "1 +inf" in report.first_error["flaky"]  # the first batch's message, not a later one
    assert [n for n, _ in seen] == ["flaky"] * 3


def test_an_infinite_score_never_becomes_an_infinite_total():
    groups = torch.tensor([0, 0, 1, 1])
    for mode in ("raw", "group_z"):
        total, norm = combine_rewards({"a": torch.tensor([1.0, INF, 2.0, 3.0])}, {"a": 1.0}, groups, mode=mode)
        assert torch.isnan(total[1]) and torch.isfinite(total[[0, 2, 3]]).all(), (mode, total)
        assert not torch.isinf(norm["a"]).any()
