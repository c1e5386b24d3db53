"""What a reward can buy before RL (CPU, toy world): K base samples of P prompts per split, scored by the demo's
rewards and by the oracle, and what reranking them buys.

Per split (default train and test; `astrolabe_rl.toy.headroom.split_prompts`), P prompts × K samples of a toy family
(sample k of prompt i with the noise seed the demo's `held_out_videos` uses for (prompt i, seed k + K·seed)):

* every reward's, the training total's and the oracle's mean, within-group and between-group sd;
* the within-group Spearman of each reward (and of the total) with the oracle and with its agreement and render
  parts: does the reward order a prompt's samples the way the oracle does?
* within-prompt pixel diversity (mean pairwise RMS distance) beside the world's renders' of the same prompts;
* the oracle of the best-of-{2, 4, 8} sample chosen by the training total and by the oracle itself.

    python bench/headroom.py --model toy --markdown bench/headroom.md       # 16 × 8, train and test (≈ 4 min)
    python bench/headroom.py --model toy_fm --markdown bench/headroom.md
    python bench/headroom.py --model toy --checkpoint new.safetensors --label "new student" --markdown bench/headroom.md
    python bench/headroom.py --quick                                        # 2 × 2, seconds (the test suite's)

Prints one JSON line; ``--markdown FILE`` adds (or replaces) this model's rows, one per split, in the file's table
(a new file gets the column explanations first). Nothing here trains or selects anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import astrolabe_rl  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from astrolabe_rl.toy import headroom as hr  # noqa: E402

FAMILIES = ("toy", "toy_fm", "toy_long")
BEST_OF = (2, 4, 8)
REWARD_ORDER = ("toy_quality", "toy_motion", "toy_text")  # the ρ(reward, oracle) cell's order (the demo's rewards)

INTRO = """# Headroom: what the toy rewards can buy before RL

`python bench/headroom.py --model <family> --markdown bench/headroom.md` (P prompts × K base samples per split, CPU).
A group is one prompt's K samples; sample k of prompt i uses the noise seed of the demo's held-out (prompt i, seed k).
Columns:

* **P×K**: prompts × samples per prompt; train prompts are drawn from the train split, test prompts are the demo's
  balanced test set (`toy.world.eval_prompts`).
* **oracle (agree / render)**: mean single-sample oracle (`toy.oracle`: ½ agreement + ½ render-likeness), its two parts.
* **renders' oracle**: the same for the world's own renders of the same prompts at K seeds (the ceiling).
* **oracle sd within / between**: the oracle's spread inside a group (what a group advantage sees) and of the group
  means (prompt difficulty, which a group advantage cancels).
* **ρ(total, oracle / agree / render)**: the mean within-group Spearman of the training total (the demo's weighted sum
  of rewards) with the oracle and its parts: whether the reward orders a prompt's samples as the oracle does.
* **ρ(reward, oracle) q / m / t**: the same with the oracle for toy_quality, toy_motion, toy_text.
* **diversity samples / renders**: mean pairwise RMS pixel distance between a prompt's samples, and between its renders.
* **best-of-2/4/8 by total**: the mean oracle of the sample the training total ranks highest among a prompt's first n
  (reranking by the reward: the bar RL is judged against, `rl_minus_best_of_4`).
* **by oracle**: the same chosen by the oracle itself (what a perfect reward could buy from n samples).
"""
HEADER = ("| model | split | P×K | oracle (agree / render) | renders' oracle | oracle sd within / between "
          "| ρ(total, oracle / agree / render) | ρ(reward, oracle) q / m / t | diversity samples / renders "
          "| best-of-2/4/8 by total | best-of-2/4/8 by oracle |")


def measure_split(io: Any, family: Any, scorer: hr.DemoScorer, split: str, p: int, k: int, seed: int,
                  num_frames: int, micro_batch: int) -> dict[str, Any]:
    """One split's statistics (`toy.headroom.headroom_stats`) with the diversity of the samples and the renders and
    the renders' oracle."""
    from astrolabe_rl.toy import world
    from astrolabe_rl.toy.oracle import one_thread, oracle_scores

    prompts = hr.split_prompts(split, p, seed)
    videos, seeds = hr.sample_groups(io, family, prompts, k, num_frames, first_draw=k * seed, micro_batch=micro_batch)
    scores = hr.score_groups(scorer, videos, prompts)
    renders = world.render([q for q in prompts for _ in range(k)], [k * seed + j for _ in prompts for j in range(k)])
    with one_thread():
        renders_oracle = oracle_scores(renders, [q for q in prompts for _ in range(k)])["oracle"]
    out = hr.headroom_stats(scores, ns=BEST_OF, correlate=[*scorer.rewards, "total"])
    diversity = {"samples": round(float(hr.pairwise_rms(videos).mean()), 4) if k > 1 else None,  # None: one sample
                 "renders": round(float(hr.pairwise_rms(renders.unflatten(0, (p, k))).mean()), 4) if k > 1 else None}
    return {"prompts": p, "samples": k, "first_noise_seeds": [row[0] for row in seeds],
            "renders_oracle": round(float(renders_oracle.mean()), 4), "diversity": diversity, **out}


def measure(model: str, checkpoint: str | None, p: int, k: int, splits: list[str], seed: int) -> dict[str, Any]:
    """Build the family the way the demo does (its config, `models.build`), then `measure_split` each split."""
    from astrolabe_rl.models.build import load_model_io
    from astrolabe_rl.models.families import get_family
    from astrolabe_rl.toy.demo import demo_config
    from astrolabe_rl.train.recipe import model_source

    overrides = [f"model.family={model}", *([f"model.checkpoint={checkpoint}"] if checkpoint else [])]
    cfg = demo_config(Path(tempfile.gettempdir()) / "headroom-unused", overrides=overrides)  # nothing is written
    family = get_family(cfg.model.family)
    io = load_model_io(family, model_source(cfg))
    scorer = hr.DemoScorer.from_config(cfg)
    num_frames = cfg.rollout.num_frames or family.horizon_frames
    return {split: measure_split(io, family, scorer, split, p, k, seed, num_frames, cfg.rollout.micro_batch)
            for split in splits}


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table_rows(label: str, result: dict[str, Any]) -> list[str]:
    """The markdown rows of one model: one per split (`HEADER`'s columns)."""
    rows = []
    for split, s in result["splits"].items():
        m, sp = s["mean"], s["spearman"]
        best = lambda by: " / ".join(_f(s["best_of"][by].get(str(n))) for n in BEST_OF)  # noqa: E731
        rows.append(" | ".join([
            f"| {label}", split, f"{s['prompts']}×{s['samples']}",
            f"{_f(m['oracle/oracle'])} ({_f(m['oracle/agreement'])} / {_f(m['oracle/render'])})",
            _f(s["renders_oracle"]),
            f"{_f(s['sd_within']['oracle/oracle'])} / {_f(s['sd_between']['oracle/oracle'])}",
            " / ".join(_f(sp["total"][part], 2) for part in hr.ORACLE_PARTS),
            " / ".join(_f(sp[n]["oracle"], 2) if n in sp else "–" for n in REWARD_ORDER),
            f"{_f(s['diversity']['samples'])} / {_f(s['diversity']['renders'])}",
            best("total"), best("oracle/oracle"),
        ]) + " |")
    return rows


def update_markdown(path: Path, rows: list[str]) -> None:
    """Put ``rows`` into the table of ``path``: each replaces the row of the same (model, split), or is appended;
    a missing file is created with `INTRO` and the header. Text around the table is kept as it is."""
    lines = path.read_text().splitlines() if path.is_file() else [*INTRO.splitlines(), "", HEADER,
                                                                  "|" + "---|" * HEADER.count(" | ") + "---|"]
    if HEADER not in lines:
        raise ValueError(f"{path} has no headroom table (its header line must read {HEADER!r}); "
                         "pass another --markdown file or fix the header")
    start = lines.index(HEADER) + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    key = lambda row: tuple(c.strip() for c in row.strip("|").split(" | ")[:2])  # noqa: E731  (model, split)
    table = lines[start:end]
    for row in rows:
        same = [i for i, old in enumerate(table) if key(old) == key(row)]
        if same:
            table[same[0]] = row
        else:
            table.append(row)
    path.write_text("\n".join([*lines[:start], *table, *lines[end:]]) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=FAMILIES, help="the toy family (default toy: the shipped student)")
    p.add_argument("--checkpoint", default=None, help="DiT weights instead of the family's shipped ones")
    p.add_argument("--label", default=None, help="the table's model name (default: the family, or family:checkpoint)")
    p.add_argument("--prompts", type=int, default=16, help="P prompts per split (default 16)")
    p.add_argument("--samples", type=int, default=8, help="K samples per prompt (default 8; best-of-n needs n <= K)")
    p.add_argument("--splits", default="train,test", help="comma-separated splits: train, dev, test (default train,test)")
    p.add_argument("--seed", type=int, default=0,
                   help="train prompts' draw, and the noise draws k + K·seed (0: the demo's held-out draws)")
    p.add_argument("--quick", action="store_true", help="2 prompts × 2 samples: a smoke run in seconds")
    p.add_argument("--markdown", type=Path, default=None, help="add this model's rows to the markdown table in FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.samples = 2, 2
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in args.splits if s not in ("train", "dev", "test")]
    if bad or not args.splits:
        p.error(f"--splits takes train, dev and/or test; got {bad or 'nothing'}")
    if args.prompts < 1 or args.samples < 1:
        p.error(f"--prompts and --samples must be >= 1; got {args.prompts} and {args.samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    label = args.label or (args.model if not args.checkpoint else f"{args.model}:{Path(args.checkpoint).name}")
    splits = measure(args.model, args.checkpoint, args.prompts, args.samples, args.splits, args.seed)
    result = {"bench": "headroom", "model": label, "family": args.model, "checkpoint": args.checkpoint,
              "prompts": args.prompts, "samples": args.samples, "seed": args.seed, "torch_threads": torch.get_num_threads(),
              "splits": splits, "wall_s": round(time.perf_counter() - start, 1)}
    if args.markdown:
        update_markdown(args.markdown, table_rows(label, result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
