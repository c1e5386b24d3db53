"""``astrolabe train``, ``astrolabe print-config`` and ``astrolabe merge-lora``."""

from __future__ import annotations

import argparse
import json
import sys


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
    metrics = train(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("perf/")}, sort_keys=True))
    return 0


def cmd_print_config(args: argparse.Namespace) -> int:
    from astrolabe_rl.config import dump_yaml

    sys.stdout.write(dump_yaml(_config(args), with_docs=not args.no_docs))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """Merge a trained adapter into the base DiT and write the weights with original Wan key names."""
    import torch
    from safetensors.torch import save_file

    from astrolabe_rl.models import CausalWan, get_family
    from astrolabe_rl.policy import merge_lora

    family = get_family(args.model)
    if args.base is None:
        if family.name != "tiny":
            raise ValueError(f"--base is required for --model {family.name} (the official checkpoint)")
        torch.manual_seed(args.init_seed)
        base = CausalWan(family.model)
    else:
        from astrolabe_rl.models import loading

        base = loading.load_causal_wan(args.base, family.model, key=family.checkpoint_key)
    merged = merge_lora(base, args.adapter)
    state = {k: v.detach().to(getattr(torch, args.dtype)).contiguous() for k, v in merged.state_dict().items()}
    save_file(state, args.out, metadata={"format": "wan-original", "family": family.name})
    print(json.dumps({"out": args.out, "tensors": len(state)}))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from astrolabe_rl.models.families import FAMILIES

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
        else:
            p.add_argument("--no-docs", action="store_true", help="plain YAML without comments")

    m = sub.add_parser("merge-lora", help="merge a trained adapter into the base weights")
    m.add_argument("--adapter", required=True, help="adapter folder (run_dir/adapter) or a checkpoint's adapter")
    m.add_argument("--model", default="tiny", choices=list(FAMILIES), help="family of the base model")
    m.add_argument("--base", default=None, help="official base checkpoint (not needed for tiny)")
    m.add_argument("--init-seed", type=int, default=0, help="weight seed of the tiny base model")
    m.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--out", required=True, help="output .safetensors (original Wan key names)")
    m.set_defaults(func=cmd_merge_lora)
