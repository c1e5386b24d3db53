"""Cheap pixel-statistic rewards and reward-hacking monitors.

Every function maps videos ``[B, T, 3, H, W]`` (float in [0, 1]) to ``[B]`` float32, vectorised over frames.
Each is registered under its name as a `FunctionReward` factory:

| name             | measures                                                   | range     | default monitor |
|------------------|------------------------------------------------------------|-----------|-----------------|
| brightness       | mean BT.601 luma                                           | [0, 1]    | yes             |
| saturation       | mean HSV saturation (max−min)/max                          | [0, 1]    | yes             |
| sharpness        | variance of the 3×3 Laplacian of luma, mean over frames    | [0, 16]   | no              |
| colour_entropy   | entropy of the quantised RGB histogram / its maximum       | [0, 1]    | yes             |
| temporal_flicker | mean |Δ| of per-frame mean luma between consecutive frames | [0, 1]    | yes             |
| motion_energy    | mean |Δ| of mean-removed luma between consecutive frames   | [0, 2]    | no              |

Monitors catch the usual hacks of learned rewards: over-exposure (brightness), over-saturation, colour
collapse (entropy), flicker, and blur or frozen video (sharpness, motion_energy). sharpness and motion_energy are
also usable as cheap "higher is better" rewards, hence not monitors by default; every factory takes
``monitor=`` to override.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from astrolabe_rl.rewards.base import FunctionReward, Reward, check_videos, register_reward

_LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, the usual choice for "perceived brightness"


def luma(videos: Tensor) -> Tensor:
    """``[B, T, 3, H, W]`` -> ``[B, T, H, W]`` float32 luma."""
    w = torch.tensor(_LUMA_WEIGHTS, dtype=torch.float32, device=videos.device)
    return torch.einsum("btchw,c->bthw", videos.float(), w)


def brightness(videos: Tensor) -> Tensor:
    """Mean luma over all frames and pixels: ``[B, T, 3, H, W]`` -> ``[B]``."""
    return luma(videos).mean(dim=(1, 2, 3))


def saturation(videos: Tensor) -> Tensor:
    """Mean HSV saturation (max − min)/max per pixel (0 for black pixels): ``[B, T, 3, H, W]`` -> ``[B]``."""
    v = videos.float()
    hi, lo = v.amax(dim=2), v.amin(dim=2)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    return sat.mean(dim=(1, 2, 3))


def luma_laplacian(videos: Tensor) -> Tensor:
    """The 4-neighbour 3×3 Laplacian of luma per frame, 'valid' borders: ``[B, T, 3, H, W]`` -> ``[B, T, H-2, W-2]``."""
    b, t, _, h, w = videos.shape
    if h < 3 or w < 3:
        raise ValueError(f"the luma Laplacian needs frames of at least 3×3 pixels; got {h}×{w}")
    y = luma(videos).reshape(b * t, 1, h, w)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=y.device)
    lap = F.conv2d(y, kernel.view(1, 1, 3, 3))  # no padding: zero-padded borders would read as edges
    return lap.view(b, t, h - 2, w - 2)


def sharpness(videos: Tensor) -> Tensor:
    """Variance of the 3×3 Laplacian of luma per frame ('valid' borders), mean over frames: ``[B]``.

    Blur lowers it, noise and ringing raise it. A one-pixel 0/1 checkerboard scores 16 (Laplacian ±4), the
    maximum for inputs in [0, 1]; a constant frame scores 0.
    """
    return luma_laplacian(videos).flatten(2).var(dim=2, correction=0).mean(dim=1)


def colour_entropy(videos: Tensor, bins: int = 8) -> Tensor:
    """Shannon entropy of the video's joint RGB histogram (``bins`` levels per channel), divided by its maximum
    log(bins³), so 0 = a single colour and 1 = all bins³ colours equally often: ``[B]``.
    """
    b = videos.shape[0]
    q = (videos.float().clamp(0, 1) * bins).long().clamp_max(bins - 1)  # [B, T, 3, H, W] bin per channel
    code = (q[:, :, 0] * bins + q[:, :, 1]) * bins + q[:, :, 2]  # [B, T, H, W] joint colour bin
    code = code.reshape(b, -1)
    ones = torch.ones_like(code, dtype=torch.float32)
    counts = torch.zeros(b, bins**3, device=videos.device).scatter_add_(1, code, ones)
    p = counts / counts.sum(dim=1, keepdim=True)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)  # 0·log 0 = 0 thanks to the clamp
    return ent / (3 * math.log(bins))


def temporal_flicker(videos: Tensor) -> Tensor:
    """Mean absolute change of the per-frame mean luma between consecutive frames: ``[B]``; 0 for one frame.

    Global brightness pumping scores high; an object moving over a steady background barely changes it.
    """
    m = luma(videos).mean(dim=(2, 3))  # [B, T]
    if m.shape[1] < 2:
        return torch.zeros(m.shape[0], device=videos.device)
    return (m[:, 1:] - m[:, :-1]).abs().mean(dim=1)


def motion_energy(videos: Tensor) -> Tensor:
    """Mean absolute frame-to-frame change of luma after removing each frame's mean: ``[B]``; 0 for one frame.

    Removing the frame mean keeps global flicker (see ``temporal_flicker``) from counting as motion, so a
    frozen video scores 0 whatever its brightness does.
    """
    y = luma(videos)
    if y.shape[1] < 2:
        return torch.zeros(y.shape[0], device=videos.device)
    y = y - y.mean(dim=(2, 3), keepdim=True)
    return (y[:, 1:] - y[:, :-1]).abs().mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------------ registry


def _wrap(name: str, fn: Callable[[Tensor], Tensor], scale: tuple[float, float], monitor: bool) -> Reward:
    def score(videos: Tensor, prompts: list[str]) -> Tensor:
        check_videos(videos)
        return fn(videos)

    return FunctionReward(name=name, fn=score, needs=frozenset({"video"}), scale=scale, monitor=monitor)


@register_reward("brightness")
def _brightness_reward(monitor: bool = True) -> Reward:
    return _wrap("brightness", brightness, (0.0, 1.0), monitor)


@register_reward("saturation")
def _saturation_reward(monitor: bool = True) -> Reward:
    return _wrap("saturation", saturation, (0.0, 1.0), monitor)


@register_reward("sharpness")
def _sharpness_reward(monitor: bool = False) -> Reward:
    return _wrap("sharpness", sharpness, (0.0, 16.0), monitor)


@register_reward("colour_entropy")
def _colour_entropy_reward(bins: int = 8, monitor: bool = True) -> Reward:
    if not 2 <= bins <= 64:
        raise ValueError(f"colour_entropy bins must be in [2, 64] levels per channel (default 8); got {bins}")
    return _wrap("colour_entropy", lambda v: colour_entropy(v, bins), (0.0, 1.0), monitor)


@register_reward("temporal_flicker")
def _temporal_flicker_reward(monitor: bool = True) -> Reward:
    return _wrap("temporal_flicker", temporal_flicker, (0.0, 1.0), monitor)


@register_reward("motion_energy")
def _motion_energy_reward(monitor: bool = False) -> Reward:
    return _wrap("motion_energy", motion_energy, (0.0, 2.0), monitor)
