"""Cost model: FLOPs by dtype and kernel class, bytes moved and host syncs of what training really runs, counted
on the meta device at the real geometry (no GPU, no weights, seconds on a CPU).

What it counts (DESIGN §6)
    Every torch function the code calls is intercepted by a `torch.overrides.TorchFunctionMode` while the model
    runs on the ``meta`` device (shapes and dtypes propagate, nothing is computed):

    * ``matmul``: ``F.linear``, ``matmul``/``bmm``/``mm``/``addmm``, convolutions: ``2·M·N·K`` FLOPs, by the
      dtype of the operands (an fp32 matmul on the bf16 sampling path is the regression this tool exists to show);
    * ``attention``: ``scaled_dot_product_attention`` / flex attention: ``4·B·H·Lq·Lk·D`` FLOPs (QKᵀ and PV),
      split into ``attention`` (unmasked) and ``attention_masked`` (dense count; the block-causal mask's visible
      share is printed separately: that is what flex attention, which skips empty tiles, computes);
    * ``copy``: ``cat``/``stack``/``clone``/``copy_``/indexed writes and dtype casts (bytes only);
    * ``elementwise``: everything else that makes a tensor (norms, modulation, RoPE, gates): bytes only;
    * views (outputs that alias an input) cost nothing;
    * ``host_syncs``: reads of device values from the host (``item``, ``bool``, ``int``, ``float``, ``tolist``,
      ``.cpu()``) and ``h2d_copies``: tensors made from host data or copied from the CPU onto the device. Both stall
      the host or break CUDA-graph capture; neither may happen per layer.

    ``bytes`` is the sum of every non-view call's input and output tensor sizes: the traffic of an unfused eager run
    (compilation fuses element-wise chains, so it is an upper bound there). The backward of the training sample is
    added analytically, as profilers do: a linear costs one more forward for the input gradient (when the input
    needs one) and one for the weight gradient (when the weight is trainable), attention 2.5 forwards (FlashAttention
    recomputes the scores), and gradient checkpointing recomputes the θ pass's forward, less its attention with
    selective checkpointing (the attention outputs are saved).

Scenarios (Wan2.1-1.3B geometry: 30 layers, width 1536, 480×832 = 60×104 latents, 21 latent frames)
    * ``rollout``: one video at batch 1 through the sampler (`astrolabe_rl.rollout.rollout`, 7 blocks × 4 steps +
      commits), through ``--path``: ``recipe`` (the merged sampling copy, `Policy.sampling_model`, when the policy has
      one; else the unmerged ``old`` adapter, which is what the recipe sampled through before it), ``unmerged`` (the
      ``old`` LoRA adapter run through peft), or ``base`` (the bare model).
    * ``train``: one NFT training sample (old and reference passes without grad, θ pass with grad, noisy block-causal
      layout at one σ), LoRA r256 on every block linear, gradient checkpointing as the model is configured.
    * ``merge``: refreshing the merged sampling copy once (what each optimiser step adds).
    * ``decode``: one 81-frame video through the Wan VAE's fast decoder (needs diffusers; skipped without it).

    ``limit_s`` is the arithmetic-limit time: bf16 FLOPs at 798 TFLOP/s (the H200's measured dense bf16 rate) plus
    fp32 FLOPs at 67 TFLOP/s (its fp32 rate without TF32; PyTorch's default for matmuls); ``bytes_s`` is the bytes at
    4.8 TB/s (HBM3e peak). A kernel can do no better than the larger of the two.

Output
    A table on stderr and one JSON line on stdout.

Usage
    python bench/costmodel.py                      # full geometry, every scenario
    python bench/costmodel.py --path unmerged      # what the adapter path costs
    python bench/costmodel.py --tiny               # tiny geometry (what the tests pin)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

try:
    import astrolabe_rl  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

BF16_FLOPS = 798e12  # H200, measured dense bf16 matmul rate
FP32_FLOPS = 67e12  # H200 fp32 (no TF32) peak
HBM_BYTES = 4.8e12  # H200 HBM3e peak bandwidth

_MATMUL = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"}
_CONV = {"conv1d", "conv2d", "conv3d"}
_ATTENTION = {"scaled_dot_product_attention", "flex_attention"}
_COPY = {"cat", "stack", "clone", "copy_", "__setitem__", "contiguous", "to", "type_as", "float", "half",
         "bfloat16", "double", "index_copy_", "index_put_", "repeat", "repeat_interleave", "pad"}
_SYNC = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"}
_HOST_DATA = {"tensor", "as_tensor", "from_numpy"}


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_owner(t: Tensor) -> Tensor:
    """The tensor whose memory ``t`` shares (itself unless it is a view): outputs aliasing an input cost nothing.
    (A view of a fresh result, e.g. the reshape inside a 3-D ``linear``, is not an alias of an input.)"""
    return t._base if t._is_view() and t._base is not None else t


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Costs:
    """What one scenario costs; every figure is a total over the scenario."""

    flops: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # (class, dtype)
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # by class
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by class (≈ eager kernel launches)
    host_syncs: int = 0
    h2d_copies: int = 0
    sync_sites: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: "Costs", scale: float = 1.0) -> None:
        for k, v in other.flops.items():
            self.flops[k] += scale * v
        for k, v in other.bytes.items():
            self.bytes[k] += scale * v
        for k, v in other.calls.items():
            self.calls[k] += int(scale * v)
        self.host_syncs += other.host_syncs
        self.h2d_copies += other.h2d_copies

    def flops_of(self, kernel: str | None = None, dtype: str | None = None) -> float:
        return sum(v for (k, d), v in self.flops.items() if kernel in (None, k) and dtype in (None, d))

    def summary(self, masked_share: float | None = None) -> dict[str, Any]:
        """JSON-ready figures: TFLOPs by class and dtype, GB moved, syncs, and the arithmetic / bandwidth limits."""
        bf16 = self.flops_of(dtype="bfloat16") + self.flops_of(dtype="float16")
        fp32 = self.flops_of(dtype="float32") + self.flops_of(dtype="float64")
        if masked_share is not None:  # flex attention skips the masked tiles (forward, backward, recompute)
            masked = sum(v for (k, d), v in self.flops.items() if k.startswith("attention_masked") and d != "float32")
            bf16 -= masked * (1 - masked_share)
        out = {
            "tflops": {f"{k}/{d}": v / 1e12 for (k, d), v in sorted(self.flops.items())},
            "tflops_bf16": bf16 / 1e12,
            "tflops_fp32": fp32 / 1e12,
            "fp32_matmul_tflops": self.flops_of("matmul", "float32") / 1e12,
            "gbytes": {k: v / 1e9 for k, v in sorted(self.bytes.items())},
            "gbytes_total": sum(self.bytes.values()) / 1e9,
            "calls": dict(sorted(self.calls.items())),
            "host_syncs": self.host_syncs,
            "h2d_copies": self.h2d_copies,
            "limit_s": bf16 / BF16_FLOPS + fp32 / FP32_FLOPS,
            "bytes_s": sum(self.bytes.values()) / HBM_BYTES,
        }
        if masked_share is not None:
            out["masked_attention_visible_share"] = masked_share
        return out


class CostCounter(TorchFunctionMode):
    """Counts FLOPs, bytes, calls and host syncs of every torch call made inside it (see the module docstring).

    ``grad_scale``: when set, matmul/attention FLOPs under autograd also get their backward added analytically.
    """

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.costs = Costs()
        self.device_type = device_type
        self.backward = False  # add the analytic backward of grad-requiring matmuls and attention

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901 - one dispatch table
        kwargs = kwargs or {}
        name = _name(func)
        c = self.costs
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        on_device = [t for t in ins if t.device.type == self.device_type]
        if name in _SYNC and on_device:
            c.host_syncs += 1
            c.sync_sites[name] += 1
            if self.device_type == "meta":  # meta tensors hold no value: answer something plausible, keep counting
                return {"item": 0.0, "tolist": [], "__bool__": True, "__int__": 0, "__float__": 0.0,
                        "__index__": 0}.get(name, None) if name != "cpu" else torch.empty_like(on_device[0],
                                                                                             device="cpu")
        out = func(*args, **kwargs)
        outs = list(_tensors(out))
        if not outs:
            return out
        dev_out = [t for t in outs if t.device.type == self.device_type]
        if name in _HOST_DATA and dev_out:
            c.h2d_copies += 1
            c.sync_sites[f"h2d:{name}"] += 1
        elif name in {"to", "cuda", "copy_"} and dev_out and any(t.device.type == "cpu" for t in ins):
            c.h2d_copies += 1
            c.sync_sites[f"h2d:{name}"] += 1
        if not dev_out:
            return out
        bases = {id(_storage_owner(t)) for t in ins}
        if all(id(_storage_owner(t)) in bases for t in dev_out) and name != "__setitem__":
            return out  # a view of an input or a no-op conversion: no kernel
        dev_in = [t for t in ins if t.device.type == self.device_type]
        moved = sum(_nbytes(t) for t in dev_in if t.dtype != torch.bool) + sum(_nbytes(t) for t in dev_out)
        if name in _MATMUL or name in _CONV:
            kernel = "matmul"
            a, w = (dev_in[1], dev_in[2]) if name in ("addmm", "baddbmm") else (dev_in[0], dev_in[1])  # bias first
            k = w.shape[1:].numel() if name in _CONV else (w.shape[-1] if name == "linear" else a.shape[-1])
            fl = 2.0 * dev_out[0].numel() * k
            c.flops[(kernel, _dtype_name(a.dtype))] += fl
            if self.backward and torch.is_grad_enabled():
                if a.requires_grad:
                    c.flops[("matmul_bwd", _dtype_name(a.dtype))] += fl
                if w.requires_grad:
                    c.flops[("matmul_bwd", _dtype_name(a.dtype))] += fl
        elif name in _ATTENTION:
            q, k = dev_in[0], dev_in[1]
            masked = kwargs.get("attn_mask") is not None or kwargs.get("block_mask") is not None or len(args) > 3
            kernel = "attention_masked" if masked else "attention"
            b, h, lq, d = q.shape
            fl = 4.0 * b * h * lq * k.shape[-2] * d
            c.flops[(kernel, _dtype_name(q.dtype))] += fl
            if self.backward and torch.is_grad_enabled() and q.requires_grad:
                c.flops[(kernel + "_bwd", _dtype_name(q.dtype))] += 2.5 * fl
        elif name in _COPY:
            kernel = "copy"
        else:
            kernel = "elementwise"
        c.bytes[kernel] += moved
        c.calls[kernel] += 1
        return out


@contextlib.contextmanager
def counting(device_type: str = "meta") -> Iterator[CostCounter]:
    with CostCounter(device_type) as counter:
        yield counter


# ------------------------------------------------------------------------------------------------- scenarios


class _MetaNoise:
    """Stand-in for `rollout.NoiseSource` on the meta device (generators cannot live there); same draws' shapes."""

    def __init__(self, seeds, device: torch.device) -> None:
        self.n, self.device = len(list(seeds)), device

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.randn(self.n, *shape, device=self.device, dtype=torch.float32).to(dtype)


def build_policy(family, rank: int, dtype: torch.dtype = torch.bfloat16):
    """The full-size (or tiny) DiT + LoRA policy on the meta device: nothing is allocated."""
    from astrolabe_rl.models import CausalWan
    from astrolabe_rl.policy import Policy

    with torch.device("meta"):
        model = CausalWan(family.model).to(dtype)
        policy = Policy(model, rank=rank, alpha=float(rank))
    return policy


def sampling_model(policy, path: str):
    """The model and adapter context a rollout runs through for ``path`` (see the module docstring)."""
    if path == "recipe" and hasattr(policy, "sampling_model"):
        return contextlib.nullcontext(policy.sampling_model())
    if path in ("recipe", "unmerged"):
        return policy.use("old")
    if path == "base":
        return policy.use("base")
    raise ValueError(f"unknown --path {path!r}; use recipe, unmerged or base")


def count_rollout(policy, family, path: str = "recipe", batch: int = 1, frames: int | None = None) -> Costs:
    """One rollout of ``frames`` latent frames (default: the family horizon) at ``batch`` through ``path``."""
    import astrolabe_rl.rollout as ro

    frames = frames or family.horizon_frames
    text = torch.randn(batch, family.model.text_len, family.model.text_dim, device="meta")
    with sampling_model(policy, path) as model, mock.patch.object(ro, "NoiseSource", _MetaNoise):
        with counting() as counter:
            ro.rollout(model, text, num_frames=frames, latent_hw=family.latent_hw,
                       sampler=family.sampler_for(frames), seeds=0)
    return counter.costs


def count_denoise(model, family, batch: int = 1) -> Costs:
    """One cached ``denoise`` call of a middle block (the call a CUDA graph would capture)."""
    fpb = family.sampler.frames_per_block
    frames = 3 * fpb
    cache = model.new_cache(batch, family.latent_hw, frames, family.sampler.cache)
    text = torch.randn(batch, family.model.text_len, family.model.text_dim, device="meta", dtype=model.dtype)
    x = torch.randn(batch, fpb, family.model.in_dim, *family.latent_hw, device="meta", dtype=model.dtype)
    with torch.no_grad():
        cache.text = model.encode_text(text)
        model.commit(cache, x, 0)
        model.denoise(cache, x, 500.0, fpb)  # warm the per-position tables, as every block after the first does
        with counting() as counter:
            model.denoise(cache, x, 500.0, fpb)
    return counter.costs


def train_layout_share(family) -> float:
    """Visible share of the noisy block-causal training mask (what flex attention computes of the dense count)."""
    from astrolabe_rl.models.attention import FrameLayout, block_bounds, frame_mask

    s = family.sampler
    bounds = block_bounds(family.horizon_frames, s.frames_per_block, s.first_block_frames)
    layout = FrameLayout.of_blocks(bounds, sink_frames=s.cache.sink_frames)
    return float(frame_mask(layout, layout, s.cache.window_frames, s.cache.sink_frames).float().mean())


def count_train_sample(policy, family, kl: bool = True) -> Costs:
    """One NFT training sample: old + reference passes (no grad), θ pass (grad) and its analytic backward."""
    from astrolabe_rl.models.schedule import renoise, x0_from_velocity

    model = policy.model
    s = family.sampler
    f = family.horizon_frames
    shape = (1, f, family.model.in_dim, *family.latent_hw)
    x0 = torch.randn(shape, device="meta", dtype=model.dtype)
    noise = torch.randn_like(x0)
    text = torch.randn(1, family.model.text_len, family.model.text_dim, device="meta", dtype=model.dtype)
    sigma = 0.75
    layout = dict(frames_per_block=s.frames_per_block, first_block_frames=s.first_block_frames, policy=s.cache)
    with counting() as counter:
        x_t = renoise(x0, sigma, noise)
        with torch.no_grad():
            with policy.use("old") as m:
                x0_from_velocity(x_t, m(x_t, sigma * 1000, text, **layout), sigma)
            if kl:
                with policy.use("base") as m:
                    x0_from_velocity(x_t, m(x_t, sigma * 1000, text, **layout), sigma)
    with counting() as theta:
        theta.backward = True
        x0_from_velocity(x_t, model(x_t, sigma * 1000, text, **layout), sigma)
    total = counter.costs
    total.add(theta.costs)
    if model.gradient_checkpointing:  # the recompute of the θ forward during backward
        recompute = Costs()
        for (k, d), v in theta.costs.flops.items():
            if k == "matmul" or (k.startswith("attention") and not k.endswith("_bwd")
                                 and getattr(model, "checkpoint_mode", "full") == "full"):
                recompute.flops[(k + "_recompute", d)] += v
        total.add(recompute)
    return total


def count_merge(policy) -> Costs | None:
    """Refreshing the merged sampling copy once (None when the policy has none)."""
    if not hasattr(policy, "refresh_sampling_copy"):
        return None
    policy.sampling_model()
    with counting() as counter:
        policy.refresh_sampling_copy()
    return counter.costs


def count_decode(family, tiny: bool) -> Costs | None:
    """One video's VAE decode through the fast decoder (None without diffusers)."""
    try:
        from astrolabe_rl.models.vae import WanVAE, random_vae, tiny_vae_config
    except ImportError:
        return None
    try:
        with torch.device("meta"):
            vae_model = random_vae(tiny_vae_config() if tiny else None, seed=0, device="meta", dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - the decode figure is optional; say why it is missing
        print(f"decode skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    vae = WanVAE(vae_model, channels_last=True)
    z = torch.randn(1, family.horizon_frames, family.model.in_dim, *family.latent_hw, device="meta",
                    dtype=torch.bfloat16)
    with torch.no_grad(), counting() as counter:
        vae.decode(z)
    return counter.costs


def run(args: argparse.Namespace) -> dict[str, Any]:
    from astrolabe_rl.models import get_family

    family = get_family("tiny" if args.tiny else args.family)
    rank = 4 if args.tiny else args.rank
    policy = build_policy(family, rank)
    policy.model.gradient_checkpointing = True
    out: dict[str, Any] = {"bench": "costmodel", "family": family.name, "latent_frames": family.horizon_frames,
                           "latent_hw": list(family.latent_hw), "lora_rank": rank, "path": args.path,
                           "merged_sampling_copy": hasattr(policy, "sampling_model"), "scenarios": {}}
    roll = count_rollout(policy, family, args.path, batch=1)
    out["scenarios"]["rollout_video"] = roll.summary()
    with sampling_model(policy, args.path) as model:
        out["scenarios"]["denoise_call"] = count_denoise(model, family).summary()
    out["scenarios"]["train_sample"] = count_train_sample(policy, family).summary(train_layout_share(family))
    merge = count_merge(policy)
    if merge is not None:
        out["scenarios"]["merge"] = merge.summary()
    if not args.no_decode:
        dec = count_decode(family, args.tiny)
        if dec is not None:
            out["scenarios"]["decode_video"] = dec.summary()
    return out


def _table(result: dict[str, Any]) -> str:
    rows = [f"{'scenario':<14} {'bf16 TF':>9} {'fp32 TF':>9} {'fp32 mm TF':>10} {'GB moved':>9} {'calls':>7} "
            f"{'syncs':>5} {'h2d':>5} {'limit s':>8} {'bytes s':>8}"]
    for name, s in result["scenarios"].items():
        rows.append(f"{name:<14} {s['tflops_bf16']:>9.3f} {s['tflops_fp32']:>9.3f} {s['fp32_matmul_tflops']:>10.3f} "
                    f"{s['gbytes_total']:>9.2f} {sum(s['calls'].values()):>7} {s['host_syncs']:>5} "
                    f"{s['h2d_copies']:>5} {s['limit_s']:>8.3f} {s['bytes_s']:>8.3f}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny geometry (the tests' model)")
    p.add_argument("--family", default="self_forcing", help="family preset for the geometry")
    p.add_argument("--rank", type=int, default=256, help="LoRA rank (alpha = rank)")
    p.add_argument("--path", default="recipe", choices=["recipe", "unmerged", "base"], help="rollout path")
    p.add_argument("--no-decode", action="store_true", help="skip the VAE decode scenario")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(parse_args(argv))
    print(_table(result), file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
