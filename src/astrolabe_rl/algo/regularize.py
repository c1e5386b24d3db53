"""Uncertainty-aware selective KL and the dynamic reference, as pure functions (DESIGN §3; reference/astrolabe.md
§4.2 and §7.5; GARDO, arXiv 2512.24138).

The KL term ‖x̂0_θ − x̂0_ref‖² (`algo.nft.kl_term`) is applied only to the samples whose main reward is *not backed*
by the auxiliary rewards: where the main reward is optimistic, reward hacking is likely, so the policy is held to
the reference there and left free elsewhere. Over the N samples gathered in an epoch (every rank), with ``s_k [N]``
the raw scores of reward k:

    rank_k(i)     1 = the highest score of reward k, N the lowest (ties share their mean rank)
    U_i           sign="optimism" (default):  U_i = mean_k rank_aux,k(i) − rank_main(i)
                  sign="release":             U_i = rank_main(i) − mean_k rank_aux,k(i)
    P             {U_i : U_i ≥ 0}
    τ             percentile(P, 100 − 100·ρ)            (linear interpolation, numpy's default)
    m_i           [U_i > τ]                              the KL mask, about the top ρ share of P

``optimism`` penalises a sample the main reward ranks high and the auxiliaries rank low: the paper's "lacking
auxiliary consensus" and GARDO's "proxy over-optimistic". The released code subtracts the other way round (rank 1 =
best), which selects the opposite case, main low / auxiliaries high; ``release`` reproduces it. The win-rate variant
(GARDO's description) scores w_k(i) = the share of the *other members of sample i's prompt group* that reward k ranks
below i (ties count ½), and U_i = w_main(i) − mean_k w_aux,k(i) (negated for ``release``). Taken over the whole epoch
a win-rate is an affine function of the rank and would select the same samples, so the win-rate is taken within the
prompt group: it asks whether the main reward's preference *among videos of one prompt* is shared.

ρ adapts each epoch (the released ``RiskCompensator``): with B the last ``buffer_size`` (20) values of mean(P), ρ ←
1.1·ρ when this epoch's mean(P) is above every value in B, ρ ← 0.9·ρ when below every one, then ρ is clipped to
[0.02, 0.2] and mean(P) joins B. A rising disagreement widens the selection, a falling one narrows it.

The dynamic reference (`should_reset`, `next_threshold`): at the start of an epoch the reference adapter is
hard-copied from θ when the last step's KL over the selected samples (all-reduced) exceeded the threshold (0.15 to
start), or when more than ``max_gap`` (15) epochs passed since the last copy. After a copy the threshold moves with
the gap between the two copies: a gap > 15 lowers it by 0.01 (not below 0.1); a gap < 5 raises it by 0.01, capped
at 0.05 as released — a quirk: a threshold of at least 0.1 then *drops* to 0.05, so frequent copies make the next
copy come sooner. ``clamp="corrected"`` caps the raise at ``high`` (0.2) instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from astrolabe_rl.algo.advantages import group_index

Sign = Literal["optimism", "release"]
Measure = Literal["rank", "winrate"]
Clamp = Literal["release", "corrected"]
RELEASE_RAISE_CAP = 0.05  # the released code's cap on a raised threshold (the quirk; see the module docstring)


def ranks(scores: Tensor) -> Tensor:
    """Descending ranks ``[N]`` -> ``[N]`` float64: 1 for the highest finite score, ties share their mean rank
    (``[3, 1, 3]`` -> ``[1.5, 3, 1.5]``); non-finite scores get NaN and are not counted."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [N] (one score per sample); got {tuple(scores.shape)}")
    x = scores.double()
    ok = torch.isfinite(x)
    v = torch.where(ok, x, 0.0)
    higher = ((v[None, :] > v[:, None]) & ok[None, :]).sum(1).double()  # finite samples that beat i
    tied = ((v[None, :] == v[:, None]) & ok[None, :]).sum(1).double()  # i itself included
    return torch.where(ok, higher + (tied + 1) / 2, torch.nan)


def win_rates(scores: Tensor, group_ids: Tensor) -> Tensor:
    """Within-group win-rate ``[N]`` float64: the share of the other finite members of sample i's group that score
    below i (ties count ½). NaN for a non-finite score or a sample with no finite group-mate."""
    if scores.shape != group_ids.shape or scores.dim() != 1:
        raise ValueError(f"scores and group_ids must both be [N]; got {tuple(scores.shape)} and {tuple(group_ids.shape)}")
    idx, _ = group_index(group_ids)
    x = scores.double()
    ok = torch.isfinite(x)
    v = torch.where(ok, x, 0.0)
    mates = (idx[None, :] == idx[:, None]) & ok[None, :] & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    wins = ((v[None, :] < v[:, None]) & mates).sum(1) + 0.5 * ((v[None, :] == v[:, None]) & mates).sum(1)
    n = mates.sum(1).double()
    return torch.where(ok & (n > 0), wins / n, torch.nan)


def uncertainty(
    main: Tensor,
    auxiliary: Sequence[Tensor],
    sign: Sign = "optimism",
    measure: Measure = "rank",
    group_ids: Tensor | None = None,
) -> Tensor:
    """U ``[N]`` float64 of the module docstring from the main reward's scores ``[N]`` and one or two auxiliaries'.

    ``measure="rank"``: ranks over all N samples (released); ``"winrate"``: win-rates within the prompt groups
    ``group_ids [N]`` (required then). Positive U = the samples the KL may select. NaN where any score is NaN.
    """
    if sign not in ("optimism", "release"):
        raise ValueError(f"sign must be 'optimism' (penalise main-reward optimism) or 'release'; got {sign!r}")
    if not 1 <= len(auxiliary) <= 2:
        raise ValueError(f"give one or two auxiliary rewards (as released); got {len(auxiliary)}")
    if any(a.shape != main.shape for a in auxiliary):
        raise ValueError(f"every auxiliary score tensor must match the main one, {tuple(main.shape)}")
    if measure == "rank":
        aux = torch.stack([ranks(a) for a in auxiliary]).mean(0)
        optimism = aux - ranks(main)  # main ranks i better (smaller number) than the auxiliaries do
    elif measure == "winrate":
        if group_ids is None:
            raise ValueError("measure='winrate' compares samples within their prompt group: pass group_ids [N]")
        aux = torch.stack([win_rates(a, group_ids) for a in auxiliary]).mean(0)
        optimism = win_rates(main, group_ids) - aux
    else:
        raise ValueError(f"measure must be 'rank' (released) or 'winrate' (GARDO); got {measure!r}")
    return optimism if sign == "optimism" else -optimism


def _non_negative(u: Tensor) -> Tensor:
    """P = the finite U ≥ 0, float64."""
    return u[torch.isfinite(u) & (u >= 0)].double()


def mean_non_negative(u: Tensor) -> float:
    """mean(P), P = {U ≥ 0}: what ρ adapts on (NaN when P is empty)."""
    pos = _non_negative(u)
    return float(pos.mean()) if pos.numel() else float("nan")


def select(u: Tensor, rho: float) -> tuple[Tensor, float]:
    """The KL mask ``m_i = [U_i > τ]`` ``[N]`` bool and ``τ = percentile(P, 100 − 100·ρ)``, P = {U ≥ 0} (τ NaN and
    nobody selected when P is empty); u ``[N]``, NaN never selected.

    Strict ``>`` as released: when the top of P is tied (e.g. all of P equal) nobody is selected.
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho (the share of the non-negative U that the KL covers) must lie in (0, 1]; got {rho}")
    pos = _non_negative(u)
    if pos.numel() == 0:
        return torch.zeros_like(u, dtype=torch.bool), float("nan")
    tau = float(torch.quantile(pos, 1.0 - rho))
    return torch.nan_to_num(u, nan=-1.0) > tau, tau


def adapt_rho(
    rho: float,
    mean_pos: float,
    buffer: Sequence[float],
    low: float = 0.02,
    high: float = 0.2,
    buffer_size: int = 20,
    up: float = 1.1,
    down: float = 0.9,
) -> tuple[float, list[float]]:
    """One step of the released ``RiskCompensator``: returns the new ρ and buffer (see the module docstring).

    ρ grows by ``up`` when ``mean_pos`` exceeds every buffered value, shrinks by ``down`` when it is below every
    one, and is clipped to [low, high]; an empty buffer changes nothing but is filled. A NaN ``mean_pos`` (no
    U ≥ 0 this epoch) leaves ρ and the buffer as they are.
    """
    if not 0 < low <= high <= 1:
        raise ValueError(f"ρ bounds must satisfy 0 < low <= high <= 1; got low={low}, high={high}")
    buf = list(buffer)
    if mean_pos != mean_pos:  # NaN
        return rho, buf
    if buf and mean_pos > max(buf):
        rho *= up
    elif buf and mean_pos < min(buf):
        rho *= down
    buf = (buf + [mean_pos])[-buffer_size:]
    return min(max(rho, low), high), buf


def should_reset(last_kl: float | None, threshold: float, epochs_since: int, max_gap: int = 15) -> bool:
    """Copy θ into the reference now? When the last step's selected KL exceeded ``threshold``, or more than
    ``max_gap`` epochs passed since the last copy. ``last_kl=None`` (no step yet) only counts the gap."""
    return (last_kl is not None and last_kl > threshold) or epochs_since > max_gap


def next_threshold(
    threshold: float,
    gap: int,
    clamp: Clamp = "release",
    step: float = 0.01,
    low: float = 0.1,
    high: float = 0.2,
    long_gap: int = 15,
    short_gap: int = 5,
) -> float:
    """The KL threshold after a reference copy that came ``gap`` epochs after the previous one (module docstring):
    ``gap > long_gap`` -> max(threshold − step, low); ``gap < short_gap`` -> min(threshold + step, cap) with cap
    0.05 (``clamp="release"``, the quirk) or ``high`` (``"corrected"``); otherwise unchanged."""
    if clamp not in ("release", "corrected"):
        raise ValueError(f"clamp must be 'release' (the released 0.05 cap) or 'corrected'; got {clamp!r}")
    if gap > long_gap:
        return max(threshold - step, low)
    if gap < short_gap:
        return min(threshold + step, RELEASE_RAISE_CAP if clamp == "release" else high)
    return threshold


@dataclass
class RegularizerState:
    """What selective KL and the dynamic reference carry from epoch to epoch (checkpointed, so a resume is exact)."""

    rho: float = 0.1
    buffer: list[float] = field(default_factory=list)  # the last mean(P) values
    threshold: float = 0.15  # the dynamic reference's KL threshold
    last_reset: int = 0  # epoch of the last reference copy (the reference starts as θ at epoch 0)
    resets: int = 0  # copies so far
    last_kl: float | None = None  # the last step's selected KL, all-reduced

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "RegularizerState":
        return cls(**state)
