"""Benchmark: peak memory and time of one streaming training step against the video's length.

For each video length (81, 240, 480, 960 pixel frames = 21, 60, 120, 240 latent frames) one streaming micro-step
trains the *last* 21-frame window: the three passes (θ_old, reference, θ) each commit the history block by block into
the family's rolling cache (local attention 12 with a 3-frame sink, LongLive's) and run the window block by block
(`train.streaming.WindowPasses` through `recipe.micro_step`), then the backward, the grad-norm clip and the AdamW
step. The Wan2.1-1.3B geometry with random weights in bf16 and LoRA r256 on a GPU; ``--tiny``: the tiny model on a
CPU. Prints one JSON line.

Bar on a GPU: peak memory at 960 frames within +10 % of 81 frames (``peak_ratio_longest``). On a CPU, where peak
memory is not measurable per step, the mechanism is what the JSON shows: the cache's bytes and the bytes saved for
the backward pass (``saved_mb``) are the same at every length; time grows with the history, which every pass
re-commits (``--history-kv old`` commits it once, with θ_old's weights, for the three passes).

    python bench/streaming_memory.py                 # GPU, full size
    python bench/streaming_memory.py --tiny          # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

try:
    import astrolabe_rl  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from astrolabe_rl.config import TrainConfig
from astrolabe_rl.models import CachePolicy, CausalWan, get_family
from astrolabe_rl.policy import Policy
from astrolabe_rl.train.recipe import micro_step
from astrolabe_rl.train.streaming import WindowPasses, commit_history

PIXEL_FRAMES = (81, 240, 480, 960)


def latent_frames(pixel: int, block: int = 3) -> int:
    """Latent frames covering ``pixel`` frames (4 per latent frame), rounded up to whole blocks: 81 -> 21, 960 -> 240."""
    return -(-((pixel + 3) // 4) // block) * block


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU")
    p.add_argument("--family", default="longlive", help="family preset (geometry, sampler, rolling cache)")
    p.add_argument("--window", type=int, default=21, help="latent frames of the trained window")
    p.add_argument("--frames", type=int, nargs="+", default=list(PIXEL_FRAMES), help="video lengths, pixel frames")
    p.add_argument("--history-kv", choices=("per_policy", "old"), default="per_policy")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    family = get_family(args.family)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    config = get_family("tiny").model if args.tiny else family.model
    sampler = replace(family.sampler, cache=CachePolicy(window_frames=12, sink_frames=3))
    latent_hw = (4, 4) if args.tiny else family.latent_hw
    rank = 4 if args.tiny else 256
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWan(config)
    model = model.to(dtype)
    model.gradient_checkpointing = True
    policy = Policy(model, rank=rank, alpha=float(rank))
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    c, (h, w), win = config.in_dim, latent_hw, args.window
    text = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    x0, noise = (torch.randn(1, win, c, h, w, device=device, dtype=dtype) for _ in range(2))
    tcfg = TrainConfig(context="clean")

    results = []
    for pixel in args.frames:
        total = latent_frames(pixel)
        start = total - win
        history = torch.randn(1, start, c, h, w, device=device, dtype=dtype)
        passes = WindowPasses(history, start, sampler, latent_hw, seeds=[0])
        saved: list[int] = []

        def step(record: bool = False) -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if args.history_kv == "old":
                with policy.use("old") as m:
                    passes.shared = commit_history(m, history, text, sampler, latent_hw, [0], win)
            hooks = torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t)
            with hooks if record else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss, _ = micro_step(policy, model, sampler, tcfg, x0, text, torch.full((1,), 0.7, device=device),
                                     torch.ones(1, dtype=torch.bool, device=device), 0.75, noise, window=passes)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = [step(record=i == 0) for i in range(args.repeats)]
        cache = commit_history(model, history[:, :0], text, sampler, latent_hw, [0], win)
        results.append({
            "pixel_frames": pixel, "latent_frames": total, "window_start": start,
            "step_s_median": statistics.median(times),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "saved_mb": sum(saved) / 1e6,
            "cache_mb": sum(t.numel() * t.element_size() for t in cache.tensors()) / 1e6,
        })
        print(f"{pixel} frames: {results[-1]}", file=sys.stderr, flush=True)
    out = {
        "bench": "streaming_memory", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "geometry": "tiny" if args.tiny else f"{args.family} (Wan2.1-1.3B)", "dtype": str(dtype).removeprefix("torch."),
        "window": win, "cache": "local attention 12, sink 3", "history_kv": args.history_kv, "lora_rank": rank,
        "results": results,
        "peak_ratio_longest": (results[-1]["peak_mem_gb"] / results[0]["peak_mem_gb"]) if cuda else None,
        "saved_mb_equal": len({round(r["saved_mb"], 3) for r in results}) == 1,
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
