"""Combine several reward components into the one scalar the advantage uses (DESIGN §3 "Reward").

    raw     (release):  R_i = Σ_k w_k · s_k,i
    group_z:            R_i = Σ_k w_k · (s_k,i − mean_{g(i)} s_k) / (std_{g(i)} s_k + eps)

where g(i) is sample i's prompt group and the group statistics skip NaN. ``raw`` sums the scorers' native scales
(HPSv3 is unnormalised, VideoAlign z-scored), so a wide-scaled reward can dominate; ``group_z`` puts every
component on the same footing within each prompt first (reference/astrolabe.md §7.4). A non-finite score (NaN,
±inf) is a failed sample: it enters as NaN, so an inf can never become an infinite advantage.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from astrolabe_rl.algo.advantages import group_advantages


def combine_rewards(
    scores: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor,
    mode: Literal["raw", "group_z"] = "raw",
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of reward components.

    scores: ``{name: [N]}`` for every scored component (rewards and monitors), NaN (or ±inf) where a sample
        failed; both are read as NaN.
    weights: ``{name: w}`` for the components that enter the sum; every name must be in ``scores``; components
        with weight 0 or absent from ``weights`` are not summed (monitors), so their NaNs cost nothing.
    group_ids: ``[N]`` integer prompt id per sample. mode: ``"raw"`` or ``"group_z"`` (see the module docstring).
    eps: added to the group std in ``group_z``; a group whose component is constant (or of size 1) gets 0.
    Returns ``(total [N], norm)`` with ``norm = {name: [N]}`` the values actually summed for every component of
    ``scores`` (raw mode: the raw scores; group_z: the group z-scores), all float32. ``total`` is NaN for a
    sample when any summed component is NaN there: a partial sum would bias its advantage; the caller drops it.
    """
    if mode not in ("raw", "group_z"):
        raise ValueError(f"mode must be 'raw' (release) or 'group_z' (z-score per prompt group); got {mode!r}")
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise ValueError(f"weights name rewards that were not scored: {missing}; scored: {sorted(scores)}")
    active = {k: float(w) for k, w in weights.items() if w != 0}
    if not active:
        raise ValueError(f"at least one reward needs a non-zero weight; got weights {weights}")
    for name, s in scores.items():
        if s.shape != group_ids.shape or s.dim() != 1:
            raise ValueError(f"score {name!r} has shape {tuple(s.shape)}; expected [N] = {tuple(group_ids.shape)}")
    finite = {k: torch.where(torch.isfinite(s), s.float(), float("nan")) for k, s in scores.items()}
    if mode == "raw":
        norm = finite
    else:  # a per-group z-score is exactly a group advantage with the group's own std
        norm = {k: group_advantages(s, group_ids, std="group", eps=eps) for k, s in finite.items()}
    total = sum(w * norm[k] for k, w in active.items())
    return total, norm
