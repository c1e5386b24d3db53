"""Rewards: the protocol, the registry, the combiner and the scorers (heavy models load lazily)."""

from astrolabe_rl.rewards.base import (
    FailureReport,
    FunctionReward,
    Reward,
    RewardFailureError,
    RewardSpec,
    available_rewards,
    build_reward,
    check_failures,
    register_reward,
    score_all,
)
from astrolabe_rl.rewards.combine import combine_rewards

__all__ = [
    "FailureReport", "FunctionReward", "Reward", "RewardFailureError", "RewardSpec", "available_rewards",
    "build_reward", "check_failures", "combine_rewards", "register_reward", "score_all",
]
