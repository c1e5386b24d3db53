"""Streaming RL's own options on the long toy world (CPU): what ``streaming.history_kv`` and ``streaming.overlap``
change, judged on the late windows' oracle, the long-range coherence and the seam at window boundaries.

Each row is an ``astrolabe demo --long --quick``-sized run (`astrolabe_rl.toy.long_demo.run_long_demo`, the real
recipe in ``train.mode=streaming``) per seed, with one option changed from `configs/demo_long.yaml`:

    history_kv   per_policy (each training pass commits the history with its own weights)
                 vs old (θ_old's K/V shared by the θ, θ_old and reference passes: one commit instead of three)
    overlap      0 (windows meet at a block boundary) vs 3 (one block of the history trained with each window, its
                 x̂0 pulled toward the committed frames with boundary_weight 1, 0.1, 0.01 or 0.001, the default)

Columns: the late windows' oracle gap closed (headline; mean ± std over training seeds), its agreement and render
halves, the window-level proxies on the late windows, the coherence over whole videos, the boundary-jump ratio (1 =
no seam), and the update phase's median seconds per epoch.

    python bench/streaming_ablations.py                 # 3 seeds, 12 epochs per run
    python bench/streaming_ablations.py --quick         # 1 seed, 2 epochs, smallest sizes (smoke)

Prints one JSON line; writes the markdown table to ``--out`` (default bench/streaming_ablations.md).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import astrolabe_rl  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablations import mean_sd, parse_args, run  # noqa: E402

from astrolabe_rl.toy.long_demo import run_long_demo  # noqa: E402
from astrolabe_rl.train.logging import read_metrics  # noqa: E402

# the quick preset's sizes as this table was measured with (12 epochs, η reaching 0.48, the dev split every 4)
PINNED = ["train.old_decay_rate=0.04", "eval.every=4"]
OPTIONS: list[tuple[str, list[str]]] = [
    ("demo --long defaults (history_kv=per_policy, overlap=0)", PINNED),
    ("history_kv=old", [*PINNED, "streaming.history_kv=old"]),
    ("overlap=3, boundary_weight=1", [*PINNED, "streaming.overlap=3", "streaming.boundary_weight=1.0"]),
    ("overlap=3, boundary_weight=0.1", [*PINNED, "streaming.overlap=3", "streaming.boundary_weight=0.1"]),
    ("overlap=3, boundary_weight=0.01", [*PINNED, "streaming.overlap=3", "streaming.boundary_weight=0.01"]),
    ("overlap=3, boundary_weight=0.001", [*PINNED, "streaming.overlap=3", "streaming.boundary_weight=0.001"]),
]
REWARDS = ["toy_quality", "toy_motion_long", "toy_text"]


def update_seconds(summary: dict) -> float:
    """The median seconds of the update phase per epoch (``perf/train_s``), from the run's metrics."""
    return statistics.median(read_metrics(Path(summary["out"]) / "run" / "metrics.jsonl")["perf/train_s"][1])


def table(rows: list[dict], seeds: list[int], epochs: int) -> str:
    ref = rows[0]["runs"][0]
    late = ref["late"]
    lines = [
        f"# Streaming options on the long toy world ({len(seeds)} seed(s): {seeds}; {epochs} epochs per run)",
        "",
        f"Each run is `astrolabe demo --long --quick` with one option changed; the EMA policy it reports is scored on "
        f"{ref['test_split']['prompts']} test prompts × {len(ref['test_split']['seeds'])} seeds, {ref['video_frames']}"
        f"-frame videos cut into windows of {ref['window']}; *late* = the last {ref['late_windows']} windows. Mean ± "
        "std over training seeds. The oracle (`toy.oracle.window_scores`) is never trained on.",
        "",
        "| option | late oracle gap closed | late agreement | late render | " + " | ".join(f"late {n}" for n in REWARDS)
        + " | coherence | boundary jump | update s/epoch |",
        "|---|---|---|---|" + "---|" * len(REWARDS) + "---|---|---|",
    ]
    for label, key in (("base model (before)", "before"), ("world renders", "real")):
        cells = ["0" if key == "before" else "1", f"{late['oracle/agreement'][key]:.3f}",
                 f"{late['oracle/render'][key]:.3f}", *[f"{late[n][key]:.3f}" for n in REWARDS],
                 f"{ref['coherence'][key]:.3f}", f"{ref['boundary_jump'][key]:.3f}", "-"]
        lines.append(f"| *{label}* | " + " | ".join(cells) + " |")
    for row in rows:
        runs = row["runs"]
        cells = [
            mean_sd([r["late_oracle_gap_closed"] for r in runs]),
            mean_sd([r["late"]["oracle/agreement"]["after"] for r in runs]),
            mean_sd([r["late"]["oracle/render"]["after"] for r in runs]),
            *[mean_sd([r["late"][n]["after"] for r in runs]) for n in REWARDS],
            mean_sd([r["coherence"]["after"] for r in runs]),
            mean_sd([r["boundary_jump"]["after"] for r in runs]),
            mean_sd([update_seconds(r) for r in runs], 2),
        ]
        lines.append(f"| {row['option']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(argv, __doc__, OPTIONS, "streaming_ablations.md", epochs=12, quick_epochs=2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(options, args.seeds, args.epochs, args.quick, args.workdir or Path(tmp), demo=run_long_demo,
                   headline="late_oracle_gap_closed")
        report = table(rows, args.seeds, args.epochs)  # reads the runs' metrics: before the folder goes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    result = {
        "bench": "streaming_ablations", "seeds": args.seeds, "epochs": args.epochs,
        "late_oracle_gap_closed": {row["option"]: [r["late_oracle_gap_closed"] for r in row["runs"]] for row in rows},
        "boundary_jump": {row["option"]: [r["boundary_jump"]["after"] for r in row["runs"]] for row in rows},
        "wall_s": round(time.perf_counter() - start, 1), "table": str(args.out),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
