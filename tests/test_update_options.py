"""The update's options beyond the release (issue 27, item 4): the rollout's own inputs as training noise
(``train.noise=rollout``), several optimiser steps per epoch (``train.update_passes``), NormGuard's velocity hinge
(``train.norm_guard``)."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.algo.nft import nft_objective, norm_guard
from astrolabe_rl.config import load_config
from astrolabe_rl.models.schedule import sigma_of
from astrolabe_rl.rollout import BlockTrace
from astrolabe_rl.train import recipe
from astrolabe_rl.train.dist import shutdown


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", "lora.rank=4", "lora.alpha=4", "data.prompts=[a red ball, a blue cube, a green cone]",
        "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=6", "rollout.micro_batch=2",
        "rewards.components=[{name: sharpness, weight: 1.0}]", "rewards.monitors=[]", "log.tensorboard=false",
        "log.plots=false", "log.progress=false", "log.table=false", "eval.every=0", "checkpoint.every=0",
        "train.lr=1e-3", "train.epochs=2", *extra,
    ])


@pytest.fixture(autouse=True)
def _single_process():
    yield
    shutdown()


def _pos_loss(world, batch, k: int | None) -> float:
    """Mean ‖x̂0_old − x0‖² of the whole batch (θ = θ_old at the start, so d = 0): at the sampler's step ``k`` of
    the recorded inputs, or (k None) the released fresh noising at the last step's σ."""
    sigma = sigma_of(batch.timesteps[-1 if k is None else k])
    n = batch.latents.shape[0]
    x_t = None if k is None else batch.inputs[:, k]
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0)) if k is None else None
    with torch.no_grad():
        _, stats = recipe.micro_step(world.policy, world.train_model, world.sampler, world.cfg.train, batch.latents,
                                     batch.text, torch.full((n,), 0.5), torch.ones(n, dtype=torch.bool), sigma, noise,
                                     x_t=x_t)
    return float(stats["pos_loss"])


def test_rollout_noise_trains_the_student_where_it_sampled(tmp_path):
    """With clean context, the recorded input of the last step gives back the video the sampler made from it: the
    training pass sees exactly what the rollout saw. The released fresh noising at the same σ does not."""
    world = recipe.setup(_cfg(tmp_path, "train.noise=rollout", "train.context=clean"))
    batch = recipe.rollout_phase(world, world.sampler_plan.epoch_plan(0))
    steps = world.sampler.steps.timesteps
    assert batch.timesteps == steps
    assert batch.inputs.shape == (batch.latents.shape[0], len(steps), *batch.latents.shape[1:])
    assert _pos_loss(world, batch, len(steps) - 1) < 1e-9 * max(1.0, float(batch.latents.square().mean()))
    assert _pos_loss(world, batch, None) > 1e-3
    world.logger.close()


def test_trajectory_joins_blocks_and_refuses_mixed_step_lists():
    a = BlockTrace(0, 2, (1000.0, 500.0), torch.zeros(1, 2, 2, 3, 4, 4))
    b = BlockTrace(2, 3, (1000.0, 500.0), torch.ones(1, 2, 1, 3, 4, 4))
    inputs, steps = recipe.trajectory([a, b])
    assert inputs.shape == (1, 2, 3, 3, 4, 4) and steps == (1000.0, 500.0)
    assert torch.equal(inputs[:, :, 2], torch.ones(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="train.noise=fresh"):
        recipe.trajectory([a, BlockTrace(2, 3, (1000.0,), torch.ones(1, 1, 1, 3, 4, 4))])


def test_update_passes_step_the_optimiser_per_pass_on_fresh_draws(tmp_path):
    world = recipe.setup(_cfg(tmp_path, "train.update_passes=3", "train.sigmas=uniform"))
    metrics = recipe.run_epoch(world)
    assert world.step == 3 and world.epoch == 1
    assert 0 < metrics["train/sigma"] <= 1 and metrics["train/grad_norm"] > 0
    assert any(k.startswith("loss_sigma/q") for k in metrics)
    world.logger.close()


def test_rollout_noise_runs_end_to_end_and_logs_per_step_losses(tmp_path):
    world = recipe.setup(_cfg(tmp_path, "train.noise=rollout", "train.update_passes=2", "train.norm_guard=1.0"))
    for _ in range(2):
        metrics = recipe.run_epoch(world)
    assert world.step == 4
    labels = {f"{sigma_of(t):.2f}" for t in world.sampler.steps.timesteps}
    assert {k.split("/")[1] for k in metrics if k.startswith("loss_sigma/")} <= labels
    assert metrics["loss/v_norm_ratio"] > 0 and metrics["loss/norm_guard"] >= 0
    world.logger.close()


def test_norm_guard_is_a_hinge_on_the_velocity_norm():
    v_ref = torch.ones(3, 2, 4)
    v = torch.stack([0.5 * torch.ones(2, 4), torch.ones(2, 4), 3.0 * torch.ones(2, 4)]).requires_grad_(True)
    guard = norm_guard(v, v_ref)
    torch.testing.assert_close(guard, torch.tensor([0.0, 0.0, 4.0]))  # (rms 3 − rms 1)² only above the reference
    guard.sum().backward()
    assert torch.equal(v.grad[:2], torch.zeros(2, 2, 4)) and (v.grad[2] > 0).all()


def test_norm_guard_adds_its_weighted_hinge_to_the_objective():
    g = torch.Generator().manual_seed(0)
    x0_theta, x0_old, x0 = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    v_theta, v_ref = 2 * torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    r = torch.tensor([0.8, 0.3])
    plain, _ = nft_objective(x0_theta, x0_old, None, x0, r, kl_weight=0)
    guarded, stats = nft_objective(x0_theta, x0_old, None, x0, r, kl_weight=0, v_theta=v_theta, v_ref=v_ref,
                                   guard_weight=0.5)
    torch.testing.assert_close(guarded, plain + 0.5 * norm_guard(v_theta, v_ref).mean())
    assert stats["v_norm_ratio"] > 1
    with pytest.raises(ValueError, match="both velocities"):
        nft_objective(x0_theta, x0_old, None, x0, r, guard_weight=0.5)


@pytest.mark.parametrize("extra, match", [
    (["train.noise=rollout", "train.mode=streaming"], "train.noise=fresh"),
    (["train.update_passes=0"], "update_passes"),
    (["train.norm_guard=-1"], "norm_guard"),
    (["train.noise=sometimes"], "train.noise"),
])
def test_bad_update_options_say_what_to_change(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, *extra)


def test_a_checkpoint_from_before_these_options_resumes(tmp_path):
    """A config saved before `train.noise`, `update_passes` and `norm_guard` existed lacks them: they read as their
    defaults (what that run computed with), so only a real change refuses the resume."""
    from astrolabe_rl.config import CRITICAL_KEYS, to_dict
    from astrolabe_rl.train.checkpoint import check_resume_compatible

    cfg = to_dict(_cfg(tmp_path))
    saved = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in ("noise", "update_passes", "norm_guard")}}
    check_resume_compatible(recipe.with_defaults(saved), cfg, CRITICAL_KEYS, force=False)
    changed = to_dict(_cfg(tmp_path, "train.noise=rollout"))
    with pytest.raises(ValueError, match="train.noise"):
        check_resume_compatible(recipe.with_defaults(saved), changed, CRITICAL_KEYS, force=False)


def test_each_sigma_set_draws_only_its_levels(tmp_path):
    """``train.sigmas``: the release grid, the same without σ = 1 (no fresh-noise regression from pure noise), the
    sampler's warped steps, or U(0, 1)."""
    world = recipe.setup(_cfg(tmp_path))
    sampler = tuple(float(sigma_of(t)) for t in world.sampler.steps.timesteps)
    for choice, allowed in (("release_grid", {1.0, 0.75, 0.5, 0.25}), ("release_below_1", {0.75, 0.5, 0.25}),
                            ("sampler_grid", set(sampler))):
        world.cfg.train.sigmas = choice
        g = torch.Generator().manual_seed(0)
        drawn = {float(recipe._train_sigmas(world, g)) for _ in range(200)}
        assert drawn == allowed, choice
    world.cfg.train.sigmas = "uniform"
    g = torch.Generator().manual_seed(0)
    assert all(1e-3 <= recipe._train_sigmas(world, g) < 1 for _ in range(50))
