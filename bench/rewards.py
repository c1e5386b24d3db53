"""Benchmark: per-video latency and peak memory of every learned reward at the real geometry.

What it measures
    Each reward's full ``__call__`` on a batch of videos (preprocessing on the device included, mp4 decode
    excluded): the video is ``--frames`` × ``--height`` × ``--width`` (81 × 480 × 832, what Wan2.1 models
    generate), float in [0, 1] on the reward's device. Models have the released architectures with RANDOM weights
    (speed and memory do not depend on them), in bf16 on CUDA:

    ========== ================================================ ====================================
    reward     model                                            input per video
    ========== ================================================ ====================================
    hpsv3      Qwen2-VL-7B + ranknet head                       every frame, 336×588 (252 tokens each)
    videoalign Qwen2-VL-2B + linear head (one head's cost)      10 frames, 336×588 (1260 tokens)
    aesthetic  CLIP ViT-L/14 + MLP                              every frame, 224×224
    clipscore  CLIP ViT-L/14                                    every frame, 224×224
    pickscore  CLIP ViT-H/14                                    every frame, 224×224
    hpsv2      CLIP ViT-H/14 (open_clip layout)                 every frame, 224×224 padded
    flow       RAFT-large, 12 iterations (LK w/o torchvision)  17 frames -> 16 pairs, short side 256
    ========== ================================================ ====================================

    The VLM prompts are tokenised by a word-level stand-in tokenizer (the real BPE gives ~10-20 % more text
    tokens; the visual tokens, which dominate, are exact). Every call, warm-up and timed, gets a freshly drawn video
    tensor (drawn before the clock starts): rewards that memoise their last result for the same tensor object, as
    VideoAlign's scorer does for its several heads, must not be timed on a cache hit. ``latency_s_per_video`` =
    median seconds per call / batch; ``peak_mem_gb`` = ``torch.cuda.max_memory_allocated`` during the timed calls
    (weights included; reset for each reward); ``weights_gb`` = memory held by the model after building it (null
    on CPU).

Output
    Exactly one JSON line on stdout::

        {"bench": "rewards", "device": "NVIDIA H200", "dtype": "bfloat16", "video": [81, 480, 832], "batch": 1,
         "results": [{"reward": "hpsv3", "latency_s_per_video": ..., "peak_mem_gb": ..., "weights_gb": ...}, ...]}

Usage
    python bench/rewards.py                           # every reward, CUDA, bf16, batch 1
    python bench/rewards.py --rewards hpsv3,videoalign --batch 4 --repeats 5
    python bench/rewards.py --tiny                    # tiny random models on CPU, 9×64×64 video (what CI runs)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

try:
    import astrolabe_rl  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

ALL = ("hpsv3", "videoalign", "aesthetic", "clipscore", "pickscore", "hpsv2", "flow")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_gb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def build_full(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The reward ``name`` with the released architecture and random weights (never through the shared cache, so
    each model is freed before the next is built)."""
    from astrolabe_rl.rewards import _qwen, flow, hpsv3, videoalign

    if name == "hpsv3":
        tok = _qwen.tiny_tokenizer([hpsv3.REWARD_TOKEN], words=hpsv3.user_text("x").split())
        config = _qwen.make_config(tok, **_qwen.QWEN2VL_7B, vocab_size=151658)
        model = hpsv3.HPSv3Model(config, tok.convert_tokens_to_ids(hpsv3.REWARD_TOKEN), [1024, 16, 2],
                                 device=device, dtype=dtype)
        return hpsv3.HPSv3Reward(model, tok, frame_batch=8)
    if name == "videoalign":
        tok = _qwen.tiny_tokenizer(videoalign.REWARD_TOKENS, words=videoalign.user_text("x").split())
        config = _qwen.make_config(tok, **_qwen.QWEN2VL_2B, vocab_size=151660)
        model = videoalign.VideoAlignModel(config, tok.convert_tokens_to_ids(videoalign.REWARD_TOKENS),
                                           device=device, dtype=dtype)
        return videoalign.VideoAlignReward(videoalign.VideoAlignScorer(model, tok, videoalign.NormStats()), "MQ",
                                           grayscale=True)
    if name in ("aesthetic", "clipscore", "pickscore", "hpsv2"):
        return _clip_reward(name, device, dtype)
    if name == "flow":
        try:
            est = flow.RaftFlow(device=device, random_weights=True)
        except ImportError:
            est = flow.lucas_kanade
        return flow.FlowReward(est, device=device)
    raise ValueError(f"unknown reward {name!r}; choose from {', '.join(ALL)}")


def _clip_reward(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import CLIPConfig, CLIPModel

    from astrolabe_rl.rewards import clip

    if name in ("aesthetic", "clipscore"):
        config = CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14),
            projection_dim=768)
    else:
        config = clip.vit_h14_config()
    tok = clip.tiny_clip_tokenizer("a red ball rolling".split())
    with torch.device(device):
        model = CLIPModel(config).to(dtype).eval().requires_grad_(False)
    scorer = clip.ClipScorer(model, tok, "pad" if name == "hpsv2" else "crop")
    head = clip.AestheticHead().to(device).eval() if name == "aesthetic" else None
    top = 0.3 if name == "hpsv2" else None
    return clip.ClipFrameReward(name, scorer, name, head, top_frac=top)


def build_tiny(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    from astrolabe_rl.rewards import build_reward

    if name == "flow":
        return build_reward("flow", backend="lk", size=32)
    return build_reward("videoalign_mq" if name == "videoalign" else name, tiny=True)


def random_videos(batch: int, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Smooth random frames ``[B, F, 3, H, W]`` in [0, 1] (noise would make flow and resizing atypical)."""
    low = torch.rand(batch * shape[0], 3, shape[1] // 8, shape[2] // 8, device=device)
    return torch.nn.functional.interpolate(low, size=shape[1:], mode="bilinear").view(batch, shape[0], 3, *shape[1:])


def measure(reward: Callable, make_videos: Callable[[], torch.Tensor], prompts: list[str], repeats: int,
            warmup: int) -> dict:
    """Median latency of ``reward`` on a fresh ``make_videos()`` tensor per call (made before the clock starts)."""
    videos = make_videos()
    device = videos.device
    for _ in range(warmup):
        reward(make_videos(), prompts)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        videos = make_videos()
        _sync(device)
        start = time.perf_counter()
        reward(videos, prompts)
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"latency_s_per_video": median / videos.shape[0], "call_s_median": median, "peak_mem_gb": _peak_gb(device)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rewards", default=",".join(ALL), help=f"comma-separated subset of {', '.join(ALL)}")
    p.add_argument("--batch", type=int, default=1, help="videos per call")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny random models on CPU, 9×64×64 video (smoke test)")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape = (9, 64, 64) if args.tiny else (args.frames, args.height, args.width)
    build = build_tiny if args.tiny else build_full
    prompts = ["a corgi surfing a wave at sunset"] * args.batch
    results = []
    for name in [n.strip() for n in args.rewards.split(",") if n.strip()]:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        before = _allocated_gb(device)
        with torch.no_grad():
            reward = build(name, device, dtype)
            after = _allocated_gb(device)
            weights = None if after is None else after - before
            row = measure(reward, lambda: random_videos(args.batch, shape, device), prompts, args.repeats,
                          args.warmup)
        results.append({"reward": name, **row, "weights_gb": weights})
        del reward
    print(json.dumps({"bench": "rewards", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                      else "cpu", "dtype": str(dtype).removeprefix("torch."), "video": list(shape),
                      "batch": args.batch, "results": results, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
