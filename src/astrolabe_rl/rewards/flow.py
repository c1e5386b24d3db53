"""Optical-flow motion reward: rewards motion that is present and smooth, never a frozen video.

A smoothness-only flow reward is maximal for a static video (`reference/rewards.md` §4), and a thresholded
"dynamic degree" is passed by any camera shake. This reward has two terms, both zero for a static video:

* ``magnitude`` = ``1 - exp(-m / m0)``: m is how far the moving pixels travel per frame pair (the mean of the top
  ``quantile`` fraction of per-pixel flow lengths, as a fraction of the frame diagonal), saturating at ``m0`` so
  ever-faster motion earns nothing more;
* ``smoothness`` = ``magnitude · exp(-k · jitter)``: jitter is the frame-to-frame change of the moving region's
  mean flow vector and mean speed, relative to its mean speed (0 for steady motion, about 2 for shaking back and
  forth). Gating by ``magnitude`` keeps a still video from scoring "perfectly smooth".

The reward ``flow`` is ``(1 - w)·magnitude + w·smoothness`` (``w = 0.5``); ``flow_magnitude`` and
``flow_smoothness`` are the terms alone, and every call leaves ``magnitude``, ``smoothness``, ``jitter`` and
``pixels_per_pair`` in ``extras``.

Flow estimators:
    ``raft``  torchvision's RAFT (``raft_large`` / ``raft_small``), inputs scaled to [-1, 1], sides multiples of 8.
              Weights: a torchvision RAFT state dict, default
              ``$ASTROLABE_REWARD_ROOT/raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth`` (the file torchvision fetches for
              ``Raft_Large_Weights.C_T_SKHT_V2``); nothing is downloaded.
    ``lk``    a dependency-free pyramidal Lucas-Kanade in torch: a few hundredths of a pixel on textured
              translations, blurred at motion boundaries; runs anywhere (tests, CPU smoke runs, machines without
              torchvision).

Statistics skip a 5 % margin on every side, where content enters or leaves the frame and no estimator is reliable.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from astrolabe_rl.rewards._common import find_path, resolve_device, shared, uniform_indices
from astrolabe_rl.rewards.base import check_videos, register_reward

FlowFn = Callable[[Tensor, Tensor], Tensor]
RAFT_FILE = "raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth"

# ------------------------------------------------------------------------------------------ estimators


def lucas_kanade(a: Tensor, b: Tensor, levels: int = 4, iters: int = 5, window: int = 7, smooth: int = 5) -> Tensor:
    """Dense flow from frames ``a`` to ``b`` ``[N, 3, H, W]`` in [0, 1] -> ``[N, 2, H, W]`` (dx, dy) in pixels.

    Coarse-to-fine Lucas-Kanade: at each pyramid level the previous flow is upsampled, ``b`` is warped back by it,
    and the residual is solved per pixel from the structure tensor summed over a ``window``-pixel box. Each update
    is clipped to ±1 px (the linearisation holds only that far), skipped where the structure tensor's smaller
    eigenvalue says there is no texture, and followed by a ``smooth``-pixel box filter of the flow, which carries
    motion into flat regions and keeps the iteration stable. Handles shifts up to about ``2^levels`` pixels; on a
    textured translation it is accurate to a few hundredths of a pixel.
    """
    ga, gb = _gray(a), _gray(b)
    pyramid = [(ga, gb)]
    for _ in range(levels - 1):
        if min(pyramid[-1][0].shape[-2:]) < 2 * window:
            break
        pyramid.append((F.avg_pool2d(pyramid[-1][0], 2), F.avg_pool2d(pyramid[-1][1], 2)))
    flow = torch.zeros_like(pyramid[-1][0]).expand(-1, 2, -1, -1).contiguous()
    for la, lb in reversed(pyramid):
        if flow.shape[-2:] != la.shape[-2:]:
            flow = 2 * F.interpolate(flow, size=la.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iters):
            flow = _box(flow + _lk_step(la, _warp(lb, flow), window), smooth)
    return flow


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() * w).sum(dim=1, keepdim=True)


def _box(x: Tensor, size: int) -> Tensor:
    """Mean over a ``size``×``size`` box with replicated borders (same shape out)."""
    if size <= 1:
        return x
    return F.avg_pool2d(F.pad(x, (size // 2,) * 4, mode="replicate"), size, stride=1)


def _warp(img: Tensor, flow: Tensor) -> Tensor:
    """Sample ``img`` at ``x + flow(x)`` (bilinear, border-clamped)."""
    n, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=img.dtype),
                            torch.arange(w, device=img.device, dtype=img.dtype), indexing="ij")
    gx = 2 * (xs + flow[:, 0]) / max(w - 1, 1) - 1
    gy = 2 * (ys + flow[:, 1]) / max(h - 1, 1) - 1
    return F.grid_sample(img, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def _lk_step(a: Tensor, b: Tensor, window: int) -> Tensor:
    """One Lucas-Kanade update ``[N, 2, H, W]`` aligning ``b`` onto ``a``, clipped to ±1 px."""
    avg = F.pad(0.5 * (a + b), (1, 1, 1, 1), mode="replicate")
    ix = 0.5 * (avg[..., 1:-1, 2:] - avg[..., 1:-1, :-2])  # central differences
    iy = 0.5 * (avg[..., 2:, 1:-1] - avg[..., :-2, 1:-1])
    it = b - a

    def box(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    xx, xy, yy, xt, yt = box(ix * ix), box(ix * iy), box(iy * iy), box(ix * it), box(iy * it)
    det = xx * yy - xy * xy
    # textured where the smaller eigenvalue is not negligible next to the frame's typical one (Shi-Tomasi)
    lam_min = 0.5 * (xx + yy) - torch.sqrt((0.5 * (xx - yy)) ** 2 + xy * xy)
    ok = lam_min > 0.01 * lam_min.mean(dim=(-2, -1), keepdim=True) + 1e-12
    det = torch.where(ok, det, torch.ones_like(det))
    du = torch.where(ok, -(yy * xt - xy * yt) / det, torch.zeros_like(det))
    dv = torch.where(ok, -(xx * yt - xy * xt) / det, torch.zeros_like(det))
    return torch.cat([du, dv], dim=1).clamp(-1.0, 1.0)


class RaftFlow:
    """torchvision RAFT as a flow function ``(a, b) [N, 3, H, W] in [0, 1] -> [N, 2, H, W]`` pixels.

    Args:
        weights: a torchvision RAFT state dict (see the module docstring), or None with ``random_weights``.
        small: ``raft_small`` instead of ``raft_large``.
        iters: refinement iterations (torchvision's default 12; VBench uses 20).
        random_weights: the real architecture with random weights (benchmarks only; the flow is meaningless).
    """

    def __init__(self, weights: str | None = None, *, small: bool = False, iters: int = 12,
                 device: torch.device = torch.device("cpu"), random_weights: bool = False) -> None:
        try:
            from torchvision.models.optical_flow import raft_large, raft_small
        except Exception as e:  # a torchvision built for another torch fails with RuntimeError/OSError, not ImportError
            raise ImportError(
                f"the RAFT flow backend needs a working torchvision ({type(e).__name__}: {e}). Install the "
                "torchvision that matches your torch, or use backend='lk' (pure torch, no weights)."
            ) from e
        self.model = (raft_small if small else raft_large)(weights=None, progress=False)
        if not random_weights:
            path = find_path(weights, RAFT_FILE, "RAFT weights",
                             "Use the state dict torchvision stores for Raft_Large_Weights.C_T_SKHT_V2 "
                             "(raft_large_C_T_SKHT_V2-ff5fadd5.pth), or backend='lk'")
            self.model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.iters = iters

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        h, w = a.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"RAFT needs sides divisible by 8; got {h}×{w}")
        return self.model(2 * a - 1, 2 * b - 1, num_flow_updates=self.iters)[-1]


# -------------------------------------------------------------------------------------------- the terms


def pair_stats(flow: Tensor, quantile: float = 0.05, moving: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair motion summary of flows ``[B, P, 2, H, W]`` in units of the frame diagonal.

    Returns:
        top: mean length of the top ``quantile`` fraction of pixels ``[B, P]``.
        speed: mean length over moving pixels (length > ``moving``) ``[B, P]`` (0 if none move).
        mean_vec: mean flow vector over moving pixels ``[B, P, 2]``.
    """
    length = flow.norm(dim=2).flatten(2)  # [B, P, HW]
    k = max(1, int(length.shape[-1] * quantile))
    top = length.topk(k, dim=-1).values.mean(-1)
    mask = (length > moving).float()
    count = mask.sum(-1).clamp_min(1)
    speed = (length * mask).sum(-1) / count
    mean_vec = (flow.flatten(3) * mask[:, :, None]).sum(-1) / count[..., None]
    return top, speed, mean_vec


def jitter(speed: Tensor, mean_vec: Tensor, eps: float = 1e-6) -> Tensor:
    """Relative frame-to-frame change of the motion ``[B]``:
    ``mean_t(|Δ mean_vec| + |Δ speed|) / (mean speed + eps)``.
    0 for steady motion (and for too few pairs), about 2 for motion that reverses every pair."""
    if speed.shape[1] < 2:
        return torch.zeros(speed.shape[0], device=speed.device)
    change = (mean_vec.diff(dim=1).norm(dim=-1) + speed.diff(dim=1).abs()).mean(dim=1)
    return change / (speed.mean(dim=1) + eps)


def motion_terms(flow: Tensor, m0: float = 0.01, k: float = 2.0, quantile: float = 0.05,
                 margin: float = 0.05) -> dict[str, Tensor]:
    """Flows ``[B, P, 2, H, W]`` (pixels) -> ``magnitude``, ``smoothness``, ``jitter``, ``pixels_per_pair`` ``[B]``.

    A ``margin`` fraction of each side is left out: where content enters or leaves the frame there is nothing to
    match, and every estimator's flow is unreliable there.
    """
    h, w = flow.shape[-2:]
    diag = math.hypot(h, w)
    mh, mw = max(1, round(margin * h)) if margin else 0, max(1, round(margin * w)) if margin else 0
    top, speed, mean_vec = pair_stats(flow[..., mh:h - mh, mw:w - mw] / diag, quantile)
    m = top.mean(dim=1)
    magnitude = 1 - torch.exp(-m / m0)
    j = jitter(speed, mean_vec)
    return {"magnitude": magnitude, "smoothness": magnitude * torch.exp(-k * j), "jitter": j,
            "pixels_per_pair": m * diag}


# ------------------------------------------------------------------------------------------------- reward


@dataclass
class FlowReward:
    """Flow-based motion score of a video (see the module docstring for the terms).

    Args:
        estimator: ``(a, b) -> flow`` on frame batches.
        term: "flow" (the blend), "magnitude" or "smoothness".
        frames: frames used, spread uniformly (17 of 81 is about 4 fps at 16 fps: the motion per pair is visible
            and the cost stays at 16 pairs); consecutive kept frames form the pairs.
        size: frames are resized so the short side is ``size`` (sides rounded to multiples of 8).
        m0: magnitude at which the magnitude term reaches 63 %, as a fraction of the diagonal per pair.
        k: jitter sensitivity of the smoothness term.
        weight: weight of smoothness in the blend.
        pair_batch: frame pairs per estimator call.
    """

    estimator: FlowFn
    term: str = "flow"
    frames: int = 17
    size: int = 256
    m0: float = 0.01
    k: float = 2.0
    weight: float = 0.5
    pair_batch: int = 16
    device: torch.device = torch.device("cpu")
    name: str = "flow"
    needs: frozenset[str] = frozenset({"video"})
    scale: tuple[float, float] | None = (0.0, 1.0)
    extras: dict[str, Tensor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, videos: Tensor, prompts: list[str] | None = None) -> Tensor:
        check_videos(videos)
        terms = {k: v.cpu() for k, v in motion_terms(self.flows(videos), self.m0, self.k).items()}
        self.extras = terms
        if self.term == "flow":
            return (1 - self.weight) * terms["magnitude"] + self.weight * terms["smoothness"]
        return terms[self.term]

    def flows(self, videos: Tensor) -> Tensor:
        """``[B, T, 3, H, W]`` -> flows ``[B, P, 2, h, w]`` between consecutive kept frames (resized)."""
        if videos.shape[1] < 2:
            raise ValueError("the flow reward needs at least 2 frames per video")
        b = videos.shape[0]
        clip = videos[:, uniform_indices(videos.shape[1], max(2, self.frames))].to(self.device).float()
        clip = _resize(clip.flatten(0, 1), self.size).unflatten(0, (b, -1))
        a, nxt = clip[:, :-1].flatten(0, 1), clip[:, 1:].flatten(0, 1)
        with self._lock:
            out = torch.cat([self.estimator(a[i:i + self.pair_batch], nxt[i:i + self.pair_batch])
                             for i in range(0, a.shape[0], self.pair_batch)])
        return out.unflatten(0, (b, -1)).float()


def _resize(frames: Tensor, short: int) -> Tensor:
    """Resize ``[N, 3, H, W]`` so the short side is about ``short``, both sides multiples of 8 (RAFT's stride)."""
    h, w = frames.shape[-2:]
    scale = short / min(h, w)
    size = (max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8))
    if size == (h, w):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _estimator(backend: str, weights: str | None, small: bool, iters: int, device: torch.device,
               random_weights: bool) -> FlowFn:
    if backend == "lk":
        return lucas_kanade
    if backend == "raft":
        key = ("raft", str(weights), small, iters, str(device), random_weights)
        return shared(key, lambda: RaftFlow(weights, small=small, iters=iters, device=device,
                                            random_weights=random_weights))
    raise ValueError(f"unknown flow backend {backend!r}; use 'raft' (torchvision) or 'lk' (pure torch)")


def _factory(term: str):
    def build(backend: str = "raft", weights: str | None = None, *, small: bool = False, iters: int = 12,
              device: str | None = None, frames: int = 17, size: int = 256, m0: float = 0.01, k: float = 2.0,
              weight: float = 0.5, pair_batch: int = 16, random_weights: bool = False) -> FlowReward:
        dev = resolve_device(device)
        est = _estimator(backend, weights, small, iters, dev, random_weights)
        name = "flow" if term == "flow" else f"flow_{term}"
        return FlowReward(est, term, frames, size, m0, k, weight, pair_batch, dev, name=name)

    build.__doc__ = f"Optical-flow motion reward, {term} term (see the module docstring)."
    return build


register_reward("flow")(_factory("flow"))
register_reward("flow_magnitude")(_factory("magnitude"))
register_reward("flow_smoothness")(_factory("smoothness"))
