"""Rewards: the protocol, the registry, the combiner and the scorers (heavy models load lazily)."""

from astrolabe_rl.rewards.base import (
    FunctionReward,
    Reward,
    RewardSpec,
    available_rewards,
    build_reward,
    register_reward,
    score_all,
)
from astrolabe_rl.rewards.combine import combine_rewards

__all__ = [
    "FunctionReward", "Reward", "RewardSpec", "available_rewards", "build_reward", "combine_rewards", "register_reward",
    "score_all",
]
