"""The toy world's rewards in the registry: ``toy_quality`` (honest: the world's renders are its ceiling),
``toy_quality_hackable`` (fooled by noise, for the hacking benchmarks), ``toy_motion`` (``toy_motion_long`` for
windows of long, bouncing videos), ``toy_text`` and the ``toy_noise`` monitor of the hack, ``toy_coherence`` for
long videos (definitions and rationale in `astrolabe_rl.toy.rewards`), and ``toy_oracle`` (``toy_oracle_long`` for
windows of long videos), the judge no run trains on (`astrolabe_rl.toy.oracle`; list it under ``eval.monitors``)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from astrolabe_rl.rewards.base import FunctionReward, Reward, register_reward
from astrolabe_rl.toy import rewards as toy


def _wrap(name: str, fn: Callable[[Tensor, list[str]], Tensor], monitor: bool) -> Reward:
    return FunctionReward(name=name, fn=fn, needs=frozenset({"video", "prompts"}), scale=(0.0, 1.0), monitor=monitor)


@register_reward("toy_quality")
def _quality(monitor: bool = False) -> Reward:
    return _wrap("toy_quality", toy.quality, monitor)


@register_reward("toy_quality_hackable")
def _quality_hackable(monitor: bool = False) -> Reward:
    return _wrap("toy_quality_hackable", toy.quality_hackable, monitor)


@register_reward("toy_motion")
def _motion(monitor: bool = False) -> Reward:
    return _wrap("toy_motion", toy.motion, monitor)


@register_reward("toy_motion_long")
def _motion_long(monitor: bool = False) -> Reward:
    return _wrap("toy_motion_long", toy.motion_long, monitor)


@register_reward("toy_text")
def _text(monitor: bool = False) -> Reward:
    return _wrap("toy_text", toy.text_alignment, monitor)


@register_reward("toy_oracle")
def _oracle(monitor: bool = True) -> Reward:
    from astrolabe_rl.toy.oracle import oracle_scores

    # ~0.2 s a video on a CPU core: an evaluation judge (eval.monitors), too slow for every rollout
    return _wrap("toy_oracle", lambda videos, prompts: oracle_scores(videos, prompts)["oracle"], monitor)


@register_reward("toy_oracle_long")
def _oracle_long(monitor: bool = True) -> Reward:
    from astrolabe_rl.toy.oracle import one_thread, window_scores

    # the oracle of a window of a long, bouncing video (`window_scores` over the whole clip it is given): what
    # streaming runs watch on their evaluation windows
    def judge(videos: Tensor, prompts: list[str]) -> Tensor:
        with one_thread():
            return window_scores(videos, prompts, videos.shape[1])["oracle"][:, 0]

    return _wrap("toy_oracle_long", judge, monitor)


@register_reward("toy_noise")
def _noise(monitor: bool = True) -> Reward:
    return FunctionReward(name="toy_noise", fn=toy.noise_level, needs=frozenset({"video"}), scale=(0.0, 0.1),
                          monitor=monitor)


@register_reward("toy_coherence")
def _coherence(window: int = 9, monitor: bool = True) -> Reward:
    """Long videos: the object keeps its colour, size and speed across windows of ``window`` frames."""
    return FunctionReward(name="toy_coherence", fn=lambda videos, prompts: toy.coherence(videos, window),
                          needs=frozenset({"video"}), scale=(0.0, 1.0), monitor=monitor)
