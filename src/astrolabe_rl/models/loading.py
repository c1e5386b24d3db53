"""Checkpoints of every family into `CausalWan`, and key-name conversion between original Wan2.1 and diffusers.

Reading (`reference/ar_models.md` §2.8, §3.8, §4, §7.9): an official file is a ``torch.save`` dict holding the
weights under ``generator_ema`` / ``generator`` / ``model`` (or a bare state dict, or a ``.safetensors`` file);
wrappers leave prefixes on the keys (``model.``, ``module.``, ``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.``, ``_orig_mod.``), EMA weights are float32, and LongLive ships its LoRA (peft keys
``base_model.model.<module>.lora_{A,B}.weight``, r 256 / α 256) next to the base. `load_causal_wan` strips the
prefixes, renames diffusers-named files, merges the LoRA, checks the key set and shapes against the model and
loads strictly: a wrong or partial file raises `CheckpointError` naming the missing and unexpected keys and the
likely cause, never a silent partial load.

Renaming: only names are converted; tensors are never touched (Wan2.1 and diffusers store every parameter with
the same shape, so a rename is the whole conversion).

Matching works on dot-separated path components, anchored at the model root, never on raw substrings:
``norm_q`` is not hit by the ``q`` rule, ``ffn.0`` does not match ``ffn.0x``, and each key is rewritten by at
most one rule, so the ``norm2``/``norm3`` swap cannot apply twice. Whatever follows the matched module path
(``weight``, ``bias``, ``lora_A.weight``, ``lora_B.default.weight``, ``base_layer.weight``) is kept as is, so
the same functions rename plain, LoRA and peft-wrapped checkpoints. A key that matches no rule passes through
unchanged, so unknown extras surface later in a strict ``load_state_dict``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from astrolabe_rl.models.wan import CausalWan, WanConfig

__all__ = [
    "original_to_diffusers_key",
    "diffusers_to_original_key",
    "original_to_diffusers",
    "diffusers_to_original",
    "CheckpointError",
    "read_checkpoint",
    "select_weights",
    "strip_prefixes",
    "to_original_names",
    "check_state_dict",
    "read_lora",
    "lora_pairs",
    "merge_lora",
    "expected_shapes",
    "load_wan_state_dict",
    "load_causal_wan",
]

V = TypeVar("V")

# (original Wan2.1 path, diffusers path). "*" stands for a block index and must sit at the same place on both
# sides. Used in both directions, so every row must be a bijection and no path may be a component-prefix of
# another path on the same side (tests/test_keymap.py checks both).
_RULES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("blocks.*.modulation", "blocks.*.scale_shift_table"),
    ("blocks.*.ffn.0", "blocks.*.ffn.net.0.proj"),
    ("blocks.*.ffn.2", "blocks.*.ffn.net.2"),
    # Swapped on purpose: Wan's norm3 is the (affine) cross-attention pre-norm, which diffusers calls norm2;
    # Wan's norm2 is the parameter-free FFN pre-norm, diffusers' norm3.
    ("blocks.*.norm3", "blocks.*.norm2"),
    ("blocks.*.norm2", "blocks.*.norm3"),
    ("blocks.*.self_attn.q", "blocks.*.attn1.to_q"),
    ("blocks.*.self_attn.k", "blocks.*.attn1.to_k"),
    ("blocks.*.self_attn.v", "blocks.*.attn1.to_v"),
    ("blocks.*.self_attn.o", "blocks.*.attn1.to_out.0"),
    ("blocks.*.self_attn.norm_q", "blocks.*.attn1.norm_q"),
    ("blocks.*.self_attn.norm_k", "blocks.*.attn1.norm_k"),
    ("blocks.*.cross_attn.q", "blocks.*.attn2.to_q"),
    ("blocks.*.cross_attn.k", "blocks.*.attn2.to_k"),
    ("blocks.*.cross_attn.v", "blocks.*.attn2.to_v"),
    ("blocks.*.cross_attn.o", "blocks.*.attn2.to_out.0"),
    ("blocks.*.cross_attn.norm_q", "blocks.*.attn2.norm_q"),
    ("blocks.*.cross_attn.norm_k", "blocks.*.attn2.norm_k"),
    # Image-conditioned (I2V / FLF2V) checkpoints only.
    ("blocks.*.cross_attn.k_img", "blocks.*.attn2.add_k_proj"),
    ("blocks.*.cross_attn.v_img", "blocks.*.attn2.add_v_proj"),
    ("blocks.*.cross_attn.norm_k_img", "blocks.*.attn2.norm_added_k"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)

# Leading components added by wrappers around the model (peft's ``base_model.model``, DDP's ``module``,
# torch.compile's ``_orig_mod``, trainers' ``model``). They are kept verbatim and matching starts after them;
# matching anywhere else in a key could rename an unrelated sub-module that happens to share a name.
_WRAPPER_COMPONENTS = frozenset({"base_model", "model", "module", "_orig_mod"})

_Path = tuple[str, ...]


def _compile(src_dst: tuple[tuple[str, str], ...]) -> tuple[tuple[_Path, _Path], ...]:
    return tuple((tuple(src.split(".")), tuple(dst.split("."))) for src, dst in src_dst)


_TO_DIFFUSERS = _compile(_RULES)
_TO_ORIGINAL = _compile(tuple((dst, src) for src, dst in _RULES))


def _match(pattern: _Path, parts: _Path) -> list[str] | None:
    """Return the components ``*`` captured if ``pattern`` is a component-prefix of ``parts``, else None."""
    if len(parts) < len(pattern):
        return None
    captured: list[str] = []
    for want, got in zip(pattern, parts):
        if want == "*":
            if not got.isdigit():  # block indices only, so "blocks.x.ffn.0" is left alone
                return None
            captured.append(got)
        elif want != got:
            return None
    return captured


def _rename(key: str, rules: tuple[tuple[_Path, _Path], ...]) -> str:
    parts = tuple(key.split("."))
    start = 0
    while start < len(parts) and parts[start] in _WRAPPER_COMPONENTS:
        start += 1
    prefix, path = parts[:start], parts[start:]
    for src, dst in rules:
        captured = _match(src, path)
        if captured is None:
            continue
        fill = iter(captured)
        head = tuple(next(fill) if c == "*" else c for c in dst)
        # First match wins; the table has no overlapping patterns, so this is also the only match.
        return ".".join(prefix + head + path[len(src):])
    return key


def original_to_diffusers_key(key: str) -> str:
    """Rename one original Wan2.1 parameter (or LoRA) key to its diffusers ``WanTransformer3DModel`` name.

    Example: ``base_model.model.blocks.0.self_attn.o.lora_A.default.weight`` ->
    ``base_model.model.blocks.0.attn1.to_out.0.lora_A.default.weight``. Unknown keys are returned unchanged.
    """
    return _rename(key, _TO_DIFFUSERS)


def diffusers_to_original_key(key: str) -> str:
    """Rename one diffusers ``WanTransformer3DModel`` key to the original Wan2.1 name (inverse of
    :func:`original_to_diffusers_key`). Unknown keys are returned unchanged."""
    return _rename(key, _TO_ORIGINAL)


def _convert(
    sd: Mapping[str, V], rename_key: Callable[[str], str], direction: str
) -> dict[str, V]:
    out: dict[str, V] = {}
    source_of: dict[str, str] = {}
    for key, value in sd.items():
        new = rename_key(key)
        if new in out:
            # Silently keeping one of the two would drop weights, e.g. in a checkpoint mixing both namings.
            raise ValueError(
                f"{direction}: keys {source_of[new]!r} and {key!r} both map to {new!r}; "
                "the state dict probably mixes original and diffusers names"
            )
        out[new] = value
        source_of[new] = key
    return out


def original_to_diffusers(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename every key of an original Wan2.1 state dict to diffusers names; values are passed through as is.

    Raises:
        ValueError: if two input keys end up with the same name.
    """
    return _convert(sd, original_to_diffusers_key, "original_to_diffusers")


def diffusers_to_original(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename every key of a diffusers ``WanTransformer3DModel`` state dict to original Wan2.1 names; values are
    passed through as is.

    Raises:
        ValueError: if two input keys end up with the same name.
    """
    return _convert(sd, diffusers_to_original_key, "diffusers_to_original")


# ============================================================================================ reading checkpoints


class CheckpointError(ValueError):
    """A file that does not fit what it is loaded into; the message names the keys and the likely cause."""


# Wrapper components that may sit anywhere in a key (FSDP wraps every block, activation checkpointing and
# torch.compile wrap modules), and those that only ever lead it (the trainers' wrapper attribute, DDP).
_WRAPPERS_ANYWHERE = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_WRAPPERS_LEADING = frozenset({"model", "module"})
# Entries of an official ``.pt`` dict that hold generator weights, in fallback order.
WEIGHT_ENTRIES = ("generator_ema", "generator", "model")
_SHOW = 5  # keys quoted per list in an error


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load a ``.safetensors`` file or a ``torch.save`` file onto the CPU (memory-mapped when possible).

    Args:
        path: the file.
        trust_pickle: allow arbitrary pickled Python objects (``torch.load(weights_only=False)``); only for files
            you trust.
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated / corrupt file, or pickled objects without ``trust_pickle``.
    """
    from astrolabe_rl.errors import path_problem

    path = Path(path)
    problem = path_problem(path, "checkpoint")
    if problem:
        raise FileNotFoundError(problem) if not path.exists() else CheckpointError(problem)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _torch_load(path, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # objects a weights-only load refuses; anything else is a broken file
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors, which are not loaded by default because "
                "unpickling can run code. If you trust the file, allow them: trust_pickle=True (generate, evaluate "
                "and merge-lora: --trust-checkpoint; train: model.trust_checkpoint=true)."
            ) from e
        raise _corrupt(path, e) from e
    except Exception as e:  # zip/safetensors readers raise assorted errors on a cut-off file
        raise _corrupt(path, e) from e


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:  # mmap keeps a 14B fp32 EMA file out of RAM until each tensor is used
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only the legacy (non-zip) format refuses mmap
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def load_error_detail(error: BaseException) -> str:
    """The part of a loader's error worth quoting: torch's weights-only refusal without its advice to unpickle
    anyway (the detail after ``WeightsUnpickler error:``), else the first line, at most 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    detail = re.search(r"WeightsUnpickler error: *([^\n]*)", text)
    if detail:
        return (detail.group(1).strip() or "not a torch checkpoint")[:200]
    return (text.strip().splitlines() or [""])[0][:200]


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"could not read {path} ({path.stat().st_size:,} bytes): {type(e).__name__}: {load_error_detail(e)}. "
        "The file is truncated or corrupt (an interrupted download?) or not a torch / safetensors checkpoint: "
        "re-download it and compare its size with the published one."
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def select_weights(
    obj: Any, key: str | None = None, source: str = "checkpoint"
) -> tuple[dict[str, Tensor], str | None]:
    """Pick the weights out of a loaded checkpoint: the entry ``key`` if present, else the first of
    ``generator_ema, generator, model``; a bare state dict is returned as is. Returns the dict and the entry used."""
    if _is_state_dict(obj):
        return dict(obj), None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict or a dict of state dicts")
    order = ([key] if key else []) + [k for k in WEIGHT_ENTRIES if k != key]
    for entry in order:
        if isinstance(obj.get(entry), Mapping):
            if key and entry != key:
                warnings.warn(f"{source} has no {key!r} entry; loading {entry!r} instead", stacklevel=2)
            return dict(obj[entry]), entry
    raise CheckpointError(
        f"{source} has entries {sorted(map(str, obj))[:8]} but no weights under any of {order}; "
        "pass the entry that holds the generator (e.g. checkpoint_key='generator')"
    )


def strip_prefixes(sd: Mapping[str, V], source: str = "checkpoint") -> dict[str, V]:
    """Remove wrapper components: ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module`` / ``_orig_mod``
    anywhere, then leading ``model`` / ``module`` (``model._fsdp_wrapped_module.blocks.0.x`` -> ``blocks.0.x``)."""
    out: dict[str, V] = {}
    for key, value in sd.items():
        parts = [p for p in key.split(".") if p not in _WRAPPERS_ANYWHERE]
        while parts and parts[0] in _WRAPPERS_LEADING:
            parts.pop(0)
        new = ".".join(parts)
        if new in out:
            raise CheckpointError(f"{source}: two keys become {new!r} once wrapper prefixes are stripped ({key!r})")
        out[new] = value
    return out


def _looks_diffusers(keys: list[str]) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)


def to_original_names(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename a diffusers-named DiT (or LoRA) state dict to original Wan names; original names pass unchanged."""
    return diffusers_to_original(sd) if _looks_diffusers(list(sd)) else dict(sd)


# ============================================================================================ teaching checks


def _natural(key: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _first(keys: list[str]) -> str:
    more = f", … (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _block_count(keys) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"(?:blocks|encoder\.block)\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def check_state_dict(
    sd: Mapping[str, Tensor], expected: Mapping[str, torch.Size], *, what: str, source: str
) -> None:
    """Raise `CheckpointError` unless ``sd`` has exactly the keys and shapes of ``expected``.

    The message lists the first few missing / unexpected / mis-shaped keys with their counts and a likely cause
    (a LoRA or VAE file passed as weights, an extra prefix, another model size, a truncated file).
    """
    missing = sorted(set(expected) - set(sd), key=_natural)
    unexpected = sorted(set(sd) - set(expected), key=_natural)
    shapes = [(k, tuple(sd[k].shape), tuple(expected[k])) for k in sorted(expected, key=_natural)
              if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not fit the {what}:"]
    if missing:
        lines.append(f"  missing {len(missing)} of {len(expected)} keys: {_first(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys: {_first(unexpected)}")
    if shapes:
        shown = "; ".join(f"{k} is {a} in the file, {b} in the model" for k, a, b in shapes[:3])
        lines.append(f"  {len(shapes)} shape mismatches: {shown}")
    lines.append(f"  likely cause: {_likely_cause(list(sd), expected, missing, unexpected, shapes)}")
    raise CheckpointError("\n".join(lines))


def _likely_cause(keys: list[str], expected: Mapping[str, torch.Size], missing: list[str], unexpected: list[str],
                  shapes: list) -> str:
    if not keys:
        return "the selected entry holds no tensors (an empty or wrong checkpoint entry)"
    if all(_is_lora_key(k) for k in keys):
        return "this is a LoRA adapter, not full weights: pass it as the LoRA (--lora) next to the base checkpoint"
    if any(k.startswith(("decoder.upsamples.", "decoder.up_blocks.", "encoder.downsamples.")) for k in unexpected):
        return "these are Wan VAE weights (Wan2.1_VAE.pth); the VAE is read from --wan-dir"
    if any(k.startswith("token_embedding.") or ".SelfAttention." in k for k in unexpected):
        return "these are umT5 text-encoder weights; the text encoder is read from --wan-dir"
    heads = {k.split(".", 1)[0] for k in unexpected}
    if len(heads) == 1 and missing and {k.split(".", 1)[-1] for k in unexpected} >= set(missing):
        return f"every key carries an extra prefix {heads.pop()!r}.; strip it (or save the bare model state dict)"
    if shapes:
        return ("the file is for another model size or variant (e.g. Wan2.1-14B is 5120 wide, 1.3B is 1536): "
                "pick the matching --model")
    have, want = _block_count(keys), _block_count(expected)
    if have < want and missing and not unexpected:
        return (f"the file has {have} blocks, the model {want}: a truncated or partial save, or a model with "
                "fewer layers")
    if missing and not unexpected:
        return "the file is incomplete (a partial save or an interrupted conversion)"
    return "the file is not a checkpoint of this model (check the path and --model)"


# ============================================================================================ LoRA


def read_lora(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A LoRA state dict from LongLive's ``lora.pt`` (``{"generator_lora": {...}}``) or a bare peft file."""
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("generator_lora"), Mapping):
        obj = obj["generator_lora"]
    if not _is_state_dict(obj):
        entries = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a LoRA file: expected peft keys or a 'generator_lora' entry, got {entries}"
        )
    return dict(obj)


def lora_pairs(lora: Mapping[str, Tensor], source: str = "LoRA") -> dict[str, tuple[Tensor, Tensor]]:
    """Group peft LoRA weights by target module (original Wan names): ``{module: (A [r, in], B [out, r])}``.

    Accepts ``[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`` with any wrapper prefixes, in original
    or diffusers naming. One adapter per file.
    """
    lora = to_original_names(lora)
    halves: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    for key, value in lora.items():
        parts = [p for p in key.split(".") if p not in _WRAPPERS_ANYWHERE]
        if parts[:2] == ["base_model", "model"]:
            parts = parts[2:]
        while parts and parts[0] in _WRAPPERS_LEADING:
            parts.pop(0)
        at = next((i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")), None)
        tail = parts[at + 1:] if at is not None else []
        if at is None or tail[-1:] != ["weight"] or len(tail) > 2:
            raise CheckpointError(
                f"{source}: {key!r} is not a LoRA weight (<module>.lora_A|lora_B[.<adapter>].weight); "
                "DoRA, biases and other adapter types are not supported"
            )
        adapters.update(tail[:-1])
        halves.setdefault(".".join(parts[:at]), {})[parts[at]] = value
    if len(adapters) > 1:
        raise CheckpointError(f"{source} holds several adapters {sorted(adapters)}; save one adapter per file")
    incomplete = sorted(m for m, h in halves.items() if len(h) != 2)
    if incomplete:
        raise CheckpointError(f"{source}: {len(incomplete)} modules lack lora_A or lora_B: {_first(incomplete)}")
    return {m: (h["lora_A"], h["lora_B"]) for m, h in sorted(halves.items(), key=lambda kv: _natural(kv[0]))}


def merge_lora(
    base: Mapping[str, Tensor], lora: Mapping[str, Tensor], *, alpha: float | None = None, source: str = "LoRA"
) -> dict[str, Tensor]:
    """Fold a LoRA into base weights: ``W ← W + (alpha / r)·B·A`` per target (float32 math, stored in W's dtype).

    Args:
        base: original-named state dict (not modified).
        lora: peft LoRA state dict (see `lora_pairs`).
        alpha: LoRA alpha; None means alpha = r (scale 1; LongLive uses r = α = 256). peft files do not store it.
    """
    pairs = lora_pairs(lora, source)
    absent = [m for m in pairs if f"{m}.weight" not in base]
    if absent:
        raise CheckpointError(
            f"{source} targets {len(absent)} modules the base weights do not have: {_first(absent)}; "
            "the LoRA was trained on another model"
        )
    out = dict(base)
    for module, (a, b) in pairs.items():
        w = base[f"{module}.weight"]
        r = a.shape[0]
        if a.dim() != 2 or b.shape != (w.shape[0], r) or a.shape[1] != w.shape[1]:
            raise CheckpointError(
                f"{source}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not fit "
                f"its weight {tuple(w.shape)} (expected A [r, {w.shape[1]}], B [{w.shape[0]}, r])"
            )
        scale = (r if alpha is None else alpha) / r
        out[f"{module}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


# ============================================================================================ the DiT


def expected_shapes(config: WanConfig) -> dict[str, torch.Size]:
    """Every parameter name and shape of a `CausalWan` with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = CausalWan(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_wan_state_dict(
    path: str | Path,
    config: WanConfig,
    *,
    key: str | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> dict[str, Tensor]:
    """Read a family's checkpoint into an original-named state dict that fits `CausalWan(config)` exactly.

    Args:
        path: ``.pt`` / ``.pth`` (a dict with ``generator_ema`` / ``generator`` / ``model``, or bare) or
            ``.safetensors``.
        config: the DiT geometry the weights must fit.
        key: the entry to prefer (the family's ``checkpoint_key``); falls back with a warning.
        lora: a LoRA file to merge into the weights (LongLive's ``lora.pt``).
        lora_alpha: its alpha (None: alpha = r).
        dtype: cast floating tensors to this (e.g. the fp32 EMA to bf16).
        trust_pickle: see `read_checkpoint`.
    Raises:
        CheckpointError: the file does not fit (missing / unexpected / mis-shaped keys, with the likely cause).
    """
    source = str(path)
    sd, _ = select_weights(read_checkpoint(path, trust_pickle=trust_pickle), key, source)
    sd = to_original_names(strip_prefixes(sd, source))
    what = f"Wan DiT ({config.num_layers} blocks, width {config.dim})"
    check_state_dict(sd, expected_shapes(config), what=what, source=source)
    if lora is not None:
        sd = merge_lora(sd, read_lora(lora, trust_pickle=trust_pickle), alpha=lora_alpha, source=str(lora))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def load_causal_wan(
    path: str | Path,
    config: WanConfig,
    *,
    key: str | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
) -> CausalWan:
    """`load_wan_state_dict`, then a `CausalWan` holding exactly those weights (strict), in eval mode.

    The model is built on the meta device and the loaded tensors are assigned, so no random init is computed and
    a 14B model never exists twice in memory.
    """
    sd = load_wan_state_dict(path, config, key=key, lora=lora, lora_alpha=lora_alpha, dtype=dtype,
                             trust_pickle=trust_pickle)
    with torch.device("meta"):
        model = CausalWan(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()
