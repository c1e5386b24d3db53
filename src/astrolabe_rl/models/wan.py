"""CausalWan: the one Wan2.1 DiT implementation, made block-causal and streaming.

Parameter names follow the original Wan code (``blocks.N.self_attn.q``, ``blocks.N.norm3``, ``head.modulation``, ...)
so the official state dicts of every family load as they are (`reference/ar_models.md` §1.2). The model runs in
three modes (DESIGN §3):

1. `forward`: a whole clip in one call under a frame mask: block-causal (the released "noisy context" layout), or
   the teacher-forcing layout ``[clean ; noisy]``; optionally a local window + sink. Training uses this.
2. `denoise`: one block against a `KVCache`; it only *reads* the cache, so it is safe under autograd and
   gradient checkpointing.
3. `commit`: the clean pass (``no_grad``) that appends the block's K/V to the cache, evicting per the cache policy.

Shapes: latents ``[B, F, C, H, W]`` (frames second), per-frame timesteps ``[B, F]`` on the 0..1000 scale, text
embeddings ``[B, L, text_dim]``. Precision follows the original: sinusoidal and RoPE tables in float64, LayerNorm
and RMSNorm statistics in float32, modulation in float32; weights and activations in the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
import contextlib
import functools
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from astrolabe_rl.models.attention import (
    AttentionMask,
    Backend,
    FrameLayout,
    attention,
    block_bounds,
    cached_mask,
    cuda_kernel,
)
from astrolabe_rl.models.kv_cache import AppendPlan, CachePolicy, KVCache

TextKV = list[tuple[Tensor, Tensor]]  # per layer: cross-attention (k, v), each [B, L, H, D]
# One layer's source of keys: maps this call's (RoPE'd K, V) ``[B, L, H, D]`` to the (keys, values) to attend to.
KVSource = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class WanConfig:
    """Every geometry number of the DiT. Nothing else in the code base hard-codes them.

    Attributes:
        dim: hidden width (1.3B: 1536, 14B: 5120).
        ffn_dim: feed-forward width (1.3B: 8960, 14B: 13824).
        num_heads: attention heads; head_dim = dim / num_heads (128 for both real models).
        num_layers: transformer blocks (1.3B: 30, 14B: 40).
        freq_dim: width of the sinusoidal timestep embedding (256).
        text_dim: width of the text-encoder output (umT5-XXL: 4096).
        text_len: tokens per prompt (512).
        in_dim, out_dim: latent channels (16).
        patch_size: (t, h, w) patch of the latent; Wan2.1 uses (1, 2, 2).
        qk_norm: RMSNorm on queries and keys (across heads).
        cross_attn_norm: affine LayerNorm before cross-attention (``norm3``).
        eps: epsilon of every norm.
        rope_max_frames: largest absolute latent-frame index + 1 the temporal RoPE supports (official: 1024).
        rope_theta: RoPE base.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_frames: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 (RoPE splits it over 3 axes)")
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size={self.patch_size}: only a temporal patch of 1 is supported (Wan2.1)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        """Tokens of one latent frame: (H / p_h) · (W / p_w); 1560 for a 60×104 latent."""
        return (latent_h // self.patch_size[1]) * (latent_w // self.patch_size[2])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def wan_1_3b(cls, **overrides) -> "WanConfig":
        """Wan2.1-T2V-1.3B (Self-Forcing, Causal Forcing, LongLive, CausVid)."""
        return replace(cls(), **overrides)

    @classmethod
    def wan_14b(cls, **overrides) -> "WanConfig":
        """Wan2.1-T2V-14B (Krea Realtime 14B)."""
        return replace(cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "WanConfig":
        """A CPU test model: 2 layers, width 24, 2 heads of 12, text width 16 (runs in milliseconds)."""
        return replace(
            cls(dim=24, ffn_dim=32, num_heads=2, num_layers=2, text_dim=16, text_len=8, rope_max_frames=1024),
            **overrides,
        )


# ----------------------------------------------------------------------------------------------- numerics


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """``[cos | sin]`` timestep embedding computed in float64, frequencies ``10000^(-i / (dim/2))``. ``[N] -> [N, dim]``."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with float32 statistics; the weight is applied after casting back (original Wan order)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm computed in float32 (affine or not), returned in float32 for the modulation that follows."""
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, num_frames: int) -> Tensor:
    """Per-frame affine modulation ``x·(1 + scale) + shift``. ``x [B, F·T, C]``, ``shift, scale [B, F, 1, C]``."""
    xf = x.unflatten(1, (num_frames, -1))
    return (xf * (1 + scale) + shift).flatten(1, 2)


def gate(x: Tensor, y: Tensor, g: Tensor, num_frames: int) -> Tensor:
    """Gated residual ``x + y·g`` per frame, the product in float32. ``g [B, F, 1, C]``."""
    return x + (y.float().unflatten(1, (num_frames, -1)) * g).flatten(1, 2).type_as(x)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x [B, L, H, D]`` by angles given as ``cos, sin [L, D/2]``."""
    xf = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)


class RopeTables:
    """3-axis RoPE angle tables (float64) and per-call cos/sin lookups cached by (frames, h, w, device, dtype).

    The head dimension ``d`` is split into complex pairs: ``d - 4·(d//6)`` real dims for time and ``2·(d//6)`` for
    each of height and width. Temporal positions are *absolute* latent-frame indices. The angles are computed on the
    call's device from per-axis tables that live there, so a lookup never copies from the host (a host-to-device
    copy per block would block CUDA-graph capture and stall the stream).
    """

    def __init__(self, head_dim: int, max_frames: int, theta: float) -> None:
        d_hw = 2 * (head_dim // 6)
        self.dims = (head_dim - 2 * d_hw, d_hw, d_hw)
        self.theta = theta
        self.max_frames = max_frames
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._axes: dict[torch.device, Tensor] = {}

    def _time_angles(self, device: torch.device) -> Tensor:
        """Temporal angles of every supported frame ``[max_frames, d_t/2]`` (float64), built once per device."""
        if device not in self._axes:
            dim = self.dims[0]
            inv = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
            self._axes[device] = torch.arange(self.max_frames, dtype=torch.float64, device=device)[:, None] * inv
        return self._axes[device]

    def _axis(self, n: int, dim: int, device: torch.device) -> Tensor:
        inv = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        return torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv

    def __call__(
        self, frames: tuple[int, ...], h: int, w: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """cos, sin ``[len(frames)·h·w, head_dim/2]`` for tokens ordered frame-major, then h, then w."""
        if max(frames) >= self.max_frames:
            raise ValueError(
                f"latent frame {max(frames)} exceeds the absolute RoPE range of {self.max_frames} frames; "
                "shorten the video or raise WanConfig.rope_max_frames"
            )
        key = (frames, h, w, device, dtype)
        if key not in self._cache:
            if len(self._cache) > 64:  # bounded: positions repeat across blocks, steps and rollouts
                self._cache.clear()
            table = self._time_angles(device)
            runs, lo = [], 0  # frames are runs of consecutive indices: slice them, no index tensor from the host
            for i in range(1, len(frames) + 1):
                if i == len(frames) or frames[i] != frames[i - 1] + 1:
                    runs.append(table[frames[lo] : frames[i - 1] + 1])
                    lo = i
            at = torch.cat(runs) if len(runs) > 1 else runs[0]
            ah, aw = self._axis(h, self.dims[1], device), self._axis(w, self.dims[2], device)
            n = len(frames)
            angles = torch.cat(
                [
                    at[:, None, None].expand(n, h, w, -1),
                    ah[None, :, None].expand(n, h, w, -1),
                    aw[None, None, :].expand(n, h, w, -1),
                ],
                dim=-1,
            ).reshape(n * h * w, -1)
            table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self._cache[key] = (angles.cos().to(table_dtype), angles.sin().to(table_dtype))
        return self._cache[key]


# -------------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        kv: KVSource | None,
        mask: AttentionMask | None,
        backend: Backend,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the output ``[B, L, C]`` and this call's RoPE'd K and raw V ``[B, L, H, D]`` (for commits).

        ``kv`` turns this call's K/V into what the queries attend to (cached context + them); None: just them.
        """
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys, values = (k, v) if kv is None else kv(k, v)
        out = attention(q, keys, values, mask, backend)
        return self.o(out.flatten(2)), k, v


class CrossAttention(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """K/V of the projected text ``[B, L, C]`` -> ``[B, L, H, D]`` each; computed once per prompt."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], backend: Backend) -> Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, kv[0], kv[1], None, backend).flatten(2))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, unmodulated cross-attention, modulated FFN (original names)."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """This block's cross-attention K/V ``[B, L, H, D]`` of the projected text ``[B, L, C]``. A block method, not
        a reach into ``cross_attn``, so that FSDP2 can gather the block's sharded weights around it (`train.dist`)."""
        return self.cross_attn.text_kv(context)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: tuple[Tensor, Tensor],
        text: tuple[Tensor, Tensor],
        kv: KVSource | None,
        mask: AttentionMask | None,
        backend: Backend,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, F·T, C]``, ``e0 [B, F, 6, C]`` (per-frame time projection) -> new x, this call's K, V."""
        n = e0.shape[1]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation.float()[:, None] + e0.float()).unbind(2)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
            m[:, :, None] for m in (shift_a, scale_a, gate_a, shift_f, scale_f, gate_f)
        )
        h = modulate(layer_norm(x, self.norm1), shift_a, scale_a, n).type_as(x)
        y, k, v = self.self_attn(h, rope, kv, mask, backend)
        x = gate(x, y, gate_a, n)
        h = x if self.norm3 is None else layer_norm(x, self.norm3).type_as(x)
        x = x + self.cross_attn(h, text, backend)
        h = modulate(layer_norm(x, self.norm2), shift_f, scale_f, n).type_as(x)
        x = gate(x, self.ffn(h), gate_f, n)
        return x, k, v


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """``x [B, F·T, C]``, ``e [B, F, C]`` (time embedding, before projection)."""
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).unbind(2)
        h = modulate(layer_norm(x, self.norm), shift[:, :, None], scale[:, :, None], e.shape[1])
        return self.head(h.type_as(x))


# --------------------------------------------------------------------------------------------------- model


_ATTENTION_OPS: set = {
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(torch.ops.aten, name)
}
if hasattr(torch.ops, "higher_order") and hasattr(torch.ops.higher_order, "flex_attention"):
    _ATTENTION_OPS.add(torch.ops.higher_order.flex_attention)


def _save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: keep the attention kernels' outputs, recompute everything else (the matmuls
    and element-wise work are cheap next to attention over thousands of tokens, their activations are not)."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


CheckpointMode = Literal["full", "selective"]


class CausalWan(nn.Module):
    """The Wan2.1 DiT with block-causal masked, cached `denoise` and cached `commit` modes.

    Attributes:
        attn_backend: "auto" (flex for masked calls on CUDA, SDPA otherwise), "sdpa" or "flex".
        gradient_checkpointing: recompute each block in backward (used by training; the cache is never written
            inside a grad-enabled call, so recomputation sees the same inputs).
        checkpoint_mode: with checkpointing, ``"selective"`` (default) saves the attention outputs and recomputes the
            rest; ``"full"`` recomputes the whole block (least memory).
    """

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RopeTables(cfg.head_dim, cfg.rope_max_frames, cfg.rope_theta)
        self.attn_backend: Backend = "auto"
        self.gradient_checkpointing = False
        self.checkpoint_mode: CheckpointMode = "selective"
        self.compiled: str = "off"
        self._steps: list[Callable] | None = None  # compiled `_block_step` per block (compile_blocks)
        self.init_weights()

    def compile_blocks(self, enabled: bool | None = None, mode: str | None = None) -> str:
        """``torch.compile`` every DiT block in place (parameter names unchanged) and return what was done.

        ``enabled=None`` compiles on CUDA only (the default for training and sampling; CPU runs and tests stay
        eager). ``mode``: a ``torch.compile`` mode; ``"reduce-overhead"`` adds CUDA graphs, which the cached
        `denoise` calls allow (no host syncs, every pointer a Python int) but which hold one graph per key length.
        What is compiled is the block *with* its activation checkpoint (`_block_step`): selective checkpointing is
        honoured by the compiler only when the checkpoint is inside the compiled region.
        """
        if enabled is None:
            enabled = self.device.type == "cuda"
        if not enabled:
            self.compiled, self._steps = "off", None
        elif not hasattr(nn.Module, "compile"):
            self.compiled = "off (torch too old)"
        else:
            # Key lengths grow block by block (the cache fills): allow enough variants before dynamo gives up.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            if self.device.type == "cuda":
                cuda_kernel(self.device.index or 0)  # decide (and log) the attention kernel outside traced code
            self._steps = [torch.compile(functools.partial(_block_step, block), mode=mode) for block in self.blocks]
            self.compiled = f"blocks ({mode or 'default'})"
        return self.compiled

    # ---------------------------------------------------------------- construction

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as in Wan: Xavier-uniform linears, zero biases, N(0, 0.02) embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.head.weight.device

    def new_cache(
        self, batch: int, latent_hw: tuple[int, int], max_frames: int, policy: CachePolicy = CachePolicy()
    ) -> KVCache:
        """An empty `KVCache` for this model at this latent size (``max_frames`` sizes a global cache)."""
        cfg = self.config
        return KVCache(
            num_layers=cfg.num_layers,
            batch=batch,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            tokens_per_frame=cfg.tokens_per_frame(*latent_hw),
            max_frames=max_frames,
            policy=policy,
            dtype=self.dtype,
            device=self.device,
        )

    # ---------------------------------------------------------------- pieces

    def encode_text(self, context: Tensor) -> TextKV:
        """Project text embeddings ``[B, L, text_dim]`` and compute every layer's cross-attention K/V once.

        A context shorter than ``text_len`` is zero-padded to it first, as the official model does: the padded rows
        go through the text MLP (whose biases make them non-zero) and are attended to, so ``L`` tokens and their
        zero-padded ``text_len`` form must give the same K/V. A longer context has no official meaning and is
        rejected.
        """
        cfg = self.config
        if context.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"text embeddings have width {context.shape[-1]}, the model expects text_dim={cfg.text_dim}"
            )
        if context.shape[1] > cfg.text_len:
            raise ValueError(
                f"text embeddings have {context.shape[1]} tokens, more than the model's text_len={cfg.text_len}; "
                f"truncate the prompt to {cfg.text_len} tokens when encoding it (umT5: max_length={cfg.text_len})"
            )
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        ctx = self.text_embedding(context.to(self.dtype))
        return [block.text_kv(ctx) for block in self.blocks]

    def _patchify(self, x: Tensor) -> Tensor:
        """``[B, F, C, H, W] -> [B, F·h·w, dim]``: the patch conv as one matmul (frame-major, then h, then w)."""
        _, ph, pw = self.config.patch_size
        b, f, c, hh, ww = x.shape
        if hh % ph or ww % pw:
            raise ValueError(f"latent size {hh}×{ww} is not divisible by the patch size {ph}×{pw}")
        x = x.reshape(b, f, c, hh // ph, ph, ww // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        x = x.reshape(b, f * (hh // ph) * (ww // pw), c * ph * pw)
        w = self.patch_embedding.weight
        return F.linear(x.to(w.dtype), w.flatten(1), self.patch_embedding.bias)

    def _unpatchify(self, x: Tensor, f: int, hh: int, ww: int) -> Tensor:
        """``[B, F·h·w, p_h·p_w·C] -> [B, F, C, H, W]`` with the original channel order (p_h, p_w, C)."""
        _, ph, pw = self.config.patch_size
        b = x.shape[0]
        h, w = hh // ph, ww // pw
        x = x.reshape(b, f, h, w, ph, pw, -1).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, -1, hh, ww)

    def _time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame timesteps ``[B, F]`` -> embedding ``e [B, F, C]`` and projection ``e0 [B, F, 6, C]``."""
        b, f = t.shape
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.config.freq_dim).to(self.dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, -1))
        return e.unflatten(0, (b, f)), e0.unflatten(0, (b, f))

    def _run(
        self,
        x: Tensor,
        t: Tensor,
        frames: tuple[int, ...],
        text: TextKV,
        kv: Callable[[int], KVSource] | None = None,
        mask: AttentionMask | None = None,
        after_layer: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """The network on a frame sequence ``x [B, N, C, H, W]`` with timesteps ``[B, N]`` at RoPE positions
        ``frames``; ``kv(layer)`` supplies each layer's key source (cached context). Returns the velocity
        ``[B, N, C, H, W]``; ``after_layer(layer, k, v)`` receives every layer's new (RoPE'd K, V) as soon as that
        layer has run (commits write them then, so no call holds every layer's K/V at once)."""
        b, n, _, hh, ww = x.shape
        if len(text) != len(self.blocks) or text[0][0].shape[0] != b:
            raise ValueError(
                f"text K/V is for {len(text)} layers × batch {text[0][0].shape[0]}; the call has "
                f"{len(self.blocks)} layers × batch {b} (encode the prompts once per sample)"
            )
        _, ph, pw = self.config.patch_size
        tokens = self._patchify(x)
        e, e0 = self._time(t)
        rope = self.rope(frames, hh // ph, ww // pw, x.device, tokens.dtype)
        ckpt = self.checkpoint_mode if self.gradient_checkpointing and torch.is_grad_enabled() else None
        for i, block in enumerate(self.blocks):
            args = (tokens, e0, rope, text[i], kv(i) if kv is not None else None, mask, self.attn_backend)
            if self._steps is not None:
                tokens, k, v = self._steps[i](ckpt, *args)
            else:
                tokens, k, v = _block_step(block, ckpt, *args)
            if after_layer is not None:
                after_layer(i, k, v)
        out = self.head(tokens, e)
        return self._unpatchify(out, n, hh, ww)

    def _text(self, text: Tensor | TextKV) -> TextKV:
        return self.encode_text(text) if isinstance(text, Tensor) else text

    @staticmethod
    def _timesteps(t: float | Tensor, b: int, f: int, device: torch.device) -> Tensor:
        """Broadcast a scalar, ``[B]`` or ``[B, F]`` timestep to per-frame ``[B, F]`` float64.

        A Python number is filled on the device (a kernel argument, not a host-to-device copy)."""
        if isinstance(t, (int, float)):
            return torch.full((b, f), float(t), dtype=torch.float64, device=device)
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.dim() == 1:
            t = t[:, None]
        return t.expand(b, f)

    # ---------------------------------------------------------------- mode 1: masked full sequence

    def forward(
        self,
        x: Tensor,
        t: float | Tensor,
        text: Tensor | TextKV,
        *,
        frames_per_block: int,
        first_block_frames: int | None = None,
        clean: Tensor | None = None,
        t_clean: float | Tensor = 0.0,
        policy: CachePolicy = CachePolicy(),
    ) -> Tensor:
        """Whole clip in one call under a block-causal mask; returns the velocity of ``x``.

        Args:
            x: latents ``[B, F, C, H, W]`` (noisy).
            t: timesteps, a scalar, ``[B]`` or per-frame ``[B, F]`` (0..1000).
            text: text embeddings ``[B, L, text_dim]`` or precomputed `encode_text` output.
            frames_per_block: latent frames per causal block (3; 1 for frame-wise models).
            first_block_frames: a different size for the first block (e.g. 1), or None.
            clean: teacher-forcing context ``[B, F, C, H, W]`` at the same RoPE positions: noisy block i sees clean
                blocks < i and itself, exactly as `denoise` does against a cache filled by `commit`. The history is
                clean and detached, as the cache's is: the clean stream (block-causal among clean frames only)
                runs first without gradient and its per-layer K/V enter the noisy stream's attention as constants,
                so the θ gradient is that of commit + denoise. None: plain block-causal attention over ``x`` (the
                released training layout).
            t_clean: timestep of the clean half (the context timestep, 0).
            policy: local window + sink (None window = global attention).
        """
        b, f = x.shape[:2]
        bounds = block_bounds(f, frames_per_block, first_block_frames)
        layout = FrameLayout.of_blocks(bounds, sink_frames=policy.sink_frames)
        t = self._timesteps(t, b, f, x.device)
        tpf = self.config.tokens_per_frame(*x.shape[-2:])
        window, sink = policy.window_frames, policy.sink_frames
        text = self._text(text)
        if clean is None:
            return self._run(x, t, layout.frame, text, mask=cached_mask(layout, layout, window, sink, tpf))
        if clean.shape != x.shape:
            raise ValueError(f"clean context {tuple(clean.shape)} must match the noisy input {tuple(x.shape)}")
        history: list[tuple[Tensor, Tensor]] = []  # per layer: the clean stream's RoPE'd K and V
        with torch.no_grad():  # the history is data, never trained through (as commits to the cache are not)
            self._run(clean.to(self.dtype), self._timesteps(t_clean, b, f, x.device), layout.frame, text,
                      mask=cached_mask(layout, layout, window, sink, tpf),
                      after_layer=lambda layer, k, v: history.append((k, v)))
        noisy = FrameLayout.of_blocks(bounds, noisy=True, sink_frames=sink)

        def with_history(layer: int) -> KVSource:
            return lambda k, v: (torch.cat([history[layer][0], k], dim=1), torch.cat([history[layer][1], v], dim=1))

        return self._run(x, t, layout.frame, text, kv=with_history,
                         mask=cached_mask(noisy, layout + noisy, window, sink, tpf))

    # ---------------------------------------------------------------- mode 2: denoise against the cache

    def denoise(
        self, cache: KVCache, x: Tensor, t: float | Tensor, start_frame: int | None = None,
        text: Tensor | TextKV | None = None,
    ) -> Tensor:
        """Velocity of one block ``x [B, f, C, H, W]`` attending to the cache plus itself (bidirectionally).

        Pure with respect to the committed frames: with gradients it reads the cache and writes nothing, so it may
        run under autograd and checkpointing; without (sampling) each layer writes the block's K/V into the slots
        the block will be committed to and attends to one contiguous stretch of the buffer (`KVCache` docstring).
        ``start_frame`` defaults to the cache's next frame; ``text`` defaults to the cache's prompt.
        """
        b, f = x.shape[:2]
        start = cache.next_frame if start_frame is None else start_frame
        text_kv = cache.text if text is None else self._text(text)
        if text_kv is None:
            raise ValueError("no prompt: set cache.text = model.encode_text(embeds) or pass text=")
        plan = None if torch.is_grad_enabled() else cache.plan_append(f, start, check_order=False)
        if plan is not None and plan.end is not None:
            cache.borrow(plan)
            kv = _in_place(cache, plan)
        else:
            kv = _concatenated(cache, f)
        return self._run(x, self._timesteps(t, b, f, x.device), tuple(range(start, start + f)), text_kv, kv=kv)

    # ---------------------------------------------------------------- mode 3: commit clean frames

    @torch.no_grad()
    def commit(
        self,
        cache: KVCache,
        x0: Tensor,
        start_frame: int | None = None,
        t: float | Tensor = 0.0,
        frames_per_block: int | None = None,
        first_block_frames: int | None = None,
    ) -> None:
        """Run the clean pass over ``x0 [B, f, C, H, W]`` at the context timestep and append its K/V to the cache.

        ``x0`` is normally one block. Several blocks at once (history, LongLive re-cache) need
        ``frames_per_block`` (and ``first_block_frames`` if the first differs): they are then processed in one call
        under a block-causal mask, which equals committing them one by one.
        """
        b, f = x0.shape[:2]
        start = cache.next_frame if start_frame is None else start_frame
        if cache.text is None:
            raise ValueError("no prompt: set cache.text = model.encode_text(embeds) before committing")
        fpb = f if frames_per_block is None else frames_per_block
        bounds = block_bounds(f, fpb, first_block_frames, start_frame=start)
        plan = cache.plan_append(f, start)
        mask = None
        if len(bounds) > 1:
            n_first = bounds[0][1] - bounds[0][0]
            ctx_layout = cache.context_layout(n_first)
            q = FrameLayout.of_blocks(bounds)
            window = cache.policy.window_frames
            # Context keys count as sink only if the cache says so; new frames become sink when the sink has room.
            room = cache.sink_frames - len(cache.sink_positions)
            q = replace(q, sink=tuple(i < room for i in range(f)))
            keys = ctx_layout + q
            tpf = self.config.tokens_per_frame(*x0.shape[-2:])
            mask = cached_mask(q, keys, window, cache.sink_frames, tpf)
            kv, after = _concatenated(cache, n_first), functools.partial(_write, cache, plan)
        elif plan.end is not None:  # one unmasked block: write it into its slots and attend in place
            kv, after = _in_place(cache, plan), None
        else:
            kv, after = _concatenated(cache, f), functools.partial(_write, cache, plan)
        self._run(
            x0.to(self.dtype),
            self._timesteps(t, b, f, x0.device),
            tuple(range(start, start + f)),
            cache.text,
            kv=kv,
            mask=mask,
            after_layer=after,
        )
        cache.finish_append(plan)


def _block_step(block: WanBlock, ckpt: CheckpointMode | None, *args) -> tuple[Tensor, Tensor, Tensor]:
    """One block, under activation checkpointing when ``ckpt`` is set (``"selective"``: attention outputs saved)."""
    if ckpt is None:
        return block(*args)
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _save_attention) if ckpt == "selective" else _no_context
    )
    return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn)


# ------------------------------------------------------------------------------------------- key sources


def _no_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Full checkpointing: no selective policy."""
    return contextlib.nullcontext(), contextlib.nullcontext()


def _concatenated(cache: KVCache, n_new: int) -> Callable[[int], KVSource]:
    """Keys = the cached context of a ``n_new``-frame block (time order) followed by the call's own K/V, in one
    concatenation per layer; nothing is written (safe under autograd and for masked calls)."""

    def source(layer: int) -> KVSource:
        ks, vs = cache.context(layer, n_new)

        def kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            return (torch.cat([*ks, k], dim=1), torch.cat([*vs, v], dim=1)) if ks else (k, v)

        return kv

    return source


def _in_place(cache: KVCache, plan: AppendPlan) -> Callable[[int], KVSource]:
    """Keys = one contiguous prefix of the layer's buffer after writing the call's K/V into the slots ``plan``
    gives them (unmasked calls without gradients: the order of keys does not matter, each carries its RoPE)."""

    def source(layer: int) -> KVSource:
        def kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache.write(layer, k, v, plan)
            return cache.k[layer][:, : plan.end], cache.v[layer][:, : plan.end]

        return kv

    return source


def _write(cache: KVCache, plan: AppendPlan, layer: int, k: Tensor, v: Tensor) -> None:
    cache.write(layer, k, v, plan)
