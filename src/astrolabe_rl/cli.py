"""The ``astrolabe`` command line: ``astrolabe generate`` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def latent_frames_for(pixel_frames: int, frames_per_block: int, first_block_frames: int | None = None) -> int:
    """Latent frames for a pixel-frame count, ``F = (T - 1) // 4 + 1`` as the official code counts (81 -> 21,
    960 -> 240), then rounded up to whole blocks."""
    if pixel_frames < 1:
        raise ValueError(f"--frames must be >= 1, got {pixel_frames}")
    f = (pixel_frames - 1) // 4 + 1
    first = first_block_frames or 0
    rest = max(0, f - first)
    return first + -(-rest // frames_per_block) * frames_per_block


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"error: prompt file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"error: prompt file {path} has no prompts (one per line)")
        return prompts
    return [args.prompt]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from astrolabe_rl.models import CausalWan, get_family
    from astrolabe_rl.models.text import HashTextEncoder
    from astrolabe_rl.rollout import rollout

    family = get_family(args.model)
    if family.name != "tiny":
        raise SystemExit(
            f"error: --model {family.name} needs its official checkpoint, the umT5 encoder and the Wan VAE; "
            "their loaders are not part of this release yet. Use --model tiny for a smoke test."
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    sampler = family.sampler
    frames = args.latent_frames or latent_frames_for(args.frames, sampler.frames_per_block, sampler.first_block_frames)
    sampler = family.sampler_for(frames)

    torch.manual_seed(args.init_seed)  # the tiny model's random weights are a function of --init-seed
    model = CausalWan(family.model).to(device, dtype).eval()
    encoder = HashTextEncoder(family.model.text_dim, family.model.text_len, seed=args.init_seed)
    prompts = _read_prompts(args)
    seeds = [args.seed + i for i in range(len(prompts) * args.num_videos)]

    bar = tqdm(total=0, desc="blocks", unit="block", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    out = rollout(
        model,
        encoder(prompts),
        num_frames=frames,
        latent_hw=family.latent_hw,
        sampler=sampler,
        seeds=seeds,
        candidates=args.num_videos,
        progress=progress,
    )
    bar.close()
    meta = {
        "model": family.name,
        "prompts": json.dumps(prompts),
        "seeds": json.dumps(seeds),
        "init_seed": str(args.init_seed),
        "latent_frames": str(frames),
        "layout": "[B, F, C, H, W]",
    }
    if args.latents_out:
        Path(args.latents_out).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": out.latents.float().cpu().contiguous()}, args.latents_out, metadata=meta)
    print(json.dumps({"latents": list(out.latents.shape), "seeds": seeds, "out": args.latents_out}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from astrolabe_rl.models.families import FAMILIES

    parser = argparse.ArgumentParser(prog="astrolabe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate videos with a streaming AR model")
    g.add_argument("--model", "--preset", dest="model", default="tiny", choices=list(FAMILIES),
                   help="model family preset (default: tiny)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="a red ball rolling to the right", help="one prompt")
    src.add_argument("--prompts", help="a text file with one prompt per line")
    g.add_argument("--frames", type=int, default=81,
                   help="pixel frames (81 = 21 latent frames; rounded up to whole blocks)")
    g.add_argument("--latent-frames", type=int, default=None, help="latent frames (overrides --frames)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first video; video i uses seed + i")
    g.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    g.add_argument("--init-seed", type=int, default=0, help="weight seed of the random tiny model")
    g.add_argument("--latents-out", default=None, help="write the latents [B, F, C, H, W] to this .safetensors")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration errors carry a message that says what to change
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
