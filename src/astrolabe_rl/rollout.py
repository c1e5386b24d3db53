"""The streaming few-step sampler: prompts × K candidates, recorded noise, long video, history, prompt switches.

For each block of ``frames_per_block`` latent frames (`reference/ar_models.md` §2.4):

    x ← ε_0                                         pure noise at t_0 = 1000
    for k, t_k in enumerate(steps):
        v̂  = model.denoise(cache, x, t_k)            reads the cache, never writes it
        x̂0 = x - σ(t_k)·v̂                            float64
        if k < last: x ← (1 - σ_{k+1})·x̂0 + σ_{k+1}·ε_{k+1}     fresh noise
    model.commit(cache, x̂0)                          clean pass at the context timestep -> K/V appended

Every ε comes from a per-sample ``torch.Generator`` seeded with that sample's seed, so a video depends only on its
seed (not on the batch it was generated in) and a rollout replays bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from astrolabe_rl.models.families import SamplerConfig
from astrolabe_rl.models.kv_cache import KVCache
from astrolabe_rl.models.schedule import renoise, sigma_of, x0_from_velocity
from astrolabe_rl.models.wan import CausalWan


@dataclass
class PromptSwitch:
    """From latent frame ``frame`` on (a block boundary), condition on ``text`` ``[P, L, text_dim]``."""

    frame: int
    text: Tensor


@dataclass
class BlockTrace:
    """What one block's sampler saw: its frames, the timesteps and every noisy input ``[B, S, f, C, H, W]``."""

    start: int
    end: int
    timesteps: tuple[float, ...]
    inputs: Tensor


@dataclass
class Rollout:
    """A batch of generated videos.

    Attributes:
        latents: clean latents ``[B, F, C, H, W]`` of the generated frames (history excluded), model dtype.
        seeds: the seed of each sample; ``rollout(..., seeds=seeds)`` replays it.
        start_frame: absolute latent index of ``latents[:, 0]`` (the history length).
        traces: per block, the noisy inputs of every step (only with ``record=True``).
    """

    latents: Tensor
    seeds: list[int]
    start_frame: int = 0
    traces: list[BlockTrace] | None = None


class NoiseSource:
    """Per-sample generators: noise for sample b depends only on ``seeds[b]`` and how many draws came before."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """``[B, *shape]`` standard normal noise (drawn in float32, then cast)."""
        return torch.stack(
            [torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        ).to(dtype)


def _expand(x: Tensor, candidates: int, batch: int, what: str) -> Tensor:
    """Repeat per-prompt tensors ``[P, ...]`` K times (``[P·K, ...]``, candidates of a prompt adjacent)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] * candidates == batch:
        return x.repeat_interleave(candidates, dim=0)
    raise ValueError(f"{what} has batch {x.shape[0]}; expected {batch // candidates} prompts or {batch} samples")


@torch.no_grad()
def rollout(
    model: CausalWan,
    text: Tensor,
    *,
    num_frames: int,
    latent_hw: tuple[int, int],
    sampler: SamplerConfig,
    seeds: Sequence[int] | int = 0,
    candidates: int = 1,
    history: Tensor | None = None,
    switches: Sequence[PromptSwitch] = (),
    record: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Rollout:
    """Generate ``num_frames`` latent frames for every prompt × ``candidates``.

    Args:
        model: the DiT (its dtype and device are used throughout).
        text: text embeddings ``[P, L, text_dim]`` of P prompts.
        num_frames: latent frames to generate (after the history); any length, through the rolling cache when
            the policy has a window.
        latent_hw: latent height and width (60×104 for 480×832).
        sampler: steps, block size, cache policy (`families` has every family's).
        seeds: one seed per sample (P·K of them), or a base seed ``s`` giving ``s, s+1, ...``.
        candidates: K videos per prompt (adjacent in the batch: sample ``p·K + k``).
        history: clean latents ``[P or P·K, Fh, C, H, W]`` committed to the cache before generating (video
            extension, image-to-video, streaming RL); generation continues at frame Fh.
        switches: prompt switches at block boundaries (absolute latent frame indices).
        record: keep every block's noisy inputs in ``Rollout.traces``.
        progress: called with ``(blocks_done, blocks_total)`` after each block.
    """
    device, dtype = model.device, model.dtype
    p = text.shape[0]
    b = p * candidates
    seeds = list(range(seeds, seeds + b)) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for {p} prompts × {candidates} candidates = {b} samples")
    c, (hh, ww) = model.config.in_dim, latent_hw
    h_frames = 0 if history is None else history.shape[1]
    total = h_frames + num_frames
    gen_bounds = sampler.block_bounds(num_frames, start_frame=h_frames)
    for s in switches:
        if s.frame not in {bs for bs, _ in gen_bounds}:
            raise ValueError(
                f"prompt switch at latent frame {s.frame} is not the start of a generated block "
                f"(blocks start at {[bs for bs, _ in gen_bounds]})"
            )

    cache = model.new_cache(b, latent_hw, total, sampler.cache)
    cache.text = model.encode_text(_expand(text.to(device), candidates, b, "text"))
    noise = NoiseSource(seeds, device)
    clean = Frames(torch.empty(b, total, c, hh, ww, dtype=dtype, device=device))
    committed: list[tuple[int, int]] = []

    if history is not None:
        clean.data[:, :h_frames] = _expand(history.to(device, dtype), candidates, b, "history")
        hist_bounds = sampler.block_bounds(h_frames) if h_frames else []
        commit_blocks(model, cache, clean, hist_bounds, sampler, noise)
        committed += hist_bounds

    traces = _generate(model, cache, clean, gen_bounds, committed, sampler, noise,
                       {s.frame: _expand(s.text.to(device), candidates, b, "switch text") for s in switches},
                       record, progress)
    return Rollout(clean.data[:, h_frames:], seeds, h_frames, traces if record else None)


@dataclass
class Frames:
    """Clean latents ``data [B, n, C, H, W]`` holding absolute latent frames ``[origin, origin + n)``."""

    data: Tensor
    origin: int = 0

    def __getitem__(self, bounds: tuple[int, int]) -> Tensor:
        return self.data[:, bounds[0] - self.origin : bounds[1] - self.origin]

    def __setitem__(self, bounds: tuple[int, int], value: Tensor) -> None:
        self.data[:, bounds[0] - self.origin : bounds[1] - self.origin] = value


def _generate(
    model: CausalWan,
    cache: KVCache,
    clean: Frames,
    bounds: list[tuple[int, int]],
    committed: list[tuple[int, int]],
    sampler: SamplerConfig,
    noise: NoiseSource,
    switch_text: dict[int, Tensor],
    record: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[BlockTrace]:
    """Sample the blocks ``bounds`` (absolute latent frames) one by one into ``clean``, committing each to the cache
    (and appending it to ``committed``); at a frame of ``switch_text`` (text ``[B, L, D]``) the prompt changes first,
    with the family's re-cache. Returns the traces (with ``record``)."""
    c, hh, ww = clean.data.shape[2:]
    traces: list[BlockTrace] = []
    for i, (s, e) in enumerate(bounds):
        switch_prompt(model, cache, clean, s, committed, sampler, noise, switch_text)
        steps = sampler.steps.for_block(first=s == 0)
        x = noise.draw((e - s, c, hh, ww), clean.data.dtype)
        inputs = []
        for k, t_k in enumerate(steps):
            inputs.append(x)
            v = model.denoise(cache, x, t_k, start_frame=s)
            x0 = x0_from_velocity(x, v, sigma_of(t_k))
            if k < len(steps) - 1:
                x = renoise(x0, sigma_of(steps[k + 1]), noise.draw(tuple(x.shape[1:]), x.dtype))
        clean[s, e] = x0
        commit_blocks(model, cache, clean, [(s, e)], sampler, noise)
        committed.append((s, e))
        if record:
            traces.append(BlockTrace(s, e, steps, torch.stack(inputs, dim=1)))
        if progress is not None:
            progress(i + 1, len(bounds))
    return traces


@torch.no_grad()
def switch_prompt(model: CausalWan, cache: KVCache, clean: Frames, frame: int, committed: list[tuple[int, int]],
                  sampler: SamplerConfig, noise: NoiseSource, switch_text: dict[int, Tensor]) -> None:
    """Before the block at ``frame``: if the prompt switches there, set the cache's cross-attention to the new text
    (``switch_text[frame] [B, L, D]``) and run the family's re-cache of the committed frames (`_recache`)."""
    if frame not in switch_text:
        return
    cache.text = model.encode_text(switch_text[frame])
    if sampler.recache_on_switch and committed:
        _recache(model, cache, clean, committed, sampler, noise)


@dataclass
class WindowRollout:
    """One window of a long video per candidate, its K candidates sharing one history per prompt.

    Attributes:
        history: clean latents ``[P, start, C, H, W]`` of each prompt's video before the window (its own rollout).
        latents: clean latents ``[P·K, window, C, H, W]`` of the window (candidates of a prompt adjacent).
        start: absolute latent frame of the window's first frame.
        seeds: the window noise seed of each candidate.
        traces: per window block, the noisy inputs of every step (only with ``record=True``).
    """

    history: Tensor
    latents: Tensor
    start: int
    seeds: list[int]
    traces: list[BlockTrace] | None = None


@torch.no_grad()
def rollout_window(
    model: CausalWan,
    text: Tensor,
    *,
    start: int,
    window: int,
    latent_hw: tuple[int, int],
    sampler: SamplerConfig,
    history_seeds: Sequence[int],
    seeds: Sequence[int],
    candidates: int,
    switches: Sequence[PromptSwitch] = (),
    micro_batch: int | None = None,
    record: bool = False,
) -> WindowRollout:
    """Streaming RL's rollout: each prompt's video is rolled from frame 0 to ``start`` once (noise from
    ``history_seeds [P]``), with the family's cache (rolling window + sink for long videos); the cache is then
    broadcast and K candidates of the window ``[start, start + window)`` continue from that exact state (noise from
    ``seeds [P·K]``), ``micro_batch`` candidates at a time (None: all at once). One history per prompt, never
    re-rolled per candidate: the group of the advantage is (prompt, history). ``switches`` change the prompt at block
    starts, in the history or in the window.
    """
    device, dtype = model.device, model.dtype
    p, b = text.shape[0], text.shape[0] * candidates
    if len(history_seeds) != p or len(seeds) != b:
        raise ValueError(f"need {p} history seeds (one per prompt) and {b} window seeds (prompts × {candidates} "
                         f"candidates); got {len(history_seeds)} and {len(seeds)}")
    bounds = sampler.block_bounds(start + window)
    if start not in {s for s, _ in bounds}:
        raise ValueError(f"window start {start} is not a block start (blocks start at {[s for s, _ in bounds]})")
    for sw in switches:
        if sw.frame not in {s for s, _ in bounds}:
            raise ValueError(f"prompt switch at latent frame {sw.frame} is not a block start")
    c, (hh, ww) = model.config.in_dim, latent_hw
    cache = model.new_cache(p, latent_hw, start + window, sampler.cache)
    cache.text = model.encode_text(text.to(device))
    history = Frames(torch.empty(p, start, c, hh, ww, dtype=dtype, device=device))
    committed: list[tuple[int, int]] = []
    in_history = {sw.frame: sw.text.to(device) for sw in switches if sw.frame < start}
    _generate(model, cache, history, [be for be in bounds if be[1] <= start], committed, sampler,
              NoiseSource(history_seeds, device), in_history)

    # the window's buffer keeps the history frames a re-cache at a prompt switch may re-encode: the last window of
    # frames with a rolling cache, all of them with a global one
    tail = min(start, sampler.cache.window_frames) if sampler.cache.rolling else start
    owner = torch.arange(p, device=device).repeat_interleave(candidates)  # sample -> its prompt's history
    window_text = {sw.frame: _expand(sw.text.to(device), candidates, b, "switch text") for sw in switches
                   if sw.frame >= start}
    latents, traces = [], []
    for i in range(0, b, micro_batch or b):
        chunk = owner[i : i + (micro_batch or b)]
        clean = Frames(torch.empty(len(chunk), tail + window, c, hh, ww, dtype=dtype, device=device),
                       origin=start - tail)
        clean.data[:, :tail] = history.data[chunk, start - tail :]
        in_window = {f: x[i : i + len(chunk)] for f, x in window_text.items()}
        traces.append(_generate(model, cache.take(chunk), clean, [be for be in bounds if be[0] >= start],
                                list(committed), sampler, NoiseSource(seeds[i : i + len(chunk)], device), in_window,
                                record))
        latents.append(clean.data[:, tail:])
    merged = [BlockTrace(t[0].start, t[0].end, t[0].timesteps, torch.cat([x.inputs for x in t])) for t in zip(*traces)]
    return WindowRollout(history.data, torch.cat(latents), start, list(seeds), merged if record else None)


def commit_blocks(
    model: CausalWan,
    cache: KVCache,
    clean: Frames,
    bounds: list[tuple[int, int]],
    sampler: SamplerConfig,
    noise: NoiseSource,
) -> None:
    """Commit consecutive blocks ``bounds`` (absolute latent frames) of ``clean`` in one call, at the context timestep
    (noised to it if > 0, with ``noise``): what sampling does after each block, and what streaming's training passes
    do with the history and the window's clean blocks."""
    if not bounds:
        return
    s, e = bounds[0][0], bounds[-1][1]
    x = clean[s, e]
    t_ctx = sampler.steps.context_timestep
    if t_ctx > 0:
        x = renoise(x, sigma_of(t_ctx), noise.draw(tuple(x.shape[1:]), x.dtype))
    sizes = {be - bs for bs, be in bounds[1:]}
    model.commit(
        cache,
        x,
        start_frame=s,
        t=t_ctx,
        frames_per_block=sizes.pop() if sizes else e - s,
        first_block_frames=bounds[0][1] - s if len(bounds) > 1 else None,
    )


def _recache(
    model: CausalWan,
    cache: KVCache,
    clean: Frames,
    committed: list[tuple[int, int]],
    sampler: SamplerConfig,
    noise: NoiseSource,
) -> None:
    """LongLive's re-cache: re-encode the last window of clean frames under the (already set) new prompt.

    The frames re-encoded are the last ``window_frames`` (all of them for a global cache); the sink keeps its
    first-prompt K/V when ``keep_sink_on_switch`` and the switch comes after frame ``window_frames``, and the window
    then shrinks by the sink. LongLive's re-cache pass starts at ``max(0, end - window_frames)``; its cache protects
    the sink only in a recompute that starts after frame 0, so an early switch re-encodes the sink too.

    ``recache_mask`` (`SamplerConfig`): ``bidirectional`` commits the frames in one unmasked call (LongLive: the
    block mask it builds is never applied); ``block_causal`` commits their blocks under the block-causal mask, which
    equals committing them one by one.
    """
    policy = sampler.cache
    end = committed[-1][1]
    early = not policy.rolling or end <= policy.window_frames
    keep_sink = sampler.keep_sink_on_switch and policy.sink_frames > 0 and not early
    cache.reset(keep_sink=keep_sink)
    if early:
        first = 0
    else:  # older frames would be evicted at once and are outside every later block's window
        first = max(end - policy.window_frames + (policy.sink_frames if keep_sink else 0), cache.next_frame)
    if sampler.recache_mask == "bidirectional":
        commit_blocks(model, cache, clean, [(first, end)], sampler, noise)
    else:
        commit_blocks(model, cache, clean, [(s, e) for s, e in committed if s >= first], sampler, noise)
