"""RunLogger: metrics.jsonl, TensorBoard, plots, captioned videos, tables, wandb wiring, rank gating."""

import json
import math
import sys
import types

import pytest
import torch

from astrolabe_rl.train.logging import RunLogger, plot_metrics, progress, read_metrics
from astrolabe_rl.video import read_mp4

CONFIG = {"train": {"lr": 1e-5}, "model": {"family": "tiny"}}


def _video(t: int = 5) -> torch.Tensor:
    return torch.linspace(0.1, 0.9, t).view(t, 1, 1, 1).expand(t, 3, 64, 48).clone()


def _log_steps(logger: RunLogger, steps: int = 25) -> None:
    for step in range(steps):
        logger.log(
            {"reward/total": 0.1 * step, "reward/hpsv3/raw": torch.tensor(2.0 + step), "loss/nft": 1 / (1 + step),
             "perf/videos_per_s": 3.0, "lr": 1e-5},
            step=step,
        )


def test_metrics_jsonl_lines_parse_and_hold_the_metrics(tmp_path):
    with RunLogger(tmp_path / "run", tensorboard=False) as logger:
        logger.log({"reward/total": 1.5, "policy/kl": torch.tensor(0.25), "loss/nft": float("nan")}, step=3)
        logger.log({"reward/total": 2.5}, step=4)
        # flushed per line: readable before close, as after a crash
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 3 and lines[0]["reward/total"] == 1.5 and lines[0]["policy/kl"] == 0.25
    assert lines[0]["loss/nft"] is None  # NaN -> null: strict JSON
    assert isinstance(lines[0]["time"], float)
    assert lines[1] == {"step": 4, "time": lines[1]["time"], "reward/total": 2.5}
    # reopening appends (a resumed run), and a repeated step keeps its last value when read back
    with RunLogger(tmp_path / "run", tensorboard=False) as logger:
        logger.log({"reward/total": 9.0}, step=4)
    steps, values = read_metrics(tmp_path / "run" / "metrics.jsonl")["reward/total"]
    assert steps == [3, 4] and values == [1.5, 9.0]
    assert math.isnan(read_metrics(tmp_path / "run" / "metrics.jsonl")["loss/nft"][1][0])


def test_bad_metrics_raise(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="must be one number.*shape \\(3,\\)"):
            logger.log({"reward/total": torch.ones(3)}, step=0)
        with pytest.raises(ValueError, match="reserved"):
            logger.log({"time": 1.0}, step=0)


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, config=CONFIG) as logger:
        _log_steps(logger, steps=3)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("reward/hpsv3/raw")
    assert [s.step for s in scalars] == [0, 1, 2] and [s.value for s in scalars] == [2.0, 3.0, 4.0]


def test_plots_one_png_per_namespace(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_steps(logger)
        paths = logger.plot()
    assert sorted(p.name for p in paths) == ["loss.png", "misc.png", "perf.png", "reward.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000
    # also usable on a finished run folder, without a logger
    assert len(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "elsewhere")) == 4


def test_video_is_written_captioned_and_readable(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        path = logger.log_video("eval/prompt 03", _video(5), step=12, caption={"hpsv3": 7.125, "flow": 0.31})
        plain = logger.log_video("eval/plain", _video(5), step=12)
    assert path == tmp_path / "samples" / "step-000012" / "eval_prompt_03.mp4"
    frames, fps = read_mp4(path)
    reference, _ = read_mp4(plain)
    assert reference.shape == (5, 3, 64, 48) and fps == 16.0
    # the caption is a band above the frame: the frame comes back whole below it (up to the codec)
    band = frames.shape[2] - 64
    assert band > 20 and frames.shape[3] >= 48 and frames[:, :, :band].max() > 0.9
    assert (frames[:, :, band:, :48] - reference).abs().max() < 0.05


def test_table_rows_are_appended_with_their_step(tmp_path):
    rows = [
        {"prompt": "a red ball", "seed": 3, "reward/sharpness": torch.tensor(0.5), "advantage": math.nan, "group": 0},
        {"prompt": "a blue cube", "seed": 4, "reward/sharpness": 0.75, "advantage": 1.0, "group": 1},
    ]
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_table("rollouts", rows, step=1)
        logger.log_table("rollouts", rows[:1], step=2)
        with pytest.raises(ValueError, match="'step' is added"):
            logger.log_table("rollouts", [{"step": 1}], step=3)
    records = [json.loads(line) for line in (tmp_path / "tables" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 2]
    assert records[0] == {"step": 1, "prompt": "a red ball", "seed": 3, "reward/sharpness": 0.5, "advantage": None,
                          "group": 0}


def test_non_main_rank_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with RunLogger(run, wandb=True, is_main=False) as logger:  # wandb is not even imported off rank 0
        _log_steps(logger, steps=2)
        assert logger.log_video("v", _video(), step=0, caption={"r": 1.0}) is None
        logger.log_table("rollouts", [{"prompt": "x"}], step=0)
        assert logger.plot() == [] and logger.wandb_id is None
    assert not run.exists()


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail whether or not it is installed
    with pytest.raises(ImportError, match="pip install wandb"):
        RunLogger(tmp_path / "run", wandb=True)
    assert not (tmp_path / "run").exists()


def test_wandb_receives_metrics_videos_tables(tmp_path, monkeypatch):
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.run = None

    def init(**kwargs):
        calls.append(("init", kwargs))
        fake.run = types.SimpleNamespace(id=kwargs["id"] or "new-id")

    fake.init = init
    fake.log = lambda data, step: calls.append(("log", step, data))
    fake.finish = lambda: calls.append(("finish",))
    fake.Video = lambda path, caption, format: ("video", path, caption, format)
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)

    with RunLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="p", wandb_id="abc", config=CONFIG) as lg:
        assert lg.wandb_id == "abc"
        lg.log({"reward/total": 1.0}, step=1)
        path = lg.log_video("eval/a", _video(), step=1, caption={"hpsv3": 2.0})
        lg.log_table("rollouts", [{"prompt": "p", "seed": 1}], step=1)
    init_kwargs = calls[0][1]
    assert init_kwargs["project"] == "p" and init_kwargs["resume"] == "allow" and init_kwargs["config"] == CONFIG
    assert calls[1] == ("log", 1, {"reward/total": 1.0})
    assert calls[2] == ("log", 1, {"video/eval/a": ("video", str(path), "hpsv3: 2", "mp4")})
    assert calls[3] == ("log", 1, {"table/rollouts": ("table", ["step", "prompt", "seed"], [[1, "p", 1]])})
    assert calls[4] == ("finish",)


def test_progress_bar_is_shown_on_the_main_rank_only():
    with progress(10, "train", is_main=True) as bar:
        bar.update(3)
        assert bar.total == 10 and bar.n == 3 and not bar.disable
    with progress(10, "train", is_main=False) as bar:
        assert bar.disable


def test_rewind_keeps_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as logger:
        for step, epoch in ((1, 1), (2, 2), (2, 3), (3, 4)):  # epoch 3 did not step
            logger.log({"reward/total": float(step), "train/epoch": float(epoch)}, step=step)
            logger.log_table("rollouts", [{"prompt": "p", "epoch": epoch}], step=step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/to')  # the torn last line of a killed run
    with RunLogger(tmp_path) as logger:  # a resume from the checkpoint at step 2, epoch 2
        logger.rewind(2, epoch=2)
        for step, epoch in ((2, 3), (3, 4)):
            logger.log({"reward/total": 10.0 * step, "train/epoch": float(epoch)}, step=step)
            logger.log_table("rollouts", [{"prompt": "p", "epoch": epoch}], step=step)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/epoch"], r["reward/total"]) for r in rows] == [
        (1, 1, 1.0), (2, 2, 2.0), (2, 3, 20.0), (3, 4, 30.0)]
    table = [json.loads(line) for line in (tmp_path / "tables" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in table] == [1, 2, 2, 2, 3]  # rows carry no epoch: the step is what cuts them
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = [(s.step, s.value) for s in acc.Scalars("reward/total")]
    # TensorBoard purges by step: past the checkpoint's step nothing of the old run is left
    assert [v for v in scalars if v[0] == 3] == [(3, 30.0)] and scalars[-2:] == [(2, 20.0), (3, 30.0)]
    assert not list(tmp_path.rglob(".*.tmp"))


def test_close_gives_up_the_run_folder_lock(tmp_path):
    from astrolabe_rl.train.checkpoint import RunDirError, claim_run_dir

    logger = RunLogger(tmp_path, tensorboard=False, owner=claim_run_dir(tmp_path, resume=None, overwrite=False))
    with pytest.raises(RunDirError, match="in use"):
        claim_run_dir(tmp_path, resume="auto", overwrite=False)
    logger.close()
    claim_run_dir(tmp_path, resume="auto", overwrite=False).release()


def test_plot_step_ticks_are_whole_numbers(tmp_path):
    from matplotlib.figure import Figure

    from astrolabe_rl.train.logging import integer_steps

    ax = Figure().subplots()
    ax.plot([1, 2, 3], [0.1, 0.4, 0.2])
    integer_steps(ax)
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plain = Figure().subplots()
    plain.plot([1, 2, 3], [0.1, 0.4, 0.2])
    assert not all(float(t).is_integer() for t in plain.get_xticks())  # what matplotlib does on its own
    single = Figure().subplots()
    single.plot([2], [0.5], marker=".")  # one logged step (a held-out evaluation at the last step only)
    integer_steps(single)
    lo, hi = single.get_xlim()
    ticks = [t for t in single.get_xticks() if lo <= t <= hi]
    assert 2 in ticks and all(float(t).is_integer() for t in ticks)
