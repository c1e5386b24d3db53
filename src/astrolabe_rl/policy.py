"""The policy: a CausalWan with peft LoRA adapters ``default`` (trained) and ``old`` (rollouts, anchor), plus an EMA.

* ``default`` is θ, the only thing the optimiser sees.
* ``old`` is θ_old: rollouts are sampled from it and it anchors the implicit policies x̂0± of the NFT loss; it follows
  θ by the soft update ``θ_old ← η·θ_old + (1 − η)·θ`` after every step (`algo.sync`).
* The KL reference is the base model with every adapter disabled (``use("base")``: peft's ``disable_adapter``), or
  one or more extra adapters (``extra_adapters``): the dynamic reference (a copy of θ re-taken now and then) or the
  EMAs of θ of the EMA-ensemble reference; they follow θ only through `copy_` and `soft_update`.
* The EMA of θ is swapped in for evaluation and export (`ema_weights`).
* Rollouts run through `sampling_model`: a plain CausalWan whose target weights are ``W + (α/r)·B_old·A_old`` folded
  in once, in the base model's dtype (bfloat16 on GPU), so sampling costs exactly what the bare model costs (no
  LoRA matmuls, no fp32 casts). It is refreshed lazily whenever θ_old changed through this class.
* LoRA factors keep fp32 master weights (what the optimiser updates) but compute in the activations' dtype: in a
  bfloat16 model every LoRA matmul runs in bfloat16, its weight gradient flows back to the fp32 master.

LoRA goes on every linear of every block (`reference/ar_models.md` §6): ``blocks.N.{self_attn,cross_attn}.{q,k,v,o}``
and ``blocks.N.ffn.{0,2}``, r 256 / α 256 as released.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.train.dist import full_tensor, shard_like

DEFAULT_TARGETS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)

Adapter = str  # "default" (θ), "old" (θ_old), "base" (every adapter disabled) or one of the extra adapters


def lora_target_names(model: CausalWan, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Full module names (``blocks.7.cross_attn.k``) so that e.g. ``norm_q`` never matches ``q``."""
    names = [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in targets]
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"LoRA targets {missing[:3]} are not linear layers of the DiT; check lora.targets")
    return names


class _LoraFactor(nn.Module):
    """A LoRA factor (``lora_A`` or ``lora_B``) that computes in its input's dtype.

    peft keeps adapter weights in float32 next to bfloat16 base weights and casts the activations up, so every LoRA
    matmul of a bf16 model ran in fp32. This keeps the weight (same Parameter, same name: the fp32 master the
    optimiser steps) and casts it down for the matmul instead; at fp32 the cast is the identity.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _compute_in_activation_dtype(model: nn.Module) -> None:
    """Swap every peft LoRA factor for a `_LoraFactor` and stop peft casting the activations to fp32."""
    for module in model.modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
            module.cast_input_dtype_enabled = False
            for factors in (module.lora_A, module.lora_B):
                for name in list(factors.keys()):
                    if isinstance(factors[name], nn.Linear):
                        factors[name] = _LoraFactor(factors[name])


def _generic(name: str, adapter: str) -> str:
    """``...q.lora_A.default.weight`` -> ``...q.lora_A.weight`` (the adapter-free peft key)."""
    return name.replace(f".{adapter}.", ".")


class Policy:
    """CausalWan + LoRA adapters; see the module docstring.

    Args:
        model: the base DiT (modified in place: peft injects LoRA layers into its linears).
        rank, alpha, dropout: the LoRA (r, α, dropout).
        targets: block-relative module names that get a LoRA.
        seed: seeds the adapters' random initialisation (peft draws lora_A from the global generator, whose state
            is left untouched), so that a run is reproducible and every rank starts from the same θ; None draws
            from the global generator as it is.
        extra_adapters: names of further adapters (the moving KL references), initialised as copies of θ, never
            trained, checkpointed with the rest.
        sampling_dtype: dtype of the merged sampling copy; None: the base weights' dtype (bf16 on GPU).
        compile_sampling: ``torch.compile`` the sampling copy's blocks; None: on CUDA only.
    """

    def __init__(
        self,
        model: CausalWan,
        rank: int = 256,
        alpha: float = 256.0,
        dropout: float = 0.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        seed: int | None = None,
        extra_adapters: Sequence[str] = (),
        sampling_dtype: torch.dtype | None = None,
        compile_sampling: bool | None = None,
    ) -> None:
        from peft import LoraConfig, get_peft_model

        clash = {"default", "old", "base", "ema"} & set(extra_adapters)
        if clash:  # checked before peft injects anything into the model
            raise ValueError(f"extra adapter names {sorted(clash)} are reserved; choose other names")
        for p in model.parameters():
            p.requires_grad_(False)
        self.target_names = lora_target_names(model, targets)
        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=self.target_names)
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.peft = get_peft_model(model, self.lora_config, adapter_name="default")
            self.peft.add_adapter("old", self.lora_config)
        for name in extra_adapters:
            self.peft.add_adapter(name, self.lora_config)
        self.extra_adapters = tuple(extra_adapters)
        _compute_in_activation_dtype(model)
        self.peft.set_adapter("default")
        self.model = model  # the same object, now with LoRA layers; call its modes directly
        self.sampling_dtype = sampling_dtype
        self.compile_sampling = compile_sampling
        self._sampling: CausalWan | None = None
        self._sampling_stale = True
        for name in ("old", *self.extra_adapters):
            self.copy_(name, "default")
        self.ema = {k: v.detach().clone() for k, v in self.adapter_params("default").items()}

    # ------------------------------------------------------------------ parameters

    def adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        """The adapter's LoRA parameters keyed by adapter-free names (``blocks.0.self_attn.q.lora_A.weight``)."""
        out = {}
        for name, p in self.model.named_parameters():
            if ".lora_" in name and f".{adapter}." in name:
                out[_generic(name, adapter)] = p
        if not out:
            raise KeyError(f"no LoRA adapter named {adapter!r}")
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter_params("default").values())

    @torch.no_grad()
    def copy_(self, dst: str, src: str) -> None:
        s = self.adapter_params(src)
        for k, p in self.adapter_params(dst).items():
            p.copy_(s[k])
        self._sampling_stale |= dst == "old"

    # ------------------------------------------------------------------ the merged sampling copy

    def sampling_model(self) -> CausalWan:
        """θ_old merged into a plain CausalWan (``W + (α/r)·B_old·A_old`` per target, cast to ``sampling_dtype``):
        what every rollout runs through. Built on the first call (compiled on CUDA), refreshed here whenever θ_old
        changed through this class (`soft_update`, `copy_`, `load_state_dict`, `load_adapter`). Use it under
        ``torch.no_grad()``; its parameters never require grad."""
        if self._sampling is None:
            self._sampling = self._new_sampling_copy()
            self._sampling.compile_blocks(self.compile_sampling)
        if self._sampling_stale:
            self.refresh_sampling_copy()
        return self._sampling

    def _new_sampling_copy(self) -> CausalWan:
        """An uninitialised plain CausalWan of the base's geometry on its device, holding the frozen non-LoRA weights."""
        base = self.model
        with torch.device("meta"):
            copy = CausalWan(base.config)
        dtype = self.sampling_dtype or base.dtype
        copy = copy.to_empty(device=base.device).to(dtype).requires_grad_(False).eval()
        copy.attn_backend = base.attn_backend
        dst = dict(copy.named_parameters())
        with torch.no_grad():
            for name, p in base.named_parameters():  # whole weights, gathered one by one when FSDP2 shards them
                if ".lora_" not in name:
                    dst[name.replace(".base_layer.", ".")].copy_(full_tensor(p))
        self._sampling_stale = True
        return copy

    @torch.no_grad()
    def refresh_sampling_copy(self) -> None:
        """Fold the current θ_old into the sampling copy's target weights (fp32 sum, one cast). Call after every
        change of θ_old that bypasses this class; `sampling_model` does it for the changes that go through it."""
        if self._sampling is None:
            return
        self._fold(lambda layer, name: (layer.lora_A["old"].weight, layer.lora_B["old"].weight))
        self._sampling_stale = False

    @torch.no_grad()
    def _fold(self, factors: "Callable[[nn.Module, str], tuple[Tensor, Tensor]]") -> None:
        """Sampling copy ← W + (α/r)·B·A per target, with (A, B) = ``factors(lora layer, module name)``."""
        modules = dict(self.model.named_modules())
        dst = dict(self._sampling.named_modules())
        for name in self.target_names:
            layer = modules[name]
            a, b = factors(layer, name)
            a, b, w = (full_tensor(t) for t in (a, b, layer.base_layer.weight))
            merged = torch.addmm(w.float(), b.float(), a.float(), alpha=layer.scaling["default"])
            dst[name].weight.copy_(merged)

    @contextlib.contextmanager
    def ema_sampling_model(self) -> Iterator[CausalWan]:
        """The EMA of θ merged into the sampling copy, for evaluation: held-out videos are sampled the way training
        samples (merged weights, the base's dtype). θ_old is folded back in before the next rollout."""
        model = self.sampling_model()
        self._fold(lambda layer, name: (self.ema[f"{name}.lora_A.weight"], self.ema[f"{name}.lora_B.weight"]))
        self._sampling_stale = True  # the next `sampling_model` folds θ_old back in, however this block exits
        yield model

    # ------------------------------------------------------------------ adapters

    @contextlib.contextmanager
    def use(self, adapter: Adapter) -> Iterator[CausalWan]:
        """Run the DiT as θ (``default``), θ_old (``old``), the bare base (``base``: adapters disabled) or one of the
        extra adapters."""
        if adapter == "default":
            yield self.model
        elif adapter == "base":
            with self.peft.disable_adapter():
                yield self.model
        elif adapter in ("old", *self.extra_adapters):
            self.peft.set_adapter(adapter)
            try:
                yield self.model
            finally:  # set_adapter also moves requires_grad: only `default` may be trainable afterwards
                self.peft.set_adapter("default")
        else:
            raise ValueError(f"unknown adapter {adapter!r}; use default, old, base or one of {list(self.extra_adapters)}")

    @torch.no_grad()
    def soft_update(self, adapter: str, eta: float) -> None:
        """adapter ← η·adapter + (1 − η)·θ (η = 0 copies θ): θ_old's schedule, the EMA-ensemble's references."""
        from astrolabe_rl.algo.sync import soft_update_

        src = self.adapter_params("default")
        dst = self.adapter_params(adapter)
        soft_update_([dst[k] for k in src], [src[k] for k in src], eta)
        self._sampling_stale |= adapter == "old"

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """EMA ← decay·EMA + (1 − decay)·θ."""
        from astrolabe_rl.algo.sync import soft_update_

        src = self.adapter_params("default")  # sharded under FSDP2; the EMA is kept whole on every rank
        soft_update_([self.ema[k] for k in src], [full_tensor(src[k]) for k in src], decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[CausalWan]:
        """Temporarily load the EMA into ``default`` (evaluation, export); restored on exit."""
        params = self.adapter_params("default")
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(shard_like(self.ema[k], p))
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Everything needed to resume: every adapter and the EMA (adapter-free names), whole tensors whatever
        the sharding (under FSDP2 every rank must call this: it all-gathers)."""
        whole = lambda a: {k: full_tensor(v.detach()).clone() for k, v in self.adapter_params(a).items()}  # noqa: E731
        return {
            **{a: whole(a) for a in ("default", "old", *self.extra_adapters)},
            "ema": {k: v.clone() for k, v in self.ema.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        missing = [a for a in self.extra_adapters if a not in state]
        if missing:
            raise ValueError(f"the checkpoint has no state for the reference adapter(s) {missing}: it was saved "
                             "with another train.reference")
        for adapter in ("default", "old", *self.extra_adapters):
            _load_into(self.adapter_params(adapter), state[adapter], adapter)
        _load_into(self.ema, state["ema"], "ema")
        self._sampling_stale = True

    def save_adapter(self, out_dir: str | Path, weights: Literal["ema", "default"] = "ema") -> Path:
        """Write the trained adapter in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``
        with rank and alpha), loadable with ``peft.PeftModel.from_pretrained`` or `load_adapter`. Each file is
        replaced atomically: a reader, or a kill mid-save, sees the previous file or the new one, never half."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = self.ema if weights == "ema" else self.adapter_params("default")
        tensors = {f"base_model.model.{k}": v.detach().float().cpu().contiguous() for k, v in src.items()}
        metadata = {"format": "pt", "weights": weights}
        _replace_atomically(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
        cfg = self.lora_config.to_dict()
        cfg["target_modules"] = self.target_names  # full names: peft would shorten them to ambiguous suffixes
        text = json.dumps(cfg, indent=2, default=str)
        _replace_atomically(out / "adapter_config.json", lambda tmp: tmp.write_text(text))
        return out

    @torch.no_grad()
    def load_adapter(self, path: str | Path, into: Literal["default", "old", "both"] = "both") -> None:
        """Warm-start from a peft adapter folder / ``.safetensors`` file (keys ``base_model.model.<module>.lora_*``)."""
        tensors = read_lora_file(path)
        for adapter in ("default", "old") if into == "both" else (into,):
            _load_into(self.adapter_params(adapter), tensors, str(path))
        self._sampling_stale |= into in ("old", "both")
        if into in ("default", "both"):
            self.ema = {k: v.detach().clone() for k, v in self.adapter_params("default").items()}


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary sibling, flush it to disk, then rename it over ``path`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _adapter_file(path: str | Path) -> Path:
    p = Path(path)
    p = p / "adapter_model.safetensors" if p.is_dir() else p
    if not p.is_file():
        hint = " (a peft folder holds adapter_model.safetensors)" if p.name == "adapter_model.safetensors" else ""
        raise FileNotFoundError(f"LoRA file {p} does not exist{hint}")
    return p


def read_lora_file(path: str | Path) -> dict[str, Tensor]:
    """LoRA tensors from a peft folder, a ``.safetensors`` or LongLive's ``lora.pt``, keyed by adapter-free module
    names (``blocks.0.self_attn.q.lora_A.weight``); diffusers names are mapped back to the original ones."""
    from astrolabe_rl.models.loading import lora_pairs, read_lora

    p = _adapter_file(path)
    out = {}
    for module, (a, b) in lora_pairs(read_lora(p), source=str(p)).items():
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
    return out


@torch.no_grad()
def _load_into(dst: dict[str, Tensor], src: dict[str, Tensor], what: str) -> None:
    missing = sorted(set(dst) - set(src))
    unexpected = sorted(set(src) - set(dst))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state from {what} does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check lora.rank / lora.targets"
        )
    for k, p in dst.items():
        if p.shape != src[k].shape:
            raise ValueError(f"LoRA tensor {k} has shape {tuple(src[k].shape)}, the model {tuple(p.shape)}; check lora.rank")
        p.copy_(shard_like(src[k], p))


def merge_lora(model: CausalWan, adapter_path: str | Path) -> CausalWan:
    """Fold a saved adapter into the base weights (``W + (α/r)·B·A``) in place and return the plain CausalWan.

    α comes from the adapter's ``adapter_config.json`` when present (else α = r, as LongLive's ``lora.pt``).
    """
    from astrolabe_rl.models.loading import merge_lora as fold
    from astrolabe_rl.models.loading import read_lora

    p = _adapter_file(adapter_path)
    cfg_file = p.parent / "adapter_config.json"
    alpha = json.loads(cfg_file.read_text())["lora_alpha"] if cfg_file.is_file() else None
    model.load_state_dict(fold(model.state_dict(), read_lora(p), alpha=alpha, source=str(p)), strict=True)
    return model
