"""``python -m astrolabe_rl.train --config X [overrides]`` (what torchrun launches on every rank)."""

import sys

from astrolabe_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
