"""Benchmark: one NFT micro-step (old + reference + θ passes, backward) at the Wan2.1-1.3B geometry.

Builds the full 1.3B DiT with random weights in bf16, wraps it with LoRA r256 on every block linear (peft), and
times `recipe.micro_step` on a 21-latent-frame (81 pixel frames, 480×832) clip with gradient checkpointing
(selective by default: attention outputs saved, the rest recomputed): the released training pass (whole clip at one
σ, block-causal mask), its backward, the grad-norm clip and the AdamW step (fp32 master LoRA weights), i.e. one
optimiser step per micro-batch, the most expensive case. On CUDA the DiT blocks are compiled unless
``--no-compile``. Prints one JSON line; ``peak_mem_gb`` is reset after the warm-up.

Bar on an H200: <= 2.0 s per sample (an Astrolabe-style step through the public Self-Forcing model: 6.0 s; the
arithmetic limit is about 1.2-1.4 s). ``--tiny`` runs the same code on the tiny model on CPU in seconds.

    python bench/train_step.py                 # GPU, full size
    python bench/train_step.py --tiny          # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

try:
    import astrolabe_rl  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from astrolabe_rl.config import TrainConfig
from astrolabe_rl.models import CausalWan, get_family
from astrolabe_rl.policy import Policy
from astrolabe_rl.train.recipe import micro_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run)")
    p.add_argument("--family", default="self_forcing", help="family preset for the geometry")
    p.add_argument("--batch", type=int, default=1, help="samples per micro-step")
    p.add_argument("--rank", type=int, default=256, help="LoRA rank (alpha = rank)")
    p.add_argument("--context", default="noisy", choices=["noisy", "clean"], help="training layout")
    p.add_argument("--checkpointing", default="selective", choices=["selective", "full", "none"],
                   help="activation checkpointing of the θ pass (selective: save attention outputs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT blocks (default: on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flex"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    family = get_family("tiny" if args.tiny else args.family)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rank = 4 if args.tiny else args.rank
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWan(family.model)
    model = model.to(dtype)
    model.gradient_checkpointing = args.checkpointing != "none"
    if args.checkpointing != "none":
        model.checkpoint_mode = args.checkpointing
    model.attn_backend = args.attn_backend
    policy = Policy(model, rank=rank, alpha=float(rank))
    compiled = model.compile_blocks(args.compile)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=device.type == "cuda")
    tcfg = TrainConfig(context=args.context)
    frames = family.horizon_frames
    c, (h, w) = family.model.in_dim, family.latent_hw
    x0 = torch.randn(args.batch, frames, c, h, w, device=device, dtype=dtype)
    noise = torch.randn_like(x0)
    text = torch.randn(args.batch, family.model.text_len, family.model.text_dim, device=device, dtype=dtype)
    r = torch.rand(args.batch, device=device)
    keep = torch.ones(args.batch, dtype=torch.bool, device=device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = micro_step(policy, model, family.sampler, tcfg, x0, text, r, keep, 0.75, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.repeats)]
    median = statistics.median(times)
    result = {
        "bench": "train_step",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "family": family.name,
        "latent_frames": frames,
        "batch": args.batch,
        "lora_rank": rank,
        "context": args.context,
        "gradient_checkpointing": args.checkpointing,
        "compile": compiled,
        "optimizer_step_included": True,
        "trainable_params": sum(p.numel() for p in policy.trainable_parameters()),
        "step_s_median": median,
        "s_per_sample": median / args.batch,
        "step_s_all": times,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
