"""Decoded-video memory is bounded by what is really allocated (issue 28): the reward server and ``evaluate`` hold at
most their decode budget of float32 frames. Each case runs in a fresh subprocess and reports the growth of its peak
resident memory (``ru_maxrss``) over a baseline taken after a warm-up decode, so the interpreter, torch and the
codec do not count; the videos are small (64 MiB decoded) so the check takes seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from astrolabe_rl.video import decoded_bytes, write_mp4

T, H, W = 60, 256, 320  # 59 MB of float32 frames; 15 MB as 8-bit
BUDGET = 64 << 20  # the decode budget the cases run under
SLACK = 24 << 20  # allocator and codec noise above the frames themselves (the old code grew by ~190 MB here)


def smooth_video(seed: int) -> torch.Tensor:
    """A moving gradient: compresses to a few KB, decodes to the full ``[T, 3, H, W]``."""
    t = torch.arange(T).view(T, 1, 1, 1) / T
    y = torch.linspace(0, 1, H).view(1, 1, H, 1)
    x = torch.linspace(0, 1, W).view(1, 1, 1, W)
    c = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1) + 0.1 * seed
    return ((x + y + t + c) % 1.0).expand(T, 3, H, W).contiguous()


@pytest.fixture(scope="module")
def mp4s(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for i in range(2):
        write_mp4(folder / f"a gradient-{i}.mp4", smooth_video(i))
    write_mp4(folder / "warm.mp4", smooth_video(0)[:2, :, :16, :16])
    return folder


def peak_growth(script: str) -> dict:
    """Run ``script`` after a warm-up decode; it prints a JSON object, to which the peak-RSS growth is added."""
    prelude = textwrap.dedent("""
        import json, resource, sys
        import torch
        from astrolabe_rl import evaluate, video
        from astrolabe_rl.rewards.base import FunctionReward
        from astrolabe_rl.rewards.remote import RewardServer
        torch.set_num_threads(1)
        folder = sys.argv[1]
        video.read_mp4(folder + "/warm.mp4")
        mean = FunctionReward("mean", lambda v, p: v.mean(dim=(1, 2, 3, 4)))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def growth():
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024  # KiB on Linux
    """)
    return prelude + textwrap.dedent(script)


def run(script: str, folder) -> dict:
    proc = subprocess.run([sys.executable, "-c", peak_growth(script), str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_budget_counts_float_frames():
    assert decoded_bytes(T, H, W) == T * 3 * H * W * 4 < BUDGET < 2 * decoded_bytes(T, H, W)


def test_the_server_holds_at_most_its_decode_budget(mp4s):
    out = run("""
        data = open(folder + "/a gradient-0.mp4", "rb").read()
        item = {"prompt": "p", "frames": %d, "height": %d, "width": %d, "encoding": "mp4", "data": data}
        server = RewardServer({"mean": mean}, max_decoded_bytes=%d)
        status, answer = server.score({"reward": "mean", "items": [{**item, "id": "0"}, {**item, "id": "1"}]})
        print(json.dumps({"status": [r["status"] for r in answer["items"]], "error": answer["items"][1].get("error"),
                          "growth": growth()}))
    """ % (T, H, W, BUDGET), mp4s)
    assert out["status"] == ["ok", "error"] and "max_decoded_bytes" in out["error"]  # the second is over the budget
    assert out["growth"] <= BUDGET + SLACK, f"peak RSS grew {out['growth'] / 2**20:.0f} MiB"


def test_evaluate_holds_at_most_its_decode_budget(mp4s):
    out = run("""
        videos = evaluate.find_videos(folder)[:2]
        scores, _ = evaluate.score_videos(videos, {"mean": mean}, batch_size=4, max_bytes=%d)
        print(json.dumps({"scored": int((~scores["mean"].isnan()).sum()), "growth": growth()}))
    """ % BUDGET, mp4s)
    assert out["scored"] == 2  # a batch of 4 asked for; the budget holds one video at a time
    assert out["growth"] <= BUDGET + SLACK, f"peak RSS grew {out['growth'] / 2**20:.0f} MiB"


def test_evaluate_skips_a_video_over_the_budget_and_max_frames_decodes_less(mp4s):
    from astrolabe_rl import evaluate

    videos = evaluate.find_videos(mp4s)[:2]
    mean = {"mean": lambda v, p: v.mean(dim=(1, 2, 3, 4))}
    scores, _ = evaluate.score_videos(videos, mean, max_bytes=BUDGET // 2)
    assert scores["mean"].isnan().all() and all("over --max-decoded-mb" in v.status for v in videos)
    videos = evaluate.find_videos(mp4s)[:2]
    scores, _ = evaluate.score_videos(videos, mean, max_frames=T // 4, max_bytes=BUDGET // 2)
    assert not scores["mean"].isnan().any() and all(v.status == "ok" for v in videos)
