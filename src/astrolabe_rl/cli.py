"""The ``astrolabe`` command line: demo, generate, train, print-config, merge-lora, evaluate, serve-reward.

Each command's parser lives with its code (the module's ``add_parser``). Only the invoked command's module is
imported, so ``astrolabe --help`` answers at once and a command pays only for what it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from typing import Any, Callable

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

    _THREADS.start()
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below: the user's problem, or a bug that keeps its traceback
        message = user_message(e)
        if message is None or os.environ.get("ASTROLABE_TRACEBACK"):
            raise
        _THREADS.said.add(message)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        return 2
    finally:
        _THREADS.finish()


class _ThreadErrors:
    """Errors of background threads under a command. One that dies of a user error (TensorBoard's writer thread on a
    full disk re-raises the error the command then reports) is said as one ``warning:`` line at the command's end,
    unless the command's own ``error:`` line said the same; a bug keeps its traceback."""

    def __init__(self) -> None:
        self.said: set[str] = set()
        self.pending: list[tuple[str, str]] = []  # (message, the line that says it)
        self.running = False
        self.lock = threading.Lock()
        self.previous: Callable[[Any], None] | None = None

    def start(self) -> None:
        with self.lock:
            self.running, self.pending, self.said = True, [], set()
            if self.previous is None:
                self.previous, threading.excepthook = threading.excepthook, self.hook

    def hook(self, args: Any) -> None:
        from astrolabe_rl.errors import user_message

        message = user_message(args.exc_value) if isinstance(args.exc_value, Exception) else None
        if message is None or os.environ.get("ASTROLABE_TRACEBACK"):
            (self.previous or threading.__excepthook__)(args)
            return
        line = f"warning: {args.thread.name if args.thread is not None else 'a thread'} stopped: {message}"
        with self.lock:
            if self.running:
                self.pending.append((message, line))
            elif message not in self.said:
                sys.stderr.write(line + "\n")

    def finish(self) -> None:
        with self.lock:
            self.running = False
            for message, line in dict.fromkeys(self.pending):
                if message not in self.said:
                    sys.stderr.write(line + "\n")
            self.pending = []
        sys.stderr.flush()


_THREADS = _ThreadErrors()


if __name__ == "__main__":
    sys.exit(main())
