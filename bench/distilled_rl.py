"""Why NFT stalls on a distilled student (issue 27, item 4): the demo's recipe with one update option changed, on
the distilled student, with the undistilled base (``toy_fm``) as the control, several training seeds each.

Every run is `astrolabe_rl.toy.demo.run_demo` (the real recipe, the ``--quick`` preset's sizes) reported on the
**dev split** at the **last** EMA (``select_best=False``): this table chooses defaults, so it neither looks at the
test split nor picks its best moment. Options (each against the demo's defaults):

    σ set          release grid {1, .75, .5, .25}  vs  the same without σ = 1  vs  the sampler's warped grid  vs
                   U(0, 1)
    noise          fresh forward noise (released)  vs  the rollout's own sampling inputs (train.noise=rollout)
    loss form      release  vs  diffusionnft
    KL weight      1e-4 (released)  vs  0  vs  1e-2
    lr / old lag   lr ×3 and ×0.3;  θ_old copied every step (η = 0)  vs  the demo's η schedule
    update passes  1  vs  4 optimiser steps per rollout
    norm guard     off  vs  NormGuard's hinge on ‖v_θ‖ above the reference's (weight 1)
    combined       the rollout's own inputs, clean context and the norm guard together (and with lr ×2, ×3, or
                   2 and 4 update passes)
    group size K   the preset's 6  vs  3 and 12 (prompts per epoch scaled to keep the videos per epoch)
    reward weight  toy_quality ×3 in the training total (alone and with the combined update)

Columns, oracle first: the oracle gap closed and the RL'd single sample against the base's best of 4 by the training
total (`rl_minus_best_of_4`), agreement and render-likeness; then the optimised total's gap closed, the training
reward on train prompts (mean of the first and the last 4 epochs), the KL to the base, and the update's own
diagnostics from the run's metrics: the policy loss per training σ, ‖x̂0_θ − x̂0_old‖² (``old_deviate``) and
rms(v_θ)/rms(v_ref).

    python bench/distilled_rl.py                                  # every model × option × seed 0 1 2
    python bench/distilled_rl.py --models student --options defaults noise=rollout --seeds 0
    python bench/distilled_rl.py --quick                          # smoke: 1 seed, 2 epochs, smallest sizes

Each finished run is appended to ``--state`` (default ``bench/distilled_rl.state.jsonl``, committed) with the
sha256 of the weights it trained, and skipped when found there: the table outlives a session and a crash. Prints one
JSON line; writes the markdown table (every run in the state file, grouped by model and option) to ``--out``,
keeping the report's hand-written ``## Reading`` section.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:
    import astrolabe_rl  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablations import QUICK_SIZE, mean_sd, slug  # noqa: E402

from astrolabe_rl.toy.demo import run_demo  # noqa: E402
from astrolabe_rl.train.logging import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS: dict[str, list[str]] = {
    "student": [],  # the shipped toy family: the DMD-distilled 4-step student
    "toy_fm": ["model.family=toy_fm"],  # its undistilled flow-matching base, sampled with the same 4 steps
}
# the demo's rewards with toy_quality (the sharpness axis, the one a blurring update loses) weighted 3 instead of 1:
# the training total, and so the best-of-4 bar, change with it
QUALITY_X3 = ('rewards.components=[{"name": "toy_quality", "weight": 3.0}, {"name": "toy_motion", "weight": 1.0}, '
              '{"name": "toy_text", "weight": 1.0}]')
# the rollout's own inputs, clean context (as at inference) and NormGuard's hinge: the combined update
COMBINED = ["train.noise=rollout", "train.context=clean", "train.norm_guard=1.0"]
OPTIONS: list[tuple[str, list[str]]] = [
    ("defaults", []),
    ("sigmas=sampler_grid", ["train.sigmas=sampler_grid"]),
    ("sigmas=uniform", ["train.sigmas=uniform"]),
    ("sigmas=release_below_1", ["train.sigmas=release_below_1"]),
    ("noise=rollout", ["train.noise=rollout"]),
    ("noise=rollout, clean context", ["train.noise=rollout", "train.context=clean"]),
    ("loss_form=diffusionnft", ["train.loss_form=diffusionnft"]),
    ("kl=0", ["train.kl_weight=0"]),
    ("kl=1e-2", ["train.kl_weight=1e-2"]),
    ("lr=3e-3", ["train.lr=3e-3"]),
    ("lr=3e-4", ["train.lr=3e-4"]),
    ("old=copy", ["train.old_decay=0"]),
    ("passes=4", ["train.update_passes=4"]),
    ("norm_guard=1", ["train.norm_guard=1.0"]),
    ("noise=rollout, clean context, norm_guard=1", COMBINED),
    ("noise=rollout, clean context, norm_guard=1, lr=3e-3", [*COMBINED, "train.lr=3e-3"]),
    ("noise=rollout, clean context, norm_guard=1, passes=2", [*COMBINED, "train.update_passes=2"]),
    ("noise=rollout, clean context, norm_guard=1, passes=4", [*COMBINED, "train.update_passes=4"]),
    ("noise=rollout, clean context, norm_guard=1, lr=2e-3", [*COMBINED, "train.lr=2e-3"]),
    ("toy_quality weight 3", [QUALITY_X3]),
    ("noise=rollout, clean context, norm_guard=1, toy_quality weight 3", [*COMBINED, QUALITY_X3]),
    ("K=3", ["rollout.candidates=3", "rollout.prompts_per_epoch=12"]),
    ("K=12", ["rollout.candidates=12", "rollout.prompts_per_epoch=3"]),
]
EVAL = {"test_prompts": 16, "eval_seeds": 4}  # 64 dev-split videos per evaluation


def weights_id(family: str) -> str:
    """sha256 (12 hex) of the shipped weights a run of ``family`` trains: which student a state-file row measured."""
    from astrolabe_rl.toy.model import FM_WEIGHTS, WEIGHTS

    return hashlib.sha256({"toy": WEIGHTS, "toy_fm": FM_WEIGHTS}[family].read_bytes()).hexdigest()[:12]


def diagnostics(metrics_file: Path) -> dict[str, Any]:
    """What the update did, from a run's ``metrics.jsonl``: the mean policy loss per training σ, the mean
    ‖x̂0_θ − x̂0_old‖², the last rms(v_θ)/rms(v_ref), and the training reward (train prompts) of the first and the
    last 4 epochs."""
    m = read_metrics(metrics_file)
    mean = lambda key: statistics.fmean(m[key][1]) if key in m and m[key][1] else None  # noqa: E731
    reward = m.get("reward/total", ([], []))[1]
    return {
        "loss_by_sigma": {k.removeprefix("loss_sigma/"): round(mean(k), 5) for k in sorted(m) if k.startswith("loss_sigma/")},
        "old_deviate": mean("loss/old_deviate"),
        "v_norm_ratio": m["loss/v_norm_ratio"][1][-1] if "loss/v_norm_ratio" in m else None,
        "train_reward_first": statistics.fmean(reward[:4]) if reward else None,
        "train_reward_last": statistics.fmean(reward[-4:]) if reward else None,
    }


def _keep(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures the table reads (the state file stays small)."""
    oracle = summary["oracle"]
    return {
        "oracle_gap_closed": summary["oracle_gap_closed"], "rl_minus_best_of_4": summary["rl_minus_best_of_4"],
        "rl_minus_best_of_4_se": summary["rl_minus_best_of_4_se"], "oracle_worse": summary["oracle_worse"],
        "agreement": oracle["agreement"], "render": oracle["render"], "oracle": oracle["oracle"],
        "proxy_gap_closed": summary["proxy_gap_closed"], "kl_base_final": summary["kl_base_final"],
        "noise": summary["hack_monitor"]["after"], "wall_s": summary["wall_s"],
    }


def read_state(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(models: list[str], options: list[tuple[str, list[str]]], seeds: list[int], epochs: int, quick: bool,
        workdir: Path, state: Path, demo: Callable[..., dict] = run_demo) -> list[dict[str, Any]]:
    """Every model × option × seed not yet in ``state`` (same weights, epochs and size); appends each as it ends."""
    done = {(r["model"], r["option"], r["seed"], r["weights"], r["epochs"], r["quick"]) for r in read_state(state)}
    for model in models:
        family = next((o.split("=", 1)[1] for o in MODELS[model] if o.startswith("model.family=")), "toy")
        weights = weights_id(family)
        for label, overrides in options:
            for seed in seeds:
                if (model, label, seed, weights, epochs, quick) in done:
                    continue
                out = workdir / model / slug(label) / f"seed{seed}"
                size = {"test_prompts": 2, "eval_seeds": 1} if quick else EVAL
                s = demo(out, quick=True, epochs=epochs, seed=seed, progress=False, split="dev", select_best=False,
                         overrides=[*MODELS[model], *overrides, *(QUICK_SIZE if quick else [])], **size)
                row = {"model": model, "option": label, "seed": seed, "weights": weights, "epochs": epochs,
                       "quick": quick, **_keep(s), **diagnostics(out / "run" / "metrics.jsonl")}
                state.parent.mkdir(parents=True, exist_ok=True)
                with state.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{model} / {label} / seed {seed}: gap {s['oracle_gap_closed']:.3f}, rl−bo4 "
                      f"{s['rl_minus_best_of_4']:+.3f} ({s['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return read_state(state)


def _fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    return mean_sd(values, digits) if values else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown report: one line per (model, weights, option, epochs), mean ± std over its seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["weights"], r["epochs"], r["quick"], r["option"]), []).append(r)
    lines = [
        "# NFT on the distilled student: the update's options (dev split, last EMA)",
        "",
        "Written by `bench/distilled_rl.py` from its state file; each row is mean ± std over its training seeds of "
        "a `--quick`-sized demo run with one option changed, reported on the dev split (16 prompts × 4 seeds) at the "
        "last EMA. Oracle first: gap closed, and the RL'd single sample minus the base's best of 4 chosen by the "
        "training total. Then what the run optimised and what the update did: the training reward on train prompts "
        "(first → last 4 epochs), the KL to the base at the end, the policy loss per training σ and "
        "‖x̂0_θ − x̂0_old‖² (means over the epochs), and rms(v_θ)/rms(v_ref) at the end.",
        "",
        "| model (weights) | option | seeds | oracle gap closed | RL − best-of-4 | agreement | render | proxy gap closed "
        "| train reward first → last | KL to base | loss per σ | ‖x̂0_θ − x̂0_old‖² | v norm ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bases = set()
    for (model, weights, epochs, quick, option), runs in groups.items():
        if (model, weights) not in bases:  # the base's own scores on the same evaluation (no training)
            bases.add((model, weights))
            before = runs[0]
            lines.append(f"| *{model} ({weights}) before RL* | - | - | 0 | - | {before['agreement']['before']:.3f} | "
                         f"{before['render']['before']:.3f} | 0 | - | 0 | - | - | - |")
        sigmas = sorted({k for r in runs for k in r["loss_by_sigma"]}, reverse=True)
        per_sigma = ", ".join(f"{k}: {statistics.fmean(r['loss_by_sigma'][k] for r in runs if k in r['loss_by_sigma']):.3f}"
                              for k in sigmas)
        first, last = _fmt([r["train_reward_first"] for r in runs]), _fmt([r["train_reward_last"] for r in runs])
        cells = [
            f"{model} ({weights}, {epochs} ep{', smoke' if quick else ''})", option, str(len(runs)),
            _fmt([r["oracle_gap_closed"] for r in runs]), _fmt([r["rl_minus_best_of_4"] for r in runs]),
            _fmt([r["agreement"]["after"] for r in runs]), _fmt([r["render"]["after"] for r in runs]),
            _fmt([r["proxy_gap_closed"] for r in runs]), f"{first} → {last}", _fmt([r["kl_base_final"] for r in runs], 4),
            per_sigma or "-", _fmt([r["old_deviate"] for r in runs], 5), _fmt([r["v_norm_ratio"] for r in runs]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


READING = "## Reading"  # the hand-written part of the report, kept when the table is rewritten


def reading(out: Path) -> str:
    """The existing report's section from the ``## Reading`` heading on (what the table means), or nothing."""
    text = out.read_text() if out.exists() else ""
    return "\n" + text[text.index(READING):] if READING in text else ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--options", nargs="+", default=None, metavar="LABEL",
                   help=f"run only these rows (default all: {', '.join(label for label, _ in OPTIONS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; --quick 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 24, the quick demo's; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, the smallest sizes")
    p.add_argument("--state", type=Path, default=HERE / "distilled_rl.state.jsonl", help="finished runs (resume)")
    p.add_argument("--out", type=Path, default=HERE / "distilled_rl.md", help="markdown table")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    known = dict(OPTIONS)
    if args.options is not None and (unknown := [o for o in args.options if o not in known]):
        p.error(f"unknown option label(s) {unknown}; choose from {list(known)}")
    options = [(o, known[o]) for o in args.options] if args.options else OPTIONS
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (2 if args.quick else 24)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.models, options, seeds, epochs, args.quick, args.workdir or Path(tmp), args.state)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows) + reading(args.out))
    result = {"bench": "distilled_rl", "models": args.models, "options": [o for o, _ in options], "seeds": seeds,
              "epochs": epochs, "runs_in_state": len(rows), "out": str(args.out), "state": str(args.state),
              "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
