"""Streaming RL of long videos, one window at a time (DESIGN §3 "Streaming"; reference/astrolabe.md §3 and §7.6).

In ``train.mode=streaming`` an epoch differs from a clip epoch in three phases, and only there:

    s        = window_start(...)          one start per epoch (released) or per prompt
    rollout  = rollout_window(θ_old, ...)  each prompt's history [0, s) rolled once, without gradient, through the
                                           family's cache (rolling window + sink); K candidates of the window
                                           [s, s + W) continue that exact cache state (`rollout.rollout_window`)
    videos   = decode_window(...)          only the window is decoded; the decoder's causal cache is warmed on the
                                           history first (exact when warmed on all of it)
    update   = WindowPasses(...)           each training pass (θ, θ_old, the reference) sees the history as K/V
                                           committed under ``no_grad`` (with its own weights, or θ_old's with
                                           ``streaming.history_kv=old``) and the window block by block: the block
                                           is denoised against the cache (gradient only in the θ pass), then
                                           committed clean. This is the teacher-forcing layout of inference, and the
                                           θ gradient equals that of one masked call over [history ; window] with
                                           the history detached (tests/test_streaming.py).

Memory depends on the window and the cache, never on the video's length: the history is committed block by block
into a cache of the family's (rolling) size, and only the window's blocks keep activations for the backward pass.
Time grows with the history (each pass re-commits it), unless ``history_kv=old`` shares one commit between passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from astrolabe_rl.config import StreamingConfig
from astrolabe_rl.models.build import Decoder
from astrolabe_rl.models.families import SamplerConfig
from astrolabe_rl.models.kv_cache import KVCache
from astrolabe_rl.models.schedule import renoise, sigma_of
from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.rollout import NoiseSource


def window_start(cfg: StreamingConfig, sampler: SamplerConfig, seed: int) -> int:
    """The window's first latent frame (``streaming.start``): ``first`` 0, ``last`` video_frames − window,
    ``random`` a uniformly drawn block start that leaves room for the window, ``choices`` one of ``streaming.choices``;
    the draws depend only on ``seed``."""
    latest = cfg.video_frames - cfg.window
    if cfg.start == "first":
        return 0
    if cfg.start == "last":
        return latest
    g = torch.Generator().manual_seed(seed)
    if cfg.start == "random":
        options = [s for s, _ in sampler.block_bounds(cfg.video_frames) if s <= latest]
    else:
        options = list(cfg.choices)
    return options[int(torch.randint(len(options), (), generator=g))]


@torch.no_grad()
def decode_window(decoder: Decoder, history: Tensor, window: Tensor, owner: Tensor, warmup: int = 0) -> Tensor:
    """Frames ``[b, T_w, 3, H, W]`` (float32, [0, 1]) of the window latents ``window [b, W, C, h, w]`` only, sample
    ``j`` continuing ``history[owner[j]]`` (``history [P, s, C, h, w]``, ``owner [b]``).

    A decoder with a temporal state (the Wan VAE's causal feature cache) is first fed the last ``warmup`` history
    frames (0 = all of them: the result then equals decoding [history ; window] and slicing the window's frames), once
    per prompt, and its state is gathered to the candidates (``take``); the history's frames are dropped. A frame-wise
    decoder (the toy VAE) decodes the window alone, which is exact.
    """
    stream = decoder.stream()
    take = getattr(stream, "take", None)
    if take is None or not history.shape[1]:
        return stream(window).float()
    stream(history[:, -warmup:] if warmup else history)
    return take(owner)(window).float()


@dataclass
class WindowPasses:
    """The window's velocity under one set of weights, with the history as detached K/V (see the module docstring).

    history: clean latents ``[b, s, C, h, w]`` before the window, one per sample, or ``[1, s, C, h, w]`` shared by
    every sample (one prompt's candidates: committed once, its cache broadcast).
    start: the window's first absolute latent frame. shared: a cache already holding the history (``history_kv=old``:
    θ_old's, built once by `commit_history` and cloned per pass); None commits the history with each pass's weights.
    seeds: per-sample seeds of the noise that a family with a non-zero context timestep adds to committed frames.
    """

    history: Tensor
    start: int
    sampler: SamplerConfig
    latent_hw: tuple[int, int]
    seeds: list[int]
    shared: KVCache | None = None

    def velocity(self, model: CausalWan, x_t: Tensor, t: float, text: Tensor, x0: Tensor) -> Tensor:
        """``v [b, W, C, h, w]`` of the noisy window ``x_t`` (one σ for every frame, timestep ``t``) with each block
        seeing the history and the *clean* earlier window blocks ``x0`` (committed under ``no_grad``); gradient
        flows only through the denoise calls, and only if it is enabled."""
        if self.shared is not None:
            cache = self.shared.clone()
        elif self.history.shape[0] == 1 < x_t.shape[0]:  # one prompt's candidates: commit its history once
            cache = commit_history(model, self.history, text[:1], self.sampler, self.latent_hw, self.seeds[:1],
                                   x_t.shape[1]).take(torch.zeros(x_t.shape[0], dtype=torch.long))
        else:
            cache = commit_history(model, self.history, text, self.sampler, self.latent_hw, self.seeds, x_t.shape[1])
        noise = NoiseSource([s + 1 for s in self.seeds], x0.device)  # the context noise of the window's commits
        text_kv = model.encode_text(text)  # with gradient: the cache's copy was made under no_grad
        out = []
        for s, e in self.sampler.block_bounds(x_t.shape[1], start_frame=self.start):
            block = (s - self.start, e - self.start)
            out.append(model.denoise(cache, x_t[:, block[0] : block[1]], t, start_frame=s, text=text_kv))
            _commit_clean(model, cache, x0[:, block[0] : block[1]], s, self.sampler, noise)
        return torch.cat(out, dim=1)


@torch.no_grad()
def commit_history(model: CausalWan, history: Tensor, text: Tensor, sampler: SamplerConfig,
                   latent_hw: tuple[int, int], seeds: list[int], window: int) -> KVCache:
    """A cache (sized for history + ``window`` frames, or the family's rolling size) holding ``history [b, s, ...]``
    committed block by block with ``model``'s current weights, the prompt ``text [b, L, D]`` set."""
    b, s = history.shape[:2]
    cache = model.new_cache(b, latent_hw, s + window, sampler.cache)
    cache.text = model.encode_text(text)
    noise = NoiseSource(seeds, history.device)
    for bs, be in sampler.block_bounds(s) if s else []:
        _commit_clean(model, cache, history[:, bs:be], bs, sampler, noise)
    return cache


def _commit_clean(model: CausalWan, cache: KVCache, x0: Tensor, start: int, sampler: SamplerConfig,
                  noise: NoiseSource) -> None:
    """Commit one clean block at the family's context timestep (noised to it when that is > 0, as sampling does)."""
    t_ctx = sampler.steps.context_timestep
    if t_ctx > 0:
        x0 = renoise(x0, sigma_of(t_ctx), noise.draw(tuple(x0.shape[1:]), x0.dtype))
    model.commit(cache, x0, start_frame=start, t=t_ctx)
