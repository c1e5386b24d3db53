"""Group statistics -> advantage A -> optimality probability r (DESIGN §3, reference/astrolabe.md §2.2 steps 3-4).

All functions are pure and run on whatever device their inputs are on. Call them on the rewards of the *whole*
epoch, gathered from every rank: the released method takes the standard deviation over all gathered samples, so a
per-rank call would change the advantages.

Missing rewards: a reward scorer marks a failed sample NaN (`rewards.base.score_all`). Non-finite rewards (NaN,
±inf) are left out of every statistic and get a NaN advantage; the caller decides whether to drop those samples
or set r = ½ for them (which makes them contribute no policy gradient on-policy).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer group ids ``[N]`` to dense indices ``[N]`` in ``0..G-1``; returns (index, G)."""
    if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(
            f"group_ids must be a 1-D integer tensor (one prompt id per sample); got shape "
            f"{tuple(group_ids.shape)}, dtype {group_ids.dtype}. Pass prompt indices, not decoded strings."
        )
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, uniq.numel()


def group_moments(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group count, mean and population std of the finite entries of ``values``, broadcast back to ``[N]``.

    values: ``[N]`` float; group_ids: ``[N]`` integer. Returns ``(count [N], mean [N], std [N])`` in float64, where
    entry i holds the statistic of sample i's group. Non-finite values are excluded; a group with no finite value
    has count 0 and mean/std NaN. The std is the population std (divide by n, as numpy's default), so a
    group of one finite sample has std 0.
    """
    idx, n_groups = group_index(group_ids)
    ok = torch.isfinite(values)
    x = torch.where(ok, values.double(), 0.0)
    w = ok.double()
    count = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, idx, w)
    total = torch.zeros_like(count).index_add_(0, idx, x)
    mean = total / count  # 0/0 = NaN for a group with no finite reward, which is what we want
    sq_dev = torch.where(ok, (x - mean[idx]) ** 2, 0.0)
    var = torch.zeros_like(count).index_add_(0, idx, sq_dev) / count
    return count[idx], mean[idx], var.sqrt()[idx]


def finite_std(values: Tensor) -> Tensor:
    """Population std (float64 scalar) of the finite entries of ``values``; NaN when none is finite."""
    x = values.double()[torch.isfinite(values)]
    if x.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    return x.std(correction=0)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std: Literal["global", "group"] = "global",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantage  A_i = (R_i − mean_{j: g_j = g_i} R_j) / (s + eps).

    rewards: ``[N]`` float, one scalar reward per video (NaN = failed sample).
    group_ids: ``[N]`` integer, the prompt id of each video (samples of the same prompt form a group).
    std: which s to divide by. ``"global"`` (release, `PerPromptStatTracker(global_std=True)`): the population std
        of all N finite rewards; ``"group"``: the population std of sample i's own group.
    eps: added to s (release 1e-4) so that a zero spread gives A = 0 instead of 0/0.
    Returns ``[N]`` in the rewards' dtype; NaN where the reward is NaN.

    Groups of size 1 (or whose other members all failed): the group mean is the sample itself, so A = 0 exactly,
    i.e. r = ½ and no policy gradient on-policy. There is nothing to compare against, and we do not fall back to
    the global mean because that would mix prompts of different difficulty. Likewise with ``std="group"`` a group
    whose rewards are all equal gets A = 0.
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' (release) or 'group'; got {std!r}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0 so that a zero spread gives A = 0, not NaN; got {eps}")
    _, mean, group_std = group_moments(rewards, group_ids)
    scale = finite_std(rewards) if std == "global" else group_std
    adv = (rewards.double() - mean) / (scale + eps)  # NaN reward -> NaN advantage
    return adv.to(rewards.dtype)


def optimality_probability(adv: Tensor, adv_clip: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability  r = clip(½ + clip(A, −c, c) / (2c), 0, 1)  with c = ``adv_clip``.

    adv: any shape (usually ``[N]``). Returns the same shape, in [0, 1]; NaN stays NaN.
    Release: c = 5, so r = ½ + A/10 for |A| ≤ 5; A = 0 -> ½, A ≥ 5 -> 1, A ≤ −5 -> 0.
    """
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0 (release: 5.0); got {adv_clip}")
    # The outer clip is a no-op mathematically; it guards against rounding just outside [0, 1].
    return (0.5 + adv.clamp(-adv_clip, adv_clip) / (2.0 * adv_clip)).clamp(0.0, 1.0)


def group_reward_stats(rewards: Tensor, group_ids: Tensor) -> dict[str, Tensor]:
    """Diagnostics worth logging each epoch (scalars, float64).

    ``zero_std_ratio``: share of groups (with ≥ 1 finite reward) whose rewards are all equal; those groups give
    A = 0 and so no policy gradient. ``group_std_mean``: mean within-group std. ``nan_ratio``: share of NaN
    rewards. ``group_size_mean``: mean number of finite rewards per group.
    """
    idx, n_groups = group_index(group_ids)
    count, _, std = group_moments(rewards, group_ids)
    # one representative entry per group: scatter the broadcast values back to [G]
    g_count = torch.zeros(n_groups, dtype=torch.float64, device=rewards.device).scatter_(0, idx, count)
    g_std = torch.zeros_like(g_count).scatter_(0, idx, std)
    live = g_count > 0
    return {
        "zero_std_ratio": (g_std[live] == 0).double().mean(),
        "group_std_mean": g_std[live].mean(),
        "nan_ratio": (~torch.isfinite(rewards)).double().mean(),
        "group_size_mean": g_count[live].mean(),
    }
