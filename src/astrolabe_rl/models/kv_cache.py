"""The self-attention KV cache of the streaming DiT, plus the prompt's cross-attention K/V.

Rules (DESIGN §3, `reference/ar_models.md` §2.3, §3.3, §7):

* Committed frames change only through a commit: `append` (one call) or `plan_append` → `write` per layer →
  `finish_append` (layer by layer, while `CausalWan.commit` runs, so no commit ever holds every layer's new K/V at
  once). Stored keys are already RoPE'd at their absolute frame positions.
* A call reads either *pieces* (`context`: views in time order, concatenated with the call's own K/V by the caller;
  masked calls and calls with gradients use this, so a grad-enabled, checkpointed `denoise` never writes anything)
  or, for unmasked calls without gradients, *one contiguous prefix* of the buffer (`slot` + `write_slot`): the
  call's K/V are written into the slots its frames would be committed to, and attention reads ``buffer[:, :end]``.
  Those slots are free or hold frames no block of that size can see, so committed frames stay intact except the
  oldest ones a full ring is about to evict, which the cache then refuses to serve (`_visible_roll`).
* Buffers are allocated once, empty (never read before written); every pointer is a Python int, so no call syncs
  with the device.

Two policies share one class. *Global* (``window_frames=None``): the buffer holds the whole video and a block sees
every committed frame. *Rolling* (``window_frames=W``, ``sink_frames=S``): the first ``S`` committed frames are a sink
that is never evicted; a query block of ``n`` frames sees the sink plus the ``W - S - n`` most recent committed
frames, i.e. a span of ``W`` frames including itself (LongLive: W = 12, S = 3). The rolling region is a ring buffer
of ``W - S`` frame slots: a commit overwrites the oldest slots instead of shifting the others (keys carry absolute
RoPE positions, so the physical order of unmasked keys does not matter; `context` returns them in time order for
the masked calls).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from astrolabe_rl.models.attention import FrameLayout


@dataclass(frozen=True)
class CachePolicy:
    """How much history a block attends to.

    Attributes:
        window_frames: attention span in latent frames, including the sink and the query block itself; None keeps
            the whole video (global attention, the Self-Forcing / CausVid default).
        sink_frames: latent frames at the start of the cache that are never evicted (LongLive: 3). Only
            meaningful with a window.
    """

    window_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self) -> None:
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.window_frames is None:
            if self.sink_frames:
                raise ValueError("sink_frames needs a window: set window_frames (LongLive uses 12 with sink 3)")
        elif self.window_frames <= self.sink_frames:
            raise ValueError(
                f"window_frames={self.window_frames} must exceed sink_frames={self.sink_frames}: "
                "the window has to leave room for the block being generated"
            )

    @property
    def rolling(self) -> bool:
        return self.window_frames is not None


@dataclass(frozen=True)
class AppendPlan:
    """Where a commit of ``n`` frames starting at ``start`` goes (computed by `KVCache.plan_append`, pure).

    Attributes:
        writes: ``(src_lo, src_hi, dst_lo, dst_hi)`` token ranges: new K/V tokens ``[src_lo, src_hi)`` go to buffer
            tokens ``[dst_lo, dst_hi)`` (at most three: sink, ring, ring after wrapping).
        end: when not None, the call's attention may read ``buffer[:, :end]`` after the writes: exactly the visible
            context plus the new frames (in some order). None: the visible set is not one prefix; use `context`.
        to_sink, skip, n_store, evict: frames going to the sink, skipped (evicted at once), stored in the ring, and
            oldest ring frames evicted.
    """

    start: int
    n: int
    writes: tuple[tuple[int, int, int, int], ...]
    end: int | None
    to_sink: int
    skip: int
    n_store: int
    evict: int


class KVCache:
    """Preallocated per-layer K/V buffers ``[B, capacity_tokens, H, D]``: a sink region, then a ring region.

    Attributes:
        k, v: one buffer per layer; tokens ``[0, S·T)`` are the sink region, the rest the ring of rolling frames.
        text: per-layer cross-attention ``(k, v)`` of the current prompt (`CausalWan.encode_text`), or None.
        next_frame: absolute index of the frame after the last committed one.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        max_frames: int,
        policy: CachePolicy = CachePolicy(),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.policy = policy
        self.tokens_per_frame = tokens_per_frame
        self.sink_frames = policy.sink_frames
        # The rolling region never needs more than W - S frames: a block of n >= 1 frames reads W - S - n of them,
        # and its own n frames take the slots of the n oldest, which it cannot see.
        capacity = policy.window_frames if policy.rolling else max_frames
        self.roll_capacity = capacity - self.sink_frames
        shape = (batch, capacity * tokens_per_frame, num_heads, head_dim)
        # empty, not zeros: no token is read before a commit or a call's own K/V has written it
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.text: list[tuple[Tensor, Tensor]] | None = None
        self.sink_positions: list[int] = []  # absolute frame index of each filled sink slot
        self.roll_first = 0  # absolute frame index of the oldest frame in the ring
        self.roll_count = 0  # frames stored in the ring
        self.roll_head = 0  # ring slot of the oldest stored frame
        self.clobbered = 0  # oldest ring frames overwritten by an uncommitted call's K/V (about to be evicted)
        self.next_frame = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def committed_frames(self) -> int:
        """Frames currently stored (sink + rolling)."""
        return len(self.sink_positions) + self.roll_count

    def _visible_roll(self, n_new: int) -> int:
        """How many of the most recent rolling frames a block of ``n_new`` frames sees."""
        take = self.roll_count
        if self.policy.rolling:
            take = max(0, min(self.roll_count, self.policy.window_frames - self.sink_frames - n_new))
        if self.roll_count - take < self.clobbered:
            raise ValueError(
                f"a block of {n_new} frames would see the oldest cached frames, whose slots an earlier call of a "
                "larger block used for its own K/V; commit that block first (blocks are denoised, then committed)"
            )
        return take

    def _ring_ranges(self, first: int, count: int) -> list[tuple[int, int]]:
        """Buffer token ranges of ``count`` ring frames starting at logical ring position ``first`` (oldest = 0)."""
        t, r, base = self.tokens_per_frame, self.roll_capacity, self.sink_frames * self.tokens_per_frame
        out, done = [], 0
        while done < count:
            slot = (self.roll_head + first + done) % r
            run = min(count - done, r - slot)
            out.append((base + slot * t, base + (slot + run) * t))
            done += run
        return out

    def context(self, layer: int, n_new: int) -> tuple[list[Tensor], list[Tensor]]:
        """The cached K and V a query block of ``n_new`` frames attends to, as lists of ``[B, L, H, D]`` views in
        time order (sink first). The caller concatenates them once together with the block's own K/V."""
        n_sink = len(self.sink_positions) * self.tokens_per_frame
        take = self._visible_roll(n_new)
        ranges = [(0, n_sink)] if n_sink else []
        for lo, hi in self._ring_ranges(self.roll_count - take, take):
            if ranges and ranges[-1][1] == lo:  # merge adjacent ranges: one view where the memory allows
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        k, v = self.k[layer], self.v[layer]
        return [k[:, a:b] for a, b in ranges], [v[:, a:b] for a, b in ranges]

    def context_layout(self, n_new: int) -> FrameLayout:
        """Frame layout of the keys `context` returns (clean, one frame per 'block' for mask building)."""
        take = self._visible_roll(n_new)
        frames = list(self.sink_positions) + list(
            range(self.roll_first + self.roll_count - take, self.roll_first + self.roll_count)
        )
        n_sink = len(self.sink_positions)
        return FrameLayout(
            tuple(frames),
            tuple(frames),
            tuple(f + 1 for f in frames),
            (False,) * len(frames),
            tuple(i < n_sink for i in range(len(frames))),
        )

    # ------------------------------------------------------------------ writing

    def plan_append(self, n: int, start_frame: int, check_order: bool = True) -> AppendPlan:
        """Where ``n`` new frames starting at ``start_frame`` would go (pure: nothing changes).

        Frames fill the sink first, then the ring, whose oldest frames are evicted when it is full; with a window,
        new frames that do not fit are evicted at once (no later block can see them). ``check_order`` (commits):
        the frames must continue the cache; a call that only borrows the slots (`denoise`) passes False.
        """
        t = self.tokens_per_frame
        if check_order:
            # The ring is contiguous in time; a gap is allowed only after the sink (LongLive re-cache keeps the
            # sink of frames 0..S-1 and re-encodes the window at the end of the video).
            if self.roll_count:
                expect = self.roll_first + self.roll_count
                ok = start_frame == expect
            else:
                expect = self.sink_positions[-1] + 1 if self.sink_positions else 0
                ok = start_frame >= expect
            if not ok:
                raise ValueError(
                    f"the next commit must start at frame {expect} (the cache holds frames up to {expect - 1}), "
                    f"got {start_frame}; commit blocks in order, or reset the cache first"
                )
        n_sink = len(self.sink_positions)
        to_sink = min(n, self.sink_frames - n_sink)
        n_roll = n - to_sink
        if not self.policy.rolling and self.roll_count + n_roll > self.roll_capacity:
            raise ValueError(
                f"the global KV cache holds {self.roll_capacity} frames and frame {start_frame + n - 1} does not fit; "
                "allocate it for the whole video (max_frames) or use a rolling policy (window_frames)"
            )
        skip = max(0, n_roll - self.roll_capacity)
        n_store = n_roll - skip
        evict = max(0, self.roll_count + n_store - self.roll_capacity)
        writes = []
        if to_sink:
            writes.append((0, to_sink * t, n_sink * t, (n_sink + to_sink) * t))
        src = (to_sink + skip) * t
        for lo, hi in self._ring_ranges(self.roll_count, n_store):
            writes.append((src, src + hi - lo, lo, hi))
            src += hi - lo
        return AppendPlan(start_frame, n, tuple(writes), self._prefix_end(n, to_sink, skip, n_store), to_sink, skip,
                          n_store, evict)

    def _prefix_end(self, n: int, to_sink: int, skip: int, n_store: int) -> int | None:
        """Token count of the buffer prefix that holds exactly the visible context plus the new frames, or None."""
        t, n_sink = self.tokens_per_frame, len(self.sink_positions)
        if skip:
            return None
        if n_store == 0:  # all new frames go to the sink: visible = the filled sink (and an empty ring)
            return (n_sink + to_sink) * t if self.roll_count == 0 else None
        if n_sink + to_sink != self.sink_frames:
            return None
        take = self._visible_roll(n)
        span = take + n_store
        if span == self.roll_capacity:  # the whole ring: visible frames + the new frames' slots, in any order
            return (self.sink_frames + self.roll_capacity) * t
        first_slot = (self.roll_head + self.roll_count - take) % self.roll_capacity
        return (self.sink_frames + span) * t if first_slot == 0 and span < self.roll_capacity else None

    @torch.no_grad()
    def write(self, layer: int, k: Tensor, v: Tensor, plan: AppendPlan) -> None:
        """Write one layer's new K/V ``[B, n·T, H, D]`` where ``plan`` puts them (no pointer changes)."""
        for a, b, lo, hi in plan.writes:
            self.k[layer][:, lo:hi] = k[:, a:b]
            self.v[layer][:, lo:hi] = v[:, a:b]

    def borrow(self, plan: AppendPlan) -> None:
        """Record that a call wrote its K/V into ``plan``'s slots without committing: the ``plan.evict`` oldest ring
        frames are overwritten and must not be served until the next commit evicts them."""
        self.clobbered = max(self.clobbered, plan.evict)

    def finish_append(self, plan: AppendPlan) -> None:
        """Update the pointers after every layer's `write` of ``plan``."""
        self.sink_positions.extend(range(plan.start, plan.start + plan.to_sink))
        if plan.n_store:
            if self.roll_count:
                self.roll_first += plan.evict
            else:
                self.roll_first = plan.start + plan.to_sink + plan.skip
            self.roll_head = (self.roll_head + plan.evict) % self.roll_capacity
            self.roll_count += plan.n_store - plan.evict
        self.clobbered = 0
        self.next_frame = plan.start + plan.n

    def append(self, kv: list[tuple[Tensor, Tensor]], start_frame: int) -> None:
        """Write new clean K/V (one ``(k, v)`` per layer, ``[B, n·T, H, D]``) for frames starting at ``start_frame``."""
        t = self.tokens_per_frame
        n = kv[0][0].shape[1] // t
        if kv[0][0].shape[1] != n * t:
            raise ValueError(f"appended K/V has {kv[0][0].shape[1]} tokens, not a multiple of {t} per frame")
        plan = self.plan_append(n, start_frame)
        for layer, (k, v) in enumerate(kv):
            self.write(layer, k, v, plan)
        self.finish_append(plan)

    def reset(self, keep_sink: bool = False) -> None:
        """Forget the committed frames (all, or all but the sink) without reallocating. Text K/V are kept."""
        if not keep_sink:
            self.sink_positions = []
        self.roll_count = 0
        self.roll_first = 0
        self.roll_head = 0
        self.clobbered = 0
        self.next_frame = self.sink_positions[-1] + 1 if self.sink_positions else 0

    def take(self, index: Tensor) -> "KVCache":
        """A new cache whose sample ``j`` is this cache's sample ``index[j]`` (committed frames, pointers and prompt):
        e.g. ``take(arange(P).repeat_interleave(K))`` lets K candidates continue one shared history without
        recomputing it."""
        out = copy.copy(self)
        out.k = [t.index_select(0, index.to(t.device)) for t in self.k]
        out.v = [t.index_select(0, index.to(t.device)) for t in self.v]
        out.sink_positions = list(self.sink_positions)
        if self.text is not None:
            out.text = [tuple(t.index_select(0, index.to(t.device)) for t in kv) for kv in self.text]
        return out

    def clone(self) -> "KVCache":
        """An independent copy (buffers, pointers and prompt), e.g. one per training pass over a shared history."""
        return self.take(torch.arange(self.batch))

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache owns (for hashing in tests and for moving)."""
        text = [x for kv in (self.text or []) for x in kv]
        return self.k + self.v + text
