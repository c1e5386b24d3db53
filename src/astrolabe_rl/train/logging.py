"""Run outputs a person reads: metrics.jsonl, TensorBoard, wandb, captioned sample videos, tables, plots.

Everything lands under one run folder:

    run_dir/
      metrics.jsonl               one JSON object per `RunLogger.log` call: {"step", "time" (unix s), metric: value}
      tensorboard/                event files (``tensorboard --logdir run_dir``)
      samples/step-000300/*.mp4   sample videos, every reward burnt into the top rows
      tables/<name>.jsonl         per-rollout rows (prompt, seed, rewards raw and normalised, advantage, group, step)
      plots/<namespace>.png       one figure per metric namespace (``reward/``, ``policy/``, ``loss/``, ...)

Metric names are namespaced with ``/`` (``reward/hpsv3/raw``, ``monitor/brightness``, ``perf/videos_per_s``); the
namespace picks the figure. Non-finite values are written to JSON as ``null`` (strict JSON readers accept it) and
passed unchanged to TensorBoard and wandb.

A resumed run first calls `RunLogger.rewind` with its checkpoint's step, so each step appears once in metrics.jsonl,
the tables and TensorBoard. The logger can hold the run folder's lock (``owner``) and gives it up in `close`.

Only the main rank writes: on other ranks every method returns at once, so the recipe calls them unconditionally.
TensorBoard, wandb, matplotlib, PyAV and tqdm are imported when first needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Callable, Mapping, TextIO

from torch import Tensor

from astrolabe_rl.video import caption_frames, write_mp4

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time")
_NO_NAMESPACE = "misc"  # the figure for metrics logged without a "namespace/" prefix
_SMOOTHING = 0.9  # EMA weight of the smoothed curve drawn over noisy series (TensorBoard's default slider)


class RunLogger:
    """Write a run's metrics, videos and tables; a context manager that closes its files.

    Args:
        run_dir: the run's output folder (created on the main rank).
        tensorboard: also write TensorBoard scalars under ``run_dir/tensorboard``.
        wandb: also log to Weights & Biases (needs ``pip install wandb``).
        wandb_project: the wandb project; None lets wandb choose.
        wandb_id: resume this wandb run (store `wandb_id` in checkpoints so a resumed run continues its curves).
        config: the resolved run config; sent to wandb and shown as text in TensorBoard.
        is_main: False on every rank but 0: then nothing is written.
        owner: the run folder's lock (`train.checkpoint.RunDirLock`, anything with ``release()``), given up by
            `close`: the logger is the last thing that writes into the folder.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        wandb_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        is_main: bool = True,
        owner: Any = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self._owner = owner
        self._metrics: TextIO | None = None
        self._tb: SummaryWriter | None = None
        self._wandb: ModuleType | None = None
        if not is_main:
            return
        wandb_module = _import_wandb() if wandb else None  # fail before creating anything
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # append: a resumed run continues
        if tensorboard:
            self._tb = _open_tensorboard(self.run_dir / "tensorboard", config)
        if wandb_module is not None:
            wandb_module.init(
                project=wandb_project, dir=str(self.run_dir), name=self.run_dir.name, id=wandb_id,
                resume="allow" if wandb_id else None, config=_jsonable(config) if config is not None else None,
            )
            self._wandb = wandb_module

    @property
    def wandb_id(self) -> str | None:
        """The wandb run id (to save in checkpoints), or None without wandb."""
        return self._wandb.run.id if self._wandb is not None and self._wandb.run is not None else None

    def log(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        """Record scalar ``metrics`` at optimiser step ``step``: one metrics.jsonl line, TensorBoard, wandb."""
        if not self.is_main:
            return
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        clash = [name for name in values if name in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl; rename them (e.g. 'perf/time_s')")
        record = {"step": step, "time": round(time.time(), 3), **{k: _finite_or_none(v) for k, v in values.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()  # a crashed run keeps every line it logged
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def rewind(self, step: int, epoch: int | None = None) -> None:
        """Forget what was logged after a checkpoint, so a resumed run logs each step once.

        Drops the metrics.jsonl records with a step above ``step`` (or, given ``epoch``, a ``train/epoch`` above it:
        epochs that did not step log at the same step) and the table rows above ``step``, each file rewritten
        atomically; TensorBoard hides its events from ``step + 1`` on (its ``purge_step``, by step only: an epoch
        that did not step after the checkpoint stays there).
        """
        if not self.is_main:
            return

        def keep_metric(record: dict[str, Any]) -> bool:
            late_epoch = epoch is not None and (record.get("train/epoch") or 0) > epoch
            return record["step"] <= step and not late_epoch

        self._metrics.close()
        _filter_jsonl(self.run_dir / METRICS_FILE, keep_metric)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        for table in sorted((self.run_dir / "tables").glob("*.jsonl")):
            _filter_jsonl(table, lambda row: row["step"] <= step)
        if self._tb is not None:
            self._tb.close()
            self._tb = _open_tensorboard(self.run_dir / "tensorboard", None, purge_step=step + 1)

    def log_video(
        self,
        tag: str,
        frames: Tensor,
        step: int,
        caption: Mapping[str, float | Tensor] | None = None,
        fps: int = 16,
    ) -> Path | None:
        """Save ``frames`` ``[T, 3, H, W]`` in [0, 1] as ``samples/step-{step:06d}/{tag}.mp4``, captioned.

        Args:
            tag: the video's name, e.g. ``"eval/prompt03"`` (characters outside ``A-Za-z0-9_.-`` become ``_``).
            caption: values burnt into the top rows, one ``name: value`` line each (e.g. every reward).
            fps: playback rate in frames per second.
        Returns:
            The mp4 path on the main rank, None elsewhere.
        """
        if not self.is_main:
            return None
        lines = [f"{name}: {_scalar(name, value):.4g}" for name, value in (caption or {}).items()]
        path = self.run_dir / "samples" / f"step-{step:06d}" / f"{_file_name(tag)}.mp4"
        write_mp4(path, caption_frames(frames, lines), fps=fps)
        if self._wandb is not None:
            # a file path, so wandb does not need moviepy to encode raw frames
            video = self._wandb.Video(str(path), caption=", ".join(lines), format="mp4")
            self._wandb.log({f"video/{tag}": video}, step=step)
        return path

    def log_table(self, name: str, rows: list[Mapping[str, Any]], step: int) -> None:
        """Append ``rows`` (one dict per rollout) with their ``step`` to ``tables/{name}.jsonl``, and to wandb."""
        if not self.is_main or not rows:
            return
        if any("step" in row for row in rows):
            raise ValueError(f"table {name!r}: the column 'step' is added by log_table; rename yours")
        records = [{"step": step, **{k: _cell(v) for k, v in row.items()}} for row in rows]
        path = self.run_dir / "tables" / f"{_file_name(name)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, default=str) + "\n" for record in records)
        if self._wandb is not None:
            columns = list(dict.fromkeys(key for record in records for key in record))
            data = [[record.get(column) for column in columns] for record in records]
            self._wandb.log({f"table/{name}": self._wandb.Table(columns=columns, data=data)}, step=step)

    def plot(self, out_dir: str | Path | None = None) -> list[Path]:
        """Draw metrics.jsonl as PNG curves (one figure per namespace) into ``out_dir`` (default ``run_dir/plots``)."""
        if not self.is_main:
            return []
        if self._metrics is not None:  # plotting after close() is fine
            self._metrics.flush()
        return plot_metrics(self.run_dir / METRICS_FILE, out_dir or self.run_dir / "plots")

    def close(self) -> None:
        """Flush and close every sink; calling it twice is harmless."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def progress(total: int, desc: str, is_main: bool = True) -> tqdm:
    """A progress bar over ``total`` optimiser steps, shown on the main rank only (``bar.update(1)`` per step)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not is_main, leave=True, dynamic_ncols=True, unit="step")


# ------------------------------------------------------------------------------------------------ plots


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` from a metrics.jsonl, sorted by step; ``null`` reads as NaN.

    A step logged twice (a resumed run repeating the steps after its checkpoint) keeps its last value.
    """
    by_step: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step = record["step"]
        for name, value in record.items():
            if name not in _RESERVED and (value is None or isinstance(value, (int, float))):
                by_step.setdefault(name, {})[step] = math.nan if value is None else float(value)
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in by_step.items()}


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per metric namespace (``reward/*`` -> ``reward.png``), a panel per metric, x = step."""
    groups: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for name, series in read_metrics(metrics_path).items():
        namespace, sep, rest = name.partition("/")
        groups.setdefault(namespace if sep else _NO_NAMESPACE, {})[rest if sep else name] = series
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_plot_group(out_dir / f"{_file_name(ns)}.png", ns, groups[ns]) for ns in sorted(groups)]


def _plot_group(path: Path, title: str, series: dict[str, tuple[list[int], list[float]]]) -> Path:
    # a bare Figure draws with the Agg canvas: no pyplot global state, no display needed
    from matplotlib.figure import Figure

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (name, (steps, values)) in zip(axes, sorted(series.items())):
        noisy = len(values) >= 20
        ax.plot(steps, values, color="C0", linewidth=1.0, alpha=0.35 if noisy else 1.0)
        if noisy:
            ax.plot(steps, _ema(values), color="C0", linewidth=1.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        integer_steps(ax)
        ax.grid(alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


def integer_steps(ax: Any) -> None:
    """Tick a matplotlib x axis at whole steps only (a few points would otherwise get ticks like 2.5); call it after
    plotting."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = ax.get_xlim()
    if hi - lo < 1:  # one step: matplotlib pads it by ±0.1 and any locator then ticks fractions
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _ema(values: list[float]) -> list[float]:
    """Exponential moving average that steps over NaNs (a failed reward batch should not erase the curve)."""
    out: list[float] = []
    avg = math.nan
    for value in values:
        if not math.isnan(value):
            avg = value if math.isnan(avg) else _SMOOTHING * avg + (1 - _SMOOTHING) * value
        out.append(avg)
    return out


# ------------------------------------------------------------------------------------------------ helpers


def _import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "wandb logging was requested (log.wandb=true) but wandb is not installed: "
            "pip install wandb (or pip install 'astrolabe-rl[wandb]'), or set log.wandb=false"
        ) from None
    return wandb


def _open_tensorboard(log_dir: Path, config: Mapping[str, Any] | None, purge_step: int | None = None) -> SummaryWriter:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30, purge_step=purge_step)
    if config is not None:
        # TensorBoard's text tab renders markdown: a 4-space indent shows the JSON as a code block
        writer.add_text("config", textwrap.indent(json.dumps(_jsonable(config), indent=2), "    "))
    return writer


def _filter_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a JSON-lines file with only the records ``keep`` accepts, atomically (temp file + rename), so a kill
    leaves either the old file or the new one; lines that do not parse are dropped. A missing file stays missing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a blank line, or the torn last line of a killed run
            continue
        if keep(record):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (a hidden temp file beside it, fsynced, then renamed): a kill or a
    full disk leaves the old file whole, and the temp file is removed when the write fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _scalar(name: str, value: float | Tensor) -> float:
    try:
        return float(value.item() if isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        shape = f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else ""
        raise ValueError(f"metric {name!r} must be one number; got {type(value).__name__}{shape}") from None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _cell(value: Any) -> Any:
    """A table cell as JSON: one-element tensors -> numbers, other tensors -> lists, NaN/inf -> null."""
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def _file_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    if not safe:
        raise ValueError(f"{name!r} cannot name a file: use letters, digits and _ . -")
    return safe


def _jsonable(config: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(config, default=str))
