"""Checkpoint loaders: every official layout, EMA casting, LongLive's LoRA merge, errors that teach (CPU, no files)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from astrolabe_rl.models import CausalWan, WanConfig
from astrolabe_rl.models.loading import (
    CheckpointError,
    load_causal_wan,
    load_wan_state_dict,
    merge_lora,
    original_to_diffusers,
    original_to_diffusers_key,
    read_checkpoint,
    strip_prefixes,
)

CFG = WanConfig.tiny()
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@pytest.fixture
def source() -> CausalWan:
    torch.manual_seed(7)
    return CausalWan(CFG).eval()


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v.clone() for k, v in sd.items()}


def _fsdp_per_block(sd: dict) -> dict:
    """FSDP wrapping every block leaves the marker inside the key: ``model.blocks.0._fsdp_wrapped_module.x``."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            parts.insert(2, "_fsdp_wrapped_module")
        out["model._fsdp_wrapped_module." + ".".join(parts)] = v.clone()
    return out


def _outputs(model: CausalWan) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, CFG.in_dim, 4, 4, generator=g)
    text = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g)
    with torch.no_grad():
        return model(x.to(model.dtype), 500.0, text, frames_per_block=3).float()


LAYOUTS = {
    # Self-Forcing: generator / critic / fp32 EMA, every key under "model."
    "self_forcing": lambda sd: ({"generator": _prefixed(sd, "model."), "critic": {"x.weight": torch.ones(1)},
                                 "generator_ema": _prefixed(sd, "model.")}, "generator_ema"),
    # Causal Forcing EMA saved through FSDP: the wrapper marker at the root and inside every block.
    "causal_forcing_fsdp_ema": lambda sd: ({"generator_ema": _fsdp_per_block(sd)}, "generator_ema"),
    # CausVid / LongLive base: "generator" only.
    "causvid": lambda sd: ({"generator": _prefixed(sd, "model.")}, "generator"),
    # a DDP + torch.compile save under "model"
    "ddp_compiled": lambda sd: ({"model": _prefixed(sd, "module._orig_mod.")}, None),
    # activation checkpointing wrapper, bare dict
    "checkpoint_wrapped": lambda sd: (_prefixed(sd, "_checkpoint_wrapped_module."), None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_torch_layout_loads_exactly(tmp_path, source, layout):
    obj, key = LAYOUTS[layout](source.state_dict())
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model = load_causal_wan(path, CFG, key=key)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(_outputs(model), _outputs(source))


@pytest.mark.parametrize("diffusers_names", [False, True])
def test_krea_safetensors_loads_in_either_naming(tmp_path, source, diffusers_names):
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    if diffusers_names:
        sd = original_to_diffusers(sd)
    path = tmp_path / "krea-realtime-video-14b.safetensors"
    save_file(sd, str(path))
    model = load_causal_wan(path, CFG)
    assert torch.equal(_outputs(model), _outputs(source))


def test_fp32_ema_is_cast_to_the_model_dtype(tmp_path, source):
    bf16 = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    ema = {k: v.float() + 1e-3 for k, v in source.state_dict().items()}  # distinguishable from the generator
    torch.save({"generator": _prefixed(bf16, "model."), "generator_ema": _fsdp_per_block(ema)}, tmp_path / "c.pt")
    model = load_causal_wan(tmp_path / "c.pt", CFG, key="generator_ema", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for k, v in ema.items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16)), k


def test_missing_entry_falls_back_with_a_warning(tmp_path, source):
    torch.save({"generator": _prefixed(source.state_dict(), "model.")}, tmp_path / "c.pt")
    with pytest.warns(UserWarning, match="no 'generator_ema' entry; loading 'generator'"):
        sd = load_wan_state_dict(tmp_path / "c.pt", CFG, key="generator_ema")
    assert torch.equal(sd["head.head.weight"], source.state_dict()["head.head.weight"])


# ------------------------------------------------------------------------------------------------ LoRA


def _peft_lora(model: CausalWan, r: int = 4, alpha: float = 8.0):
    """LongLive's recipe on a tiny model: peft LoRA on every linear of every block, by full module name."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    targets = [f"blocks.{i}.{t}" for i in range(CFG.num_layers) for t in TARGETS]
    torch.manual_seed(11)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  init_lora_weights=False))  # random B: a non-zero update
    return peft_model, get_peft_model_state_dict(peft_model)


@pytest.mark.parametrize("wrapped", [True, False])
def test_longlive_lora_merge_equals_the_peft_adapter(tmp_path, source, wrapped):
    base = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save({"generator": _prefixed(base, "model.")}, tmp_path / "longlive_base.pt")
    peft_model, lora = _peft_lora(source, r=4, alpha=8.0)
    assert set(lora) and all(k.startswith("base_model.model.blocks.") for k in lora)
    assert len(lora) == 2 * len(TARGETS) * CFG.num_layers
    torch.save({"generator_lora": lora} if wrapped else lora, tmp_path / "lora.pt")

    merged = load_causal_wan(tmp_path / "longlive_base.pt", CFG, key="generator", lora=tmp_path / "lora.pt",
                             lora_alpha=8.0)
    with torch.no_grad():
        plain = CausalWan(CFG).eval()
        plain.load_state_dict(base)
    adapter_out = _outputs(peft_model)
    torch.testing.assert_close(_outputs(merged), adapter_out, rtol=1e-5, atol=1e-5)
    assert (adapter_out - _outputs(plain)).abs().max() > 1e-2  # the LoRA really changes the output


def test_lora_merge_is_name_agnostic_and_uses_alpha_over_rank(source):
    base = dict(source.state_dict())
    a, b = torch.randn(2, CFG.dim), torch.randn(CFG.dim, 2)
    lora = {"base_model.model.blocks.1.self_attn.o.lora_A.weight": a,
            "base_model.model.blocks.1.self_attn.o.lora_B.weight": b}
    merged = merge_lora(base, lora, alpha=6.0)
    torch.testing.assert_close(merged["blocks.1.self_attn.o.weight"], base["blocks.1.self_attn.o.weight"] + 3.0 * b @ a)
    renamed = {original_to_diffusers_key(k): v for k, v in lora.items()}
    assert "base_model.model.blocks.1.attn1.to_out.0.lora_A.weight" in renamed
    assert torch.equal(merge_lora(base, renamed, alpha=6.0)["blocks.1.self_attn.o.weight"],
                       merged["blocks.1.self_attn.o.weight"])
    assert torch.equal(merged["blocks.0.self_attn.o.weight"], base["blocks.0.self_attn.o.weight"])


def test_lora_errors_name_the_problem(source):
    base = dict(source.state_dict())
    a = torch.randn(2, CFG.dim)
    with pytest.raises(CheckpointError, match="lack lora_A or lora_B"):
        merge_lora(base, {"base_model.model.blocks.0.self_attn.q.lora_A.weight": a})
    with pytest.raises(CheckpointError, match="do not have: blocks.9.self_attn.q"):
        merge_lora(base, {"blocks.9.self_attn.q.lora_A.weight": a, "blocks.9.self_attn.q.lora_B.weight": a.T})
    with pytest.raises(CheckpointError, match="do not fit its weight"):
        merge_lora(base, {"blocks.0.ffn.0.lora_A.weight": a, "blocks.0.ffn.0.lora_B.weight": a.T})


# ------------------------------------------------------------------------------------------------ teaching errors


def _error(tmp_path, obj, **kw) -> str:
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_causal_wan(tmp_path / "bad.pt", CFG, **kw)
    return str(info.value)


def test_truncated_state_dict_names_missing_keys_and_cause(tmp_path, source):
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}
    msg = _error(tmp_path, {"generator": _prefixed(sd, "model.")})
    n_missing = sum(k.startswith("blocks.1.") for k in source.state_dict())
    assert f"missing {n_missing} of {len(source.state_dict())} keys: blocks.1." in msg
    assert "unexpected" not in msg
    assert "1 blocks, the model 2" in msg and "truncated or partial" in msg


def test_wrong_size_names_shapes(tmp_path):
    torch.manual_seed(0)
    wide = CausalWan(WanConfig.tiny(dim=48, num_heads=4)).state_dict()
    msg = _error(tmp_path, {"generator_ema": _prefixed(wide, "model.")})
    assert "shape mismatches: blocks.0.cross_attn.k.bias is (48,) in the file, (24,) in the model" in msg
    assert "another model size" in msg


@pytest.mark.parametrize("keys, cause", [
    ({"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 24)}, "LoRA adapter"),
    ({"decoder.upsamples.0.residual.0.gamma": torch.ones(2), "encoder.conv1.weight": torch.ones(2)}, "VAE"),
    ({"token_embedding.weight": torch.ones(2, 2), "blocks.0.attn.q.weight": torch.ones(2, 2)}, "umT5"),
])
def test_foreign_files_are_recognised(tmp_path, keys, cause):
    msg = _error(tmp_path, keys)
    assert cause in msg and "missing" in msg and "unexpected" in msg


def test_unknown_prefix_is_pointed_out(tmp_path, source):
    msg = _error(tmp_path, {"generator": _prefixed(source.state_dict(), "net.")})
    assert "extra prefix 'net'" in msg


def test_corrupt_and_pickled_files(tmp_path, source):
    good = tmp_path / "good.pt"
    torch.save({"generator": source.state_dict()}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_causal_wan(cut, CFG)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save({"generator": source.state_dict(), "config": _Opaque()}, pickled)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        read_checkpoint(pickled)
    assert "generator" in read_checkpoint(pickled, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


class _Opaque:  # a pickled object that weights_only loading refuses
    pass


def test_no_weight_entry(tmp_path):
    msg = _error(tmp_path, {"critic": {"a": torch.ones(1)}, "step": 3})
    assert "no weights under any of ['generator_ema', 'generator', 'model']" in msg


def test_strip_prefixes_refuses_collisions():
    with pytest.raises(CheckpointError, match="two keys become 'head.head.bias'"):
        strip_prefixes({"model.head.head.bias": torch.ones(1), "module.head.head.bias": torch.ones(1)})
