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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from astrolabe_rl.config import StreamingConfig
from astrolabe_rl.models.build import Decoder
from astrolabe_rl.models.families import SamplerConfig
from astrolabe_rl.models.kv_cache import KVCache
from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.rollout import Frames, NoiseSource, commit_blocks, switch_prompt


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


def pixel_frame(latent: int, temporal_stride: int) -> int:
    """The first decoded frame of latent frame ``latent`` (the video's first latent frame decodes to one frame, each
    later one to ``temporal_stride``: the Wan VAE's 1 + 4·(F − 1))."""
    return 0 if latent == 0 else 1 + temporal_stride * (latent - 1)


def window_frames(video_frames: int, window: int, temporal_stride: int) -> list[tuple[int, int]]:
    """The decoded-frame ranges ``(first, end)`` of the consecutive windows ``[k·window, (k+1)·window)`` of a video of
    ``video_frames`` latent frames (a last partial window is dropped): what streaming evaluation scores one by one."""
    return [(pixel_frame(s, temporal_stride), pixel_frame(s + window, temporal_stride))
            for s in range(0, video_frames - window + 1, window)]


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
    start: the window's first absolute latent frame. switches: a multi-prompt video's schedule, ``{frame: text
    [1, L, D]}`` for every prompt after the first (the first is the ``text`` given to `velocity`); the passes switch
    the cache's prompt there, with the family's re-cache, as the rollout did. shared: a cache already holding the
    history (``history_kv=old``: θ_old's, built once by `commit_history` and cloned per pass); None commits the
    history with each pass's weights. seeds: per-sample seeds of the noise that a family with a non-zero context
    timestep adds to committed frames. overlap, boundary_weight: with ``streaming.overlap`` the passes start
    ``o`` frames before the new window, at the history's last frames, and `recipe.micro_step` adds the
    boundary-consistency term on them (then ``history`` ends where the overlap begins).
    """

    history: Tensor
    start: int
    sampler: SamplerConfig
    latent_hw: tuple[int, int]
    seeds: list[int]
    switches: dict[int, Tensor] = field(default_factory=dict)
    shared: KVCache | None = None
    overlap: Tensor | None = None  # [1, o, C, h, w]: history frames trained with the window (streaming.overlap)
    boundary_weight: float = 0.0  # weight of θ's x̂0 of the overlap pulled to those frames

    def history_cache(self, model: CausalWan, text: Tensor, window: int) -> KVCache:
        """The cache at the window's start with ``model``'s weights, for ``text.shape[0]`` samples."""
        b = text.shape[0]
        if self.shared is not None:
            return self.shared.clone()
        if self.history.shape[0] == 1 < b:  # one prompt's candidates: commit its history once
            cache = commit_history(model, self.history, text[:1], self.sampler, self.latent_hw, self.seeds[:1],
                                   window, self.switches)
            return cache.take(torch.zeros(b, dtype=torch.long))
        return commit_history(model, self.history, text, self.sampler, self.latent_hw, self.seeds, window,
                              self.switches)

    def velocity(self, model: CausalWan, x_t: Tensor, t: float, text: Tensor, x0: Tensor) -> Tensor:
        """``v [b, W, C, h, w]`` of the noisy window ``x_t`` (one σ for every frame, timestep ``t``) with each block
        seeing the history and the *clean* earlier window blocks ``x0`` (committed under ``no_grad``); gradient
        flows only through the denoise calls, and only if it is enabled. ``text [b, L, D]``: the video's first
        prompt."""
        b, w = x_t.shape[:2]
        cache = self.history_cache(model, text, w)
        noise = NoiseSource([s + 1 for s in self.seeds], x0.device)  # the context noise of the window's commits
        bounds = self.sampler.block_bounds(w, start_frame=self.start)
        # the prompt of each block, encoded with gradient (the cache's copy was made under no_grad)
        active = max([0, *(f for f in self.switches if f <= self.start)])
        texts = {f: self.switches[f].expand(b, -1, -1) for f in self.switches if active <= f < self.start + w}
        if active == 0:  # no switch before the window: it opens on the video's first prompt
            texts[0] = text
        text_kv = {f: model.encode_text(x) for f, x in texts.items()}
        inside = {f: x for f, x in texts.items() if f > self.start}  # switches inside the window: re-cache there
        # a re-cache re-encodes committed frames, history and window alike; without one the window alone is read
        frames = (Frames(torch.cat([self.history.expand(b, -1, -1, -1, -1), x0.detach()], dim=1)) if inside
                  else Frames(x0.detach(), origin=self.start))
        committed = self.sampler.block_bounds(self.start) if self.start else []
        out = []
        for s, e in bounds:
            if s in inside:
                switch_prompt(model, cache, frames, s, committed, self.sampler, noise, inside)
            active = s if s in text_kv else active
            out.append(model.denoise(cache, x_t[:, s - self.start : e - self.start], t, start_frame=s,
                                     text=text_kv[active]))
            commit_blocks(model, cache, frames, [(s, e)], self.sampler, noise)
            committed.append((s, e))
        return torch.cat(out, dim=1)


@torch.no_grad()
def commit_history(model: CausalWan, history: Tensor, text: Tensor, sampler: SamplerConfig,
                   latent_hw: tuple[int, int], seeds: list[int], window: int,
                   switches: dict[int, Tensor] | None = None) -> KVCache:
    """A cache (sized for history + ``window`` frames, or the family's rolling size) holding ``history [b, s, ...]``
    committed block by block with ``model``'s current weights, the prompt ``text [b, L, D]`` set and switched at the
    ``switches`` frames (``{frame: text [1, L, D]}``) with the family's re-cache, as the rollout did."""
    b, s = history.shape[:2]
    cache = model.new_cache(b, latent_hw, s + window, sampler.cache)
    cache.text = model.encode_text(text)
    noise = NoiseSource(seeds, history.device)
    frames, committed = Frames(history), []
    texts = {f: x.expand(b, -1, -1) for f, x in (switches or {}).items() if f < s}
    for bs, be in sampler.block_bounds(s) if s else []:
        switch_prompt(model, cache, frames, bs, committed, sampler, noise, texts)
        commit_blocks(model, cache, frames, [(bs, be)], sampler, noise)
        committed.append((bs, be))
    return cache
