"""``astrolabe demo``: align the shipped toy model with the Astrolabe recipe on a CPU, and judge it on the oracle.

    astrolabe demo                      # ≈ 6.5 minutes on 2 CPU cores
    astrolabe demo --quick              # ≈ 2.5 minutes (measured 2 min 23 s)
    astrolabe demo --long [--quick]     # streaming RL of long videos (`astrolabe_rl.toy.long_demo`)
    python -m astrolabe_rl.toy.demo --quick --out runs/demo-quick

What runs: the toy family (`astrolabe_rl.toy`: the DMD-distilled student) through the recipe's own loop
(`train.recipe.train` with `configs/demo.yaml`: NFT loss, old/EMA policies, KL to the base, one optimiser step per
epoch) on ``toy_quality + toy_motion + toy_text`` (raw sum, weights 1, as released), watching the dev split;
``--split dev`` reports on the dev split instead, to tune a recipe without looking at the test split.

What it shows, on test-split prompts (colour-shape pairs never seen in pretraining, distillation or RL, and never
tuned on; balanced in direction and speed) at fixed seeds:

* ``before``: the base model (adapters disabled), ``after``: the EMA of the trained adapter at the evaluation that
  scored best on the dev split's oracle (early stopping: `DevSelection`; ``selected`` in the summary names the epoch
  and the dev curve), ``real``: the world's own renders of the same prompts;
* the headline, ``oracle_gap_closed = (after − before) / (real − before)`` of `toy.oracle` (prompt agreement and
  render-likeness: what no run optimises), with the oracle attributes that got worse (fell by more than two standard
  errors of the paired change); beside it every proxy reward, their combined gap closed, the monitors, and the KL to
  the base at a fixed σ set;
* RL against reranking, ``rl_minus_best_of_4`` (± its paired standard error ``rl_minus_best_of_4_se``): the ``after``
  oracle minus that of the base's best of 4 samples chosen by the training total (`base_best_of`; candidate 0 is the
  ``before`` video of the same prompt and seed, the others fresh base draws), and per oracle attribute the same
  delta and SE (``best_of_4``). A policy that does not beat picking the best of a few of its base's own samples by
  the reward it was trained on has not aligned anything (DESIGN §4). The reranking reads the training total only;
  the oracle only judges;
* ``out/grid-seed<s>.png``: labelled stills, a row per test prompt, columns base / after / renders, a few frames
  per cell;
* ``out/curves.png``: training reward, dev-split reward (with the base and renders levels), KL to the base and the
  hack monitor (with its before / after) per optimiser step (``out/run/plots/`` has every metric);
* ``out/run/adapter``: the trained EMA adapter in peft format (``astrolabe generate --model toy --adapter ...``);
  a rerun moves the previous ``out/run`` aside to ``out/run.old-<time>``;
* one final JSON line on stdout (also ``out/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

MONITORS = ["toy_noise", "brightness", "saturation"]
HACK_MONITOR = "toy_noise"
BEST_OF = 4  # the reranking bar: the base's best of this many samples by the training total (`base_best_of`)

# Each preset: overrides of configs/demo.yaml (the full run) and the held-out evaluation's size.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"overrides": [], "dev_prompts": 8, "test_prompts": 12, "eval_seeds": 4},
    "quick": {"overrides": ["rollout.prompts_per_epoch=6", "rollout.candidates=6", "train.epochs=24"],
              "dev_prompts": 4, "test_prompts": 8, "eval_seeds": 3},
}


def demo_config(out: Path, preset: str = "full", epochs: int | None = None, seed: int = 0,
                overrides: list[str] | tuple[str, ...] = (), recipe: str = "demo",
                presets: dict[str, dict[str, Any]] | None = None) -> Any:
    """The demo's `Config`: ``configs/<recipe>.yaml`` (``demo``: the toy family, LoRA r16, the toy rewards, the
    release NFT defaults), the preset's sizes (``presets``, default `PRESETS`), the toy world's prompts, then
    ``overrides`` (dotted ``key=value`` strings, as on the ``astrolabe train`` command line)."""
    from astrolabe_rl.config import load_config
    from astrolabe_rl.toy import world

    size = (presets or PRESETS)[preset]
    base = [
        f"run_dir={out / 'run'}", "checkpoint.overwrite=true", f"train.seed={seed}", *size["overrides"],
        f"data.prompts={json.dumps(world.split('train'))}",
        # the curves during training watch the dev split (tuning); the headline is measured on the test split
        f"data.eval_inline={json.dumps(world.eval_prompts(size['dev_prompts'], split='dev'))}",
        *([f"train.epochs={epochs}"] if epochs else []),
    ]
    return load_config(recipe, [*base, *overrides])


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def held_out_videos(world: Any, which: str, prompts: list[str], seeds: list[int]) -> Tensor:
    """Videos ``[N, T, 3, H, W]`` of every held-out prompt × seed from the base (``"base"``) or the EMA
    (``"after"``) weights; the noise of sample (prompt i, seed s) is the same for both."""
    from astrolabe_rl.toy.headroom import noise_seed
    from astrolabe_rl.train.recipe import sample_videos

    repeated = [p for p in prompts for _ in seeds]
    noise_seeds = [noise_seed(i, s) for i in range(len(prompts)) for s in seeds]
    with world.policy.use("base") if which == "base" else world.policy.ema_weights() as model:
        text = world.io.encode(repeated)
        return torch.cat([videos for _, _, videos in sample_videos(world, model, text, noise_seeds)])


def real_videos(prompts: list[str], seeds: list[int]) -> Tensor:
    """The world's own renders ``[N, T, 3, H, W]`` in the same (prompt, seed) order as `held_out_videos`."""
    from astrolabe_rl.toy import world

    return world.render([p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds])


def proxy_scores(world: Any, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """Per video (one prompt each): every reward and monitor, and ``total`` (the weighted sum the recipe optimises);
    a reward that fails on held-out videos is an error."""
    from astrolabe_rl.rewards.base import score_all

    got, errors = score_all({**world.rewards, **world.monitors}, videos, prompts)
    if errors:
        raise RuntimeError(f"a toy reward failed on held-out videos: {errors}")
    got["total"] = sum(w * got[name] for name, w in world.weights.items())
    return got


def score(world: Any, videos: Tensor, prompts: list[str], seeds: list[int]) -> dict[str, Tensor]:
    """Per video: the oracle (`toy.oracle`: prompt agreement per attribute and render-likeness; never trained on),
    and `proxy_scores`."""
    from astrolabe_rl.toy.oracle import oracle_scores

    prompts = [p for p in prompts for _ in seeds]
    return {**{f"oracle/{k}": v for k, v in oracle_scores(videos, prompts).items()},
            **proxy_scores(world, videos, prompts)}


def compare(before: dict[str, Tensor], after: dict[str, Tensor], real: dict[str, Tensor]) -> dict[str, Any]:
    """Means, the gap closed and the paired change ± its standard error for every oracle figure, reward and monitor."""
    out: dict[str, Any] = {}
    for name in before:
        delta = after[name] - before[name]
        se = float(delta.std(correction=1) / math.sqrt(delta.numel())) if delta.numel() > 1 else float("nan")
        b, a, r = float(before[name].mean()), float(after[name].mean()), float(real[name].mean())
        out[name] = {"before": round(b, 4), "after": round(a, 4), "real": round(r, 4),
                     "delta": round(a - b, 4), "delta_se": round(se, 4),
                     "gap_closed": round((a - b) / (r - b), 3) if abs(r - b) > 1e-9 else None}
    return out


@torch.no_grad()
def base_best_of(world: Any, prompts: list[str], seeds: list[int], first: Tensor, n: int = BEST_OF) -> tuple[Tensor, Tensor]:
    """Reranking, the bar RL is judged against: for every held-out (prompt, seed s) the base's best of ``n`` samples
    by the training total (`proxy_scores`' ``total``; never the oracle). Candidate 0 is ``first`` (the base's videos
    ``[N, T, 3, H, W]`` from `held_out_videos`, noise of (prompt, s)); candidate j ≥ 1 is the base's draw
    ``s + j·(max(seeds) + 1)`` of the prompt (`toy.headroom.noise_seed`), fresh noise no evaluation uses.

    Returns the chosen videos ``[N, T, 3, H, W]`` and which candidate each is ``[N]`` (ties: the earliest)."""
    from astrolabe_rl.toy.headroom import best_of_n_index

    step = max(seeds) + 1
    candidates = [first, *(held_out_videos(world, "base", prompts, [s + j * step for s in seeds]) for j in range(1, n))]
    repeated = [p for p in prompts for _ in seeds]
    totals = torch.stack([proxy_scores(world, c, repeated)["total"].float().cpu() for c in candidates], dim=1)  # [N, n]
    chosen = best_of_n_index(totals, n)
    return torch.stack(candidates, dim=1)[torch.arange(len(chosen)), chosen], chosen


def versus_best_of(after: dict[str, Tensor], best: dict[str, Tensor], chosen: Tensor) -> dict[str, Any]:
    """RL against reranking on the oracle: the RL'd policy's single sample against the base's best of `BEST_OF` by
    the training total, paired by (prompt, seed) (`score` outputs of both, ``chosen``: `base_best_of`'s indices).

    ``rl_minus_best_of_4`` = mean(after oracle) − mean(best-of-4 oracle) with the standard error of the paired
    difference; ``best_of_4`` holds both means, the same for every oracle attribute, agreement and render, the
    training total of both (what each optimised), and how often the first candidate was the chosen one."""
    from astrolabe_rl.toy.oracle import ATTRIBUTES

    def paired(name: str) -> dict[str, float]:
        a, b = after[name].double(), best[name].double()
        delta = a - b
        se = float(delta.std(correction=1) / math.sqrt(delta.numel())) if delta.numel() > 1 else float("nan")
        return {"after": round(float(a.mean()), 4), f"best_of_{BEST_OF}": round(float(b.mean()), 4),
                "delta": round(float(delta.mean()), 4), "delta_se": round(se, 4)}

    head = paired("oracle/oracle")
    return {
        f"rl_minus_best_of_{BEST_OF}": head["delta"], f"rl_minus_best_of_{BEST_OF}_se": head["delta_se"],
        f"best_of_{BEST_OF}": {
            "selected_by": "total", "oracle": head,
            "attributes": {a: paired(f"oracle/{a}") for a in (*ATTRIBUTES, "agreement", "render")},
            "total": paired("total"),
            "first_candidate_chosen": round(float((chosen == 0).double().mean()), 4),
        },
    }


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The demo's claim, on what no run optimises: the oracle gap closed, and the oracle attributes that got worse
    (fell by more than two standard errors of the paired change)."""
    from astrolabe_rl.toy.oracle import ATTRIBUTES

    worse = [a for a in (*ATTRIBUTES, "render") if results[f"oracle/{a}"]["delta"] < -2 * results[f"oracle/{a}"]["delta_se"]]
    return {"oracle_gap_closed": results["oracle/oracle"]["gap_closed"], "oracle_worse": worse}


# ------------------------------------------------------------------------------------------------ outputs


GRID_COLUMNS = {"before": "base", "after": "after RL (EMA)", "real": "renders (the world's own)"}


def frame_strip(video: Tensor, frames: int, pad: int = 1) -> Tensor:
    """``[T, 3, H, W]`` -> one image ``[3, H, k·(W + pad) − pad]``: ``k = min(frames, T)`` frames evenly spaced from
    the first to the last, left to right, on white."""
    t, c, h, w = video.shape
    picks = torch.linspace(0, t - 1, min(frames, t)).round().long()
    strip = torch.ones(c, h, len(picks) * (w + pad) - pad)
    for j, i in enumerate(picks.tolist()):
        strip[:, :, j * (w + pad): j * (w + pad) + w] = video[i]
    return strip


def still_grid(videos: dict[str, Tensor], prompts: list[str], n_seeds: int, seed_index: int, out: Path,
               frames: int = 4) -> Path:
    """One labelled PNG: a row per prompt, a column per source (`GRID_COLUMNS`: base / after / renders), each cell
    ``frames`` frames of that prompt's video at seed number ``seed_index`` (the videos are ``[P·S, T, 3, H, W]``,
    prompt-major). Prompts, column names and the frame times are written beside the images, never over them."""
    import textwrap

    from matplotlib.figure import Figure

    names = [k for k in GRID_COLUMNS if k in videos]
    t, _, h, w = videos[names[0]].shape[1:]
    picks = torch.linspace(0, t - 1, min(frames, t)).round().long().tolist()
    cell_w = 0.03 * len(picks) * (w + 1)  # inches: 0.03 in per pixel (3 px at 100 dpi), a 64-px frame 1.9 in
    fig = Figure(figsize=(2.4 + cell_w * len(names), 0.6 + 0.03 * (h + 16) * len(prompts)), layout="constrained")
    axes = fig.subplots(len(prompts), len(names), squeeze=False)
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(names):
            ax = axes[r, c]
            strip = frame_strip(videos[name][r * n_seeds + seed_index], frames)
            ax.imshow(strip.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(GRID_COLUMNS[name], fontsize=12)
            if c == 0:
                ax.set_ylabel(textwrap.fill(prompt, 26), rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(f"held-out prompts, noise seed {seed_index}; each cell: frames {', '.join(map(str, picks))} "
                 "left to right", fontsize=11)
    fig.savefig(out, dpi=100)
    return out


def plot_curves(metrics_file: Path, out: Path, levels: dict[str, Any] | None = None) -> Path:
    """One figure: training reward, held-out reward, KL to the base, hack monitor, each against the optimiser step.

    ``levels`` (`compare`'s output) adds reference lines measured on the demo's held-out set: the base model's and
    the renders' combined reward on the held-out panel, and the hack monitor before and after training on its panel.
    """
    from matplotlib.figure import Figure

    from astrolabe_rl.train.logging import integer_steps, read_metrics

    metrics = read_metrics(metrics_file)
    panels = [("reward/total", "training reward (combined)"), ("eval/reward/total", "dev-split reward (EMA)"),
              ("eval/kl_base", "KL to base ‖x̂0_ema − x̂0_ref‖², fixed σ set"), (f"monitor/{HACK_MONITOR}", "hack monitor: noise")]
    lines: dict[str, list[tuple[float, str, str]]] = {}  # panel key -> (level, label, style)
    if levels is not None:
        lines["eval/reward/total"] = [(levels["total"]["before"], "base (test split)", "C3--"),
                                      (levels["total"]["real"], "renders (test split)", "C2--")]
        hack = levels[HACK_MONITOR]
        lines[f"monitor/{HACK_MONITOR}"] = [(hack["before"], "base (held-out)", "C3--"),
                                            (hack["after"], "after (held-out)", "C1:")]
    fig = Figure(figsize=(4 * len(panels), 3.4), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(panels)), panels):
        steps, values = metrics.get(key, ([], []))
        pts = [(step, v) for step, v in zip(steps, values) if not math.isnan(v)]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label="per step")
        for level, label, style in lines.get(key, []):
            ax.axhline(level, color=style[:2], linestyle=style[2:], linewidth=1.2, label=f"{label} {level:.3g}")
        if key in lines:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimiser step")
        integer_steps(ax)
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return out


# ------------------------------------------------------------------------------------------------ the demo


class DevSelection:
    """Early stopping on the dev split's oracle: every evaluation scores the EMA's dev-split videos with the oracle
    (``toy_oracle`` in ``eval.monitors``), and the best EMA so far is kept; the demo reports (and exports) that one,
    and says at which epoch.

    The dev split is for tuning (`toy.world`), so choosing a checkpoint on it leaves the test split untouched.
    """

    def __init__(self, metric: str = "eval/monitor/toy_oracle",
                 judge: Callable[[Tensor, list[str]], Tensor] | None = None) -> None:
        """``metric``: the evaluation's oracle figure to maximise; ``judge(videos, prompts) -> [B]`` scores the base's
        dev videos the same way (default: the clip oracle, `toy.oracle.oracle_scores`)."""
        self.metric, self.judge = metric, judge
        self.curve: list[dict[str, float]] = []  # {"epoch", "oracle"} per evaluation, the base at epoch 0
        self.best: tuple[float, int, dict[str, Tensor]] | None = None  # (oracle, epoch, EMA adapter tensors)

    def start(self, world: Any) -> None:
        """The base's point of the curve: its dev-split videos at noise seed 0 (the evaluation's first)."""
        from astrolabe_rl.toy.oracle import oracle_scores

        prompts = world.eval_prompts
        videos = held_out_videos(world, "base", prompts, [0])
        value = float(self.judge(videos, prompts).mean() if self.judge else oracle_scores(videos, prompts)["oracle"].mean())
        self.curve.append({"epoch": world.epoch, "oracle": round(value, 4)})

    def watch(self, world: Any, metrics: dict[str, float]) -> None:
        """After an epoch: keep the EMA when that epoch's evaluation scored the best dev oracle so far."""
        if self.metric not in metrics:  # not an evaluation epoch (`eval.every`, and the last)
            return
        value = metrics[self.metric]
        self.curve.append({"epoch": world.epoch, "oracle": round(value, 4)})
        if self.best is None or value > self.best[0]:
            self.best = (value, world.epoch, {k: v.detach().clone() for k, v in world.policy.ema.items()})

    def restore_best(self, world: Any) -> bool:
        """Put the best EMA back if a later one replaced it; True when it did."""
        if self.best is None or self.best[1] == world.epoch:
            return False
        for k, v in world.policy.ema.items():
            v.copy_(self.best[2][k])
        return True

    def selected(self, world: Any, select_best: bool) -> dict[str, Any]:
        """What a demo reports as its chosen EMA: `report`, or the last EMA when it does not select."""
        if select_best:
            return self.report()
        return {"epoch": world.epoch, "why": "the last EMA (select_best=False)", "dev_oracle_curve": self.curve}

    def report(self) -> dict[str, Any]:
        epoch = None if self.best is None else self.best[1]
        last = self.curve[-1]["epoch"] if self.curve else None
        why = ("the last evaluation was the best on the dev split" if epoch == last else
               f"the dev-split oracle peaked at epoch {epoch} and fell after: the demo stops there")
        return {"epoch": epoch, "why": why, "dev_oracle_curve": self.curve}


def summarise(world: Any, results: dict[str, Any], prompts: list[str], seeds: list[int], preset: str,
              split: str = "test", versus: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's JSON summary: the oracle headlines first (the gap closed; RL against the base's best of 4 when
    ``versus``, `versus_best_of`'s output, is given), then every oracle figure, the optimised proxies (and their gap
    closed), the monitors, and the KL to the base (with the σ it was measured at)."""
    from astrolabe_rl.train.logging import read_metrics

    metrics = read_metrics(Path(world.cfg.run_dir) / "metrics.jsonl")
    kls = [v for v in metrics.get("eval/kl_base", ([], []))[1] if not math.isnan(v)]
    versus = versus or {}
    return {
        **headline(results),
        **{k: v for k, v in versus.items() if k.startswith("rl_minus_")},
        "demo": preset, "epochs": world.cfg.train.epochs, "seed": world.cfg.train.seed,
        f"{split}_split": {"prompts": len(prompts), "seeds": seeds},
        "oracle": {k.removeprefix("oracle/"): v for k, v in results.items() if k.startswith("oracle/")},
        "proxy_gap_closed": results["total"]["gap_closed"],
        "proxies_worse": [n for n in world.rewards if results[n]["delta"] < -2 * results[n]["delta_se"]],
        "kl_base_final": kls[-1] if kls else None, "kl_base_max": max(kls) if kls else None,
        "kl_sigmas": world.cfg.eval.kl_sigmas,
        "hack_monitor": results[HACK_MONITOR],
        "rewards": {n: results[n] for n in [*world.rewards, "total"]},
        "monitors": {n: results[n] for n in world.monitors},
        **{k: v for k, v in versus.items() if not k.startswith("rl_minus_")},
    }


def run_demo(out: str | Path | None = None, quick: bool = False, epochs: int | None = None, seed: int = 0,
             overrides: list[str] | tuple[str, ...] = (), progress: bool = True, test_prompts: int | None = None,
             eval_seeds: int | None = None, split: str = "test", select_best: bool = True) -> dict[str, Any]:
    """Train (the recipe's own loop), evaluate before/after on the test split, write grids, curves and the summary;
    returns the summary. Each preset writes into its own folder (``runs/demo``, ``runs/demo-quick``);
    ``test_prompts`` and ``eval_seeds`` override the preset's size of the before/after evaluation; ``split="dev"``
    reports on the dev split instead (for tuning the recipe without looking at the test split; the checkpoint is
    then chosen on the split it is reported on, so its figure is an optimistic one). ``select_best=False`` reports
    the last EMA instead of the dev split's best (the hacking benchmark judges where a run ends, not its best moment)."""
    from astrolabe_rl.toy import world as toy_world
    from astrolabe_rl.train import recipe

    start = time.perf_counter()
    preset = "quick" if quick else "full"
    out = Path(out or ("runs/demo-quick" if quick else "runs/demo"))
    cfg = demo_config(out, preset, epochs, seed, [f"log.progress={str(progress).lower()}", *overrides])
    seeds = list(range(eval_seeds or PRESETS[preset]["eval_seeds"]))
    if split not in ("test", "dev"):
        raise ValueError(f"the demo reports on the test split, or the dev split while tuning; got {split!r}")
    prompts = toy_world.eval_prompts(test_prompts or PRESETS[preset]["test_prompts"], split=split)
    dev = DevSelection()
    videos: dict[str, Tensor] = {}
    held: dict[str, Any] = {}

    def before(world: Any) -> None:
        videos["before"] = held_out_videos(world, "base", prompts, seeds)
        dev.start(world)

    def after(world: Any) -> None:
        if select_best and dev.restore_best(world):
            recipe.export_adapter(world)  # the adapter on disk is the one the demo reports
        videos["after"] = held_out_videos(world, "after", prompts, seeds)
        videos["real"] = real_videos(prompts, seeds)
        scored = {k: score(world, videos[k], prompts, seeds) for k in ("before", "after", "real")}
        held["results"] = compare(scored["before"], scored["after"], scored["real"])
        best, chosen = base_best_of(world, prompts, seeds, videos["before"])  # chosen by the training total
        versus = versus_best_of(scored["after"], score(world, best, prompts, seeds), chosen)
        held["summary"] = {**summarise(world, held["results"], prompts, seeds, preset, split, versus),
                           "selected": dev.selected(world, select_best)}
        held["prompts"] = prompts

    recipe.train(cfg, recipe.Callbacks(on_start=before, on_epoch=dev.watch, on_end=after))
    write_outputs(out, Path(cfg.run_dir), videos, held["results"], held["prompts"], len(seeds))
    summary = {**held["summary"], "wall_s": round(time.perf_counter() - start, 1), "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def write_outputs(out: Path, run_dir: Path, videos: dict[str, Tensor], levels: dict[str, Any], prompts: list[str],
                  n_seeds: int) -> list[Path]:
    """The files a person reads: ``grid-seed<s>.png`` per noise seed (`still_grid`) and ``curves.png``."""
    grids = [still_grid(videos, prompts, n_seeds, s, out / f"grid-seed{s}.png") for s in range(n_seeds)]
    return [*grids, plot_curves(run_dir / "metrics.jsonl", out / "curves.png", levels)]


def cmd_demo(args: argparse.Namespace) -> int:
    if args.long:
        from astrolabe_rl.toy.long_demo import run_long_demo

        if args.split != "test":
            raise ValueError("--long reports on the test split (its early stopping watches the dev split)")
        summary = run_long_demo(args.out, quick=args.quick, epochs=args.epochs, seed=args.seed,
                                overrides=args.overrides, progress=not args.no_progress)
    else:
        summary = run_demo(args.out, quick=args.quick, epochs=args.epochs, seed=args.seed, overrides=args.overrides,
                           progress=not args.no_progress, split=args.split)
    print(json.dumps(summary))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on an ``astrolabe`` sub-command parser."""
    p = subparsers.add_parser("demo", help="align the shipped toy model on a CPU and show before/after",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the ≈3-minute version (fewer prompts, epochs, test prompts and seeds)")
    p.add_argument("--long", action="store_true",
                   help="streaming RL of the long toy model on 45-frame videos, judged window by window "
                        "(`astrolabe_rl.toy.long_demo`)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the preset's epochs (full 50, quick 24; --long: 24, 8)")
    p.add_argument("--out", default=None,
                   help="output folder: grids, curves, summary, the run (default: runs/demo, runs/demo-quick, "
                        "runs/demo-long, runs/demo-long-quick)")
    p.add_argument("--seed", type=int, default=0, help="train.seed: the adapter init, prompts, noise and σ draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--split", choices=("test", "dev"), default="test",
                   help="where the before/after is reported: the test split, or the dev split while tuning a recipe")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-4 rollout.candidates=4")
    p.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astrolabe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
