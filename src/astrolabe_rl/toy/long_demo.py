"""``astrolabe demo --long``: streaming RL of the long toy model on a CPU, judged window by window on the oracle.

    astrolabe demo --long               # ≈ 10 minutes on 2 CPU cores
    astrolabe demo --long --quick       # ≈ 3 minutes

What runs: the ``toy_long`` family (the distilled student extended to long rollouts, `toy.distill --long`: a rolling
cache of 9 latent frames with a 3-frame sink) through the recipe's own loop in ``train.mode=streaming``
(`configs/demo_long.yaml`): each epoch rolls every prompt's history once, without gradient, to a late window start,
samples K candidates of that window from the shared cache and trains them on the window-level rewards
``toy_quality + toy_motion_long + toy_text`` (`train.streaming`).

What it shows, on test-split prompts (balanced in direction and speed) at fixed seeds, on videos of
``rollout.num_frames`` = 45 latent frames cut into 5 windows of 9:

* per window position, for ``before`` (the base), ``after`` (the EMA of the trained adapter at the evaluation that
  scored best on the dev split's last-window oracle) and ``real`` (the world's own long renders, bouncing off the
  borders): the window oracle (`toy.oracle.window_scores`: prompt agreement and render-likeness, bounce-aware; no
  run trains on it), every reward and monitor;
* the headline: the **late windows' oracle gap closed** (the last `LATE_WINDOWS` windows, past the 27 frames the
  long model was extended on, where it decays), with the oracle attributes that got worse there;
* over whole videos: the long-range coherence (`toy.rewards.coherence`) and the seam metric at window boundaries
  (`toy.rewards.boundary_jump`), before / after / real; the peak resident memory of the process;
* ``out/long-<i>.mp4`` (base | after | renders side by side), ``out/strip-seed<s>.png`` (stills along the video),
  ``out/windows.png`` (per-window curves), ``out/curves.png`` (training curves) and ``out/summary.json``, also printed
  as the final JSON line.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from astrolabe_rl.toy import demo

LATE_WINDOWS = 2  # the headline's windows: the last two of five (latent frames 27-44)
SELECT_METRIC = "eval/last_window/monitor/toy_oracle_long"
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"overrides": [], "dev_prompts": 4, "test_prompts": 8, "eval_seeds": 3},
    "quick": {"overrides": ["rollout.prompts_per_epoch=4", "rollout.candidates=6", "train.epochs=8",
                            "train.old_decay_rate=0.06", "eval.every=4"],
              "dev_prompts": 4, "test_prompts": 8, "eval_seeds": 2},
}


def long_demo_config(out: Path, preset: str = "full", epochs: int | None = None, seed: int = 0,
                     overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The long demo's `Config`: ``configs/demo_long.yaml`` with this module's presets (`demo.demo_config`)."""
    return demo.demo_config(out, preset, epochs, seed, overrides, recipe="demo_long", presets=PRESETS)


def real_long_videos(prompts: list[str], seeds: list[int], frames: int) -> Tensor:
    """The world's long renders ``[N, frames, 3, H, W]`` (bouncing), in `demo.held_out_videos`' (prompt, seed)
    order."""
    from astrolabe_rl.toy import world

    return world.render_long([[(0, p)] for p in prompts for _ in seeds], [s for _ in prompts for s in seeds], frames)


def window_table(world: Any, videos: Tensor, prompts: list[str], seeds: list[int]) -> dict[str, Tensor]:
    """Per video and window ``[N, n_windows]``: the window oracle (``oracle/<figure>``), every reward and monitor
    and ``total``; per video ``[N]``: ``coherence`` and ``boundary_jump`` (the windows are `streaming.window`
    frames, the toy VAE's frames being its latent frames)."""
    from astrolabe_rl.toy import rewards as R
    from astrolabe_rl.toy.oracle import one_thread, window_scores

    w = world.cfg.streaming.window
    repeated = [p for p in prompts for _ in seeds]
    with one_thread():
        table = {f"oracle/{k}": v for k, v in window_scores(videos, repeated, w).items()}
    per_window = [demo.proxy_scores(world, videos[:, k * w:(k + 1) * w], repeated) for k in range(videos.shape[1] // w)]
    table |= {name: torch.stack([g[name] for g in per_window], dim=1) for name in per_window[0]}
    table["coherence"] = R.coherence(videos, w)
    table["boundary_jump"] = R.boundary_jump(videos, w)
    return table


def compare_windows(before: dict[str, Tensor], after: dict[str, Tensor], real: dict[str, Tensor],
                    late: int = LATE_WINDOWS) -> dict[str, Any]:
    """Per figure: the per-window means before / after / real, and over the last ``late`` windows (per-video
    figures: over the video) the means, the paired change ± its standard error and the gap closed."""
    out: dict[str, Any] = {}
    for name, b in before.items():
        a, r, row, key = after[name], real[name], {}, "video"
        if b.dim() == 2:  # per window: the curves, then the late windows' mean per video
            row = {k: [round(float(x), 4) for x in v.mean(0)] for k, v in (("before", b), ("after", a), ("real", r))}
            b, a, r, key = b[:, -late:].mean(1), a[:, -late:].mean(1), r[:, -late:].mean(1), "late"
        delta = a - b
        se = float(delta.std(correction=1) / math.sqrt(delta.numel())) if delta.numel() > 1 else float("nan")
        mb, ma, mr = float(b.mean()), float(a.mean()), float(r.mean())
        row[key] = {"before": round(mb, 4), "after": round(ma, 4), "real": round(mr, 4), "delta": round(ma - mb, 4),
                    "delta_se": round(se, 4),
                    "gap_closed": round((ma - mb) / (mr - mb), 3) if abs(mr - mb) > 1e-9 else None}
        out[name] = row
    return out


def summarise(world: Any, results: dict[str, Any], prompts: list[str], seeds: list[int], preset: str) -> dict[str, Any]:
    """The long demo's JSON: the late windows' oracle headline first, then the per-window oracle, the proxies, the
    monitors, coherence and the seam metric."""
    from astrolabe_rl.toy.oracle import ATTRIBUTES

    late = {k: v["late"] for k, v in results.items() if "late" in v}
    return {
        "late_oracle_gap_closed": late["oracle/oracle"]["gap_closed"],
        "late_oracle_worse": [a for a in (*ATTRIBUTES, "render")
                              if late[f"oracle/{a}"]["delta"] < -2 * late[f"oracle/{a}"]["delta_se"]],
        "coherence": results["coherence"]["video"], "boundary_jump": results["boundary_jump"]["video"],
        "demo": f"long-{preset}", "epochs": world.cfg.train.epochs, "seed": world.cfg.train.seed,
        "video_frames": world.num_frames, "window": world.cfg.streaming.window, "late_windows": LATE_WINDOWS,
        "test_split": {"prompts": len(prompts), "seeds": seeds},
        "per_window": {k: {s: v[s] for s in ("before", "after", "real")} for k, v in results.items() if "late" in v},
        "late": late,
        "proxy_late_gap_closed": late["total"]["gap_closed"],
        "hack_monitor_late": late[demo.HACK_MONITOR],
    }


def plot_windows(results: dict[str, Any], names: list[str], out: Path) -> Path:
    """``out``: one panel per figure in ``names``, its mean per window position before / after / real."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(names), 3.2), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names)), names):
        row = results[name]
        for key, style, label in (("before", "C3o-", "base"), ("after", "C0o-", "after RL (EMA)"),
                                  ("real", "C2--", "renders")):
            ax.plot(range(len(row[key])), row[key], style, label=label, markersize=4)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("window (9 latent frames each)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.savefig(out, dpi=100)
    return out


def write_outputs(out: Path, run_dir: Path, videos: dict[str, Tensor], results: dict[str, Any],
                  prompts: list[str], n_seeds: int, mp4s: int = 4) -> list[Path]:
    """Stills along the videos (``strip-seed<s>.png``), side-by-side mp4s of the first ``mp4s`` prompts at seed 0,
    the per-window curves and the training curves."""
    from astrolabe_rl.video import write_mp4

    files = [demo.still_grid(videos, prompts, n_seeds, s, out / f"strip-seed{s}.png", frames=10)
             for s in range(n_seeds)]
    for i in range(min(mp4s, len(prompts))):
        side = torch.cat([videos[k][i * n_seeds] for k in demo.GRID_COLUMNS], dim=-1)  # [T, 3, H, 3W]
        files.append(write_mp4(out / f"long-{i}.mp4", side, fps=8))
    files.append(plot_windows(results, ["oracle/oracle", "oracle/agreement", "oracle/render", "total",
                                        "toy_quality", "toy_motion_long", "toy_text"], out / "windows.png"))
    files.append(demo.plot_curves(run_dir / "metrics.jsonl", out / "curves.png"))
    return files


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_long_demo(out: str | Path | None = None, quick: bool = False, epochs: int | None = None, seed: int = 0,
                  overrides: list[str] | tuple[str, ...] = (), progress: bool = True, test_prompts: int | None = None,
                  eval_seeds: int | None = None, select_best: bool = True) -> dict[str, Any]:
    """Train (streaming, the recipe's own loop), evaluate long videos before/after on the test split window by window,
    write the files; returns the summary (``runs/demo-long``, ``runs/demo-long-quick`` by default)."""
    from astrolabe_rl.rewards.base import build_reward
    from astrolabe_rl.toy import world as toy_world
    from astrolabe_rl.train import recipe

    start = time.perf_counter()
    preset = "quick" if quick else "full"
    out = Path(out or ("runs/demo-long-quick" if quick else "runs/demo-long"))
    cfg = long_demo_config(out, preset, epochs, seed, [f"log.progress={str(progress).lower()}", *overrides])
    seeds = list(range(eval_seeds or PRESETS[preset]["eval_seeds"]))
    prompts = toy_world.eval_prompts(test_prompts or PRESETS[preset]["test_prompts"], split="test")
    w = cfg.streaming.window
    judge = build_reward("toy_oracle_long")  # what the evaluation logs as eval/last_window/monitor/toy_oracle_long
    dev = demo.DevSelection(SELECT_METRIC, lambda v, p: judge(v[:, -w:], p))
    videos: dict[str, Tensor] = {}
    held: dict[str, Any] = {}

    def before(world: Any) -> None:
        videos["before"] = demo.held_out_videos(world, "base", prompts, seeds)
        dev.start(world)

    def after(world: Any) -> None:
        if select_best and dev.restore_best(world):
            recipe.export_adapter(world)
        videos["after"] = demo.held_out_videos(world, "after", prompts, seeds)
        videos["real"] = real_long_videos(prompts, seeds, world.num_frames)
        held["results"] = compare_windows(*(window_table(world, videos[k], prompts, seeds)
                                            for k in ("before", "after", "real")))
        held["summary"] = {**summarise(world, held["results"], prompts, seeds, preset),
                           "selected": dev.selected(world, select_best)}

    recipe.train(cfg, recipe.Callbacks(on_start=before, on_epoch=dev.watch, on_end=after))
    write_outputs(out, Path(cfg.run_dir), videos, held["results"], prompts, len(seeds))
    summary = {**held["summary"], "peak_rss_mb": peak_rss_mb(), "wall_s": round(time.perf_counter() - start, 1),
               "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
