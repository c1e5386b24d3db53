"""``astrolabe train``, ``astrolabe print-config`` and ``astrolabe merge-lora``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args: argparse.Namespace):
    from astrolabe_rl.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from astrolabe_rl.train.recipe import train

    cfg = _config(args)
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    if args.force_resume:
        cfg.checkpoint.force_resume = True
    if args.overwrite:
        cfg.checkpoint.overwrite = True
    metrics = train(cfg)
    if not metrics:  # a finished run resumed: no epoch ran, nothing new to report
        print(f"nothing to train: {cfg.run_dir} has already run its train.epochs={cfg.train.epochs} epochs (its "
              "adapter is brought up to date); raise train.epochs to continue it", file=sys.stderr)
        return 0
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("perf/")}, sort_keys=True))
    return 0


def cmd_print_config(args: argparse.Namespace) -> int:
    from astrolabe_rl.config import dump_yaml

    sys.stdout.write(dump_yaml(_config(args), with_docs=not args.no_docs))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """Fold a trained adapter into the family's DiT (`models.build`, as every command builds it) and write the weights
    with original Wan key names."""
    import torch
    from safetensors.torch import save_file

    from astrolabe_rl.generate import options_from_args
    from astrolabe_rl.models.build import build_dit
    from astrolabe_rl.models.families import get_family

    if not args.adapter:
        raise ValueError("merge-lora needs --adapter (a run folder, one of its checkpoints, or a peft folder)")
    family = get_family(args.model)
    merged = build_dit(family, options_from_args(args).source)
    state = {k: v.detach().to(getattr(torch, args.dtype)).contiguous() for k, v in merged.state_dict().items()}
    tmp = Path(args.out).with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "wan-original", "family": family.name})
    tmp.replace(args.out)  # a crash never leaves a half-written file under the final name
    print(json.dumps({"out": args.out, "tensors": len(state)}))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``print-config`` and ``merge-lora``."""
    from astrolabe_rl.generate import add_weight_flags

    for name, fn, help_ in (
        ("train", cmd_train, "run the Astrolabe RL recipe (torchrun for several GPUs)"),
        ("print-config", cmd_print_config, "print the resolved config with every field's documentation"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 rollout.candidates=8")
        p.set_defaults(func=fn)
        if name == "train":
            p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint path")
            p.add_argument("--force-resume", action="store_true", help="resume although run-altering values changed")
            p.add_argument("--overwrite", action="store_true",
                           help="run_dir holds an earlier run: move it to <run_dir>.old-<UTC time> and start fresh")
        else:
            p.add_argument("--no-docs", action="store_true", help="plain YAML without comments")

    m = sub.add_parser("merge-lora", help="merge a trained adapter into the base weights",
                       description="Fold an adapter into the family's base DiT (--checkpoint, or its default: the "
                                   "official download location, the shipped toy weights, the random tiny model).")
    add_weight_flags(m.add_argument_group("weights"))
    m.set_defaults(checkpoint=None)
    m.add_argument("--base", dest="checkpoint", default=None, help="alias of --checkpoint")
    m.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--out", required=True, help="output .safetensors (original Wan key names)")
    m.set_defaults(func=cmd_merge_lora)
