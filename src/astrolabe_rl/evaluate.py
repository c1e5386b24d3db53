"""``astrolabe evaluate``: score videos with any set of rewards; a table on stdout and a JSON file.

Two sources of videos:

* a folder of mp4s named the VBench way, ``{prompt}-{i}.mp4`` (the prompt is the file name up to the last
  ``-<digits>``; other names are scored with the whole stem as the prompt)::

      astrolabe evaluate --videos samples/ --rewards hpsv3,videoalign_mq,flow --out eval.json

* a model's own generations on a prompt file: ``astrolabe generate`` is run with the same flags (``--model``,
  ``--checkpoint``, ``--wan-dir``, ``--frames``, ``--seed`` ...), its mp4s are saved under VBench names in
  ``--save-videos`` (a temporary folder otherwise), then scored as above::

      astrolabe evaluate --model self_forcing --checkpoint runs/x/step-300.pt --prompts prompts/moviegen.txt \\
          --num-videos 5 --rewards hpsv3,videoalign --save-videos eval_videos/

Reward options go in ``--reward-kwargs`` (JSON or a .json/.yaml file): ``{"hpsv3": {"checkpoint": "..."}}``.
A reward that fails on a video scores NaN there (JSON ``null``) and the run goes on; the summary counts failures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_VBENCH_NAME = re.compile(r"^(?P<prompt>.+)-(?P<index>\d+)$")


@dataclass
class VideoFile:
    """One mp4 to score, with the prompt its name encodes."""

    path: Path
    prompt: str
    index: int | None


def find_videos(folder: str | Path) -> list[VideoFile]:
    """Every ``*.mp4`` directly in ``folder`` (sorted), with prompts parsed from VBench names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--videos {folder} is not a folder")
    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise FileNotFoundError(f"no .mp4 files in {folder} (expected VBench names like 'a cat-0.mp4')")
    out = []
    for f in files:
        m = _VBENCH_NAME.match(f.stem)
        out.append(VideoFile(f, m["prompt"], int(m["index"])) if m else VideoFile(f, f.stem, None))
    return out


def vbench_name(prompt: str, index: int) -> str:
    """``{prompt}-{index}.mp4`` (a ``/`` in the prompt, impossible in a file name, becomes ``_``)."""
    return f"{prompt.replace('/', '_')}-{index}.mp4"


def score_videos(videos: list[VideoFile], rewards: dict[str, Any], batch_size: int = 4,
                 max_frames: int | None = None) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Score files in batches of same-shaped videos.

    Returns ``{reward: [N]}`` scores (NaN where a reward failed) in ``videos`` order, and the errors per reward.
    """
    from astrolabe_rl.rewards.base import score_all
    from astrolabe_rl.video import read_mp4

    scores = {name: torch.full((len(videos),), float("nan")) for name in rewards}
    errors: dict[str, list[str]] = {}
    loaded = []
    for i, v in enumerate(videos):
        frames, _ = read_mp4(v.path)
        loaded.append((i, frames[:max_frames] if max_frames else frames))
    for group in _batches(loaded, batch_size):
        idx = [i for i, _ in group]
        out, errs = score_all(rewards, torch.stack([f for _, f in group]), [videos[i].prompt for i in idx])
        for name, s in out.items():
            scores[name][idx] = s
        for name, msg in errs.items():
            errors.setdefault(name, []).append(f"{[videos[i].path.name for i in idx]}: {msg}")
    return scores, errors


def _batches(loaded: list[tuple[int, Tensor]], size: int) -> list[list[tuple[int, Tensor]]]:
    """Consecutive groups of at most ``size`` videos of one shape (so they stack into ``[B, T, 3, H, W]``)."""
    by_shape: dict[tuple, list[tuple[int, Tensor]]] = {}
    for item in loaded:
        by_shape.setdefault(tuple(item[1].shape), []).append(item)
    return [g[k:k + size] for g in by_shape.values() for k in range(0, len(g), size)]


def summarize(videos: list[VideoFile], scores: dict[str, Tensor]) -> dict[str, Any]:
    """Per reward: mean, std (over scored videos), n, failed; and per prompt: the mean of each reward."""
    summary = {}
    for name, s in scores.items():
        ok = s[~s.isnan()]
        summary[name] = {"mean": _num(ok.mean()) if len(ok) else None,
                         "std": _num(ok.std(unbiased=False)) if len(ok) else None,
                         "n": len(ok), "failed": int(s.isnan().sum())}
    per_prompt: dict[str, dict[str, float | None]] = {}
    for prompt in dict.fromkeys(v.prompt for v in videos):
        rows = [i for i, v in enumerate(videos) if v.prompt == prompt]
        per_prompt[prompt] = {name: _num(s[rows].nanmean()) for name, s in scores.items()}
    return {"summary": summary, "per_prompt": per_prompt}


def _num(x: Tensor | float) -> float | None:
    """A JSON-safe float (NaN -> None)."""
    v = float(x)
    return None if math.isnan(v) else v


def table(summary: dict[str, dict[str, Any]]) -> str:
    """A fixed-width text table of the summary."""
    lines = [f"{'reward':<20} {'mean':>10} {'std':>10} {'n':>5} {'failed':>7}"]
    for name, s in summary.items():
        mean = "-" if s["mean"] is None else f"{s['mean']:.4f}"
        std = "-" if s["std"] is None else f"{s['std']:.4f}"
        lines.append(f"{name:<20} {mean:>10} {std:>10} {s['n']:>5} {s['failed']:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- generated videos


def generate_for_evaluation(args: argparse.Namespace, out_dir: Path) -> list[VideoFile]:
    """Run ``astrolabe generate`` with this command's model flags, then file its mp4s under VBench names.

    Videos come out in prompt-line order, ``--num-videos`` per line (seeds ``--seed``, ``--seed + 1``, ...), which
    is how each file is matched to its prompt and index.
    """
    from astrolabe_rl.cli import add_generate_parser
    from astrolabe_rl.generate import generate, read_prompt_lines

    parser = argparse.ArgumentParser(prog="astrolabe")
    add_generate_parser(parser.add_subparsers(dest="command"))
    raw = out_dir / "_generated"
    argv = ["generate", "--model", args.model, "--prompts", args.prompts, "--num-videos", str(args.num_videos),
            "--seed", str(args.seed), "--frames", str(args.frames), "--init-seed", str(args.init_seed),
            "--batch", str(args.gen_batch), "--out", str(raw), "--quiet"]
    for flag, value in (("--checkpoint", args.checkpoint), ("--wan-dir", args.wan_dir), ("--device", args.device),
                        ("--dtype", args.dtype), ("--text-cache", args.text_cache)):
        if value is not None:
            argv += [flag, value]
    gen_args = parser.parse_args(argv)
    written = generate(gen_args)["videos"]
    lines = read_prompt_lines(gen_args)
    if len(written) != len(lines) * args.num_videos:
        raise RuntimeError(f"generate wrote {len(written)} videos for {len(lines)} prompts × {args.num_videos}")
    files = []
    for k, path in enumerate(written):
        prompt, index = lines[k // args.num_videos], k % args.num_videos
        target = out_dir / vbench_name(prompt, index)
        Path(path).replace(target)
        files.append(VideoFile(target, prompt, index))
    raw.rmdir()
    return files


# ----------------------------------------------------------------------------------------------- command


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``astrolabe evaluate``."""
    from astrolabe_rl.models.families import FAMILIES

    p = subparsers.add_parser("evaluate", help="score videos (a folder, or a model's generations) with rewards",
                              description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of VBench-named mp4s ({prompt}-{i}.mp4)")
    src.add_argument("--prompts", help="prompt file (one per line): generate with --model, then score")
    p.add_argument("--rewards", required=True, help="comma-separated registered rewards, e.g. hpsv3,videoalign_mq")
    p.add_argument("--reward-kwargs", default=None, help="JSON {reward: {kwarg: value}} or a .json/.yaml file")
    p.add_argument("--out", default="evaluate.json", help="JSON results file (default: evaluate.json)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per reward call (default 4)")
    p.add_argument("--max-frames", type=int, default=None, help="score only the first N frames of each video")
    p.add_argument("--device", default=None, help="device for rewards and generation (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    g = p.add_argument_group("generation (with --prompts; the flags of astrolabe generate)")
    g.add_argument("--model", default="tiny", choices=list(FAMILIES), help="model family preset (default: tiny)")
    g.add_argument("--checkpoint", default=None, help="the family's checkpoint (default: its download location)")
    g.add_argument("--wan-dir", default=None, help="Wan2.1 folder with the umT5 encoder and VAE")
    g.add_argument("--num-videos", type=int, default=5, help="videos per prompt (VBench: 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first video; video k uses seed + k")
    g.add_argument("--frames", type=int, default=81, help="pixel frames per video (default 81)")
    g.add_argument("--init-seed", type=int, default=0, help="weight seed of the random tiny model")
    g.add_argument("--gen-batch", type=int, default=1, help="videos generated together")
    g.add_argument("--text-cache", default=None, help="folder caching prompt embeddings")
    g.add_argument("--save-videos", default=None, help="keep the generated mp4s here (default: a temporary folder)")
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    """Run ``astrolabe evaluate``; returns the exit code (0, or 1 when some video could not be scored)."""
    from astrolabe_rl.rewards._common import build_rewards, parse_reward_kwargs

    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    rewards = build_rewards(names, parse_reward_kwargs(args.reward_kwargs), args.device, args.dtype)
    with tempfile.TemporaryDirectory(prefix="astrolabe_eval_") as tmp:
        if args.videos:
            videos, source = find_videos(args.videos), str(args.videos)
        else:
            out_dir = Path(args.save_videos or tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            videos, source = generate_for_evaluation(args, out_dir), f"{args.model}:{args.checkpoint or 'default'}"
        scores, errors = score_videos(videos, rewards, args.batch_size, args.max_frames)
    result = {"source": source, "rewards": names, **summarize(videos, scores),
              "videos": [{"file": v.path.name, "prompt": v.prompt, "index": v.index,
                          "scores": {n: _num(scores[n][i]) for n in names}} for i, v in enumerate(videos)],
              "errors": errors}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result["summary"]))
    print(f"{len(videos)} videos; results in {args.out}")
    for name, msgs in errors.items():
        print(f"warning: {name} failed on some videos: {msgs[0]}", file=sys.stderr)
    return 1 if any(s["failed"] for s in result["summary"].values()) else 0
