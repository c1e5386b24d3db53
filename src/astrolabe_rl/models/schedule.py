"""Flow-matching schedule of the distilled Wan models: shift warp, sigma(t), x0 <-> velocity, re-noise.

Convention (all families, `reference/ar_models.md` §2.6):

    x_t = (1 - σ)·x0 + σ·ε,      the network predicts v = ε - x0,      x̂0 = x_t - σ·v̂,      σ = t / 1000.

Timesteps live on the 0..1000 scale. A *raw* step list such as Self-Forcing's ``[1000, 750, 500, 250]`` is
*warped* through the shift before use: ``t = 1000 · shift(t_raw / 1000)`` with
``shift(u) = s·u / (1 + (s - 1)·u)``, which with s = 5 gives ``[1000, 937.5, 833.33, 625]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: float | Tensor, shift: float) -> float | Tensor:
    """The time-shift warp ``σ = s·u / (1 + (s - 1)·u)`` for ``u ∈ [0, 1]``; identity for ``shift == 1``."""
    return shift * u / (1 + (shift - 1) * u)


def warp_timesteps(raw: tuple[float, ...] | list[float], shift: float) -> tuple[float, ...]:
    """Map raw timesteps (0..1000) through the shift, as the official ``warp_denoising_step`` does.

    The official code indexes a 1000-point shifted grid at ``1000 - t_raw``; for integer ``t_raw`` that is exactly
    ``1000 · shift(t_raw / 1000)``, computed here in float64.
    """
    out = []
    for t in raw:
        if not 0 <= t <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"raw timestep {t} is outside [0, {NUM_TRAIN_TIMESTEPS}]")
        out.append(NUM_TRAIN_TIMESTEPS * float(shift_sigma(float(t) / NUM_TRAIN_TIMESTEPS, shift)))
    return tuple(out)


def sigma_of(t: float | Tensor) -> float | Tensor:
    """σ(t) = t / 1000 (the shift is already inside the warped timesteps)."""
    return t / NUM_TRAIN_TIMESTEPS


def _broadcast_sigma(sigma: float | Tensor, like: Tensor) -> Tensor:
    """σ as float64 broadcastable to ``like`` ``[B, F, C, H, W]``: a scalar, ``[B]`` or per-frame ``[B, F]``."""
    if isinstance(sigma, (int, float)):  # filled on the device: no host-to-device copy per sampler step
        return torch.full((1,) * like.dim(), float(sigma), dtype=torch.float64, device=like.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=like.device)
    while s.dim() < like.dim():
        s = s.unsqueeze(-1)
    return s


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: float | Tensor) -> Tensor:
    """``x̂0 = x_t - σ·v̂`` in float64, cast back to ``x_t``'s dtype. Shapes ``[B, F, C, H, W]``."""
    s = _broadcast_sigma(sigma, x_t)
    return (x_t.double() - s * v.double()).to(x_t.dtype)


def velocity_from_x0(x_t: Tensor, x0: Tensor, sigma: float | Tensor) -> Tensor:
    """``v = (x_t - x0) / σ`` in float64 (σ > 0), cast back to ``x_t``'s dtype."""
    s = _broadcast_sigma(sigma, x_t)
    if torch.any(s <= 0):
        raise ValueError("velocity_from_x0 needs σ > 0; at σ = 0 the velocity is undefined")
    return ((x_t.double() - x0.double()) / s).to(x_t.dtype)


def renoise(x0: Tensor, sigma: float | Tensor, noise: Tensor) -> Tensor:
    """Forward process ``x_σ = (1 - σ)·x0 + σ·ε`` in float64, cast back to ``x0``'s dtype."""
    s = _broadcast_sigma(sigma, x0)
    return ((1 - s) * x0.double() + s * noise.double()).to(x0.dtype)


@dataclass(frozen=True)
class StepSchedule:
    """The few-step sampler's timesteps of one model family (already warped, 0..1000 scale).

    Attributes:
        timesteps: the denoising steps of every block, first is the pure-noise level (normally 1000).
        first_block_timesteps: a different list for the first block (Causal Forcing++ 1/2-step models use
            4 steps there), or None to use ``timesteps``.
        context_timestep: the timestep of the clean pass that writes a block into the KV cache (0 = clean).
        shift: the flow shift the list was warped with (kept for training-time σ sampling).
    """

    timesteps: tuple[float, ...]
    first_block_timesteps: tuple[float, ...] | None = None
    context_timestep: float = 0.0
    shift: float = 5.0

    def __post_init__(self) -> None:
        for name, ts in (("timesteps", self.timesteps), ("first_block_timesteps", self.first_block_timesteps)):
            if ts is None:
                continue
            if len(ts) == 0:
                raise ValueError(f"StepSchedule.{name} is empty; give at least one timestep")
            if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts):
                raise ValueError(f"StepSchedule.{name}={ts}: every step must lie in (0, 1000]")
            if any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"StepSchedule.{name}={ts} must be strictly decreasing")
        if not 0 <= self.context_timestep < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"context_timestep={self.context_timestep} must lie in [0, 1000)")

    def for_block(self, first: bool) -> tuple[float, ...]:
        """The timesteps of a block; ``first`` is True for the video's first block (latent frame 0)."""
        if first and self.first_block_timesteps is not None:
            return self.first_block_timesteps
        return self.timesteps


def self_forcing_steps() -> StepSchedule:
    """Self-Forcing / Causal Forcing (chunk- and frame-wise) / LongLive: shift 5, warped [1000, 750, 500, 250]."""
    return StepSchedule(warp_timesteps((1000, 750, 500, 250), 5.0), shift=5.0)


def causvid_steps() -> StepSchedule:
    """CausVid: shift 8, three *unwarped* steps [1000, 757, 522] (σ = 1, .757, .522)."""
    return StepSchedule((1000.0, 757.0, 522.0), shift=8.0)


def causal_forcing_pp_steps(num_steps: int) -> StepSchedule:
    """Causal Forcing++ frame-wise 1- or 2-step models: the first block keeps the 4-step list.

    2 steps: warped [1000, 500] = (1000, 833.33); 1 step: [1000].
    """
    raw = {1: (1000,), 2: (1000, 500)}
    if num_steps not in raw:
        raise ValueError(f"Causal Forcing++ ships 1- and 2-step models, not {num_steps}")
    return StepSchedule(
        warp_timesteps(raw[num_steps], 5.0),
        first_block_timesteps=warp_timesteps((1000, 750, 500, 250), 5.0),
        shift=5.0,
    )
