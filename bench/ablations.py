"""Ablations on the toy world (CPU): the oracle on the test split, the proxies and the hack monitor, release
defaults vs each option.

Each row is a short ``astrolabe demo``-style run (`astrolabe_rl.toy.demo.run_demo`, the real recipe) per seed,
with one config option changed from the demo's defaults (`configs/demo.yaml`: the release NFT recipe, with the
old policy's η schedule compressed to the run's length so that it ends off-policy at η = 0.5):

    loss_form    release (plain x̂0 MSE)  vs  diffusionnft (adaptive weight, ×adv_clip/β)
    train.sigmas release_grid {1, .75, .5, .25}  vs  sampler_grid (the warped steps)
    train.context noisy (whole clip noised, block-causal)  vs  clean (teacher forcing on clean history)
    combine      raw weighted sum  vs  group_z (z-score each reward within its prompt group)
    β            0.1 (released)  vs  0.01, 0.03, 0.3 and 1.0 (DiffusionNFT's default)

Columns, judged first on what no run optimises: the oracle gap closed on the test split (`toy.oracle`: prompt
agreement and render-likeness; mean ± std over training seeds), its two halves, then the optimised proxies (each
reward after training, and the combined reward's gap closed), the noise monitor (the hack of the hackable proxy),
and the KL to the base at the fixed σ set (``eval/kl_base``) at the end.

    python bench/ablations.py                  # default: 3 seeds, 16 epochs per run (about 40 min on 2 cores)
    python bench/ablations.py --quick          # 1 seed, 3 epochs, smallest sizes (a smoke run, ~2 min)
    python bench/ablations.py --seeds 0 1 --epochs 24 --out /tmp/ablations.md

Prints one JSON line; writes the markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

try:
    import astrolabe_rl  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from astrolabe_rl.toy.demo import run_demo

OPTIONS: list[tuple[str, list[str]]] = [
    ("demo defaults", []),
    ("loss_form=diffusionnft", ["train.loss_form=diffusionnft"]),
    ("train.sigmas=sampler_grid", ["train.sigmas=sampler_grid"]),
    ("train.context=clean", ["train.context=clean"]),
    ("combine=group_z", ["rewards.combine=group_z"]),
    ("β=0.03", ["train.beta=0.03"]),
    ("β=0.3", ["train.beta=0.3"]),
    ("β=0.01", ["train.beta=0.01"]),
    ("β=1.0", ["train.beta=1.0"]),
]
QUICK_SIZE = ["rollout.prompts_per_epoch=2", "rollout.candidates=4", "eval.every=0"]


def mean_sd(values: list[float], digits: int = 3) -> str:
    """``mean ± sample std`` of the values over seeds (std 0 for one)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def slug(label: str) -> str:
    """A row label as a folder name (letters, digits, ``-`` and ``.`` kept, the rest ``_``)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label)


def run(options: list[tuple[str, list[str]]], seeds: list[int], epochs: int, quick: bool, workdir: Path,
        demo: Callable[..., dict] = run_demo, headline: str = "oracle_gap_closed", **demo_kwargs: object) -> list[dict]:
    """Every option × seed (``demo``, `run_demo` by default, with the option's overrides and ``demo_kwargs``); one
    dict per option with the per-seed demo summaries (``headline`` names the figure printed as each run ends)."""
    rows = []
    for label, overrides in options:
        runs = []
        for seed in seeds:
            out = workdir / slug(label) / f"seed{seed}"
            extra = [*overrides, *(QUICK_SIZE if quick else [])]
            s = demo(out, quick=True, epochs=epochs, seed=seed, overrides=extra, progress=False,
                     **({"test_prompts": 2, "eval_seeds": 1} if quick else {}), **demo_kwargs)
            runs.append(s)
            print(f"{label} seed {seed}: {headline} {s[headline]:.3f} ({s['wall_s']:.0f} s)", file=sys.stderr,
                  flush=True)
        rows.append({"option": label, "runs": runs})
    return rows


def table(rows: list[dict], seeds: list[int], epochs: int) -> str:
    """The markdown report."""
    ref = rows[0]["runs"][0]
    rewards = [n for n in ref["rewards"] if n != "total"]
    lines = [
        f"# Toy-world ablations ({len(seeds)} seed(s): {seeds}; {epochs} epochs per run; test split)",
        "",
        "Each run is `astrolabe demo --quick` with one option changed; scores are the EMA policy's (the one of the "
        "evaluation that scored best on the dev split's oracle, as the demo reports) on the test split "
        f"({ref['test_split']['prompts']} prompts × {len(ref['test_split']['seeds'])} seeds, balanced in direction "
        "and speed, never tuned on), mean ± std over training seeds. The oracle (`toy.oracle`) is the headline: "
        "oracle gap closed = (after − base) / (renders − base) of ½·agreement + ½·render-likeness. The proxies are "
        "the rewards the run optimised; the noise monitor exposes noise bought as quality (the world's renders score "
        f"{ref['hack_monitor']['real']:.4f}); KL is ‖x̂0_ema − x̂0_ref‖² at σ ∈ {ref['kl_sigmas']} at the end.",
        "",
        "| option | oracle gap closed | agreement | render | " + " | ".join(rewards)
        + " | proxy gap closed | noise monitor | KL to base |",
        "|---|---|---|---|" + "---|" * len(rewards) + "---|---|---|",
    ]
    for label, key in (("base model (before)", "before"), ("world renders", "real")):
        cells = ["0" if key == "before" else "1", f"{ref['oracle']['agreement'][key]:.3f}",
                 f"{ref['oracle']['render'][key]:.3f}", *[f"{ref['rewards'][n][key]:.3f}" for n in rewards],
                 "0" if key == "before" else "1", f"{ref['hack_monitor'][key]:.4f}", "0"]
        lines.append(f"| *{label}* | " + " | ".join(cells) + " |")
    for row in rows:
        runs = row["runs"]
        cells = [
            mean_sd([r["oracle_gap_closed"] for r in runs]),
            mean_sd([r["oracle"]["agreement"]["after"] for r in runs]),
            mean_sd([r["oracle"]["render"]["after"] for r in runs]),
            *[mean_sd([r["rewards"][n]["after"] for r in runs]) for n in rewards],
            mean_sd([r["proxy_gap_closed"] for r in runs]),
            mean_sd([r["hack_monitor"]["after"] for r in runs]),
            mean_sd([r["kl_base_final"] for r in runs]) if all(r["kl_base_final"] is not None for r in runs) else "-",
        ]
        lines.append(f"| {row['option']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None, doc: str, rows: list[tuple[str, list[str]]], out: str, epochs: int,
               quick_epochs: int, flag: str = "--options") -> tuple[argparse.Namespace, list[tuple[str, list[str]]]]:
    """The command line of a toy-world table bench: ``--quick``, ``--seeds``, ``--epochs``, ``--out``, ``--workdir``
    and ``flag`` (run only some of the labelled ``rows``); returns the arguments, with seeds and epochs filled in, and
    the rows to run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"1 seed, {quick_epochs} epochs, smallest sizes (smoke run)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {epochs}; --quick {quick_epochs})")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / out,
                   help=f"markdown table (default bench/{out})")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument(flag, dest="labels", nargs="+", default=None, metavar="LABEL",
                   help=f"run only these rows (default: all of {', '.join(label for label, _ in rows)})")
    args = p.parse_args(argv)
    known = dict(rows)
    if args.labels is not None and (unknown := [o for o in args.labels if o not in known]):
        p.error(f"unknown {flag.strip('-').rstrip('s')} label(s) {unknown}; choose from {list(known)}")
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs or (quick_epochs if args.quick else epochs)
    return args, [(label, known[label]) for label in args.labels] if args.labels else list(rows)


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(argv, __doc__, OPTIONS, "ablations.md", epochs=16, quick_epochs=3)
    seeds, epochs = args.seeds, args.epochs
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(options, seeds, epochs, args.quick, args.workdir or Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, seeds, epochs))
    result = {
        "bench": "ablations", "seeds": seeds, "epochs": epochs, "out": str(args.out),
        "wall_s": round(time.perf_counter() - start, 1),
        "results": {row["option"]: {
            "oracle_gap_closed": statistics.fmean(r["oracle_gap_closed"] for r in row["runs"]),
            "proxy_gap_closed": statistics.fmean(r["proxy_gap_closed"] for r in row["runs"]),
            "noise_after": statistics.fmean(r["hack_monitor"]["after"] for r in row["runs"]),
        } for row in rows},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
