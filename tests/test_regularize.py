"""Selective KL and the moving references: the pure functions against hand-computed values, then their wiring into
the recipe (the mask, the reference reset, the EMA ensemble, resume, misconfiguration)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from astrolabe_rl.algo.nft import kl_term, nft_objective
from astrolabe_rl.algo.regularize import (
    adapt_rho,
    mean_non_negative,
    next_threshold,
    ranks,
    select,
    should_reset,
    uncertainty,
    win_rates,
)
from astrolabe_rl.train import recipe
from astrolabe_rl.train.dist import shutdown

sys.path.insert(0, str(Path(__file__).parent))
from test_train import _cfg, _metric_lines, _params, crash_and_resume  # noqa: E402

T = torch.tensor
SELECTIVE = ["regularize.mode=selective", "regularize.main=sharpness", "regularize.auxiliary=[saturation]"]


@pytest.fixture(autouse=True)
def _single_process():
    yield
    shutdown()


# ------------------------------------------------------------------------------------------------ pure functions


def test_ranks_are_descending_with_mean_ranks_for_ties_and_nan_left_out():
    assert ranks(T([3.0, 1.0, 3.0])).tolist() == [1.5, 3.0, 1.5]
    assert ranks(T([0.2, 0.9, 0.5, 0.1])).tolist() == [3.0, 1.0, 2.0, 4.0]
    r = ranks(T([1.0, float("nan"), 2.0]))
    assert r[0] == 2.0 and r[2] == 1.0 and math.isnan(r[1])


def test_uncertainty_by_rank_for_both_signs():
    main, aux = T([4.0, 3.0, 2.0, 1.0]), T([1.0, 2.0, 3.0, 4.0])
    # rank_main = [1, 2, 3, 4], rank_aux = [4, 3, 2, 1]
    assert uncertainty(main, [aux]).tolist() == [3.0, 1.0, -1.0, -3.0]  # optimism: aux rank − main rank
    assert uncertainty(main, [aux], sign="release").tolist() == [-3.0, -1.0, 1.0, 3.0]
    # two auxiliaries: their ranks are averaged; aux2 ranks = [1, 2, 3, 4] -> mean aux rank = [2.5] * 4
    assert uncertainty(main, [aux, main.clone()]).tolist() == [1.5, 0.5, -0.5, -1.5]


def test_win_rates_within_the_prompt_group():
    scores, groups = T([1.0, 2.0, 2.0, 5.0, 3.0]), T([0, 0, 0, 1, 1])
    # sample 1 beats 1.0 and ties 2.0 among its two group-mates: (1 + ½)/2
    assert win_rates(scores, groups).tolist() == [0.0, 0.75, 0.75, 1.0, 0.0]
    assert math.isnan(win_rates(T([1.0, 2.0]), T([0, 1]))[0])  # alone in its group: nothing to compare
    u = uncertainty(scores, [T([2.0, 1.0, 1.0, 3.0, 5.0])], measure="winrate", group_ids=groups)
    # aux win-rates: [1, .25, .25, 0, 1] -> U = main − aux
    assert u.tolist() == [-1.0, 0.5, 0.5, 1.0, -1.0]
    with pytest.raises(ValueError, match="group_ids"):
        uncertainty(scores, [scores], measure="winrate")


def test_threshold_is_the_percentile_of_the_non_negative_disagreements():
    u = T([3.0, 1.0, -1.0, -3.0, 0.0])  # P = {0, 1, 3}
    mask, tau = select(u, 0.5)  # the median of P
    assert tau == 1.0 and mask.tolist() == [True, False, False, False, False]
    mask, tau = select(u, 0.2)  # 80th percentile: 1 + 0.6·(3 − 1)
    assert tau == pytest.approx(2.2) and mask.tolist() == [True, False, False, False, False]
    mask, tau = select(u, 1.0)  # τ = min P = 0; strict >
    assert tau == 0.0 and mask.tolist() == [True, True, False, False, False]
    mask, tau = select(T([-1.0, -2.0]), 0.1)
    assert math.isnan(tau) and not mask.any()
    assert mean_non_negative(u) == pytest.approx(4 / 3) and math.isnan(mean_non_negative(T([-1.0])))


def test_the_sign_pin_optimism_selects_the_main_rewards_favourite_that_the_auxiliaries_rank_last():
    n = 10
    main = torch.linspace(1.0, 0.0, n)  # sample 0 ranked first by the main reward ...
    aux1, aux2 = torch.linspace(0.0, 1.0, n), torch.linspace(0.1, 0.9, n)  # ... and last by both auxiliaries
    mask, _ = select(uncertainty(main, [aux1, aux2], sign="optimism"), 0.1)
    assert mask[0] and mask.sum() == 1
    mask, _ = select(uncertainty(main, [aux1, aux2], sign="release"), 0.1)
    assert not mask[0] and mask[-1]  # the released sign picks the opposite case: main last, auxiliaries first


def test_rho_adapts_on_the_buffer_and_stays_in_bounds():
    assert adapt_rho(0.1, 0.5, []) == (0.1, [0.5])  # nothing to compare against yet
    assert adapt_rho(0.1, 0.9, [0.5, 0.6]) == (pytest.approx(0.11), [0.5, 0.6, 0.9])  # above every value
    assert adapt_rho(0.1, 0.4, [0.5, 0.6]) == (pytest.approx(0.09), [0.5, 0.6, 0.4])  # below every value
    assert adapt_rho(0.1, 0.55, [0.5, 0.6]) == (0.1, [0.5, 0.6, 0.55])  # in between
    assert adapt_rho(0.195, 0.9, [0.5])[0] == 0.2 and adapt_rho(0.021, 0.1, [0.5])[0] == 0.02  # clipped
    assert adapt_rho(0.1, 0.9, [0.5] * 20)[1] == [0.5] * 19 + [0.9]  # the buffer keeps the last 20
    assert adapt_rho(0.1, float("nan"), [0.5]) == (0.1, [0.5])  # no U ≥ 0 this epoch: nothing changes
    with pytest.raises(ValueError, match="low <= high"):
        adapt_rho(0.1, 0.5, [], low=0.2, high=0.02)


def test_reset_rule_and_threshold_moves_as_released():
    assert should_reset(0.2, 0.15, 3) and not should_reset(0.1, 0.15, 3)
    assert should_reset(None, 0.15, 16) and not should_reset(None, 0.15, 15)  # more than 15 epochs
    assert next_threshold(0.15, 16) == pytest.approx(0.14)
    assert next_threshold(0.105, 20) == 0.1  # not below 0.1
    assert next_threshold(0.15, 10) == 0.15  # 5 ≤ gap ≤ 15: unchanged
    assert next_threshold(0.15, 3) == 0.05  # the released quirk: a "raise" capped at 0.05 lowers it
    assert next_threshold(0.15, 3, clamp="corrected") == pytest.approx(0.16)
    assert next_threshold(0.195, 3, clamp="corrected", high=0.2) == 0.2


def test_nobody_selected_gives_zero_kl_term_and_zero_kl_gradient():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    old, ref, x0 = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    r = T([0.2, 0.5, 0.9])
    masked, stats = nft_objective(theta, old, ref, x0, r, kl_weight=10.0, kl_mask=torch.zeros(3, dtype=torch.bool))
    (grad_masked,) = torch.autograd.grad(masked, theta)
    plain, _ = nft_objective(theta, old, None, x0, r)
    (grad_plain,) = torch.autograd.grad(plain, theta)
    assert stats["kl_selected"].item() == 0.0 and stats["kl"].item() > 0
    assert torch.equal(masked, plain) and torch.equal(grad_masked, grad_plain)


# ------------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("overrides, field", [
    (["rewards.components=[{name: sharpness, weight: 1.0}]", *SELECTIVE[:2], "regularize.auxiliary=[]"],
     "rewards.components has 1"),
    ([*SELECTIVE[:2], "regularize.auxiliary=[brightness]"], "regularize.auxiliary names 'brightness'"),
    ([*SELECTIVE[:1], "regularize.main=brightness", "regularize.auxiliary=[sharpness]"], "regularize.main"),
    ([*SELECTIVE[:2], "regularize.auxiliary=[sharpness]"], "lists the main reward"),
    (["regularize.rho_min=0.2", "regularize.rho_max=0.02"], "regularize.rho_min"),
    (["regularize.rho=0.5"], "regularize.rho=0.5"),
    ([*SELECTIVE, "train.kl_weight=0"], "train.kl_weight"),
    (["train.reference=ema_ensemble", "regularize.ema_decays=[1.0]"], "regularize.ema_decays"),
    (["regularize.sign=pessimism"], "regularize.sign"),
])
def test_misconfiguration_fails_before_anything_runs_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        _cfg(tmp_path, *overrides)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------ the recipe


def test_selective_mask_reaches_the_update_and_is_logged(tmp_path):
    world = recipe.setup(_cfg(tmp_path, *SELECTIVE, "rollout.candidates=4", "regularize.rho=0.2", "train.epochs=2"))
    m = recipe.run_epoch(world)
    world.logger.close()
    assert 0 <= m["reg/kl_frac"] < 1 and m["reg/rho"] == pytest.approx(0.2)
    assert m["loss/kl_frac"] == pytest.approx(m["reg/kl_frac"])  # one rank: what was selected is what the KL saw
    assert {"reg/tau", "reg/u_pos_mean", "reg/kl_selected"} <= m.keys()


def test_dynamic_reference_copies_theta_exactly_and_only_when_its_rule_fires(tmp_path):
    world = recipe.setup(_cfg(tmp_path, "train.reference=dynamic", "train.epochs=6"))
    recipe.run_epoch(world)
    recipe.run_epoch(world)
    theta, ref = _params(world, "default"), _params(world, "ref")
    assert any(not torch.equal(theta[k], ref[k]) for k in theta)  # θ moved, the reference did not
    world.reg.last_kl = world.reg.threshold / 2  # below the threshold, gap 2 ≤ 15: no copy
    assert recipe.reference_phase(world)["reg/ref_reset"] == 0.0
    assert all(torch.equal(_params(world, "ref")[k], ref[k]) for k in ref)
    world.reg.last_kl = world.reg.threshold * 2  # above: copy
    out = recipe.reference_phase(world)
    assert out["reg/ref_reset"] == 1.0 and world.reg.resets == 1 and world.reg.last_reset == world.epoch
    assert world.reg.threshold == 0.05  # gap 2 < 5 under the released clamp
    assert all(torch.equal(_params(world, "ref")[k], theta[k]) for k in theta)
    world.logger.close()


def test_ema_ensemble_reference_follows_theta_at_each_decay_and_averages_predictions(tmp_path):
    world = recipe.setup(_cfg(tmp_path, "train.reference=ema_ensemble", "regularize.ema_decays=[0.5, 0.9]"))
    assert world.reference == ("ref_ema0", "ref_ema1")
    before = [_params(world, a) for a in world.reference]
    recipe.run_epoch(world)
    theta = _params(world, "default")
    for decay, name, prev in zip((0.5, 0.9), world.reference, before):
        for k, p in _params(world, name).items():
            torch.testing.assert_close(p, decay * prev[k] + (1 - decay) * theta[k])
    # the KL's reference is the mean x̂0 of the ensemble
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, world.num_frames, world.policy.model.config.in_dim, *world.family.latent_hw, generator=g)
    text = world.io.encode(["a red ball", "a blue cube"])
    noise = torch.randn(x0.shape, generator=g)
    _, stats = recipe.micro_step(world.policy, world.train_model, world.sampler, world.cfg.train, x0, text,
                                 T([0.5, 0.5]), torch.ones(2, dtype=torch.bool), 0.5, noise, reference=world.reference)
    layout = dict(frames_per_block=world.sampler.frames_per_block, first_block_frames=world.sampler.first_block_frames,
                  policy=world.sampler.cache)
    x_t = (1 - 0.5) * x0 + 0.5 * noise
    with torch.no_grad():
        preds = []
        for name in world.reference:
            with world.policy.use(name) as model:
                preds.append(x_t - 0.5 * model(x_t, 500.0, text, **layout))
        mine = x_t - 0.5 * world.policy.model(x_t, 500.0, text, **layout)
    torch.testing.assert_close(stats["kl"], kl_term(mine, sum(preds) / 2).mean(), rtol=1e-5, atol=1e-8)
    world.logger.close()


def test_resume_with_selective_kl_and_a_dynamic_reference_is_bit_identical(tmp_path):
    # the reference is re-copied once more than one epoch has passed, so the resumed run must restore ρ, its
    # buffer, the threshold, the last copy's epoch and the `ref` adapter to match
    full, resumed = crash_and_resume(tmp_path, _cfg, *SELECTIVE, "rollout.candidates=4", "regularize.rho=0.2",
                                     "train.kl_weight=1.0", "train.reference=dynamic", "regularize.reset_max_gap=1")
    assert full.reg == resumed.reg and full.reg.resets >= 1  # a copy at epoch 2, right after the resume
    assert any(row["reg/kl_frac"] > 0 for row in _metric_lines(tmp_path / "full").values())  # the selective KL was live

def test_reference_adapters_are_checkpointed_with_the_policy():
    from astrolabe_rl.models import CausalWan, WanConfig
    from astrolabe_rl.policy import Policy

    def make(extra):
        torch.manual_seed(0)
        return Policy(CausalWan(WanConfig.tiny()), rank=4, alpha=4.0, extra_adapters=extra)

    a = make(["ref_ema0", "ref_ema1"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.adapter_params("ref_ema1").values():
            p.add_(torch.randn(p.shape, generator=g))
    state = a.state_dict()
    b = make(["ref_ema0", "ref_ema1"])
    b.load_state_dict(state)
    for name in ("ref_ema0", "ref_ema1"):
        assert all(torch.equal(v, b.adapter_params(name)[k]) for k, v in a.adapter_params(name).items())
    with pytest.raises(ValueError, match="another train.reference"):
        make(["ref"]).load_state_dict(state)
    with pytest.raises(ValueError, match="reserved"):
        make(["old"])
