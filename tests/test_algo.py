"""Hand-computed checks of the RL update's pure functions: advantages, r, the NFT loss, KL, sync schedules."""

from __future__ import annotations

import math

import pytest
import torch

from astrolabe_rl.algo import (
    ema_decay,
    ema_update_,
    group_advantages,
    group_reward_stats,
    kl_term,
    nft_loss,
    nft_objective,
    old_decay,
    optimality_probability,
    soft_update_,
)

# ------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_global_std_by_hand():
    # groups (ids need not be contiguous): {5: [0, 2]} mean 1, {9: [4, 8]} mean 6 -> deviations -1, 1, -2, 2.
    # global population std: mean 3.5, squared deviations 12.25 + 2.25 + 0.25 + 20.25 = 35 -> sqrt(35/4).
    rewards = torch.tensor([0.0, 2.0, 4.0, 8.0])
    groups = torch.tensor([5, 5, 9, 9])
    s = math.sqrt(8.75) + 1e-4
    expected = torch.tensor([-1 / s, 1 / s, -2 / s, 2 / s])
    torch.testing.assert_close(group_advantages(rewards, groups), expected)


def test_group_advantages_group_std_by_hand():
    # group stds: {0, 2} -> 1, {4, 8} -> 2, so every advantage is ±1 (up to eps).
    rewards = torch.tensor([0.0, 2.0, 4.0, 8.0])
    groups = torch.tensor([5, 5, 9, 9])
    expected = torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (2 + 1e-4), 2 / (2 + 1e-4)])
    torch.testing.assert_close(group_advantages(rewards, groups, std="group"), expected)


def test_group_advantages_nan_excluded_and_propagated():
    # the NaN sample must not move group 5's mean (1) nor the global std (sqrt(8.75)) of the test above
    rewards = torch.tensor([0.0, 2.0, float("nan"), 4.0, 8.0])
    groups = torch.tensor([5, 5, 5, 9, 9])
    adv = group_advantages(rewards, groups)
    assert torch.isnan(adv[2]) and torch.isfinite(adv[[0, 1, 3, 4]]).all()
    s = math.sqrt(8.75) + 1e-4
    torch.testing.assert_close(adv[[0, 1, 3, 4]], torch.tensor([-1 / s, 1 / s, -2 / s, 2 / s]))


def test_group_advantages_singleton_and_all_nan_groups():
    # group 1 has one sample -> A = 0 (nothing to compare); group 2 has only NaN -> NaN; group 0 is normal.
    rewards = torch.tensor([1.0, 3.0, 7.0, float("nan")])
    groups = torch.tensor([0, 0, 1, 2])
    for mode in ("global", "group"):
        adv = group_advantages(rewards, groups, std=mode)
        assert adv[2].item() == 0.0
        assert torch.isnan(adv[3])
        assert adv[0] < 0 < adv[1]


def test_group_advantages_constant_group_is_zero_and_errors():
    adv = group_advantages(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0, 0, 0]), std="group")
    assert torch.equal(adv, torch.zeros(3))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.zeros(3), torch.zeros(3))  # float group ids
    with pytest.raises(ValueError, match="std must be"):
        group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), std="batch")  # type: ignore[arg-type]


def test_group_reward_stats():
    # group 0 is constant, group 1 has std 0.5 -> zero_std_ratio 1/2, group_std_mean 0.25
    stats = group_reward_stats(torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1]))
    assert stats["zero_std_ratio"].item() == 0.5
    assert stats["group_std_mean"].item() == pytest.approx(0.25)
    assert stats["nan_ratio"].item() == 0.0


def test_optimality_probability_by_hand():
    # r = clip(1/2 + clip(A, ±5)/10, 0, 1)
    adv = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 12.0, float("nan")])
    r = optimality_probability(adv)
    torch.testing.assert_close(r[:7], torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))
    assert torch.isnan(r[7])
    # c = 2: A = 1 -> 1/2 + 1/4
    assert optimality_probability(torch.tensor([1.0]), adv_clip=2.0).item() == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------ NFT loss


def _hand_batch():
    """B = 2 samples of shape [F, C, H, W] = [1, 1, 1, 2]; β = 0.5.

    sample 0: x0 = [0, 0], old = [1, 2], θ = [3, 2], r = 0.75
      x⁺ = .5·[3,2] + .5·[1,2] = [2, 2] -> pos = (4 + 4)/2 = 4;   x⁻ = 1.5·[1,2] − .5·[3,2] = [0, 2] -> neg = 2
    sample 1: x0 = [1, 1], old = [1, 1], θ = [1, 3], r = 0
      x⁺ = [1, 2] -> err [0, 1] -> pos = 0.5;                      x⁻ = [1, 0] -> err [0, −1] -> neg = 0.5
    """
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 1, 2)
    old = torch.tensor([[1.0, 2.0], [1.0, 1.0]]).view(2, 1, 1, 1, 2)
    theta = torch.tensor([[3.0, 2.0], [1.0, 3.0]]).view(2, 1, 1, 1, 2).requires_grad_()
    r = torch.tensor([0.75, 0.0])
    return theta, old, x0, r


def test_nft_loss_release_by_hand():
    theta, old, x0, r = _hand_batch()
    loss, stats = nft_loss(theta, old, x0, r, beta=0.5, form="release")
    # ℓ0 = .75·4 + .25·2 = 3.5, ℓ1 = 0·.5 + 1·.5 = .5 -> mean 2
    assert loss.item() == pytest.approx(2.0)
    assert stats["pos_loss"].item() == pytest.approx((4 + 0.5) / 2)
    assert stats["neg_loss"].item() == pytest.approx((2 + 0.5) / 2)
    assert stats["old_deviate"].item() == pytest.approx(2.0)  # (θ − old)² means: [2,0] -> 2, [0,2] -> 2
    loss.backward()
    # ∂/∂θ0 = (1/B)(1/n)[r·2·err⁺·β − (1−r)·2·err⁻·β] = ¼[.75·2·[2,2]·.5 − .25·2·[0,2]·.5] = [.375, .25]
    # ∂/∂θ1 = ¼[0 − 1·2·[0,−1]·.5] = [0, .25]
    torch.testing.assert_close(theta.grad.view(2, 2), torch.tensor([[0.375, 0.25], [0.0, 0.25]]))


def test_nft_loss_diffusionnft_by_hand():
    theta, old, x0, r = _hand_batch()
    loss, stats = nft_loss(theta, old, x0, r, beta=0.5, form="diffusionnft", adv_clip=5.0)
    # sample 0: w⁺ = 1/mean|[2,2]| = .5, w⁻ = 1/mean|[0,2]| = 1 -> .75·.5·4 + .25·1·2 = 2; ×(5/.5) = 20
    # sample 1: w⁺ = w⁻ = 1/mean|[0,1]| = 2 -> 0 + 1·2·.5 = 1; ×10 = 10.  mean -> 15
    assert loss.item() == pytest.approx(15.0)
    assert stats["weight_pos"].item() == pytest.approx((0.5 + 2) / 2)
    assert stats["weight_neg"].item() == pytest.approx((1 + 2) / 2)
    assert stats["unweighted_policy_loss"].item() == pytest.approx(2.0)  # the release value


def test_nft_loss_sample_weight_drops_a_sample():
    theta, old, x0, r = _hand_batch()
    r = torch.tensor([0.75, float("nan")])  # sample 1's reward failed; weight 0 drops it
    loss, stats = nft_loss(theta, old, x0, r, beta=0.5, sample_weight=torch.tensor([1.0, 0.0]))
    # (1·ℓ0 + 0·ℓ1)/B = 3.5/2: normalised by B so micro-batch averaging still equals one big batch
    assert loss.item() == pytest.approx(1.75)
    assert stats["pos_loss"].item() == pytest.approx(4.0) and stats["r_mean"].item() == pytest.approx(0.75)
    loss.backward()
    torch.testing.assert_close(theta.grad.view(2, 2), torch.tensor([[0.375, 0.25], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        nft_loss(theta, old, x0, r, beta=0.5, sample_weight=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="sample_weight"):
        nft_loss(theta, old, x0, r, sample_weight=torch.tensor([1.0, -1.0]))


def _policy_grads(r: torch.Tensor, beta: float, form: str, seed: int = 0) -> list[torch.Tensor]:
    """Gradients of the NFT loss w.r.t. a tiny linear 'policy' evaluated on-policy (θ_old = θ)."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 4)
    x_t = torch.randn(3, 2, 2, 3, 4)  # [B, F, C, H, W]
    x0 = torch.randn(3, 2, 2, 3, 4)
    x0_theta = net(x_t)
    x0_old = net(x_t).detach()  # the old adapter equals the trained one
    loss, _ = nft_loss(x0_theta, x0_old, x0, r, beta=beta, form=form)  # type: ignore[arg-type]
    return list(torch.autograd.grad(loss, list(net.parameters())))


@pytest.mark.parametrize("form", ["release", "diffusionnft"])
def test_r_half_gives_exactly_zero_policy_gradient_on_policy(form):
    grads = _policy_grads(torch.full((3,), 0.5), beta=0.1, form=form)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    # and the test can fail: a non-neutral r moves the parameters
    grads = _policy_grads(torch.tensor([0.5, 0.9, 0.2]), beta=0.1, form=form)
    assert any(g.abs().max() > 1e-6 for g in grads)


def test_r_half_off_policy_is_a_pull_toward_old():
    # Off-policy the release loss at r = ½ is ½‖e + βd‖² + ½‖e − βd‖² = ‖e‖² + β²‖d‖², whose gradient is
    # 2β²·d/(B·n): a proximal pull toward θ_old, not zero (documented in algo/nft.py).
    torch.manual_seed(0)
    theta = torch.randn(2, 1, 2, 2, 2, requires_grad=True)
    old, x0 = torch.randn(2, 1, 2, 2, 2), torch.randn(2, 1, 2, 2, 2)
    loss, _ = nft_loss(theta, old, x0, torch.full((2,), 0.5), beta=0.3)
    loss.backward()
    torch.testing.assert_close(theta.grad, 2 * 0.3**2 * (theta.detach() - old) / (2 * 8))


def test_diffusionnft_on_policy_gradient_is_beta_independent():
    r = torch.tensor([0.1, 0.5, 0.95])
    base = _policy_grads(r, beta=0.1, form="diffusionnft")
    for beta in (1.0, 2.0):
        for g0, g in zip(base, _policy_grads(r, beta=beta, form="diffusionnft")):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)
    # ... while the release form scales linearly with β (so the test above distinguishes the forms)
    rel1, rel2 = _policy_grads(r, beta=0.1, form="release"), _policy_grads(r, beta=0.2, form="release")
    torch.testing.assert_close(rel2[0], 2 * rel1[0], rtol=1e-5, atol=1e-7)


def test_diffusionnft_on_policy_gradient_closed_form():
    # at θ = θ_old: ∂L/∂x̂0_θ = 2·Ā·w·e/(B·n), Ā = (2r − 1)·c, w = 1/mean|e|, e = x̂0_old − x0
    torch.manual_seed(3)
    old, x0 = torch.randn(2, 2, 1, 2, 3), torch.randn(2, 2, 1, 2, 3)
    theta = old.clone().requires_grad_()
    r = torch.tensor([0.8, 0.3])
    loss, _ = nft_loss(theta, old, x0, r, beta=0.37, form="diffusionnft", adv_clip=5.0)
    loss.backward()
    e = old - x0
    w = 1 / e.abs().flatten(1).mean(1)
    a_bar = (2 * r - 1) * 5.0
    expected = 2 * (a_bar * w).view(2, 1, 1, 1, 1) * e / (2 * e[0].numel())
    torch.testing.assert_close(theta.grad, expected)


def test_nft_loss_input_errors():
    theta, old, x0, r = _hand_batch()
    with pytest.raises(ValueError, match="r must be"):
        nft_loss(theta, old, x0, r[:1])
    with pytest.raises(ValueError, match="same shape"):
        nft_loss(theta, old[:, :, :, :, :1], x0, r)
    with pytest.raises(ValueError, match="NaN"):
        nft_loss(theta, old, x0, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="form"):
        nft_loss(theta, old, x0, r, form="grpo")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ KL


def test_kl_term_and_objective_by_hand():
    theta, old, x0, r = _hand_batch()
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]]).view(2, 1, 1, 1, 2)
    # ‖θ − ref‖²: sample 0 [3,2] -> (9+4)/2 = 6.5; sample 1 [0,1] -> .5
    kl = kl_term(theta, ref)
    torch.testing.assert_close(kl, torch.tensor([6.5, 0.5]), check_dtype=False)
    lam = 0.1
    full, stats = nft_objective(theta, old, ref, x0, r, beta=0.5, kl_weight=lam)
    assert full.item() == pytest.approx(2.0 + lam * 3.5)  # policy 2 (test above) + λ·mean(6.5, .5)
    sel, stats = nft_objective(theta, old, ref, x0, r, beta=0.5, kl_weight=lam, kl_mask=torch.tensor([False, True]))
    assert sel.item() == pytest.approx(2.0 + lam * 0.5)
    assert stats["kl"].item() == pytest.approx(3.5) and stats["kl_frac"].item() == 0.5
    # sample_weight drops sample 1 from the policy term only; its KL still counts: (3.5 + 0)/2 + λ·3.5
    kept, _ = nft_objective(theta, old, ref, x0, r, beta=0.5, kl_weight=lam, sample_weight=torch.tensor([1.0, 0.0]))
    assert kept.item() == pytest.approx(1.75 + lam * 3.5)
    none, _ = nft_objective(theta, old, ref, x0, r, beta=0.5, kl_weight=lam, kl_mask=torch.zeros(2, dtype=torch.bool))
    assert none.item() == pytest.approx(2.0)
    # the KL gradient flows into θ only, averaged over the 1 selected sample: λ·2·(θ − ref)/n -> [0, .1·2·1/2]
    sel.backward()
    policy_grad = torch.tensor([[0.375, 0.25], [0.0, 0.25]])
    torch.testing.assert_close(theta.grad.view(2, 2), policy_grad + torch.tensor([[0.0, 0.0], [0.0, 0.1]]))


# ------------------------------------------------------------------------------------------------ sync


def test_old_decay_schedules():
    assert [old_decay(s, 0) for s in (0, 10, 10_000)] == [0.0, 0.0, 0.0]
    assert old_decay(0, 1) == 0.0
    assert old_decay(100, 1) == pytest.approx(0.1)
    assert old_decay(499, 1) == pytest.approx(0.499)
    assert old_decay(5000, 1) == 0.5
    assert old_decay(10, 1, rate=0.02) == pytest.approx(0.2) and old_decay(40, 1, rate=0.02, cap=0.6) == 0.6
    assert old_decay(74, 2) == 0.0 and old_decay(75, 2) == 0.0
    assert old_decay(76, 2) == pytest.approx(0.0075)
    assert old_decay(100, 2) == pytest.approx(0.1875)  # 0.0075·25
    assert old_decay(1000, 2) == 0.999
    with pytest.raises(ValueError, match="schedule"):
        old_decay(1, 3)
    with pytest.raises(ValueError, match="step"):
        old_decay(-1, 1)


def test_soft_update_by_hand_and_edge_cases():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]], dtype=torch.float64)]
    source = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]], dtype=torch.float64)]
    soft_update_(target, source, 0.25)  # .25·t + .75·s
    torch.testing.assert_close(target[0], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(target[1], torch.tensor([[1.0]], dtype=torch.float64))
    # η = 0: a bit-exact copy, even of awkward values; η = 1: untouched
    src = [torch.randn(7, 5) * 1e3]
    tgt = [torch.randn(7, 5)]
    keep = tgt[0].clone()
    soft_update_(tgt, src, 1.0)
    assert torch.equal(tgt[0], keep)
    soft_update_(tgt, src, 0.0)
    assert torch.equal(tgt[0], src[0])
    with pytest.raises(ValueError, match="tensors"):
        soft_update_([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.5)
    with pytest.raises(ValueError, match="shape"):
        soft_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_soft_update_on_module_parameters():
    torch.manual_seed(0)
    old, new = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.5 * o.detach() + 0.5 * n.detach() for o, n in zip(old.parameters(), new.parameters())]
    soft_update_(old.parameters(), new.parameters(), old_decay(500, 1))  # η = 0.5; generators are fine
    for p, e in zip(old.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
        assert p.requires_grad and p.grad is None


def test_ema_decay_and_update():
    assert ema_decay(0) == pytest.approx(0.1)  # (1+0)/(10+0)
    assert ema_decay(1) == pytest.approx(2 / 11)
    assert ema_decay(80) == pytest.approx(0.9)  # 81/90 = .9 exactly, capped anyway
    assert ema_decay(10_000) == 0.9
    assert ema_decay(50, decay=0.99) == pytest.approx(51 / 60)  # still warming up below the cap
    ema, params = [torch.tensor([0.0])], [torch.tensor([1.0])]
    ema_update_(ema, params, 0.9)  # .9·0 + .1·1
    ema_update_(ema, params, 0.9)  # .9·.1 + .1·1
    torch.testing.assert_close(ema[0], torch.tensor([0.19]))
