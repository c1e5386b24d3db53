"""The reward protocol every scorer implements, and the registry that builds rewards by name.

A reward is a named callable on decoded videos:

    reward(videos: [B, T, 3, H, W] float in [0, 1], prompts: list[str]) -> [B] float32 (higher is better)

It declares what it needs (``needs``: a subset of {"video", "prompts"}), its rough output scale (``scale``: the
(low, high) range a healthy video scores in, for plots and sanity checks; None when unbounded or unknown),
and optionally whether it is a hacking monitor (``monitor``: True for statistics that are logged, never
optimised; read it with ``getattr(reward, "monitor", False)``). Rewards are plain objects; nothing inherits from
anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """What the trainer calls. See the module docstring for the contract."""

    name: str
    needs: frozenset[str]
    scale: tuple[float, float] | None

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor: ...


@dataclass
class FunctionReward:
    """Wrap a plain function ``fn(videos, prompts) -> [B]`` as a `Reward`."""

    name: str
    fn: Callable[[Tensor, list[str]], Tensor]
    needs: frozenset[str] = frozenset({"video"})
    scale: tuple[float, float] | None = None
    monitor: bool = False

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return self.fn(videos, prompts)


def check_videos(videos: Tensor, prompts: list[str] | None = None) -> None:
    """Validate the reward input contract with errors that say what is wrong."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"rewards take videos [B, T, 3, H, W]; got shape {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise ValueError(f"rewards take float videos in [0, 1]; got dtype {videos.dtype} (divide uint8 by 255)")
    if prompts is not None and len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")


def check_scores(name: str, scores: Tensor, batch: int) -> Tensor:
    """A reward must return one finite-or-NaN float per video; NaN marks a failed sample."""
    if scores.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({batch},)")
    return scores.float()


# ------------------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: ``@register_reward("sharpness")`` on a factory ``(**kwargs) -> Reward``."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class RewardSpec:
    """One configured reward: registry name, weight in the sum, factory keyword arguments."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


_INSTANCES: dict[tuple, Reward] = {}


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Build a registered reward; identical (name, kwargs) share one instance (one model in memory)."""
    _import_builtin()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    key = (name, repr(sorted(kwargs.items())))
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[name](**kwargs)
    return _INSTANCES[key]


def _import_builtin() -> None:
    """Register the built-in rewards (imported lazily so heavy models load only when asked for)."""
    import importlib

    for mod in ("pixel", "hpsv3", "videoalign", "clip", "flow", "remote", "toy"):
        try:
            importlib.import_module(f"astrolabe_rl.rewards.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"astrolabe_rl.rewards.{mod}":
                raise


def score_all(
    rewards: dict[str, Reward], videos: Tensor, prompts: list[str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Run every reward on a batch; a failure marks only the samples that fail, never the run.

    When a reward raises on the batch it is retried sample by sample, so one bad video costs one NaN.
    Returns the scores ``{name: [B]}`` (NaN where a sample failed) and the errors ``{name: message}``.
    """
    check_videos(videos, prompts)
    scores, errors = {}, {}
    for name, reward in rewards.items():
        try:
            # every score lands on the videos' device, whichever path produced it, so callers can stack them
            scores[name] = check_scores(name, reward(videos, prompts), videos.shape[0]).to(videos.device)
            continue
        except Exception as e:  # noqa: BLE001 - a scorer's failure must not lose the run
            errors[name] = f"{type(e).__name__}: {e}"
        out = torch.full((videos.shape[0],), float("nan"), device=videos.device)
        for i in range(videos.shape[0]):
            try:
                out[i] = check_scores(name, reward(videos[i : i + 1], prompts[i : i + 1]), 1)[0]
            except Exception:  # noqa: BLE001
                pass
        scores[name] = out
    return scores, errors
