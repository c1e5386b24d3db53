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

Videos are read and scored a batch at a time: the decoded frames held at once are one batch of at most
``--batch-size`` same-shaped videos and at most ``--max-decoded-mb`` (counted as float32 frames, what they take in
memory; `video.decoded_bytes`), not the folder; each video decodes straight into its place in the batch. A video
over that budget alone is skipped with its status (``--max-frames`` scores the first frames only, and decodes no
more). A file that cannot be read, or whose prompt is unknown, is recorded with its status in the JSON and the rest
is still scored; a ``videos.json`` that does not parse is a warning (the prompts then come from the file names). A
reward that fails on a video scores NaN there (JSON ``null``). Reward options go in ``--reward-kwargs`` (JSON or a
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
_CUT_PROMPT = re.compile(r"~[0-9a-f]{8}$")  # `generate.video_name` cut a long prompt: its whole text is in videos.json


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
    from astrolabe_rl.generate import SIDECAR, read_sidecar, sidecar_prompt

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--videos {folder} is not a folder ({'a file' if folder.exists() else 'it does not exist'})")
    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise ValueError(f"no .mp4 files in {folder} (expected names like 'a cat-0.mp4', as astrolabe generate writes)")
    sidecar, problem = read_sidecar(folder)
    if problem:
        print(f"warning: {problem}; the prompts come from the file names instead", file=sys.stderr, flush=True)
    out = []
    for f in files:
        m = _VBENCH_NAME.match(f.stem)
        if f.name in sidecar:
            try:
                out.append(VideoFile(f, *sidecar_prompt(sidecar[f.name])))
            except ValueError as e:
                out.append(VideoFile(f, None, None, status=f"skipped: {e}"))
        elif m and _CUT_PROMPT.search(m["prompt"]):
            out.append(VideoFile(f, None, None, status=f"skipped: the name cuts a long prompt whose whole text is "
                                                     f"not in {SIDECAR}"))
        elif m:
            out.append(VideoFile(f, m["prompt"], int(m["index"])))
        elif prompt_from_name:
            out.append(VideoFile(f, f.stem, None))
        else:
            out.append(VideoFile(f, None, None, status="skipped: no prompt (name it '{prompt}-{i}.mp4', list it "
                                                     "in videos.json, or pass --prompt-from-name)"))
    return out


def score_videos(videos: list[VideoFile], rewards: dict[str, Any], batch_size: int = 4,
                 max_frames: int | None = None, progress: bool = False,
                 max_bytes: int = 1 << 30) -> tuple[dict[str, "Tensor"], dict[str, list[str]]]:
    """Score the files in batches of same-shaped videos, reading each batch only when it is scored; a batch holds
    at most ``batch_size`` videos and ``max_bytes`` of decoded frames (`video.decoded_bytes`).

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
    for idx, batch in _read_batches(videos, todo, batch_size, max_frames, max_bytes):
        out, errs = score_all(rewards, batch, [videos[i].prompt for i in idx])
        del batch  # before the next batch is decoded: one batch is held at a time
        for name, s in out.items():
            scores[name][idx] = s.float().cpu()
        for name, msg in errs.items():
            errors.setdefault(name, []).append(f"{[videos[i].path.name for i in idx]}: {msg}")
        for i in idx:
            videos[i].status = "ok"
        bar.update(len(idx))
    bar.close()
    return scores, errors


def _read_batches(videos: list[VideoFile], todo: list[int], size: int, max_frames: int | None,
                  max_bytes: int = 1 << 30) -> Iterator[tuple[list[int], "Tensor"]]:
    """Batches ``[B, T, 3, H, W]`` of at most ``size`` same-shaped videos and ``max_bytes`` of decoded frames, each
    yielded as soon as it is decoded. Every file's header is read first (frame count and size, nothing decoded), so
    a batch is allocated once at its final size and each video decodes into its place. Files that cannot be read,
    or are over ``max_bytes`` alone, get a status instead."""
    import torch

    from astrolabe_rl import video

    shapes: dict[tuple[int, int, int], list[int]] = {}
    total: dict[int, int] = {}
    for i in todo:
        try:
            header = video.probe_mp4(videos[i].path, count=True)
            if header.frames == 0:
                raise ValueError("the file holds no video frames")
        except Exception as e:  # noqa: BLE001 - one bad file must not lose the evaluation; its status says why
            videos[i].status = f"unreadable: {type(e).__name__}: {e}"
            continue
        shape = (min(header.frames, max_frames or header.frames), header.height, header.width)
        try:
            video.check_budget(*shape, max_bytes, "--max-decoded-mb")
        except ValueError as e:
            videos[i].status = f"skipped: {e} (score the first frames with --max-frames, or raise --max-decoded-mb)"
            continue
        total[i] = header.frames
        shapes.setdefault(shape, []).append(i)
    for (t, h, w), members in shapes.items():
        per = max(1, min(size, max_bytes // video.decoded_bytes(t, h, w)))
        for start in range(0, len(members), per):
            batch = torch.empty(len(members[start : start + per]), t, 3, h, w)
            kept: list[int] = []
            for i in members[start : start + per]:
                try:
                    video.decode_into(videos[i].path, batch[len(kept)], more="stop" if t < total[i] else "error")
                except Exception as e:  # noqa: BLE001 - its slot is reused by the next file
                    videos[i].status = f"unreadable: {type(e).__name__}: {e}"
                    continue
                kept.append(i)
            if kept:
                yield kept, batch[: len(kept)]
            del batch


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
    p.add_argument("--max-decoded-mb", type=float, default=1024.0,
                   help="decoded frames held at once (float32, 12 bytes a pixel: one batch); a video over it alone "
                        "is skipped (default 1024)")
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

    if args.batch_size < 1 or (args.max_frames is not None and args.max_frames < 1) or args.max_decoded_mb <= 0:
        raise ValueError("--batch-size and --max-frames must be at least 1, --max-decoded-mb above 0")
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
        scores, errors = score_videos(videos, rewards, args.batch_size, args.max_frames, progress=not args.quiet,
                                      max_bytes=int(args.max_decoded_mb * (1 << 20)))
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
