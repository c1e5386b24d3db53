"""Every user mistake is one ``error:`` line from every command (issue 28): `cli.main` is the one place that turns
them into lines; the checks run before a run writes anything; a message says the real cause, once, and briefly."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

import pytest
import torch

from astrolabe_rl import cli
from astrolabe_rl.errors import path_problem, shorten, user_message
from astrolabe_rl.train import checkpoint as ckpt
from astrolabe_rl.train import logging as run_logging
from astrolabe_rl.train.dist import shutdown

TINY_RUN = [
    "lora.rank=4", "lora.alpha=4", "data.prompts=[a red ball, a blue cube, a green cone]",
    "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=3", "rollout.micro_batch=2",
    "rewards.components=[{name: sharpness, weight: 1.0}]", "rewards.monitors=[]", "log.tensorboard=false",
    "log.progress=false", "eval.every=0", "train.lr=1e-3",
]


@pytest.fixture(autouse=True)
def _single_process():
    yield
    shutdown()


def one_error_line(capsys, argv: list[str]) -> str:
    """Run a command; it must fail with exit status 2 and say so in exactly one ``error:`` line on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train(run_dir: Path, *extra: str) -> list[str]:
    return ["train", f"run_dir={run_dir}", *TINY_RUN, *extra]


# ------------------------------------------------------------------------------------------------ the one place


def test_user_errors_become_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from astrolabe_rl.train import commands

    def fails(error):
        monkeypatch.setattr(commands, "cmd_print_config", lambda args: (_ for _ in ()).throw(error))
        return cli.main(["print-config"])

    assert fails(OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")) == 2
    assert capsys.readouterr().err == "error: no space left on device: /runs/x/metrics.jsonl\n"
    assert fails(ValueError("train.lr must be > 0")) == 2
    assert capsys.readouterr().err == "error: train.lr must be > 0\n"
    with pytest.raises(KeyError):  # a bug is not the user's to fix: its traceback stays
        fails(KeyError("bug"))
    monkeypatch.setenv("ASTROLABE_TRACEBACK", "1")
    with pytest.raises(ValueError):
        fails(ValueError("shown with its traceback on request"))


def test_a_thread_dying_of_the_reported_error_adds_no_traceback(capsys):
    """TensorBoard's writer thread re-raises the full disk the command then reports: one line, not a traceback."""
    import threading

    def command(full: bool):
        def writer():
            raise OSError(errno.ENOSPC, "No space left on device")

        thread = threading.Thread(target=writer, name="tb-writer")
        thread.start()
        thread.join()
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return 0

    assert cli.run(command, True) == 2
    assert capsys.readouterr().err == "error: no space left on device\n"
    assert cli.run(command, False) == 0  # the command went on: the thread's error is a warning, said once
    assert capsys.readouterr().err == "warning: tb-writer stopped: no space left on device\n"


def test_a_long_message_is_cut_to_its_ends():
    prompt = "a red ball " * 9000  # 99 KB, echoed twice by the toy encoder's message
    message = f"toy prompt {prompt!r} must be 1..10 words (unknown: {prompt.split()!r}); vocabulary: a red"
    short = shorten(message)
    assert len(short) < 600 and short.startswith("toy prompt 'a red ball") and short.endswith("vocabulary: a red")
    assert "characters]" in short and shorten("short stays") == "short stays"
    assert user_message(RuntimeError("a bug")) is None


def test_a_100kb_prompt_is_not_echoed_whole(tmp_path, capsys):
    line = one_error_line(capsys, ["generate", "--model", "toy", "--prompt", "a red ball " * 9000,
                                   "--out", str(tmp_path / "v"), "--quiet"])
    assert len(line) < 2100 and "toy prompt" in line


# ------------------------------------------------------------------------------------------------ train


def test_a_typo_in_a_rewards_kwargs_is_one_line_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    line = one_error_line(capsys, train(run, "rewards.components=[{name: clipscore, kwargs: {tny: true}}]"))
    assert "reward 'clipscore': unknown keyword 'tny' (did you mean 'tiny'?)" in line
    assert not run.exists()


@pytest.mark.parametrize("bad", ["resume", "empty prompts", "folder prompts"])
def test_a_run_that_fails_its_first_checks_leaves_nothing_behind(tmp_path, capsys, bad):
    run = tmp_path / "run"
    (tmp_path / "empty.txt").write_text("\n\n")
    extra, says = {"resume": ("checkpoint.resume=" + str(tmp_path / "nope"), "no checkpoint folder"),
                   "empty prompts": (f"data.train_prompts={tmp_path / 'empty.txt'}", "has no prompts"),
                   "folder prompts": (f"data.train_prompts={tmp_path}", "is a folder; give a file")}[bad]
    assert says in one_error_line(capsys, train(run, extra))
    assert not run.exists() or [p.name for p in run.iterdir()] == [".lock"]  # no metrics.jsonl, no tensorboard/
    assert cli.main(train(run, "train.epochs=1", "checkpoint.every=0")) == 0  # the corrected run is not refused


def test_on_error_abort_names_the_reward_and_its_error_and_a_dead_server_says_connection_refused(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = f"{{name: remote, kwargs: {{url: 'http://127.0.0.1:{port}', reward: hpsv3, retries: 0}}}}"
    line = one_error_line(capsys, train(tmp_path / "run", f"rewards.components=[{remote}]", "rewards.on_error=abort",
                                        "train.epochs=1", "checkpoint.every=0"))
    assert "reward remote failed on 4 of 4 samples" in line and "rewards.on_error=abort" in line
    assert "connection refused" in line


def test_disk_full_during_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")
    real_save_pt = ckpt._save_pt

    def full_at_step_2(path, obj):
        if path.parent.name == ".tmp-step-000002":
            raise full
        real_save_pt(path, obj)

    def plot_on_a_full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "plots/loss.png")

    monkeypatch.setattr(ckpt, "_save_pt", full_at_step_2)
    monkeypatch.setattr(run_logging, "plot_metrics", plot_on_a_full_disk)
    argv = train(run, "train.epochs=3", "checkpoint.every=1", "log.plots=true")
    line = one_error_line(capsys, argv)
    assert line.startswith("error: could not write checkpoint step-000002") and "no space left" in line
    assert "step-000001, which --resume auto continues from" in line  # the real cause, not the plot's
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert ckpt.latest_checkpoint(run) == run / "checkpoints" / "step-000001"

    def fsync_on_a_full_disk(fd):  # the resume's rewind of metrics.jsonl is the first write: it fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_logging.os, "fsync", fsync_on_a_full_disk)
    line = one_error_line(capsys, [*argv, "--resume", "auto"])
    assert "no space left on device" in line
    assert not list(run.glob(".*.tmp")), "a failed rewind left its temp file"

    monkeypatch.undo()  # space again: the run resumes from step 1 and finishes
    assert cli.main([*argv, "--resume", "auto"]) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_finished_run_resumed_says_so(tmp_path, capsys, monkeypatch):
    from astrolabe_rl.train import recipe

    monkeypatch.setattr(recipe, "train", lambda cfg: {})
    assert cli.main(["train", "--config", "smoke", f"run_dir={tmp_path}", "--resume", "auto"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "nothing to train" in out.err and "raise train.epochs" in out.err


# ------------------------------------------------------------------------------------------------ paths, YAML


def test_a_folder_is_said_to_be_a_folder(tmp_path, capsys):
    from astrolabe_rl.models.loading import read_checkpoint
    from astrolabe_rl.models.text import read_prompt_file
    from astrolabe_rl.train.checkpoint import resolve_resume

    assert path_problem(tmp_path, "prompt file") == f"prompt file {tmp_path} is a folder; give a file"
    with pytest.raises(ValueError, match="is a folder; give a file"):
        read_prompt_file(tmp_path)
    with pytest.raises(ValueError, match="is a folder; give a file"):
        read_checkpoint(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"\0")
    with pytest.raises(ValueError, match="is a file; a checkpoint is a folder"):
        resolve_resume(tmp_path, str(tmp_path / "x.pt"))
    assert "is a folder; give a file" in one_error_line(capsys, ["generate", "--preset", "tiny", "--prompts",
                                                                 str(tmp_path)])


def test_a_binary_checkpoint_is_corrupt_not_a_reason_to_trust_it(tmp_path):
    from astrolabe_rl.models.loading import CheckpointError, read_checkpoint

    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(junk)
    assert "truncated or corrupt" in str(info.value)
    assert "trust" not in str(info.value) and "weights_only" not in str(info.value)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    from astrolabe_rl.config import load_config
    from astrolabe_rl.rewards._common import parse_reward_kwargs

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 3.0e-4\n")
    with pytest.raises(ValueError, match=r"c.yaml:4:3: malformed YAML: key 'lr' is given twice \(first at line 2\)"):
        load_config(cfg)
    with pytest.raises(ValueError, match="key 'frames' is given twice"):
        parse_reward_kwargs('{"hpsv3": {"frames": 8, "frames": 16}}')
    kw = tmp_path / "kw.yaml"
    kw.write_text("hpsv3: {frames: 8}\nhpsv3: {frames: 16}\n")
    with pytest.raises(ValueError, match="key 'hpsv3' is given twice"):
        parse_reward_kwargs(str(kw))


def test_overwrite_of_the_current_folder_moves_it_aside(tmp_path, monkeypatch):
    run = tmp_path / "here"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(run)
    ckpt.claim_run_dir(".", resume=None, overwrite=True).release()
    (aside,) = tmp_path.glob("here.old-*")
    assert (aside / "metrics.jsonl").is_file() and [p.name for p in run.iterdir()] == [".lock"]
