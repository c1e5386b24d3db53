"""The training recipe end to end on the tiny model: what changes, what must not, accumulation, resume, failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astrolabe_rl.algo.sync import old_decay
from astrolabe_rl.config import TrainConfig, load_config
from astrolabe_rl.models import CausalWan, WanConfig, get_family
from astrolabe_rl.policy import Policy
from astrolabe_rl.rewards.base import FunctionReward, RewardFailureError
from astrolabe_rl.train import recipe
from astrolabe_rl.train.dist import shutdown

REPO = Path(__file__).resolve().parents[1]


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", "lora.rank=4", "lora.alpha=4",
        "data.prompts=[a red ball, a blue cube, a green cone]",
        "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=3", "rollout.micro_batch=2",
        "rewards.components=[{name: sharpness, weight: 1.0}, {name: saturation, weight: 0.5}]",
        "rewards.monitors=[brightness]", "log.tensorboard=false", "log.plots=false", "log.progress=false",
        "eval.every=0", "checkpoint.every=0", "train.lr=1e-3", "train.epochs=4", *extra,
    ])


@pytest.fixture(autouse=True)
def _single_process():
    yield
    shutdown()


def _params(world, adapter):
    return {k: v.detach().clone() for k, v in world.policy.adapter_params(adapter).items()}


def test_two_steps_move_every_lora_tensor_and_nothing_else(tmp_path):
    world = recipe.setup(_cfg(tmp_path))
    base = {n: p.detach().clone() for n, p in world.policy.model.named_parameters() if ".lora_" not in n}
    start = _params(world, "default")
    recipe.run_epoch(world)
    old1 = _params(world, "old")
    recipe.run_epoch(world)
    old2, theta2 = _params(world, "old"), _params(world, "default")
    assert world.step == 2
    assert all(not torch.equal(theta2[k], start[k]) for k in start), "a LoRA tensor of `default` did not change"
    for n, p in world.policy.model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
    eta = old_decay(2, 1)  # 0.002
    for k in old2:
        torch.testing.assert_close(old2[k], eta * old1[k] + (1 - eta) * theta2[k], atol=1e-7, rtol=0)
    world.logger.close()


def test_accumulating_two_micro_batches_equals_one_batch_of_two():
    torch.manual_seed(0)
    fam = get_family("tiny")
    pol = Policy(CausalWan(WanConfig.tiny()), rank=4, alpha=4)
    with torch.no_grad():  # a policy away from θ_old so both branches and the KL carry gradient
        for p in pol.adapter_params("default").values():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 16, 8, 8, generator=g)
    noise = torch.randn(2, 3, 16, 8, 8, generator=g)
    text = torch.randn(2, 8, 16, generator=g)
    r = torch.tensor([0.9, 0.2])
    keep = torch.ones(2, dtype=torch.bool)
    tcfg = TrainConfig()

    def grads(chunks):
        for p in pol.trainable_parameters():
            p.grad = None
        for sl in chunks:
            loss, _ = recipe.micro_step(pol, pol.model, fam.sampler, tcfg, x0[sl], text[sl], r[sl], keep[sl], 0.75,
                                        noise[sl])
            (loss / len(chunks)).backward()
        return [p.grad.clone() for p in pol.trainable_parameters()]

    one = grads([slice(0, 2)])
    two = grads([slice(0, 1), slice(1, 2)])
    assert any(g.abs().max() > 0 for g in one)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-5)


def _metric_lines(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = {k: v for k, v in row.items() if not k.startswith("perf/") and k != "time"}
    return out


def crash_and_resume(tmp_path, make_cfg, *opts: str, epochs: int = 4, crash_at: int = 2):
    """An uninterrupted run of ``epochs`` (``tmp_path/full``) against one that dies after ``crash_at`` and resumes
    from its last checkpoint (``tmp_path/resumed``); asserts that every adapter, the EMA and the logged metrics
    after the crash are bit-identical, and returns the two (closed) worlds."""
    full = recipe.setup(make_cfg(tmp_path / "full", "checkpoint.every=1", *opts))
    for _ in range(epochs):
        recipe.run_epoch(full)
    full.logger.close()

    crashed = recipe.setup(make_cfg(tmp_path / "resumed", "checkpoint.every=1", *opts))
    for _ in range(crash_at):
        recipe.run_epoch(crashed)
    crashed.logger.close()
    del crashed  # the process dies here; only the run directory survives

    resumed = recipe.setup(make_cfg(tmp_path / "resumed", "checkpoint.every=1", *opts, "checkpoint.resume=auto"))
    assert (resumed.step, resumed.epoch) == (crash_at, crash_at)
    for _ in range(epochs - crash_at):
        recipe.run_epoch(resumed)
    resumed.logger.close()

    for adapter in ("default", "old", *full.policy.extra_adapters):
        a, b = _params(full, adapter), _params(resumed, adapter)
        assert all(torch.equal(a[k], b[k]) for k in a), adapter
    assert all(torch.equal(full.policy.ema[k], resumed.policy.ema[k]) for k in full.policy.ema)
    ma, mb = _metric_lines(tmp_path / "full"), _metric_lines(tmp_path / "resumed")
    assert all(ma[step] == mb[step] for step in range(crash_at + 1, epochs + 1))
    return full, resumed


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    crash_and_resume(tmp_path, _cfg)


def test_resume_refuses_a_run_altering_change(tmp_path):
    world = recipe.setup(_cfg(tmp_path, "checkpoint.every=1", "train.epochs=1"))
    recipe.run_epoch(world)
    world.logger.close()
    with pytest.raises(ValueError, match="train.sigmas"):
        recipe.setup(_cfg(tmp_path, "checkpoint.every=1", "checkpoint.resume=auto", "train.sigmas=uniform"))
    forced = recipe.setup(_cfg(tmp_path, "checkpoint.resume=auto", "train.sigmas=uniform",
                               "checkpoint.force_resume=true"))
    assert forced.step == 1
    forced.logger.close()


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    world = recipe.setup(_cfg(tmp_path))
    before = _params(world, "default")
    real = recipe.micro_step

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(recipe, "micro_step", poisoned)
    with pytest.warns(RuntimeWarning, match="optimiser step skipped"):
        metrics = recipe.run_epoch(world)
    assert metrics["train/skipped_step"] == 1.0 and world.step == 0
    after = _params(world, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)
    world.logger.close()


@pytest.mark.parametrize("policy", ["drop", "zero", "abort"])
def test_a_failing_reward_marks_its_samples(tmp_path, policy):
    world = recipe.setup(_cfg(tmp_path, f"rewards.on_error={policy}"))

    def picky(videos, prompts):
        if any("red" in p for p in prompts):
            raise RuntimeError("cannot score red things")
        return videos.mean(dim=(1, 2, 3, 4))

    world.rewards["sharpness"] = world.scorer.rewards["sharpness"] = FunctionReward("sharpness", picky)
    plan = world.sampler_plan.epoch_plan(0)
    batch = recipe.rollout_phase(world, plan)
    scores, _, report = recipe.score_phase(world, batch)
    red = torch.tensor(["red" in p for p in batch.prompts])
    assert torch.isnan(scores["sharpness"][red]).all() and torch.isfinite(scores["sharpness"][~red]).all()
    if not red.any():
        pytest.skip("this epoch drew no red prompt")
    assert report.failed["sharpness"] == int(red.sum()) and "cannot score red things" in report.first_error["sharpness"]
    if policy == "abort":  # one line naming the reward and its own error, before the advantages
        with pytest.raises(RewardFailureError, match="reward sharpness failed on .* rewards.on_error=abort; first error: "
                                                     "RuntimeError: cannot score red things"):
            recipe.check_rewards(world, report, 0)
        with pytest.raises(RewardFailureError, match="reward sharpness failed .* rewards.on_error=abort"):
            recipe.advantage_phase(world, batch, scores)
    else:
        adv = recipe.advantage_phase(world, batch, scores)
        assert torch.all(adv.r[red] == 0.5)
        assert torch.equal(adv.keep, ~red if policy == "drop" else torch.ones_like(red))
        kl_mask, _ = recipe.regularize_phase(world, adv)
        stepped, _ = recipe.update_phase(world, batch, adv, kl_mask, 0)  # the update runs with the failed samples handled
        assert stepped
    world.logger.close()


def test_async_scoring_gives_the_same_scores(tmp_path):
    out = []
    for flag in ("false", "true"):
        world = recipe.setup(_cfg(tmp_path / flag, f"rewards.async_scoring={flag}"))
        batch = recipe.rollout_phase(world, world.sampler_plan.epoch_plan(0))
        out.append(recipe.score_phase(world, batch)[:2])
        world.logger.close()
    (a, ma), (b, mb) = out
    assert a.keys() == b.keys() and ma.keys() == mb.keys()
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(ma[k], mb[k]) for k in ma)


def _run_cli(args, env=None, timeout=600):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_smoke_config_runs_from_the_command_line(tmp_path):
    exe = [shutil.which("astrolabe")] if shutil.which("astrolabe") else [sys.executable, "-m", "astrolabe_rl.cli"]
    _run_cli([*exe, "train", "--config", "configs/smoke.yaml", f"run_dir={tmp_path}"], timeout=600)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("reward/total" in r and "loss/loss" in r for r in rows)
    assert list(tmp_path.glob("samples/**/*.mp4"))
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*/COMPLETE"))
    assert ckpts and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "config.yaml").is_file() and list((tmp_path / "plots").glob("*.png"))
    assert (tmp_path / "tables" / "rollouts.jsonl").is_file()


STREAMING_SELECTIVE = [
    "train.mode=streaming", "streaming.video_frames=6", "streaming.window=3", "streaming.choices=[3]",
    "rewards.components=[{name: sharpness, weight: 1.0}, {name: saturation, weight: 0.5}]", "train.kl_weight=0.1",
    "regularize.mode=selective", "regularize.main=sharpness", "regularize.auxiliary=[saturation]", "regularize.rho=0.2",
]


@pytest.mark.parametrize("extra", [[], STREAMING_SELECTIVE, [*STREAMING_SELECTIVE, "dist.strategy=fsdp2"],
                                   [*STREAMING_SELECTIVE, "dist.strategy=fsdp2", "streaming.history_kv=old"]],
                         ids=["clip", "streaming+selective", "streaming+fsdp2", "streaming+fsdp2+history_kv_old"])
def test_two_processes_agree_with_one(tmp_path, extra):
    # streaming averages DDP's gradients by hand, FSDP2 reduces them in the blocks' hooks that the window passes'
    # cached calls fire, and selective KL gathers every rank's rewards before it selects
    common = ["lora.rank=4", "lora.alpha=4", "data.prompts=[a red ball, a blue cube, a green cone]",
              "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=3",
              "rollout.micro_batch=1", "rewards.components=[{name: sharpness, weight: 1.0}]", "rewards.monitors=[]",
              "log.tensorboard=false", "log.plots=false", "log.progress=false", "eval.every=0",
              "checkpoint.every=2", "train.epochs=2", "train.lr=1e-3", "dist.strategy=ddp", *extra]
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    _run_cli([sys.executable, "-m", "astrolabe_rl.cli", "train", f"run_dir={tmp_path / 'one'}", *common], env)
    _run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "astrolabe_rl.train", f"run_dir={tmp_path / 'two'}", *common], env)
    from astrolabe_rl.train.checkpoint import latest_checkpoint, load_checkpoint

    one = load_checkpoint(latest_checkpoint(tmp_path / "one"))["policy"]
    two = load_checkpoint(latest_checkpoint(tmp_path / "two"))["policy"]
    for adapter in ("default", "old", "ema"):
        assert one[adapter].keys() == two[adapter].keys()
        for k in one[adapter]:
            torch.testing.assert_close(one[adapter][k], two[adapter][k], atol=1e-6, rtol=1e-4)
    ra = _metric_lines(tmp_path / "one")
    rb = _metric_lines(tmp_path / "two")
    assert ra.keys() == rb.keys()
    for step in ra:
        assert ra[step]["reward/total"] == pytest.approx(rb[step]["reward/total"], rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------------ run folder, export


def _steps(path):
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


def _same_tensors(a, b):
    return set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_a_run_folder_belongs_to_one_run(tmp_path):
    from astrolabe_rl.policy import read_lora_file
    from astrolabe_rl.train.checkpoint import RunDirError

    run = tmp_path / "run"
    recipe.train(_cfg(run, "train.epochs=1"))
    assert _steps(run / "metrics.jsonl") == [1]
    first = read_lora_file(run / "adapter")  # exported at the end although checkpoint.every=0
    with pytest.raises(RunDirError, match="already holds a run.*--resume auto.*--overwrite"):
        recipe.setup(_cfg(run, "train.epochs=1"))  # rerunning the same command no longer appends [1, 1]
    recipe.train(_cfg(run, "train.epochs=1", "train.seed=7", "checkpoint.overwrite=true"))
    (old,) = tmp_path.glob("run.old-*")
    assert _steps(run / "metrics.jsonl") == [1] and _steps(old / "metrics.jsonl") == [1]
    assert _same_tensors(read_lora_file(old / "adapter"), first)
    assert not _same_tensors(read_lora_file(run / "adapter"), first)

    holder = recipe.setup(_cfg(run, "checkpoint.resume=auto"))  # a live run holds the folder
    with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} "):
        recipe.setup(_cfg(run, "checkpoint.resume=auto"))
    holder.logger.close()  # what teardown does: the lock goes with the logger
    recipe.setup(_cfg(run, "checkpoint.resume=auto")).logger.close()


def test_resume_logs_each_step_once_and_brings_the_export_in_line(tmp_path):
    from astrolabe_rl.policy import read_lora_file

    run = tmp_path / "run"
    crashed = recipe.setup(_cfg(run, "checkpoint.every=2"))
    for _ in range(3):  # checkpoint at step 2, then a step the checkpoint does not hold
        recipe.run_epoch(crashed)
        if crashed.step == 2:
            ema_at_2 = {k: v.clone() for k, v in crashed.policy.ema.items()}
    crashed.logger.close()
    del crashed  # killed after step 3
    step2 = run / "checkpoints" / "step-000002"
    assert _same_tensors(read_lora_file(step2), ema_at_2)  # the checkpoint is itself the EMA adapter, in peft format
    assert json.loads((step2 / "adapter_config.json").read_text())["r"] == 4
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]

    recipe.train(_cfg(run, "checkpoint.every=2", "checkpoint.resume=auto"))
    assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4]  # step 3 is logged once, by the resumed run
    assert sorted(set(_steps(run / "tables" / "rollouts.jsonl"))) == [1, 2, 3, 4]
    assert len(_steps(run / "tables" / "rollouts.jsonl")) == 4 * 4  # 2 prompts × 2 candidates per step, once
    step4 = run / "checkpoints" / "step-000004"
    final = read_lora_file(step4)
    assert _same_tensors(read_lora_file(run / "adapter"), final)

    # a kill after the final checkpoint, before the export: resuming the finished run rewrites the stale adapter
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / "adapter" / name).write_bytes((step2 / name).read_bytes())
    recipe.train(_cfg(run, "checkpoint.every=2", "checkpoint.resume=auto"))
    assert _same_tensors(read_lora_file(run / "adapter"), final) and not _same_tensors(final, ema_at_2)
    assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4]


def test_train_command_overwrite_flag_sets_the_config(tmp_path, monkeypatch):
    from astrolabe_rl import cli

    seen = []
    monkeypatch.setattr(recipe, "train", lambda cfg: seen.append(cfg) or {})
    assert cli.main(["train", "--config", "configs/smoke.yaml", f"run_dir={tmp_path}"]) == 0
    assert cli.main(["train", "--config", "configs/smoke.yaml", "--overwrite", f"run_dir={tmp_path}"]) == 0
    assert [cfg.checkpoint.overwrite for cfg in seen] == [False, True]
