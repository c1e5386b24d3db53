"""Key-name conversion between original Wan2.1 and diffusers WanTransformer3DModel (CPU, no network)."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.models import loading
from astrolabe_rl.models.loading import (
    diffusers_to_original,
    diffusers_to_original_key,
    original_to_diffusers,
    original_to_diffusers_key,
)

NUM_LAYERS = 2
TINY_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=NUM_LAYERS,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def _linear(name: str) -> list[str]:
    return [f"{name}.weight", f"{name}.bias"]


def original_keys(num_layers: int = NUM_LAYERS, image: bool = False) -> list[str]:
    """Every parameter name of an original Wan2.1 DiT, written out by hand from its module tree."""
    keys = _linear("patch_embedding")
    keys += _linear("text_embedding.0") + _linear("text_embedding.2")
    keys += _linear("time_embedding.0") + _linear("time_embedding.2")
    keys += _linear("time_projection.1")
    for i in range(num_layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                keys += _linear(f"{b}.{attn}.{proj}")
            keys += [f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"]
        keys += _linear(f"{b}.norm3")  # cross-attn pre-norm; norm1 / norm2 carry no parameters
        keys += _linear(f"{b}.ffn.0") + _linear(f"{b}.ffn.2")
        keys.append(f"{b}.modulation")
        if image:
            keys += _linear(f"{b}.cross_attn.k_img") + _linear(f"{b}.cross_attn.v_img")
            keys.append(f"{b}.cross_attn.norm_k_img.weight")
    keys += _linear("head.head")
    keys.append("head.modulation")
    if image:
        for j in (0, 1, 3, 4):
            keys += _linear(f"img_emb.proj.{j}")
        keys.append("img_emb.emb_pos")
    return keys


@pytest.mark.parametrize(
    ("original", "diffusers"),
    [
        ("patch_embedding.weight", "patch_embedding.weight"),
        ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight"),
        ("time_embedding.2.bias", "condition_embedder.time_embedder.linear_2.bias"),
        ("text_embedding.0.bias", "condition_embedder.text_embedder.linear_1.bias"),
        ("text_embedding.2.weight", "condition_embedder.text_embedder.linear_2.weight"),
        ("time_projection.1.weight", "condition_embedder.time_proj.weight"),
        ("head.modulation", "scale_shift_table"),
        ("head.head.weight", "proj_out.weight"),
        ("head.head.bias", "proj_out.bias"),
        ("blocks.1.modulation", "blocks.1.scale_shift_table"),
        ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight"),
        ("blocks.0.ffn.2.bias", "blocks.0.ffn.net.2.bias"),
        # The swap: original norm3 (affine cross-attn norm) <-> diffusers norm2, and vice versa.
        ("blocks.0.norm3.weight", "blocks.0.norm2.weight"),
        ("blocks.1.norm3.bias", "blocks.1.norm2.bias"),
        ("blocks.0.norm2.weight", "blocks.0.norm3.weight"),
        ("blocks.0.norm1.weight", "blocks.0.norm1.weight"),
        ("blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"),
        ("blocks.0.self_attn.k.bias", "blocks.0.attn1.to_k.bias"),
        ("blocks.0.self_attn.v.weight", "blocks.0.attn1.to_v.weight"),
        ("blocks.0.self_attn.o.weight", "blocks.0.attn1.to_out.0.weight"),
        ("blocks.0.self_attn.norm_q.weight", "blocks.0.attn1.norm_q.weight"),
        ("blocks.0.self_attn.norm_k.weight", "blocks.0.attn1.norm_k.weight"),
        ("blocks.1.cross_attn.q.weight", "blocks.1.attn2.to_q.weight"),
        ("blocks.1.cross_attn.o.bias", "blocks.1.attn2.to_out.0.bias"),
        ("blocks.1.cross_attn.norm_q.weight", "blocks.1.attn2.norm_q.weight"),
        ("blocks.1.cross_attn.norm_k.weight", "blocks.1.attn2.norm_k.weight"),
        ("blocks.12.cross_attn.k_img.weight", "blocks.12.attn2.add_k_proj.weight"),
        ("blocks.3.cross_attn.v_img.bias", "blocks.3.attn2.add_v_proj.bias"),
        ("blocks.3.cross_attn.norm_k_img.weight", "blocks.3.attn2.norm_added_k.weight"),
        ("img_emb.proj.0.weight", "condition_embedder.image_embedder.norm1.weight"),
        ("img_emb.proj.1.bias", "condition_embedder.image_embedder.ff.net.0.proj.bias"),
        ("img_emb.proj.3.weight", "condition_embedder.image_embedder.ff.net.2.weight"),
        ("img_emb.proj.4.bias", "condition_embedder.image_embedder.norm2.bias"),
        ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
        # LoRA keys: the module path is renamed, the adapter suffix kept.
        ("blocks.0.self_attn.q.lora_A.weight", "blocks.0.attn1.to_q.lora_A.weight"),
        ("blocks.0.self_attn.o.lora_B.weight", "blocks.0.attn1.to_out.0.lora_B.weight"),
        (
            "base_model.model.blocks.0.self_attn.q.lora_B.weight",
            "base_model.model.blocks.0.attn1.to_q.lora_B.weight",
        ),
        ("blocks.1.cross_attn.v.lora_A.default.weight", "blocks.1.attn2.to_v.lora_A.default.weight"),
        (
            "base_model.model.blocks.1.ffn.0.lora_A.default.weight",
            "base_model.model.blocks.1.ffn.net.0.proj.lora_A.default.weight",
        ),
        (
            "base_model.model.blocks.0.cross_attn.o.base_layer.weight",
            "base_model.model.blocks.0.attn2.to_out.0.base_layer.weight",
        ),
        ("base_model.model.head.head.lora_B.default.weight", "base_model.model.proj_out.lora_B.default.weight"),
        ("module._orig_mod.head.modulation", "module._orig_mod.scale_shift_table"),
    ],
)
def test_specific_mappings(original: str, diffusers: str) -> None:
    assert original_to_diffusers_key(original) == diffusers
    assert diffusers_to_original_key(diffusers) == original


@pytest.mark.parametrize(
    "key",
    [
        "blocks.0.ffn.0x.weight",  # component must match exactly, not as a prefix
        "blocks.0.ffn.1.weight",  # GELU slot, no parameters and no rule
        "blocks.x.self_attn.q.weight",  # block index must be numeric
        "blocks.0.self_attn.qq.weight",
        "blocks.0.self_attn_extra.q.weight",
        "head.norm.weight",
        "rope.freqs_cos",
        "some_extra_buffer",
        "",
        "foo.blocks.0.self_attn.q.weight",  # rules are anchored at the model root (after wrapper prefixes)
        "foo.scale_shift_table",
    ],
)
def test_unknown_keys_pass_through(key: str) -> None:
    assert original_to_diffusers_key(key) == key
    assert diffusers_to_original_key(key) == key


def test_rule_renames_are_not_substring_replacements() -> None:
    # "q" rule must not touch norm_q; "o" must not touch anything containing an "o".
    assert original_to_diffusers_key("blocks.0.self_attn.norm_q.weight") == "blocks.0.attn1.norm_q.weight"
    assert original_to_diffusers_key("blocks.0.cross_attn.norm_k_img.weight") == (
        "blocks.0.attn2.norm_added_k.weight"
    )
    # The swap applies once per key, in both directions.
    for i in range(NUM_LAYERS):
        for n_from, n_to in (("norm2", "norm3"), ("norm3", "norm2")):
            key = f"blocks.{i}.{n_from}.weight"
            assert original_to_diffusers_key(key) == f"blocks.{i}.{n_to}.weight"
            assert diffusers_to_original_key(key) == f"blocks.{i}.{n_to}.weight"
            assert diffusers_to_original_key(original_to_diffusers_key(key)) == key


def test_rule_table_is_unambiguous() -> None:
    # Each side must be a set of paths none of which is a component-prefix of another, otherwise a key could
    # match two rules and the result would depend on table order.
    for side in (0, 1):
        paths = [tuple(rule[side].split(".")) for rule in loading._RULES]
        assert len(set(paths)) == len(paths)
        for a in paths:
            for b in paths:
                if a != b:
                    assert b[: len(a)] != a, (a, b)
    for src, dst in loading._RULES:
        assert src.split(".").count("*") == dst.split(".").count("*")


@pytest.mark.parametrize("image", [False, True])
def test_round_trip_keys_and_values(image: bool) -> None:
    keys = original_keys(image=image)
    assert len(set(keys)) == len(keys)
    sd = {k: torch.randn(2) for k in keys}
    converted = original_to_diffusers(sd)
    assert len(converted) == len(sd)
    back = diffusers_to_original(converted)
    assert list(back) == keys
    for k in keys:
        assert back[k] is sd[k]  # values untouched, not copied
    # Every original key is renamed except the patch embedding, which keeps its name.
    unchanged = {k for k in keys if original_to_diffusers_key(k) == k}
    assert unchanged == {"patch_embedding.weight", "patch_embedding.bias"}


def test_lora_state_dict_round_trip() -> None:
    sd = {}
    for k in original_keys():
        if k.endswith(".weight") and ("self_attn" in k or "cross_attn" in k or ".ffn." in k):
            if ".norm_" in k:
                continue
            module = k[: -len(".weight")]
            for ab in ("lora_A", "lora_B"):
                sd[f"base_model.model.{module}.{ab}.default.weight"] = object()
    converted = original_to_diffusers(sd)
    assert all(k.startswith("base_model.model.blocks.") for k in converted)
    assert not any("self_attn" in k or "cross_attn" in k or ".ffn.0." in k for k in converted)
    back = diffusers_to_original(converted)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_collision_raises() -> None:
    sd = {"blocks.0.self_attn.q.weight": 1, "blocks.0.attn1.to_q.weight": 2}
    with pytest.raises(ValueError, match="both map to 'blocks.0.attn1.to_q.weight'"):
        original_to_diffusers(sd)
    with pytest.raises(ValueError, match="both map to"):
        diffusers_to_original({"scale_shift_table": 1, "head.modulation": 2})


def _tiny_diffusers(**overrides):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**{**TINY_CONFIG, **overrides})


def test_names_match_diffusers_state_dict() -> None:
    model = _tiny_diffusers()
    expected = set(model.state_dict().keys())
    produced = set(original_to_diffusers(dict.fromkeys(original_keys())))
    assert produced == expected, (sorted(produced - expected), sorted(expected - produced))
    # Every state-dict entry is a parameter (the RoPE tables are non-persistent buffers), and all of them map
    # back onto the hand-written original tree.
    assert expected == {name for name, _ in model.named_parameters()}
    assert set(diffusers_to_original(dict.fromkeys(expected))) == set(original_keys())


def test_converted_state_dict_loads_strictly() -> None:
    model = _tiny_diffusers()
    original = diffusers_to_original({k: v.clone() for k, v in model.state_dict().items()})
    for v in original.values():
        v.add_(1.0)
    model.load_state_dict(original_to_diffusers(original), strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[diffusers_to_original_key(k)])
    # The swap lands the affine cross-attention norm (original norm3) on diffusers' norm2.
    torch.testing.assert_close(model.blocks[0].norm2.weight, original["blocks.0.norm3.weight"])


def test_names_match_diffusers_image_model() -> None:
    # I2V / FLF2V variant: image embedder (with positional embedding) and extra cross-attention K/V.
    model = _tiny_diffusers(image_dim=20, added_kv_proj_dim=24, pos_embed_seq_len=514)
    expected = set(model.state_dict().keys())
    produced = set(original_to_diffusers(dict.fromkeys(original_keys(image=True))))
    assert produced == expected, (sorted(produced - expected), sorted(expected - produced))
