"""The ``astrolabe`` command line: demo, generate, train, print-config, merge-lora, evaluate, serve-reward."""

from __future__ import annotations

import argparse
import json
import sys

_DTYPES = ("float32", "bfloat16", "float16")


def cmd_generate(args: argparse.Namespace) -> int:
    from astrolabe_rl.generate import generate

    try:
        summary = generate(args)
    except FileNotFoundError as e:  # a path the user gave; the message names it
        raise ValueError(str(e)) from e
    print(json.dumps(summary))
    return 0


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """``astrolabe generate``: the flags, grouped as a user reads them."""
    from astrolabe_rl.models.families import FAMILIES

    g = sub.add_parser("generate", help="generate videos with a streaming AR model",
                       description="Generate mp4 videos (and/or latents) with a streaming AR model.")
    g.add_argument("--model", "--preset", dest="model", default="tiny", choices=list(FAMILIES),
                   help="model family preset (default: tiny)")
    w = g.add_argument_group("weights")
    w.add_argument("--checkpoint", default=None,
                   help="the family's .pt / .safetensors (default: where its README downloads it)")
    w.add_argument("--checkpoint-key", default=None,
                   help="entry of the .pt dict to load (default: the family's, e.g. generator_ema)")
    w.add_argument("--wan-dir", default=None,
                   help="Wan2.1-T2V folder with the umT5 encoder, tokenizer and VAE, original or diffusers layout "
                        "(default: wan_models/Wan2.1-T2V-1.3B)")
    w.add_argument("--lora", default=None, help="LoRA to merge (LongLive: lora.pt, found by default); 'none' to skip")
    w.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank, LongLive's 256/256)")
    w.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled Python objects in .pt files (only for files you trust)")
    w.add_argument("--init-seed", type=int, default=0, help="weight seed of the random tiny model")
    p = g.add_argument_group("prompts and videos")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="a red ball rolling to the right",
                     help="one prompt; 'scene one [10s] | scene two' switches prompt after 10 s")
    src.add_argument("--prompts", help="a text file, one prompt (or 'a [10s] | b [10s] | c' scene list) per line")
    p.add_argument("--frames", type=int, default=81,
                   help="pixel frames at 16 fps (81 = 21 latent frames; 240/480/960 for long video through the "
                        "rolling cache; rounded up to whole blocks)")
    p.add_argument("--latent-frames", type=int, default=None, help="latent frames (overrides --frames)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first video; video i uses seed + i")
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt line")
    p.add_argument("--batch", type=int, default=1, help="videos generated together (memory grows with it)")
    o = g.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="x.mp4 (one video; several become x_<line>_s<seed>.mp4) or a folder "
                        "(default: outputs/, unless only --latents-out is given)")
    o.add_argument("--latents-out", default=None, help="write the latents [B, F, C, H, W] to this .safetensors")
    o.add_argument("--text-cache", default=None, help="folder caching prompt embeddings (skips the encoder)")
    r = g.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", default=None, choices=_DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    r.add_argument("--vae-chunk", type=int, default=3, help="latent frames per VAE decoder call (speed vs memory)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astrolabe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # each command's parser lives next to its code; the heavy imports happen only when it runs
    from astrolabe_rl import evaluate
    from astrolabe_rl.rewards import remote
    from astrolabe_rl.toy import demo
    from astrolabe_rl.train.commands import add_parsers as add_train_parsers

    demo.add_parser(sub)
    add_generate_parser(sub)
    add_train_parsers(sub)
    evaluate.add_parser(sub)
    remote.add_parser(sub)
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
