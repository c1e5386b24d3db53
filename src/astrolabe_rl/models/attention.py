"""Attention backends and the frame-level masks of the causal DiT.

Every token belongs to a latent frame, and every mask we need is constant over the tokens of a frame, so masks are
built at frame granularity (`[Fq, Fk]`, tiny) from a small spec and expanded only where a backend needs it:

* CPU / no mask needed: `torch.nn.functional.scaled_dot_product_attention`; with a mask, one unmasked SDPA call
  per group of query frames that see the same key frames, on just those keys (`AttentionMask.groups`: the
  block-causal and teacher-forcing masks are mostly False, and a dense boolean mask makes SDPA's CPU path
  compute every masked-out score: 3× the work at 64 tokens a frame);
* GPU with a mask: flex attention with a block mask whose `mask_mod` looks the frame mask up;
* GPU without a mask (cached `denoise` / `commit` calls, cross-attention): the fastest correct kernel present,
  chosen once and logged (`choose_cuda_kernel`): on Hopper FlashAttention-3 when installed, else cuDNN attention
  through SDPA, else FlashAttention-2 through SDPA; on Ampere/Ada SDPA's FlashAttention-2.

Visibility rule (`reference/ar_models.md` §2.2, §3.3): a query in a block that ends at frame ``e`` sees a key frame
``f`` iff ``f < e`` and, with a local window of ``W`` frames and ``S`` sink frames, ``f`` is a sink frame or
``f >= e - (W - S)``. In the teacher-forcing layout ``[clean ; noisy]`` a noisy block sees the clean frames before
its own start plus the noisy frames of its own block; clean frames follow the block-causal rule among themselves.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "sdpa", "flex"]
CudaKernel = Literal["fa3", "cudnn", "flash", "efficient"]

log = logging.getLogger(__name__)


def block_bounds(
    num_frames: int, frames_per_block: int, first_block_frames: int | None = None, start_frame: int = 0
) -> list[tuple[int, int]]:
    """Split frames ``[start_frame, start_frame + num_frames)`` into blocks ``[(start, end), ...]``.

    The first of these blocks may be shorter or longer (``first_block_frames``, e.g. 1 for an independent first
    frame).
    Raises if the frames do not split into whole blocks: a partial last block would silently change the model's
    attention pattern.
    """
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    bounds: list[tuple[int, int]] = []
    s = start_frame
    end = start_frame + num_frames
    if first_block_frames is not None and num_frames > 0:
        s = start_frame + first_block_frames
        bounds.append((start_frame, s))
    while s < end:
        bounds.append((s, s + frames_per_block))
        s += frames_per_block
    if bounds and bounds[-1][1] != end:
        first = f" (first block {first_block_frames})" if first_block_frames is not None else ""
        raise ValueError(
            f"{num_frames} latent frames do not split into blocks of {frames_per_block}{first}; "
            f"use a frame count of first_block + k·{frames_per_block}"
        )
    return bounds


@dataclass(frozen=True)
class FrameLayout:
    """Per-frame description of a token sequence: which frame, which block, clean or noisy, sink or not.

    All lists have one entry per frame of the sequence, in sequence order. Frame indices are absolute (they are
    also the RoPE temporal positions).
    """

    frame: tuple[int, ...]
    block_start: tuple[int, ...]
    block_end: tuple[int, ...]
    noisy: tuple[bool, ...]
    sink: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.frame)

    def __add__(self, other: "FrameLayout") -> "FrameLayout":
        return FrameLayout(
            self.frame + other.frame,
            self.block_start + other.block_start,
            self.block_end + other.block_end,
            self.noisy + other.noisy,
            self.sink + other.sink,
        )

    @staticmethod
    def of_blocks(bounds: list[tuple[int, int]], *, noisy: bool = False, sink_frames: int = 0) -> "FrameLayout":
        frame, bs, be = [], [], []
        for s, e in bounds:
            for f in range(s, e):
                frame.append(f)
                bs.append(s)
                be.append(e)
        return FrameLayout(
            tuple(frame), tuple(bs), tuple(be), (noisy,) * len(frame), tuple(f < sink_frames for f in frame)
        )


def frame_mask(
    queries: FrameLayout, keys: FrameLayout, window_frames: int | None = None, sink_frames: int = 0
) -> Tensor:
    """Boolean visibility ``[Fq, Fk]`` (True = attend) under the block-causal / window / sink / TF rule.

    Args:
        queries, keys: the frame layouts of the query and key sequences.
        window_frames: total attention span in frames *including* the sink and the query's own block
            (LongLive: 12), or None for unbounded (global) attention.
        sink_frames: how many frames of that span are the sink (keys flagged ``sink`` in their layout).
    """
    qf = torch.tensor(queries.block_end)[:, None]
    qs = torch.tensor(queries.block_start)[:, None]
    qn = torch.tensor(queries.noisy)[:, None]
    kf = torch.tensor(keys.frame)[None, :]
    kn = torch.tensor(keys.noisy)[None, :]
    ks = torch.tensor(keys.sink)[None, :]
    # A clean key is context: visible to clean queries up to their block end, to noisy queries before their block.
    clean_vis = ~kn & torch.where(qn, kf < qs, kf < qf)
    # A noisy key is visible only to the noisy queries of its own block.
    noisy_vis = kn & qn & (kf >= qs) & (kf < qf)
    visible = clean_vis | noisy_vis
    if window_frames is not None:
        in_window = kf >= qf - (window_frames - sink_frames)
        visible = visible & (ks | in_window)
    return visible


@dataclass
class AttentionMask:
    """A frame mask plus the token geometry; lazily materialises the dense or flex form a backend needs."""

    frames: Tensor  # [Fq, Fk] bool
    tokens_per_frame: int
    _flex: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def all_visible(self) -> bool:
        return bool(self.frames.all())

    @functools.cached_property
    def groups(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """The query frames grouped by their visibility row: per distinct row, the token indices of its query
        frames and of the key frames it sees (``[Lg]``, ``[Kg]`` long). Every key of a group is visible to every
        query of it, so each group is one unmasked attention."""
        t = self.tokens_per_frame
        tokens = lambda frames: (frames[:, None] * t + torch.arange(t)).flatten()  # noqa: E731
        rows, which = torch.unique(self.frames, dim=0, return_inverse=True)
        if not bool(rows.any(1).all()):
            raise ValueError("a query frame of this attention mask sees no key frame")
        return tuple((tokens(torch.nonzero(which == i)[:, 0]), tokens(torch.nonzero(row)[:, 0]))
                     for i, row in enumerate(rows))

    @functools.cached_property
    def group_order(self) -> Tensor:
        """The permutation ``[Lq]`` that puts the groups' concatenated outputs back in query order."""
        return torch.argsort(torch.cat([q for q, _ in self.groups]))

    def flex(self, device: torch.device):
        """Flex-attention ``BlockMask`` (built once per device)."""
        if device not in self._flex:
            from torch.nn.attention.flex_attention import create_block_mask

            frames = self.frames.to(device)
            t = self.tokens_per_frame

            def mask_mod(b, h, q_idx, kv_idx):
                return frames[q_idx // t, kv_idx // t]

            lq, lk = frames.shape[0] * t, frames.shape[1] * t
            # compiled construction never materialises the [Lq, Lk] mask (65k² booleans at full size)
            self._flex[device] = create_block_mask(
                mask_mod, None, None, lq, lk, device=str(device), _compile=device.type == "cuda"
            )
        return self._flex[device]


@functools.lru_cache(maxsize=32)
def cached_mask(
    queries: FrameLayout, keys: FrameLayout, window_frames: int | None, sink_frames: int, tokens_per_frame: int
) -> AttentionMask:
    """`AttentionMask` memoised by layout: training repeats one layout every micro-batch, so the dense or flex
    form is built once per run instead of once per call."""
    return AttentionMask(frame_mask(queries, keys, window_frames, sink_frames), tokens_per_frame)


_compiled_flex = None


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """Flex attention, compiled once on CUDA with autotuned tiles (the eager version materialises the full score
    matrix). CUDA graphs stay off: the training pass runs one call per layer with differing activations."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


def choose_cuda_kernel(capability: tuple[int, int], has_fa3: bool, has_cudnn: bool) -> CudaKernel:
    """The unmasked attention kernel for a GPU of compute ``capability``.

    Hopper (9.x): FlashAttention-3 (its Hopper kernels, ``flash_attn_interface``) when installed, else cuDNN's
    fused attention (SDPA's cuDNN backend; on H100/H200 it outruns FlashAttention-2), else FlashAttention-2.
    Ampere/Ada (8.x): FlashAttention-2. Older: the memory-efficient kernel.
    """
    if capability >= (9, 0) and capability < (10, 0):
        if has_fa3:
            return "fa3"
        if has_cudnn:
            return "cudnn"
    return "flash" if capability >= (8, 0) else "efficient"


_CUDA_KERNELS: dict[int, CudaKernel] = {}  # chosen kernel per device index: a plain dict, read as a constant
# by torch.compile (an lru_cache'd call would break the graph at every layer)


def cuda_kernel(device_index: int) -> CudaKernel:
    """`choose_cuda_kernel` for this device, decided once per process and logged, so a run says which kernel it
    used. `CausalWan.compile_blocks` calls it before compiling, outside the traced code."""
    if device_index in _CUDA_KERNELS:
        return _CUDA_KERNELS[device_index]
    try:
        import flash_attn_interface  # noqa: F401  (FlashAttention-3's Hopper build)

        has_fa3 = True
    except ImportError:
        has_fa3 = False
    from torch.nn.attention import SDPBackend

    has_cudnn = hasattr(SDPBackend, "CUDNN_ATTENTION") and torch.backends.cudnn.is_available()
    kernel = choose_cuda_kernel(torch.cuda.get_device_capability(device_index), has_fa3, has_cudnn)
    log.info("unmasked attention on %s: %s", torch.cuda.get_device_name(device_index), kernel)
    _CUDA_KERNELS[device_index] = kernel
    return kernel


def _sdpa_cuda(q: Tensor, k: Tensor, v: Tensor, kernel: CudaKernel) -> Tensor:
    """Unmasked attention on CUDA, ``[B, H, L, D]`` in and out, through ``kernel`` (SDPA falls back down the list
    when a kernel rejects the inputs, e.g. fp32)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel == "fa3" and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
        return out.transpose(1, 2)
    order = {
        "cudnn": ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
        "fa3": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
        "flash": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
        "efficient": ["EFFICIENT_ATTENTION", "MATH"],
    }[kernel]
    with sdpa_kernel([getattr(SDPBackend, b) for b in order], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def _grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Masked attention ``[B, H, Lq, D]`` as one unmasked SDPA per `AttentionMask.groups` entry: the same softmax
    over the same visible keys as the dense mask, without computing the masked-out scores."""
    if len(mask.groups) == 1:  # one row: every query sees the same keys
        keys = mask.groups[0][1].to(q.device)
        return F.scaled_dot_product_attention(q, k.index_select(2, keys), v.index_select(2, keys))
    parts = []
    for queries, keys in mask.groups:
        queries, keys = queries.to(q.device), keys.to(q.device)
        parts.append(F.scaled_dot_product_attention(q.index_select(2, queries), k.index_select(2, keys),
                                                    v.index_select(2, keys)))
    return torch.cat(parts, dim=2).index_select(2, mask.group_order.to(q.device))


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None = None, backend: Backend = "auto"
) -> Tensor:
    """Multi-head attention, ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]``.

    ``mask=None`` means every key is visible. ``backend="auto"`` picks flex attention for masked calls on CUDA,
    the `choose_cuda_kernel` kernel for unmasked calls on CUDA, and SDPA everywhere else.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    if mask is not None and mask.all_visible:
        mask = None
    if backend == "auto":
        if q.is_cuda and mask is None:
            index = q.device.index or 0
            kernel = _CUDA_KERNELS[index] if index in _CUDA_KERNELS else cuda_kernel(index)
            return _sdpa_cuda(q, k, v, kernel).transpose(1, 2)
        backend = "flex" if (mask is not None and q.is_cuda) else "sdpa"
    if backend == "flex":
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = _flex_attention(q, k, v, mask.flex(q.device))
    elif backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v) if mask is None else _grouped_sdpa(q, k, v, mask)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; use 'auto', 'sdpa' or 'flex'")
    return out.transpose(1, 2)
