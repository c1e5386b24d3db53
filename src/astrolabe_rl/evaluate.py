"""``astrolabe evaluate``: score videos with any set of rewards; a table on stdout and a JSON file.

Two sources of videos:

* a folder of mp4s, named the way ``astrolabe generate`` names them: ``{prompt}-{i}.mp4`` (the VBench convention),
  with the full prompts in ``videos.json`` beside them when generate wrote the folder (file names cut long prompts)::

      astrolabe evaluate --videos samples/ --rewards hpsv3,videoalign_mq,flow --out eval.json

* a model's own generations on a prompt file (`generate.generate` with this command's model flags; ``--adapter``
  takes a training run, one of its checkpoints or a peft folder), saved in ``--save-videos`` (a temporary folder
  otherwise), then scored as above::

      astrolabe evaluate --model self_forcing --adapter runs/x/checkpoints/step-000300 --prompts prompts/moviegen.txt \\
          --num-videos 5 --rewards hpsv3,videoalign --save-videos eval_videos/

Videos are read and scored a batch at a time (memory is bounded by ``--batch-size``, not by the folder). A file that
cannot be read, or whose prompt is unknown, is recorded with its status in the JSON and the rest is still scored;
a reward that fails on a video scores NaN there (JSON ``null``). Reward options go in ``--reward-kwargs`` (JSON or a
.json/.yaml file): ``{"hpsv3": {"checkpoint": "..."}}``.
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
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from torch import Tensor

_VBENCH_NAME = re.compile(r"^(?P<prompt>.+)-(?P<index>\d+)$")


@dataclass
class VideoFile:
    """One mp4 to score, with its prompt (None: unknown) and ``status`` (``ok`` once scored, else why not)."""

    path: Path
    prompt: str | None
    index: int | None
    status: str = "pending"


def find_videos(folder: str | Path, prompt_from_name: bool = False) -> list[VideoFile]:
    """Every ``*.mp4`` directly in ``folder`` (sorted) with its prompt: from ``videos.json`` if listed there, else
    from a ``{prompt}-{i}`` name; other names get no prompt (status says so) unless ``prompt_from_name``."""
    from astrolabe_rl.generate import SIDECAR

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--videos {folder} is not a folder")
    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise ValueError(f"no .mp4 files in {folder} (expected names like 'a cat-0.mp4', as astrolabe generate writes)")
    sidecar = json.loads((folder / SIDECAR).read_text()) if (folder / SIDECAR).is_file() else {}
    out = []
    for f in files:
        m = _VBENCH_NAME.match(f.stem)
        if f.name in sidecar:
            out.append(VideoFile(f, sidecar[f.name]["prompt"], sidecar[f.name].get("index")))
        elif m:
            out.append(VideoFile(f, m["prompt"], int(m["index"])))
        elif prompt_from_name:
            out.append(VideoFile(f, f.stem, None))
        else:
            out.append(VideoFile(f, None, None, status="skipped: no prompt (name it '{prompt}-{i}.mp4', list it "
                                                     "in videos.json, or pass --prompt-from-name)"))
    return out


def score_videos(videos: list[VideoFile], rewards: dict[str, Any], batch_size: int = 4,
                 max_frames: int | None = None, progress: bool = False) -> tuple[dict[str, "Tensor"], dict[str, list[str]]]:
    """Score the files in batches of same-shaped videos, reading each batch only when it is scored.

    Returns ``{reward: [N]}`` scores (NaN where a reward failed or the file was not scored) in ``videos`` order, and
    the errors per reward; each file's ``status`` becomes ``ok`` or the reason it was not scored.
    """
    import torch
    from tqdm import tqdm

    from astrolabe_rl.rewards.base import score_all

    scores = {name: torch.full((len(videos),), float("nan")) for name in rewards}
    errors: dict[str, list[str]] = {}
    todo = [i for i, v in enumerate(videos) if v.prompt is not None]
    bar = tqdm(total=len(todo), desc="scoring", unit="video", file=sys.stderr, disable=not progress)
    for idx, frames in _read_batches(videos, todo, batch_size, max_frames):
        out, errs = score_all(rewards, torch.stack(frames), [videos[i].prompt for i in idx])
        for name, s in out.items():
            scores[name][idx] = s.float().cpu()
        for name, msg in errs.items():
            errors.setdefault(name, []).append(f"{[videos[i].path.name for i in idx]}: {msg}")
        for i in idx:
            videos[i].status = "ok"
        bar.update(len(idx))
    bar.close()
    return scores, errors


def _read_batches(videos: list[VideoFile], todo: list[int], size: int,
                  max_frames: int | None) -> Iterator[tuple[list[int], list["Tensor"]]]:
    """Batches of at most ``size`` same-shaped videos (they stack into ``[B, T, 3, H, W]``), each yielded as soon as
    it is full: at most ``size`` decoded videos per distinct shape are held at once. Unreadable files get a status."""
    from astrolabe_rl.video import read_mp4

    pending: dict[tuple, tuple[list[int], list[Tensor]]] = {}
    for i in todo:
        try:
            frames, _ = read_mp4(videos[i].path)
        except Exception as e:  # noqa: BLE001 - one bad file must not lose the evaluation; its status says why
            videos[i].status = f"unreadable: {type(e).__name__}: {e}"
            continue
        frames = frames[:max_frames] if max_frames else frames
        idx, group = pending.setdefault(tuple(frames.shape), ([], []))
        idx.append(i)
        group.append(frames)
        if len(idx) == size:
            yield pending.pop(tuple(frames.shape))
    yield from pending.values()


def summarize(videos: list[VideoFile], scores: dict[str, "Tensor"]) -> dict[str, Any]:
    """Per reward: mean, std (over scored videos), n, failed; and per prompt: the mean of each reward."""
    summary = {}
    for name, s in scores.items():
        ok = s[~s.isnan()]
        summary[name] = {"mean": _num(ok.mean()) if len(ok) else None,
                         "std": _num(ok.std(unbiased=False)) if len(ok) else None,
                         "n": len(ok), "failed": int(s.isnan().sum())}
    per_prompt: dict[str, dict[str, float | None]] = {}
    for prompt in dict.fromkeys(v.prompt for v in videos if v.prompt is not None):
        rows = [i for i, v in enumerate(videos) if v.prompt == prompt]
        per_prompt[prompt] = {name: _num(s[rows].nanmean()) for name, s in scores.items()}
    return {"summary": summary, "per_prompt": per_prompt}


def _num(x: Any) -> float | None:
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
    """`generate.generate` with this command's model flags into ``out_dir``; the videos with their prompts."""
    from astrolabe_rl.generate import generate, options_from_args

    opts = options_from_args(args)
    opts.batch, opts.out, opts.latents_out = args.gen_batch, str(out_dir), None
    generate(opts)
    return find_videos(out_dir)


# ----------------------------------------------------------------------------------------------- command


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``astrolabe evaluate``."""
    from astrolabe_rl.generate import add_weight_flags

    p = subparsers.add_parser("evaluate", help="score videos (a folder, or a model's generations) with rewards",
                              description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of '{prompt}-{i}.mp4' files (as astrolabe generate writes them)")
    src.add_argument("--prompts", help="prompt file (one per line): generate with --model, then score")
    p.add_argument("--rewards", required=True, help="comma-separated registered rewards, e.g. hpsv3,videoalign_mq")
    p.add_argument("--reward-kwargs", default=None, help="JSON {reward: {kwarg: value}} or a .json/.yaml file")
    p.add_argument("--out", default="evaluate.json", help="JSON results file (default: evaluate.json)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per reward call (default 4)")
    p.add_argument("--max-frames", type=int, default=None, help="score only the first N frames of each video")
    p.add_argument("--prompt-from-name", action="store_true",
                   help="score files not named '{prompt}-{i}.mp4' with their whole name as the prompt")
    p.add_argument("--device", default=None, help="device for rewards and generation (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("generation (with --prompts; the flags of astrolabe generate)")
    add_weight_flags(g)
    g.add_argument("--num-videos", type=int, default=5, help="videos per prompt (VBench: 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first video; video k uses seed + k")
    g.add_argument("--frames", type=int, default=None, help="pixel frames per video (default: the model's length)")
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
            videos, source = find_videos(args.videos, args.prompt_from_name), str(args.videos)
        else:
            out_dir = Path(args.save_videos or tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            videos = generate_for_evaluation(args, out_dir)
            source = f"{args.model}:{args.checkpoint or 'default'}" + (f"+{args.adapter}" if args.adapter else "")
        scores, errors = score_videos(videos, rewards, args.batch_size, args.max_frames, progress=not args.quiet)
    result = {"source": source, "rewards": names, **summarize(videos, scores),
              "videos": [{"file": v.path.name, "prompt": v.prompt, "index": v.index, "status": v.status,
                          "scores": {n: _num(scores[n][i]) for n in names}} for i, v in enumerate(videos)],
              "errors": errors}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(table(result["summary"]))
    not_scored = [v for v in videos if v.status != "ok"]
    print(f"{len(videos)} videos, {len(not_scored)} not scored; results in {args.out}")
    for v in not_scored[:5]:
        print(f"warning: {v.path.name}: {v.status}", file=sys.stderr)
    for name, msgs in errors.items():
        print(f"warning: {name} failed on some videos: {msgs[0]}", file=sys.stderr)
    failed = not_scored or any(s["failed"] for s in result["summary"].values())
    return 1 if failed else 0
