"""The ``astrolabe`` command line: demo, generate, train, print-config, merge-lora, evaluate, serve-reward.

Each command's parser lives with its code (the module's ``add_parser``). Only the invoked command's module is
imported, so ``astrolabe --help`` answers at once and a command pays only for what it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

# command -> (the module whose ``add_parser`` registers it, the one-line help the command list shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("astrolabe_rl.toy.demo", "align the shipped toy model on a CPU and show before/after"),
    "generate": ("astrolabe_rl.generate", "generate videos with a streaming AR model"),
    "train": ("astrolabe_rl.train.commands", "run the Astrolabe RL recipe (torchrun for several GPUs)"),
    "print-config": ("astrolabe_rl.train.commands", "print the resolved config with every field's documentation"),
    "merge-lora": ("astrolabe_rl.train.commands", "merge a trained adapter into the base weights"),
    "evaluate": ("astrolabe_rl.evaluate", "score videos (a folder, or a model's generations) with rewards"),
    "serve-reward": ("astrolabe_rl.rewards.remote", "serve rewards over HTTP for remote scoring"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the command named in ``argv`` (every command when None) gets its full flags from its module."""
    parser = argparse.ArgumentParser(prog="astrolabe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = set(COMMANDS) if argv is None else {a for a in argv if a in COMMANDS}
    modules = list(dict.fromkeys(COMMANDS[c][0] for c in chosen))
    for module in modules:  # registers the chosen command (and its module's siblings) with all their flags
        importlib.import_module(module).add_parser(sub)
    for name, (module, help_) in COMMANDS.items():
        if module not in modules:
            sub.add_parser(name, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[:1]).parse_args(argv)  # the command is the first word
    return run(args.func, args)


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a problem the user fixes (`errors.user_message`) is printed as one ``error:`` line (exit 2),
    anything else is a bug and raises with its traceback (``ASTROLABE_TRACEBACK=1`` shows every traceback)."""
    from astrolabe_rl.errors import user_message

    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below: the user's problem, or a bug that keeps its traceback
        message = user_message(e)
        if message is None or os.environ.get("ASTROLABE_TRACEBACK"):
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
