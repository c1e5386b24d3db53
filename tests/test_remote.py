"""The reward server and client on 127.0.0.1: round trips (msgpack, JSON, mp4), per-item failures, timeouts,
size limits, and the ``serve-reward`` command's parser. Every server stops at the end of its test."""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from astrolabe_rl.rewards import build_reward
from astrolabe_rl.rewards.base import FunctionReward, score_all
from astrolabe_rl.rewards.remote import (
    JSON,
    RemoteReward,
    RemoteRewardError,
    RewardServer,
    add_parser,
    decode_video,
    encode_video,
)


def mean_value(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    if any("explode" in p for p in prompts):
        raise RuntimeError("this prompt always fails")
    return videos.mean(dim=(1, 2, 3, 4))


def slow(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    time.sleep(2.0)
    return videos.mean(dim=(1, 2, 3, 4))


@pytest.fixture
def server():
    with RewardServer({"mean": FunctionReward("mean", mean_value), "slow": FunctionReward("slow", slow)},
                      max_request_bytes=200_000) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        yield srv


def quantised_mean(videos: torch.Tensor) -> torch.Tensor:
    return ((videos * 255).round() / 255).mean(dim=(1, 2, 3, 4))


def videos(b: int = 3, t: int = 4, h: int = 16, w: int = 24) -> torch.Tensor:
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("content_type", ["application/msgpack", JSON])
def test_round_trip_is_lossless_for_rgb24(server, content_type):
    v = videos()
    remote = RemoteReward(server.url, "mean", content_type=content_type)
    torch.testing.assert_close(remote(v, ["a", "b", "c"]), quantised_mean(v))
    assert remote.name == "mean" and remote.extras["errors"] == {}


def test_mp4_encoding_round_trips_through_the_server(server):
    v = videos(2, 5, 32, 48)
    scores = RemoteReward(server.url, "mean", encoding="mp4")(v, ["a", "b"])
    torch.testing.assert_close(scores, quantised_mean(v), atol=0.01, rtol=0)  # H.264 is lossy, the mean is not


def test_a_failing_item_fails_alone(server):
    v = videos()
    remote = RemoteReward(server.url, "mean")
    scores = remote(v, ["fine", "explode please", "fine too"])
    assert torch.isnan(scores[1]) and not torch.isnan(scores[[0, 2]]).any()
    torch.testing.assert_close(scores[[0, 2]], quantised_mean(v)[[0, 2]])
    assert "always fails" in remote.extras["errors"][1]
    # a malformed item (wrong byte count) is reported as that item's error
    item = {"id": "7", "prompt": "x", "frames": 2, "height": 4, "width": 4, "encoding": "rgb24", "data": b"\0" * 5}
    status, answer = server.score({"reward": "mean", "items": [item]})
    assert status == 200 and answer["items"][0]["status"] == "error" and "96 expected" in answer["items"][0]["error"]


def test_timeout_is_bounded_and_then_fails_fast(server):
    remote = RemoteReward(server.url, "slow", timeout=0.3, retries=1, backoff=0.05, cooldown_s=60)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="failed after 2 attempts.*timed out"):
        remote(videos(1), ["a"])
    assert time.monotonic() - start < 1.9  # two 0.3 s attempts, never the 2 s the reward takes
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="failed recently"):
        remote(videos(1), ["a"])
    assert time.monotonic() - start < 0.1
    # inside the trainer a transport failure becomes NaN scores plus an error message, never a crash
    scores, errors = score_all({"slow": remote}, videos(2), ["a", "b"])
    assert torch.isnan(scores["slow"]).all() and "failed recently" in errors["slow"]


def test_oversized_request_is_refused_and_the_client_splits_batches(server):
    big = videos(2, 40, 32, 48)  # 184,320 bytes per video; the server takes 200,000 per request
    with pytest.raises(RemoteRewardError, match="HTTP 413.*at most 200000"):
        RemoteReward(server.url, "mean", max_request_bytes=10**9)(big, ["a", "b"])
    split = RemoteReward(server.url, "mean", max_request_bytes=190_000)
    torch.testing.assert_close(split(big, ["a", "b"]), quantised_mean(big))
    tiny_limit = RemoteReward(server.url, "mean", max_request_bytes=1000)
    scores = tiny_limit(big, ["a", "b"])
    assert torch.isnan(scores).all() and "over max_request_bytes" in tiny_limit.extras["errors"][0]


def test_unknown_reward_and_protocol_are_refused(server):
    with pytest.raises(RemoteRewardError, match="HTTP 404.*not served here"):
        RemoteReward(server.url, "hpsv3")(videos(1), ["a"])
    assert server.score({"protocol": "other/9", "reward": "mean", "items": []})[0] == 400


def test_a_dead_server_costs_bounded_retries():
    with RewardServer({"mean": FunctionReward("mean", mean_value)}) as srv:
        url = srv.url
    remote = RemoteReward(url, "mean", retries=2, backoff=0.01, timeout=1.0)
    with pytest.raises(RemoteRewardError, match="failed after 3 attempts"):
        remote(videos(1), ["a"])


def test_remote_reward_is_built_like_any_reward_and_serves_a_learned_model():
    local = build_reward("clipscore", tiny=True)
    with RewardServer({"clipscore": local}) as srv:
        remote = build_reward("remote", url=srv.url, reward="clipscore", timeout=30.0)
        v = videos(2, 3, 40, 40)
        quantised = (v * 255).round() / 255
        torch.testing.assert_close(remote(v, ["a red ball", "a cat"]), local(quantised, ["a red ball", "a cat"]))


def test_encoding_helpers_agree():
    v = videos(1, 3, 8, 10)[0]
    item = {"frames": 3, "height": 8, "width": 10, "encoding": "rgb24", "data": encode_video(v)}
    torch.testing.assert_close(decode_video(item), (v * 255).round() / 255)
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_video(v, "png")


def test_serve_reward_parser_defaults_to_loopback():
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["serve-reward", "--reward", "hpsv3,videoalign_mq"])
    assert args.host == "127.0.0.1" and args.port == 8765 and args.max_request_mb == 256.0
    assert callable(args.func)
