"""The self-attention KV cache of the streaming DiT, plus the prompt's cross-attention K/V.

Rules (DESIGN §3, `reference/ar_models.md` §2.3, §3.3, §7):

* Reading is pure: `context(layer, n)` returns views (or one concatenation) of what a query block of ``n`` frames
  may see; nothing is written while the network runs, so grad-enabled and checkpointed forwards are safe.
* Writing happens only in `append`, called by `CausalWan.commit` after all layers have run (the functional pattern
  LongLive introduced): stored keys are already RoPE'd at their absolute frame positions.
* Buffers are preallocated once; every pointer is a Python int, so no call ever syncs with the device.

Two policies share one class. *Global* (``window_frames=None``): the buffer holds the whole video and a block sees
every committed frame. *Rolling* (``window_frames=W``, ``sink_frames=S``): the first ``S`` committed frames are a sink
that is never evicted; a query block of ``n`` frames sees the sink plus the ``W - S - n`` most recent committed
frames, i.e. a span of ``W`` frames including itself (LongLive: W = 12, S = 3).
"""

from __future__ import annotations

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


class KVCache:
    """Preallocated per-layer K/V buffers ``[B, capacity_tokens, H, D]`` with a sink region and a rolling region.

    Attributes:
        k, v: one buffer per layer; tokens ``[0, S·T)`` are the sink region, the rest the rolling region.
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
        # The rolling region never needs more than W - S frames: a block of n >= 1 frames reads W - S - n of them.
        capacity = policy.window_frames if policy.rolling else max_frames
        self.roll_capacity = capacity - self.sink_frames
        shape = (batch, capacity * tokens_per_frame, num_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.text: list[tuple[Tensor, Tensor]] | None = None
        self.sink_positions: list[int] = []  # absolute frame index of each filled sink slot
        self.roll_first = 0  # absolute frame index of the first frame in the rolling region
        self.roll_count = 0  # frames stored in the rolling region
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
        if not self.policy.rolling:
            return self.roll_count
        return max(0, min(self.roll_count, self.policy.window_frames - self.sink_frames - n_new))

    def context(self, layer: int, n_new: int) -> tuple[list[Tensor], list[Tensor]]:
        """The cached K and V a query block of ``n_new`` frames attends to, as lists of ``[B, L, H, D]`` pieces.

        The pieces are views; the caller concatenates them once together with the block's own K/V.
        """
        t = self.tokens_per_frame
        sink_tok = self.sink_frames * t
        n_sink = len(self.sink_positions) * t
        take = self._visible_roll(n_new)
        lo = sink_tok + (self.roll_count - take) * t
        hi = sink_tok + self.roll_count * t
        k, v = self.k[layer], self.v[layer]
        # Return one contiguous view whenever the visible tokens are contiguous (always, for a global cache).
        if n_sink == 0:
            ranges = [(lo, hi)]
        elif lo == hi:
            ranges = [(0, n_sink)]
        elif lo == n_sink:
            ranges = [(0, hi)]
        else:
            ranges = [(0, n_sink), (lo, hi)]
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

    @torch.no_grad()
    def append(self, kv: list[tuple[Tensor, Tensor]], start_frame: int) -> None:
        """Write new clean K/V (one ``(k, v)`` per layer, ``[B, n·T, H, D]``) for frames starting at ``start_frame``.

        Frames fill the sink first, then the rolling region, whose oldest frames are evicted when it is full.
        """
        t = self.tokens_per_frame
        n = kv[0][0].shape[1] // t
        if kv[0][0].shape[1] != n * t:
            raise ValueError(f"appended K/V has {kv[0][0].shape[1]} tokens, not a multiple of {t} per frame")
        # The rolling region is contiguous in time; a gap is allowed only after the sink (LongLive re-cache keeps
        # the sink of frames 0..S-1 and re-encodes the window at the end of the video).
        if self.roll_count:
            ok, expect = start_frame == self.roll_first + self.roll_count, self.roll_first + self.roll_count
        else:
            expect = self.sink_positions[-1] + 1 if self.sink_positions else 0
            ok = start_frame >= expect
        if not ok:
            raise ValueError(
                f"the next commit must start at frame {expect} (the cache holds frames up to {expect - 1}), "
                f"got {start_frame}; commit blocks in order, or reset the cache first"
            )
        to_sink = min(n, self.sink_frames - len(self.sink_positions))
        n_roll = n - to_sink
        if not self.policy.rolling and self.roll_count + n_roll > self.roll_capacity:
            raise ValueError(
                f"the global KV cache holds {self.roll_capacity} frames and frame {start_frame + n - 1} does not fit; "
                "allocate it for the whole video (max_frames) or use a rolling policy (window_frames)"
            )
        # With a window, new frames that do not fit are evicted at once (no later block can see them) and the
        # oldest stored frames make room for the rest.
        skip = max(0, n_roll - self.roll_capacity)
        n_store = n_roll - skip
        evict = max(0, self.roll_count + n_store - self.roll_capacity)
        keep = self.roll_count - evict
        s0 = len(self.sink_positions) * t
        sink_tok = self.sink_frames * t
        for layer, (k_new, v_new) in enumerate(kv):
            for buf, new in ((self.k[layer], k_new), (self.v[layer], v_new)):
                if to_sink:
                    buf[:, s0 : s0 + to_sink * t] = new[:, : to_sink * t]
                if evict and keep:  # shift the kept frames left; clone because source and target overlap
                    src = buf[:, sink_tok + evict * t : sink_tok + (evict + keep) * t].clone()
                    buf[:, sink_tok : sink_tok + keep * t] = src
                if n_store:
                    at = sink_tok + keep * t
                    buf[:, at : at + n_store * t] = new[:, (to_sink + skip) * t :]
        self.sink_positions.extend(range(start_frame, start_frame + to_sink))
        if n_store:
            self.roll_first = self.roll_first + evict if keep else start_frame + to_sink + skip
            self.roll_count = keep + n_store
        self.next_frame = start_frame + n

    def reset(self, keep_sink: bool = False) -> None:
        """Forget the committed frames (all, or all but the sink) without reallocating. Text K/V are kept."""
        if not keep_sink:
            self.sink_positions = []
        self.roll_count = 0
        self.roll_first = 0
        self.next_frame = self.sink_positions[-1] + 1 if self.sink_positions else 0

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache owns (for hashing in tests and for moving)."""
        text = [x for kv in (self.text or []) for x in kv]
        return self.k + self.v + text
