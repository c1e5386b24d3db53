"""The RL update as pure functions: advantages -> r, the NFT loss + KL, selective KL, old-policy / EMA sync."""

from astrolabe_rl.algo.advantages import (
    group_advantages,
    group_moments,
    group_reward_stats,
    optimality_probability,
)
from astrolabe_rl.algo.nft import adaptive_weight, kl_term, nft_loss, nft_objective
from astrolabe_rl.algo.regularize import (
    RegularizerState,
    adapt_rho,
    next_threshold,
    ranks,
    select,
    should_reset,
    uncertainty,
    win_rates,
)
from astrolabe_rl.algo.sync import ema_decay, ema_update_, old_decay, soft_update_

__all__ = [
    "adaptive_weight", "ema_decay", "ema_update_", "group_advantages", "group_moments", "group_reward_stats",
    "kl_term", "nft_loss", "nft_objective", "old_decay", "optimality_probability", "soft_update_",
    "RegularizerState", "adapt_rho", "next_threshold", "ranks", "select", "should_reset", "uncertainty", "win_rates",
]
