"""Reward hacking under control (CPU, toy world): does selective KL hold a hackable main reward to the oracle?

The main reward is the deliberately hackable quality proxy ``toy_quality_hackable`` (luma sharpness: noise raises it
as much as crisp edges do), and it alone is optimised; the honest ``toy_motion`` and ``toy_text`` are scored on every
rollout (weight 0) as the auxiliaries of selective KL, GARDO's setting: auxiliary reward models that judge whether
the proxy's preferences are backed, without being optimised themselves. Each row is a short ``astrolabe demo``-style run (`toy.demo.run_demo`, the real
recipe) per training seed with one regularisation setting; the **last** EMA is judged (no dev-split early stopping:
this bench asks where a run ends up), on the test split, which nobody trains or tunes on:

    no KL                  train.kl_weight = 0
    uniform KL λ           every sample regularised toward the frozen base, at three weights
    selective (optimism)   the KL on the top ρ of main-reward optimism (main high, auxiliaries low), base reference
    selective (release)    the released code's sign (main low, auxiliaries high)
    selective + dynamic    ... with the reference re-copied from θ by the released rule
    selective + EMA ens.   ... with the reference the mean x̂0 of EMAs of θ at decays 0.9 / 0.99 / 0.999

Columns, judged first on what no run optimises: the oracle gap closed (`toy.oracle`), the hack monitor
``toy_noise`` (the world's renders ≈ 0.01), then the main reward's and the auxiliaries' gains, the KL to the base
at the fixed σ set (``eval/kl_base``), the share of samples the KL covered, the reference copies, and the train
phase's seconds per epoch (what the extra reference passes cost). Mean ± std over training seeds.

    python bench/hacking.py                      # 3 seeds, 24 epochs per run (about 45 min on 2 cores)
    python bench/hacking.py --quick              # 1 seed, 2 epochs, smallest sizes (a smoke run)
    python bench/hacking.py --rows "no KL" "selective + dynamic" --seeds 0

Prints one JSON line; writes the markdown table to ``--out`` (default ``bench/hacking.md``).
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

import yaml  # noqa: E402
from ablations import mean_sd, parse_args, run  # noqa: E402  (bench/ is the script's folder)

from astrolabe_rl.train.logging import read_metrics  # noqa: E402

MAIN, AUXILIARY = "toy_quality_hackable", ["toy_motion", "toy_text"]
# Only the main reward is optimised. Measured on the dev split (24 epochs, seed 0): optimised alone it hacks (noise
# monitor 0.008 -> 0.012, render-likeness 0.11 -> 0.06); in a raw sum with the honest rewards, even at weight 3, it
# barely moves (0.008 -> 0.008), so a bench of hacking needs the proxy alone.
REWARDS = ("rewards.components=[" + ", ".join(
    f"{{name: {n}, weight: {w}}}" for n, w in [(MAIN, 1.0), *((a, 0.0) for a in AUXILIARY)]) + "]")
# λ_KL, chosen on the dev split (24 epochs, seed 0): uniform 1e-2 holds the policy at the base (main reward +0.00),
# 1e-3 lets a quarter of no-KL's main gain through, 0.1 freezes it; 1e-4 is the released weight. Selective KL at 1e-2
# froze the main reward too, at 1e-3 it let half of it through: the selective rows use 1e-3.
UNIFORM_WEIGHTS = (1e-4, 1e-3, 1e-2)
SELECTIVE_WEIGHT = 1e-3  # λ_KL of the selective rows (the KL is averaged over the selected samples only)
SELECTIVE = ["regularize.mode=selective", f"regularize.main={MAIN}", f"regularize.auxiliary=[{','.join(AUXILIARY)}]",
             f"train.kl_weight={SELECTIVE_WEIGHT}"]
ROWS: list[tuple[str, list[str]]] = [
    ("no KL", ["train.kl_weight=0"]),
    *((f"uniform KL λ={w:g}", [f"train.kl_weight={w}"]) for w in UNIFORM_WEIGHTS),
    ("selective (optimism)", SELECTIVE),
    ("selective (release sign)", [*SELECTIVE, "regularize.sign=release"]),
    ("selective + dynamic", [*SELECTIVE, "train.reference=dynamic"]),
    ("selective + EMA ensemble", [*SELECTIVE, "train.reference=ema_ensemble"]),
]
HACK = "toy_noise"


def run_extras(summary: dict) -> dict:
    """What the demo summary lacks, from the run's folder: the KL's coverage, reference copies, train s/epoch, and
    the memory of the reference adapters (each as large as the trained adapter, kept in fp32)."""
    run_dir = Path(summary["out"]) / "run"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    last = lambda key: metrics[key][1][-1] if key in metrics else 0.0  # noqa: E731
    frac = metrics.get("loss/kl_frac", ([], [0.0]))[1]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    adapters = {"base": 0, "dynamic": 1, "ema_ensemble": len(cfg["regularize"]["ema_decays"])}[cfg["train"]["reference"]]
    adapter_mb = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size / 1e6
    return {"kl_frac": statistics.fmean(frac), "resets": last("reg/ref_resets"),
            "train_s": statistics.median(metrics["perf/train_s"][1]), "ref_mb": adapters * adapter_mb}


def table(rows: list[dict], seeds: list[int], epochs: int) -> str:
    ref = rows[0]["runs"][0]
    gain = lambda r, n: r["rewards"][n]["after"] - r["rewards"][n]["before"]  # noqa: E731
    lines = [
        f"# Reward hacking under control ({len(seeds)} seed(s): {seeds}; {epochs} epochs per run; test split)",
        "",
        f"Optimised: `{MAIN}` alone (hackable by noise); `toy_motion` and `toy_text` are scored on every rollout "
        "with weight 0, as the auxiliaries of selective KL. Scores of the last EMA on the test split "
        f"({ref['test_split']['prompts']} prompts × {len(ref['test_split']['seeds'])} seeds, never tuned on), "
        "mean ± std over training seeds. Oracle gap closed = (after − base) / (renders − base) of "
        "½·agreement + ½·render-likeness. Hack monitor: background noise (base "
        f"{ref['hack_monitor']['before']:.4f}, renders {ref['hack_monitor']['real']:.4f}). Gains are after − before "
        f"(base: main {ref['rewards'][MAIN]['before']:.3f}, " + ", ".join(
            f"{a} {ref['rewards'][a]['before']:.3f}" for a in AUXILIARY) + "). KL to base: ‖x̂0_ema − x̂0_base‖² at "
        f"σ ∈ {ref['kl_sigmas']} at the end. KL coverage: share of samples the KL term covered, mean over epochs. "
        "Train s: median seconds of the update phase per epoch (the reference passes included); reference MB: the "
        "reference adapters' memory (fp32 LoRA tensors; the base reference costs none).",
        "",
        "| regularisation | oracle gap closed | hack monitor | main gain | " + " | ".join(f"{a} gain" for a in AUXILIARY)
        + " | KL to base | KL coverage | reference copies | train s | reference MB |",
        "|---|---|---|---|" + "---|" * len(AUXILIARY) + "---|---|---|---|---|",
    ]
    for row in rows:
        runs, extras = row["runs"], row["extras"]
        cells = [
            mean_sd([r["oracle_gap_closed"] for r in runs]),
            mean_sd([r["hack_monitor"]["after"] for r in runs], digits=4),
            mean_sd([gain(r, MAIN) for r in runs]),
            *[mean_sd([gain(r, a) for r in runs]) for a in AUXILIARY],
            mean_sd([r["kl_base_final"] for r in runs]),
            mean_sd([e["kl_frac"] for e in extras]),
            mean_sd([e["resets"] for e in extras]),
            mean_sd([e["train_s"] for e in extras]),
            f"{extras[0]['ref_mb']:.1f}",
        ]
        lines.append(f"| {row['option']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, rows_cfg = parse_args(argv, __doc__, ROWS, "hacking.md", epochs=24, quick_epochs=2, flag="--rows")
    rows_cfg = [(label, [REWARDS, *overrides]) for label, overrides in rows_cfg]
    seeds, epochs = args.seeds, args.epochs
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(rows_cfg, seeds, epochs, args.quick, args.workdir or Path(tmp), select_best=False)
        for row in rows:
            row["extras"] = [run_extras(s) for s in row["runs"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, seeds, epochs))
    result = {
        "bench": "hacking", "seeds": seeds, "epochs": epochs, "out": str(args.out),
        "wall_s": round(time.perf_counter() - start, 1),
        "results": {row["option"]: {
            "oracle_gap_closed": statistics.fmean(r["oracle_gap_closed"] for r in row["runs"]),
            "hack_after": statistics.fmean(r["hack_monitor"]["after"] for r in row["runs"]),
            "main_gain": statistics.fmean(r["rewards"][MAIN]["after"] - r["rewards"][MAIN]["before"] for r in row["runs"]),
            "kl_base": statistics.fmean(r["kl_base_final"] for r in row["runs"]),
        } for row in rows},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
