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
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

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
    """A reward must return one float per video, shape ``[B]``; every non-finite entry (NaN, ±inf) becomes NaN,
    the one mark of a failed sample (an inf would otherwise become A = inf, r = 1)."""
    if scores.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({batch},)")
    scores = scores.float()
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("nan")))


def _nonfinite_message(raw: Tensor) -> str:
    """Say which non-finite values a reward returned, e.g. ``returned non-finite scores: 2 NaN, 1 +inf of 4``."""
    raw = raw.detach().float()
    parts = [f"{n} {label}" for label, n in (
        ("NaN", int(torch.isnan(raw).sum())), ("+inf", int((raw == float("inf")).sum())),
        ("-inf", int((raw == float("-inf")).sum()))) if n]
    return f"returned non-finite scores: {', '.join(parts)} of {raw.numel()}"


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
    check_reward(name, kwargs)
    key = (name, repr(sorted(kwargs.items())))
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[name](**kwargs)
    return _INSTANCES[key]


def check_reward(name: str, kwargs: dict[str, Any] | None = None) -> None:
    """Raise a ValueError, before anything is built, for an unknown reward or a keyword its factory does not take
    (each with a did-you-mean). A run checks its rewards this way before it writes anything."""
    import difflib

    _import_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    problem = kwargs_problem(_REGISTRY[name], kwargs or {})
    if problem:
        raise ValueError(f"reward {name!r}: {problem}")


def kwargs_problem(fn: Callable[..., Any], kwargs: dict[str, Any]) -> str | None:
    """What is wrong with calling ``fn(**kwargs)``: a keyword it does not take (with the closest it does) or a
    required one missing; None when the call fits. A ``**kwargs`` factory checks what it forwards itself
    (``options=`` on the function: the callable those keywords go to)."""
    import difflib
    import inspect

    params = inspect.signature(fn).parameters
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    forwarded = getattr(fn, "options", None)
    accepted = set(named) | (set(inspect.signature(forwarded).parameters) if forwarded else set())
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values()) and forwarded is None
    unknown = [] if open_ended else sorted(k for k in kwargs if k not in accepted)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(accepted), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"unknown keyword {unknown[0]!r}{hint}; it takes: "
                f"{', '.join(sorted(k for k in accepted if not k.startswith('_'))) or 'nothing'}")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in kwargs]
    return f"the keyword {missing[0]!r} is required" if missing else None


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

    A sample fails when its reward raises, or returns NaN or ±inf. When a reward raises on the batch it is
    retried sample by sample, so one bad video costs one NaN.
    Returns the scores ``{name: [B]}`` (NaN where a sample failed) and, for every reward with a failed sample, its
    first error ``{name: message}``: the exception, the reward's own per-item message (``extras["errors"]``, e.g.
    a remote reward's), or which non-finite values it returned.
    """
    check_videos(videos, prompts)
    scores, errors = {}, {}
    for name, reward in rewards.items():
        try:
            raw = reward(videos, prompts)
            # every score lands on the videos' device, whichever path produced it, so callers can stack them
            scores[name] = check_scores(name, raw, videos.shape[0]).to(videos.device)
        except Exception:  # noqa: BLE001 - a scorer's failure must not lose the run
            scores[name], first = _score_one_by_one(name, reward, videos, prompts)
            if first is not None:
                errors[name] = first
            continue
        if torch.isnan(scores[name]).any():
            errors[name] = _item_error(reward) or _nonfinite_message(raw)
    return scores, errors


def _score_one_by_one(name: str, reward: Reward, videos: Tensor, prompts: list[str]) -> tuple[Tensor, str | None]:
    """Retry a batch that raised sample by sample -> (``[B]`` scores, NaN where a sample failed; the first sample
    error, None when every sample scored alone)."""
    out = torch.full((videos.shape[0],), float("nan"), device=videos.device)
    first: str | None = None
    for i in range(videos.shape[0]):
        try:
            raw = reward(videos[i : i + 1], prompts[i : i + 1])
            out[i] = check_scores(name, raw, 1)[0]
            if torch.isnan(out[i]) and first is None:
                first = _item_error(reward) or _nonfinite_message(raw)
        except Exception as e:  # noqa: BLE001
            first = first or f"{type(e).__name__}: {e}"
    return out, first


def _item_error(reward: Reward) -> str | None:
    """The first per-item message a reward left in ``extras["errors"]`` (``{index: message}``), if any."""
    errors = (getattr(reward, "extras", None) or {}).get("errors")
    if isinstance(errors, dict) and errors:
        return str(next(iter(errors.values())))
    return None


# ------------------------------------------------------------------------------------------------ failures


class RewardFailureError(ValueError):
    """Too many samples failed a reward. A ValueError, so the CLI prints its message (which says what to change)
    as one line, like a configuration error."""


@dataclass
class FailureReport:
    """Per reward: samples scored, samples failed (NaN after `score_all`), and the first error message seen.

    Build one per batch with `from_scores`, sum batches (or ranks) with `merge`, read it once per epoch.
    """

    scored: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores: dict[str, Tensor], errors: dict[str, str] | None = None) -> "FailureReport":
        """``scores`` ``{name: [N]}`` (NaN or ±inf where a sample failed) and ``errors`` ``{name: message}``."""
        errors = errors or {}
        failed = {name: int((~torch.isfinite(s)).sum()) for name, s in scores.items()}
        return cls(
            scored={name: int(s.numel()) for name, s in scores.items()},
            failed=failed,
            first_error={name: errors[name] for name in scores if failed[name] and name in errors},
        )

    def merge(self, other: "FailureReport") -> "FailureReport":
        """Counts summed; each reward keeps the earliest message (``self``'s first)."""
        names = list(dict.fromkeys([*self.scored, *other.scored]))
        return FailureReport(
            scored={n: self.scored.get(n, 0) + other.scored.get(n, 0) for n in names},
            failed={n: self.failed.get(n, 0) + other.failed.get(n, 0) for n in names},
            first_error={**other.first_error, **self.first_error},
        )

    def failed_frac(self) -> dict[str, float]:
        """``{name: failed / scored}`` in [0, 1] (0 for a reward that scored nothing)."""
        return {n: self.failed.get(n, 0) / s if s else 0.0 for n, s in self.scored.items()}

    def metrics(self) -> dict[str, float]:
        """``{"reward/<name>/failed_frac": share}`` for every reward, failing or not (a flat 0 is a fact too)."""
        return {f"reward/{n}/failed_frac": f for n, f in self.failed_frac().items()}

    def warning(self, epoch: int | None = None) -> str | None:
        """One line per failing reward naming it, its failed share and its first error; None when nothing failed.
        Print it yourself (e.g. to stderr): ``warnings.warn`` would show a repeated message only once."""
        lines = [
            f"reward {n} failed on {self.failed[n]} of {self.scored[n]} samples"
            f"{'' if epoch is None else f' in epoch {epoch}'}; first error: "
            f"{self.first_error.get(n, 'unknown (raised on another rank; see its log)')}"
            for n in self.scored if self.failed.get(n, 0)
        ]
        return "\n".join(f"warning: {line}" for line in lines) or None


def check_failures(report: FailureReport, max_failed_frac: float, names: Iterable[str] | None = None,
                   abort: bool = False) -> None:
    """Raise `RewardFailureError` when a reward's failed share exceeds ``max_failed_frac`` (in [0, 1]), or with
    ``abort`` (``rewards.on_error=abort``) when it failed on any sample; the message names the reward and its
    first error.

    Whatever ``rewards.on_error`` says: dropping or zeroing most of a batch silently trains on noise.
    ``names`` restricts the check (e.g. to the optimised rewards, leaving the monitors to the warning).
    """
    if not 0 <= max_failed_frac <= 1:
        raise ValueError(f"max_failed_frac must lie in [0, 1]; got {max_failed_frac}")
    keep = None if names is None else set(names)
    limit = 0.0 if abort else max_failed_frac
    over = {n: f for n, f in report.failed_frac().items()
            if f > limit and report.failed.get(n, 0) and (keep is None or n in keep)}
    if over:
        name, frac = max(over.items(), key=lambda kv: kv[1])
        why, fix = ((" and rewards.on_error=abort", "or set rewards.on_error=zero or drop to train on what still "
                     "scores") if abort else
                    (f", over rewards.max_failed_frac={max_failed_frac:g}", "or raise rewards.max_failed_frac to "
                     "train on what still scores"))
        raise RewardFailureError(
            f"reward {name} failed on {report.failed[name]} of {report.scored[name]} samples ({frac:.0%}){why}; "
            f"first error: {report.first_error.get(name, 'unknown (raised on another rank)')}. Fix the reward (or "
            f"its server), {fix}"
        )
