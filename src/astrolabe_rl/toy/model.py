"""The shipped toy DiT: where its weights live, how they are saved and loaded, and the toy family's loader.

The geometry is the ``toy`` family preset (`models.families.TOY_WAN`), recorded in each file's metadata (a file
built with another geometry loads as built); the weights are a plain safetensors state dict with the original Wan
key names, stored in float16 and loaded into float32. `LOADER` is what the ``toy`` family's preset names
(`models.build.FamilyLoader`): the shipped weights (or ``--checkpoint``), the word-table text encoder and the exact
toy VAE, so ``generate``, ``evaluate``, ``merge-lora`` and training build it like any family.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from torch import Tensor

from astrolabe_rl.models.families import Family, get_family
from astrolabe_rl.models.wan import CausalWan, WanConfig

if TYPE_CHECKING:
    from astrolabe_rl.models.build import ModelSource
    from astrolabe_rl.toy.text import ToyTextEncoder

WEIGHTS = Path(__file__).resolve().parent / "weights" / "toy.safetensors"
FM_WEIGHTS = WEIGHTS.with_name("toy_fm.safetensors")  # the flow-matching base, kept for comparison (family toy_fm)
LONG_WEIGHTS = WEIGHTS.with_name("toy_long.safetensors")  # the student extended to long rollouts (family toy_long)


def save_weights(model: CausalWan, path: str | Path) -> Path:
    """Write the model's state dict as float16 safetensors (``path``'s folder is created)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # the geometry travels with the weights, so a file built with another (a bed being tried) loads as built
    config = json.dumps(model.config.to_dict())
    save_file(state, path, metadata={"format": "wan-original", "family": "toy", "config": config})
    return path


def toy_config(path: str | Path) -> WanConfig:
    """The geometry a toy weights file was built with: its ``config`` metadata, else the ``toy`` preset's."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return toy_geometry(json.loads(meta["config"]) if "config" in meta else {})


def toy_geometry(fields: dict) -> WanConfig:
    """The ``toy`` preset's `WanConfig` with ``fields`` replaced (JSON values: lists become the tuples it holds)."""
    return replace(get_family("toy").model, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_toy_model(path: str | Path | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> CausalWan:
    """The toy CausalWan with the shipped (or given) weights, in eval mode, every parameter frozen."""
    from safetensors.torch import load_file

    path = WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"toy weights {path} are missing: reinstall the package, or rebuild them with "
            "`python -m astrolabe_rl.toy.pretrain` (toy_fm, about 50 minutes on 2 CPU cores), then "
            "`python -m astrolabe_rl.toy.distill` (toy, about 10 minutes more)"
        )
    model = CausalWan(toy_config(path))
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a toy-model state dict: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device, dtype).eval().requires_grad_(False)


class ToyDecoder:
    """The exact toy VAE as a `models.build.Decoder`: frame-wise, so streaming is decoding each block."""

    def decode(self, latents: Tensor) -> Tensor:
        from astrolabe_rl.toy import vae

        return vae.decode(latents)

    def stream(self) -> Callable[[Tensor], Tensor]:
        return self.decode


class _ToyLoader:
    """Builds a toy model whose DiT defaults to the ``weights`` file (``--checkpoint`` overrides it)."""

    def __init__(self, weights: Path) -> None:
        self.weights = weights

    def dit(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> CausalWan:
        return load_toy_model(self.weights if source.checkpoint is None else source.checkpoint, device, dtype)

    def text_encoder(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> "ToyTextEncoder":
        from astrolabe_rl.toy.text import ToyTextEncoder

        return ToyTextEncoder()

    def decoder(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> ToyDecoder:
        return ToyDecoder()


LOADER = _ToyLoader(WEIGHTS)  # family "toy": the DMD-distilled 4-step causal student (`toy.distill`)
FM_LOADER = _ToyLoader(FM_WEIGHTS)  # family "toy_fm": the flow-matching base it was distilled from (`toy.pretrain`)
LONG_LOADER = _ToyLoader(LONG_WEIGHTS)  # family "toy_long": the student extended to long videos (`toy.distill --long`)
