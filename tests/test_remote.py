"""The reward server and client on 127.0.0.1: round trips (msgpack, JSON, mp4), per-item failures, timeouts,
size limits, and the ``serve-reward`` command's parser; and the hardening against hostile clients (malformed
Content-Length, slow clients, mp4s that decode to more than they claim). Every server stops at the end of its
test; every raw socket has a timeout."""

from __future__ import annotations

import argparse
import json
import socket
import threading
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
    sent = []
    send = remote._send
    remote._send = lambda body: sent.append(body) or send(body)
    # both 0.3 s attempts time out: had the client waited for the 2 s reward it would have got an answer
    with pytest.raises(RemoteRewardError, match="failed after 2 attempts.*timed out"):
        remote(videos(1), ["a"])
    assert len(sent) == 2
    # then it fails fast: no request reaches the server during the cooldown (counted, not timed: issue 26)
    with pytest.raises(RemoteRewardError, match="failed recently"):
        remote(videos(1), ["a"])
    assert len(sent) == 2
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
    assert args.request_timeout == 60.0 and args.max_decoded_mb == 1024.0
    assert callable(args.func)


# ------------------------------------------------------------------------------------- a hardened server (issue 15)


def raw_exchange(url: str, send: bytes, read_timeout: float = 5.0) -> tuple[int, dict]:
    """Send raw bytes to the server on loopback; return the status and the JSON answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(send)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer; got {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = int(next(v for k, v in (line.split(": ", 1) for line in lines[1:]) if k.lower() == "content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "12abc", "²"])
def test_a_malformed_content_length_gets_400_and_the_server_keeps_serving(server, value):
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {value}\r\n\r\n"
    status, answer = raw_exchange(server.url, head.encode())
    assert status == 400 and "Content-Length must be a non-negative integer" in answer["error"], answer
    status, _ = raw_exchange(server.url, b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411  # a missing length is still "length required"
    torch.testing.assert_close(RemoteReward(server.url, "mean")(videos(1), ["a"]), quantised_mean(videos(1)))


@pytest.mark.parametrize("stage", ["idle", "headers", "body"])
def test_a_slow_client_gets_408_at_the_deadline_however_it_trickles(stage):
    """One byte every 0.1 s never trips a per-read timeout of 0.5 s; the 0.5 s deadline for the request does."""
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    sent_at_once, trickled = {"idle": (b"", b""), "headers": (b"", head), "body": (head, b"{" * 100)}[stage]
    with RewardServer({"mean": FunctionReward("mean", mean_value)}, request_timeout=0.5) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10.0) as sock:
            stop = threading.Event()

            def trickle() -> None:
                for byte in trickled:
                    if stop.wait(0.1):
                        return
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        return

            start = time.monotonic()
            sock.sendall(sent_at_once)
            thread = threading.Thread(target=trickle, daemon=True)
            thread.start()
            try:
                status, answer = read_answer(sock)
            finally:
                stop.set()
                thread.join(timeout=2)
            elapsed = time.monotonic() - start
            assert status == 408 and "within 0.5 s" in answer["error"], answer
            # never before the deadline; the upper bound is loose (a loaded machine answers late) and still far
            # below the 8-10 s a client trickling the whole request would take without one
            assert 0.4 < elapsed < 5.0, elapsed
            assert sock.recv(1) == b""  # and the connection is closed
        # a well-behaved client is served as before
        torch.testing.assert_close(RemoteReward(srv.url, "mean")(videos(1), ["a"]), quantised_mean(videos(1)))


def mp4_item(video: torch.Tensor, **claims: int) -> dict:
    t, _, h, w = video.shape
    item = {"id": "0", "prompt": "x", "frames": t, "height": h, "width": w, "encoding": "mp4",
            "data": encode_video(video, "mp4")}
    return {**item, **claims}


def test_an_mp4_is_checked_against_its_header_before_decoding(server, monkeypatch):
    import astrolabe_rl.video as video

    def never(*args):
        raise AssertionError("decoded an mp4 whose header does not match the item")

    real = torch.rand(12, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(video, "decode_into", never)
    for claims, says in [({"frames": 2, "height": 16, "width": 16}, "header says 12 frames of 64×96"),
                         ({"frames": 12, "height": 32}, "header says 12 frames of 64×96; 12 frames of 32×96")]:
        status, answer = server.score({"reward": "mean", "items": [mp4_item(real, **claims)]})
        result = answer["items"][0]
        assert status == 200 and result["status"] == "error" and says in result["error"], result
    garbage = {**mp4_item(real[:2]), "data": b"\0\0\0\x18ftypmp42" + b"\xff" * 64}
    assert "not a readable mp4" in server.score({"reward": "mean", "items": [garbage]})[1]["items"][0]["error"]


def test_decoding_stops_at_what_a_lying_header_claims(monkeypatch):
    import astrolabe_rl.video as video

    real = torch.rand(12, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    data = encode_video(real, "mp4")
    monkeypatch.setattr(video, "probe_mp4", lambda source: video.Mp4Header(3, 64, 96, 16.0))
    with pytest.raises(ValueError, match="decodes to more than the 3 frames"):
        video.read_mp4_bounded(data, 3, 64, 96)
    monkeypatch.setattr(video, "probe_mp4", lambda source: video.Mp4Header(12, 32, 48, 16.0))
    with pytest.raises(ValueError, match="frame 0 of the mp4 is 64×96, not the 32×48"):
        video.read_mp4_bounded(data, 12, 32, 48)
    monkeypatch.setattr(video, "probe_mp4", lambda source: video.Mp4Header(20, 64, 96, 16.0))
    with pytest.raises(ValueError, match="decodes to 12 frames; its header says 20"):
        video.read_mp4_bounded(data, 20, 64, 96)


def test_decoded_bytes_per_request_are_bounded_and_the_client_splits_on_them():
    v = videos(3, 2, 16, 16)  # 6144 decoded bytes each: float32, as the frames are held (1536 as 8-bit)
    with RewardServer({"mean": FunctionReward("mean", mean_value)}, max_decoded_bytes=2 * 6144) as srv:
        items = [{"id": str(i), "prompt": "p", "frames": 2, "height": 16, "width": 16, "encoding": "rgb24",
                  "data": encode_video(v[i])} for i in range(3)]
        status, answer = srv.score({"reward": "mean", "items": items})
        assert [r["status"] for r in answer["items"]] == ["ok", "ok", "error"]
        assert "max_decoded_bytes=12288" in answer["items"][2]["error"]
        assert srv.info()["max_decoded_bytes"] == 12288
        split = RemoteReward(srv.url, "mean", max_decoded_bytes=12288)
        torch.testing.assert_close(split(v, ["a", "b", "c"]), quantised_mean(v))
        alone = RemoteReward(srv.url, "mean", max_decoded_bytes=1000)
        assert torch.isnan(alone(v, ["a", "b", "c"])).all()
        assert "over max_decoded_bytes=1000" in alone.extras["errors"][0]


@pytest.mark.parametrize("claims", [{"frames": 0}, {"height": -4}, {"width": "16"}, {"frames": True}])
def test_an_item_must_declare_a_positive_integer_shape(server, claims):
    item = {"id": "0", "prompt": "x", "frames": 2, "height": 4, "width": 4, "encoding": "rgb24",
            "data": b"\0" * 96, **claims}
    result = server.score({"reward": "mean", "items": [item]})[1]["items"][0]
    assert result["status"] == "error" and "positive integers" in result["error"], result


# ------------------------------------------------------------------------------------- every client answered (issue 28)


def json_request(v: torch.Tensor) -> bytes:
    from astrolabe_rl.rewards.remote import pack

    t, _, h, w = v.shape
    body = pack({"reward": "mean", "items": [{"id": "0", "prompt": "p", "frames": t, "height": h, "width": w,
                                               "encoding": "rgb24", "data": encode_video(v)}]}, JSON)
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def parallel_raw_clients(url: str, n: int, request: bytes) -> list:
    """``n`` raw clients connect at the same moment and send ``request``; each one's status, or its socket error."""
    start = threading.Barrier(n)
    got: list = [None] * n

    def client(k: int) -> None:
        try:
            start.wait(timeout=30)
            got[k] = raw_exchange(url, request, read_timeout=30.0)[0]
        except Exception as e:  # noqa: BLE001 - a reset is what is counted
            got[k] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return got


def test_100_parallel_raw_clients_are_all_answered():
    """A listen backlog of 5 reset most of them; now each gets 200, or a 503 if the server is full."""
    with RewardServer({"mean": FunctionReward("mean", mean_value)}) as srv:
        got = parallel_raw_clients(srv.url, 100, json_request(videos(1, 2, 8, 8)[0]))
    assert all(status in (200, 503) for status in got), [s for s in got if s not in (200, 503)][:5]
    assert got.count(200) >= 1


def test_a_full_server_answers_503_at_once_and_serves_the_clients_it_holds():
    release = threading.Event()

    def waits(v, prompts):
        release.wait(timeout=30)
        return v.mean(dim=(1, 2, 3, 4))

    request = json_request(videos(1, 2, 8, 8)[0])
    with RewardServer({"mean": FunctionReward("mean", waits)}, max_clients=4) as srv:
        assert srv.info()["max_clients"] == 4 and srv.httpd.request_queue_size == 4  # the listen backlog
        held = []
        first = threading.Thread(target=lambda: held.extend(parallel_raw_clients(srv.url, 4, request)), daemon=True)
        first.start()
        for _ in range(400):  # until the 4 connections hold every thread (bounded: 400 × 0.05 s)
            if srv.httpd._serving._value == 0:
                break
            time.sleep(0.05)
        turned_away = [raw_exchange(srv.url, request) for _ in range(10)]
        release.set()
        first.join(timeout=30)
    assert [status for status, _ in turned_away] == [503] * 10
    assert "maximum of 4 clients" in turned_away[0][1]["error"]
    assert held == [200] * 4


def test_conflicting_content_lengths_and_transfer_encodings_are_refused(server):
    head = ("POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
            "Content-Length: 40\r\n\r\n{}")
    status, answer = raw_exchange(server.url, head.encode())
    assert status == 400 and "Content-Length is given 2 times" in answer["error"]
    head = ("POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Content-Length: 2\r\n\r\n{}")
    status, answer = raw_exchange(server.url, head.encode())
    assert status == 400 and "Transfer-Encoding is not supported" in answer["error"]


def test_a_port_in_use_is_one_line(capsys):
    from astrolabe_rl import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve-reward", "--reward", "sharpness", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot serve on 127.0.0.1:{port}: address already in use")


def test_a_dead_server_is_reported_as_refused_not_as_the_cooldown():
    with RewardServer({"mean": FunctionReward("mean", mean_value)}) as srv:
        url = srv.url
    remote = RemoteReward(url, "mean", retries=0)
    scores, errors = score_all({"mean": remote}, videos(2), ["a", "b"])  # batch, then item by item in the cooldown
    assert torch.isnan(scores["mean"]).all() and "connection refused" in errors["mean"]
