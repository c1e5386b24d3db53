"""Parameter-name conversion between original Wan2.1 DiT checkpoints and diffusers ``WanTransformer3DModel``.

Only names are converted; tensors are never touched (Wan2.1 and diffusers store every parameter with the
same shape, so a rename is the whole conversion).

Matching works on dot-separated path components, anchored at the model root, never on raw substrings:
``norm_q`` is not hit by the ``q`` rule, ``ffn.0`` does not match ``ffn.0x``, and each key is rewritten by at
most one rule, so the ``norm2``/``norm3`` swap cannot apply twice. Whatever follows the matched module path
(``weight``, ``bias``, ``lora_A.weight``, ``lora_B.default.weight``, ``base_layer.weight``) is kept as is, so
the same functions rename plain, LoRA and peft-wrapped checkpoints. A key that matches no rule passes through
unchanged, so unknown extras surface later in a strict ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = [
    "original_to_diffusers_key",
    "diffusers_to_original_key",
    "original_to_diffusers",
    "diffusers_to_original",
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
