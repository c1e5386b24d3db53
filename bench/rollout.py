"""Benchmark: wall-clock of the streaming few-step sampler (`astrolabe_rl.rollout.rollout`) plus the VAE decode.

What it measures
    The DiT time of one complete video, through the path training samples with (``--path recipe``, the default):
    the policy's merged sampling copy (`Policy.sampling_model`: θ_old's LoRA r``--rank`` folded into a plain bf16
    CausalWan, blocks compiled on CUDA), or the bare base model (``--path base``). ``merge_s_median`` is the time of
    one refresh of that copy (what each optimiser step adds). The sampler: the 4-step Self-Forcing sampler over 7 blocks of 3 latent frames with the
    global KV cache (denoise + commit passes), text cross-attention K/V included, the text encoder excluded. The model
    is the full Wan2.1-T2V-1.3B architecture (``get_family("self_forcing")``: 30 layers, width 1536) with RANDOM
    weights (speed does not depend on them), bf16 on CUDA, latent 60×104 (480×832 pixels), 21 latent frames = 81
    pixel frames, random text embeddings ``[P, 512, 4096]``. Each batch size is warmed up, then timed ``--repeats``
    times (``torch.cuda.synchronize`` around each run); the median is reported.

    Then the VAE decode of that batch's latents: the full-size ``AutoencoderKLWan`` (default config = the Wan2.1 VAE,
    random weights, same dtype) through `WanVAE` (``--decode fast``: our batched, chunked streaming decoder, optionally
    channels-last and compiled) or diffusers' own ``AutoencoderKLWan.decode`` (``--decode reference``), timed the
    same way. ``--compare-reference`` also times the reference and reports the speed-up and the largest difference.

    ``dit_frames_per_s`` = batch · pixel_frames / median DiT seconds (pixel frames = 4·(latent_frames - 1) + 1).
    ``frames_per_s`` = batch · pixel_frames / (median DiT s + median decode s): end to end, decode included.
    ``peak_mem_gb`` = ``torch.cuda.max_memory_allocated`` (reset per batch size; on CPU the process's peak RSS).
    ``cache_kv_gb`` = size of the self-attention KV cache (+ text K/V) the sampler preallocates for that batch.
    ``peak_mem_gb`` is reset before each batch size, and again before its decode (``decode_peak_mem_gb``).
    ``text_kv_s_median`` = time of ``model.encode_text`` alone (the projected text and every layer's cross-attn K/V),
    which is part of ``dit_s_median``.

The bar
    H200, batch 8: >= 50 DiT frames/s (the public Self-Forcing pipeline reaches 32.4) and >= 40 frames/s end to end,
    decode included (public pipeline: 19.5; its decode alone takes 1.65 s per 81-frame video: ours must be >= 3×
    faster).

Output
    Exactly one JSON line on stdout, e.g.::

        {"bench": "rollout", "device": "NVIDIA H200", "dtype": "bfloat16", "model": "wan_1_3b", "latent_frames": 21,
         "pixel_frames": 81, "decode": "fast", "results": [{"batch": 1, "dit_s_median": ..., "dit_frames_per_s": ...,
         "decode_s_median": ..., "frames_per_s": ..., "peak_mem_gb": ..., "cache_kv_gb": ...}, ...], "torch": "2.x"}

Usage
    python bench/rollout.py                      # recipe path: full 1.3B + LoRA merged, full VAE, CUDA, batches 1, 8
    python bench/rollout.py --path base --no-compile   # the bare model, eager
    python bench/rollout.py --batches 8 --repeats 5 --decode-compile --compare-reference
    python bench/rollout.py --tiny               # 2-layer model + tiny VAE on CPU in float32 (CI; seconds)
    python bench/rollout.py --decode none        # DiT only: needs nothing but torch

torch and `astrolabe_rl.models` / `astrolabe_rl.rollout` are imported at start; peft only for ``--path recipe``,
diffusers only when decoding.
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
except ImportError:  # run from a checkout without installing: use the repository's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from astrolabe_rl.models import CausalWan, WanConfig, get_family
from astrolabe_rl.rollout import rollout

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _model_name(cfg: WanConfig) -> str:
    for name in ("wan_1_3b", "wan_14b", "tiny"):
        if cfg == getattr(WanConfig, name)():
            return name
    return f"wan_custom_{cfg.num_layers}x{cfg.dim}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:  # CPU: the process's peak resident set (KiB on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    except (ImportError, OSError):
        return float("nan")


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _sampling_model(args: argparse.Namespace, model: CausalWan) -> tuple[CausalWan, dict]:
    """The model the sampler runs: the recipe's merged copy of a LoRA policy, or the bare model. Returns it and the
    fields it adds to the output (merge time)."""
    if args.path == "base":
        return model, {"compile": model.compile_blocks(args.compile)}
    from astrolabe_rl.policy import Policy

    policy = Policy(model, rank=args.rank, alpha=float(args.rank), seed=args.seed, compile_sampling=args.compile)
    sampling = policy.sampling_model()
    merge_times = _timed(policy.refresh_sampling_copy, model.device, 1, args.repeats)
    return sampling, {"compile": sampling.compiled, "lora_rank": args.rank,
                      "merge_s_median": statistics.median(merge_times)}


def _build_vae(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(fast, reference) `WanVAE`s sharing one random ``AutoencoderKLWan`` (full size, or tiny with --tiny)."""
    if args.decode == "none":
        return None, None
    from astrolabe_rl.models.vae import WanVAE, random_vae, tiny_vae_config

    if device.type == "cuda":  # the decoder repeats a handful of conv shapes: let cuDNN pick the fastest once
        torch.backends.cudnn.benchmark = True
    model = random_vae(tiny_vae_config() if args.tiny else None, seed=args.seed, device=device, dtype=dtype)
    channels_last = device.type == "cuda" if args.decode_channels_last is None else args.decode_channels_last
    fast = WanVAE(model, chunk_frames=args.decode_chunk, channels_last=channels_last)
    if args.decode_compile and device.type == "cuda":
        fast.compile_decoder()
    return fast, WanVAE(model)


def _decode_stats(args, fast, reference, latents: torch.Tensor, device: torch.device) -> dict:
    """Median decode seconds of the chosen path (and of diffusers' decode with --compare-reference)."""
    decode = fast.decode if args.decode == "fast" else reference.decode_reference
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _timed(lambda: decode(latents), device, args.warmup, args.repeats)
    out = {"decode_s_median": statistics.median(times), "decode_s_all": times,
           "decode_peak_mem_gb": _peak_mem_gb(device)}
    if args.compare_reference:
        ref_times = _timed(lambda: reference.decode_reference(latents), device, args.warmup, args.repeats)
        out["decode_reference_s_median"] = statistics.median(ref_times)
        out["decode_speedup"] = out["decode_reference_s_median"] / out["decode_s_median"]
        out["decode_max_abs_diff"] = (decode(latents) - reference.decode_reference(latents)).abs().max().item()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer random model on CPU in float32 (CI smoke run)")
    p.add_argument("--family", default="self_forcing", help="model family preset (default self_forcing)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the family horizon, 21)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--candidates", type=int, default=1, help="videos per prompt (batch = prompts × candidates)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size first")
    p.add_argument("--path", default="recipe", choices=["recipe", "base"],
                   help="recipe: the policy's merged bf16 sampling copy (what training samples with); base: bare model")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank of the recipe path's policy, alpha = rank "
                   "(default 256; 4 with --tiny)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each DiT block (default: on CUDA)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flex"])
    p.add_argument("--decode", default="fast", choices=["fast", "reference", "none"],
                   help="VAE decode after the rollout: our WanVAE streaming decoder, diffusers' decode, or skip")
    p.add_argument("--decode-chunk", type=int, default=3, help="latent frames per decoder call (fast decode)")
    p.add_argument("--decode-channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last VAE weights/activations (default: on for CUDA)")
    p.add_argument("--decode-compile", action="store_true", help="torch.compile the decoder's blocks (CUDA only)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also time diffusers' decode and report the speed-up and max |fast - reference|")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rank is None:
        args.rank = 4 if args.tiny else 256
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    family = get_family("tiny" if args.tiny else args.family)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float32 if args.tiny else torch.bfloat16)
    frames = args.frames or family.horizon_frames
    sampler = family.sampler_for(frames)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    cfg = family.model
    hh, ww = family.latent_hw
    torch.manual_seed(args.seed)

    with torch.device(device):  # build directly on the device: CPU init of 1.3B parameters is slow
        model = CausalWan(cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    model.attn_backend = args.attn_backend
    model, path_fields = _sampling_model(args, model)
    fast_vae, reference_vae = _build_vae(args, device, dtype)

    tpf = cfg.tokens_per_frame(hh, ww)
    elem = torch.finfo(dtype).bits // 8
    pixel_frames = 4 * (frames - 1) + 1
    results = []
    for batch in batches:
        if batch % args.candidates:
            raise SystemExit(f"batch {batch} is not a multiple of --candidates {args.candidates}")
        prompts = batch // args.candidates
        gen = torch.Generator(device=device).manual_seed(args.seed)
        text = torch.randn(prompts, cfg.text_len, cfg.text_dim, generator=gen, device=device, dtype=torch.float32)
        text = text.to(dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def run() -> torch.Tensor:
            return rollout(model, text, num_frames=frames, latent_hw=(hh, ww), sampler=sampler, seeds=args.seed,
                           candidates=args.candidates).latents

        def encode() -> None:
            with torch.no_grad():
                model.encode_text(text.repeat_interleave(args.candidates, dim=0))

        times = _timed(run, device, args.warmup, args.repeats)
        peak = _peak_mem_gb(device)
        text_times = _timed(encode, device, 1 if args.warmup else 0, args.repeats)
        median = statistics.median(times)
        cache_frames = sampler.cache.window_frames or frames
        cache_bytes = 2 * cfg.num_layers * batch * cache_frames * tpf * cfg.dim * elem
        text_kv_bytes = 2 * cfg.num_layers * batch * cfg.text_len * cfg.dim * elem
        row = {
            "batch": batch,
            "dit_s_median": median,
            "dit_s_all": times,
            "dit_frames_per_s": batch * pixel_frames / median,
            "latent_frames_per_s": batch * frames / median,
            "peak_mem_gb": peak,
            "cache_kv_gb": (cache_bytes + text_kv_bytes) / 1e9,
            "text_kv_s_median": statistics.median(text_times),
        }
        if fast_vae is not None:
            row.update(_decode_stats(args, fast_vae, reference_vae, run(), device))
            row["frames_per_s"] = batch * pixel_frames / (median + row["decode_s_median"])
            row["decode_share"] = row["decode_s_median"] / (median + row["decode_s_median"])
        results.append(row)

    out = {
        "bench": "rollout",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": _model_name(cfg),
        "family": family.name,
        "latent_frames": frames,
        "pixel_frames": pixel_frames,
        "latent_hw": [hh, ww],
        "steps": len(sampler.steps.timesteps),
        "frames_per_block": sampler.frames_per_block,
        "path": args.path,
        **path_fields,
        "attn_backend": args.attn_backend,
        "decode": args.decode,
        "decode_chunk": args.decode_chunk,
        "decode_channels_last": bool(fast_vae and fast_vae.channels_last),
        "decode_compile": bool(args.decode_compile and device.type == "cuda"),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
        "torch": torch.__version__,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
