"""The policy: a CausalWan with peft LoRA adapters ``default`` (trained) and ``old`` (rollouts, anchor), plus an EMA.

* ``default`` is θ, the only thing the optimiser sees.
* ``old`` is θ_old: rollouts are sampled from it and it anchors the implicit policies x̂0± of the NFT loss; it follows
  θ by the soft update ``θ_old ← η·θ_old + (1 − η)·θ`` after every step (`algo.sync`).
* The KL reference is the base model with every adapter disabled (peft's ``disable_adapter``).
* The EMA of θ is swapped in for evaluation and export (`ema_weights`).

LoRA goes on every linear of every block (`reference/ar_models.md` §6): ``blocks.N.{self_attn,cross_attn}.{q,k,v,o}``
and ``blocks.N.ffn.{0,2}``, r 256 / α 256 as released.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from astrolabe_rl.models.wan import CausalWan

DEFAULT_TARGETS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)

Adapter = Literal["default", "old", "ref"]


def lora_target_names(model: CausalWan, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Full module names (``blocks.7.cross_attn.k``) so that e.g. ``norm_q`` never matches ``q``."""
    names = [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in targets]
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"LoRA targets {missing[:3]} are not linear layers of the DiT; check lora.targets")
    return names


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
    """

    def __init__(
        self,
        model: CausalWan,
        rank: int = 256,
        alpha: float = 256.0,
        dropout: float = 0.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        seed: int | None = None,
    ) -> None:
        from peft import LoraConfig, get_peft_model

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
        self.peft.set_adapter("default")
        self.model = model  # the same object, now with LoRA layers; call its modes directly
        self.copy_("old", "default")
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

    # ------------------------------------------------------------------ adapters

    @contextlib.contextmanager
    def use(self, adapter: Adapter) -> Iterator[CausalWan]:
        """Run the DiT as θ (``default``), θ_old (``old``) or the reference (``ref``: adapters disabled)."""
        if adapter == "default":
            yield self.model
        elif adapter == "ref":
            with self.peft.disable_adapter():
                yield self.model
        elif adapter == "old":
            self.peft.set_adapter("old")
            try:
                yield self.model
            finally:  # set_adapter also moves requires_grad: only `default` may be trainable afterwards
                self.peft.set_adapter("default")
        else:
            raise ValueError(f"unknown adapter {adapter!r}; use default, old or ref")

    @torch.no_grad()
    def soft_update_old(self, eta: float) -> None:
        """θ_old ← η·θ_old + (1 − η)·θ (η = 0 copies θ)."""
        from astrolabe_rl.algo.sync import soft_update_

        src = self.adapter_params("default")
        dst = self.adapter_params("old")
        soft_update_([dst[k] for k in src], [src[k] for k in src], eta)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """EMA ← decay·EMA + (1 − decay)·θ."""
        from astrolabe_rl.algo.sync import soft_update_

        src = self.adapter_params("default")
        soft_update_([self.ema[k] for k in src], [src[k] for k in src], decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[CausalWan]:
        """Temporarily load the EMA into ``default`` (evaluation, export); restored on exit."""
        params = self.adapter_params("default")
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.ema[k])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Everything needed to resume: the two adapters and the EMA (adapter-free names)."""
        return {
            "default": {k: v.detach().clone() for k, v in self.adapter_params("default").items()},
            "old": {k: v.detach().clone() for k, v in self.adapter_params("old").items()},
            "ema": {k: v.clone() for k, v in self.ema.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for adapter in ("default", "old"):
            _load_into(self.adapter_params(adapter), state[adapter], adapter)
        _load_into(self.ema, state["ema"], "ema")

    def save_adapter(self, out_dir: str | Path, weights: Literal["ema", "default"] = "ema") -> Path:
        """Write the trained adapter in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``
        with rank and alpha), loadable with ``peft.PeftModel.from_pretrained`` or `load_adapter`."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = self.ema if weights == "ema" else self.adapter_params("default")
        tensors = {f"base_model.model.{k}": v.detach().float().cpu().contiguous() for k, v in src.items()}
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt", "weights": weights})
        cfg = self.lora_config.to_dict()
        cfg["target_modules"] = self.target_names  # full names: peft would shorten them to ambiguous suffixes
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))
        return out

    @torch.no_grad()
    def load_adapter(self, path: str | Path, into: Literal["default", "old", "both"] = "both") -> None:
        """Warm-start from a peft adapter folder / ``.safetensors`` file (keys ``base_model.model.<module>.lora_*``)."""
        tensors = read_lora_file(path)
        for adapter in ("default", "old") if into == "both" else (into,):
            _load_into(self.adapter_params(adapter), tensors, str(path))
        if into in ("default", "both"):
            self.ema = {k: v.detach().clone() for k, v in self.adapter_params("default").items()}


def _adapter_file(path: str | Path) -> Path:
    p = Path(path)
    p = p / "adapter_model.safetensors" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {p} does not exist")
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
        p.copy_(src[k])


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
