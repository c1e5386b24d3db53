"""Shared reward plumbing: frame sampling and pooling on hand-made inputs, Qwen2-VL preprocessing against the
library's own processors, checkpoint key maps and LoRA merging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrolabe_rl.rewards import _qwen
from astrolabe_rl.rewards._common import quantize, resize_levels, top_frac_mean, uniform_indices


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA wheel on a CPU torch raises RuntimeError/OSError
        return False
    return True


def smooth_frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Natural-image-like frames [n, 3, h, w] in [0, 1] (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, h // 16), max(2, w // 16), generator=g)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------- sampling and pooling


def test_uniform_indices_match_astrolabe_sampling():
    assert uniform_indices(81, 10) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert uniform_indices(81, 10) == torch.linspace(0, 80, 10).round().long().tolist()
    assert uniform_indices(5, None) == [0, 1, 2, 3, 4]
    assert uniform_indices(3, 10) == [0, 1, 2]
    with pytest.raises(ValueError):
        uniform_indices(10, 0)


def test_top_frac_mean_on_hand_made_scores():
    scores = torch.tensor([[1.0, 9.0, 3.0, 7.0, 5.0, 2.0, 8.0, 4.0, 6.0, 0.0]])  # 10 frames
    assert top_frac_mean(scores, 0.3).item() == pytest.approx((9 + 8 + 7) / 3)  # int(10 · 0.3) = 3 best
    assert top_frac_mean(scores, None).item() == pytest.approx(4.5)
    assert top_frac_mean(torch.tensor([[2.0, 5.0]]), 0.3).item() == 5.0  # at least one frame
    assert top_frac_mean(torch.arange(81.0)[None], 0.3).item() == pytest.approx(sum(range(57, 81)) / 24)
    with pytest.raises(ValueError):
        top_frac_mean(scores, 1.5)


# --------------------------------------------------------------------------------- Qwen2-VL geometry


@pytest.mark.parametrize(("hw", "pixels", "expected"), [
    ((480, 832), 200704, (336, 588)),  # HPSv3's fixed 448² area on a Wan2.1 frame
    ((448, 448), 200704, (448, 448)),
    ((1080, 1920), 200704, (336, 588)),
    ((56, 56), 3136, (56, 56)),
])
def test_smart_resize_matches_the_library(hw, pixels, expected):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as library

    assert _qwen.smart_resize(*hw, 28, pixels, pixels) == expected == library(*hw, 28, pixels, pixels)


def test_image_preprocessing_matches_qwen2vl_image_processor():
    """Same uint8 frames through Qwen2VLImageProcessor (PIL resize) and our torch path: at most two 8-bit levels
    apart (rounding ties between PIL's fixed-point and torch's float kernels), almost every value exact."""
    from transformers import Qwen2VLImageProcessor

    frames = smooth_frames(2, 480, 832)
    proc = Qwen2VLImageProcessor(min_pixels=200704, max_pixels=200704)
    u8 = quantize(frames).to(torch.uint8)
    ref = proc(images=[f.permute(1, 2, 0).numpy() for f in u8], return_tensors="pt")
    geo = _qwen.VisionGeometry()
    size = _qwen.smart_resize(480, 832, geo.factor, 200704, 200704)
    ours = [_qwen.patchify(f[None], geo) for f in _qwen.preprocess(frames, size)]
    assert ref["image_grid_thw"].tolist() == [list(g) for _, g in ours] == [[1, 24, 42]] * 2
    level = 1 / 255 / min(_qwen.OPENAI_CLIP_STD)  # one 8-bit level after normalisation
    diff = (torch.cat([p for p, _ in ours]) - ref["pixel_values"]).abs()
    assert diff.max() <= 2.01 * level
    assert (diff > 0.5 * level).float().mean() < 0.01
    assert geo.tokens((1, 24, 42)) == 252


def test_resize_emulates_pil_even_on_noise():
    """PIL's two 8-bit passes: a single float pass would differ by ~12 levels where bicubic overshoot clips."""
    import numpy as np
    from PIL import Image

    x = quantize(torch.rand(1, 3, 96, 160))
    img = Image.fromarray(x[0].permute(1, 2, 0).to(torch.uint8).numpy())
    ref = torch.from_numpy(np.array(img.resize((84, 56), Image.BICUBIC))).permute(2, 0, 1).float()
    assert (resize_levels(x, (56, 84))[0] - ref).abs().max() <= 1


def test_video_patchify_layout():
    """Rows run over (t, h/m, w/m, m, m); columns are (C, tp, p, p): checked on an index-valued video."""
    geo = _qwen.VisionGeometry(patch_size=2, merge_size=2, temporal_patch_size=2)
    t, h, w = 4, 8, 4
    video = torch.arange(t * 3 * h * w, dtype=torch.float32).view(t, 3, h, w)
    patches, grid = _qwen.patchify(video, geo)
    assert grid == (2, 4, 2) and patches.shape == (2 * 4 * 2, 3 * 2 * 2 * 2)
    # row 0: temporal patch 0, merge group (0, 0), sub-patch (0, 0); column (c, tp, py, px)
    row = patches[0].view(3, 2, 2, 2)
    assert torch.equal(row[1, 1], video[1, 1, 0:2, 0:2])
    # row 1 is the next sub-patch of the same 2×2 group: (0, 1) -> columns 2..3
    assert torch.equal(patches[1].view(3, 2, 2, 2)[0, 0], video[0, 0, 0:2, 2:4])
    # row 2: sub-patch (1, 0) -> rows 2..3
    assert torch.equal(patches[2].view(3, 2, 2, 2)[2, 0], video[0, 2, 2:4, 0:2])
    # an odd frame count repeats the last frame
    odd, grid = _qwen.patchify(video[:3], geo)
    last = odd.view(2, -1, 3, 2, 2, 2)[1]  # second temporal patch: (frame 2, its copy)
    assert grid == (2, 4, 2) and torch.equal(last[:, :, 1], last[:, :, 0])


def test_video_patches_of_held_frames_equal_the_image_processor():
    """A video whose frames come in identical pairs patchifies exactly like the image processor's images."""
    from transformers import Qwen2VLImageProcessor

    frames = smooth_frames(2, 56, 84, seed=3)
    proc = Qwen2VLImageProcessor(do_resize=False)
    u8 = quantize(frames).to(torch.uint8)
    ref = proc(images=[f.permute(1, 2, 0).numpy() for f in u8], return_tensors="pt")["pixel_values"]
    video = _qwen.preprocess(frames.repeat_interleave(2, dim=0), (56, 84))
    ours, grid = _qwen.patchify(video, _qwen.VisionGeometry())
    assert grid == (2, 4, 6)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not _torchvision_works(), reason="Qwen2VLVideoProcessor needs a working torchvision")
def test_video_preprocessing_matches_qwen2vl_video_processor():
    from transformers import Qwen2VLVideoProcessor

    frames = smooth_frames(10, 336, 588, seed=1)
    u8 = quantize(frames).to(torch.uint8)
    proc = Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056)
    ref = proc(videos=[u8], return_tensors="pt", cap_pixels_per_frame=False)
    ours, grid = _qwen.patchify(_qwen.preprocess(frames, (336, 588)), _qwen.VisionGeometry())
    assert ref["video_grid_thw"].tolist() == [list(grid)] == [[5, 24, 42]]
    torch.testing.assert_close(ours, ref["pixel_values_videos"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- checkpoint keys


@pytest.mark.parametrize(("official", "ours"), [
    ("model.layers.3.self_attn.q_proj.weight", "backbone.language_model.layers.3.self_attn.q_proj.weight"),
    ("model.embed_tokens.weight", "backbone.language_model.embed_tokens.weight"),
    ("visual.blocks.0.attn.qkv.weight", "backbone.visual.blocks.0.attn.qkv.weight"),
    ("model.language_model.norm.weight", "backbone.language_model.norm.weight"),
    ("model.visual.merger.mlp.0.bias", "backbone.visual.merger.mlp.0.bias"),
    ("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight",
     "backbone.language_model.layers.0.mlp.up_proj.weight"),
    ("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight",
     "backbone.language_model.layers.0.mlp.up_proj.lora_A.default.weight"),
    ("base_model.model.rm_head.modules_to_save.default.weight", "rm_head.weight"),
    ("rm_head.0.bias", "rm_head.0.bias"),
    ("lm_head.weight", None),
    ("base_model.model.rm_head.original_module.weight", None),
])
def test_official_key_map(official, ours):
    assert _qwen.official_key(official) == ours


def test_merge_lora_adds_scaled_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    a, b = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    weights = {"m.q.weight": w.clone()}
    _qwen.merge_lora(weights, {"m.q.lora_A.default.weight": a, "m.q.lora_B.weight": b}, 0.5, "test")
    torch.testing.assert_close(weights["m.q.weight"], w + 0.5 * b @ a)
    assert _qwen.lora_scale({"r": 64, "lora_alpha": 128}) == 2.0
    assert _qwen.lora_scale({"lora_r": 16, "lora_alpha": 32, "use_rslora": True}) == 8.0
    with pytest.raises(ValueError, match="not both"):
        _qwen.merge_lora({"m.q.weight": w}, {"m.q.lora_A.weight": a}, 1.0, "test")
    with pytest.raises(ValueError, match="not in the base model"):
        _qwen.merge_lora({}, {"x.lora_A.weight": a, "x.lora_B.weight": b}, 1.0, "test")


def test_load_weights_names_missing_and_unexpected_keys():
    module = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"1 missing .*bias.*1 unexpected .*extra"):
        _qwen.load_weights(module, [("weight", torch.zeros(3, 2)), ("extra", torch.zeros(1))], "ckpt.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        _qwen.load_weights(module, [("weight", torch.zeros(2, 2)), ("bias", torch.zeros(3))], "ckpt.pth")
    _qwen.load_weights(module, [("weight", torch.ones(3, 2)), ("bias", torch.ones(3))], "ckpt.pth")
    assert module.weight.sum().item() == 6


def test_gather_tokens_reads_the_first_occurrence_per_row():
    hidden = torch.arange(2 * 5 * 1.0).view(2, 5, 1)
    ids = torch.tensor([[1, 7, 2, 8, 7], [7, 8, 0, 0, 0]])
    assert _qwen.gather_tokens(hidden, ids, [7, 8])[..., 0].tolist() == [[1.0, 3.0], [5.0, 6.0]]
    with pytest.raises(ValueError, match="missing"):
        _qwen.gather_tokens(hidden, ids, [2])


# ---------------------------------------------------------------------------------------- position scheme


@pytest.fixture(scope="module")
def tiny_backbone():
    """A seeded random 2-layer Qwen2-VL, its tokenizer, and a padded batch of two images of different sizes."""
    from astrolabe_rl.rewards._common import seeded

    tok = _qwen.tiny_tokenizer(["<|Reward|>"], words="rate this image of a cat please".split())
    config = _qwen.make_config(tok, **_qwen.TINY)
    backbone = seeded(11, lambda: _qwen.build_backbone(config, torch.device("cpu"), torch.float32, init=True))
    geo = _qwen.VisionGeometry.of(config)
    frames = [smooth_frames(1, 56, 84, seed=4), smooth_frames(1, 56, 56, seed=5)]
    patches = [_qwen.patchify(_qwen.preprocess(f, f.shape[-2:]), geo) for f in frames]
    texts = [_qwen.chat_text(t, "image", geo.tokens(g))
             for t, (_, g) in zip(["rate this image of a cat please <|Reward|>", "rate <|Reward|> cat"], patches)]
    ids, mask = _qwen.tokenize(tok, texts, torch.device("cpu"))
    batch = dict(pixel_values=torch.cat([p for p, _ in patches]), grid=torch.tensor([g for _, g in patches]))
    return backbone, tok, ids, mask, batch


def plain_lm_hidden(backbone, ids, mask, pixel_values, grid) -> torch.Tensor:
    """The reference: the same embedded sequence (token embeddings, vision-tower outputs at the image
    placeholders) through a plain causal language model, ``transformers.Qwen2Model`` (ordinary 1-D RoPE), holding
    the backbone's language-model weights, with positions ``0 .. L-1``."""
    from transformers import Qwen2Config, Qwen2Model

    text = backbone.config.text_config
    lm = Qwen2Model(Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
        max_position_embeddings=text.max_position_embeddings))
    lm.load_state_dict(backbone.language_model.state_dict(), strict=True)
    lm.config._attn_implementation = "sdpa"
    with torch.no_grad():
        vision = backbone.get_image_features(pixel_values, grid, return_dict=True).pooler_output
        embeds = backbone.get_input_embeddings()(ids)
        slots = ids == backbone.config.image_token_id
        embeds[slots] = torch.cat(list(vision)).to(embeds.dtype)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state


def test_sequential_positions_equal_a_plain_causal_lm_and_differ_from_mrope(tiny_backbone):
    """The released reward checkpoints were trained with 1-D positions over the whole sequence (vision tokens
    included); "sequential" must reproduce that exactly at the reward token, and M-RoPE must not."""
    backbone, tok, ids, mask, batch = tiny_backbone
    reward_id = tok.convert_tokens_to_ids("<|Reward|>")
    reference = plain_lm_hidden(backbone, ids, mask, **batch)
    with torch.no_grad():
        sequential = _qwen.last_hidden(backbone, ids, mask, vision="image", **batch)
        mrope = _qwen.last_hidden(backbone, ids, mask, vision="image", positions="mrope", **batch)
    at = lambda h: _qwen.gather_tokens(h, ids, [reward_id])[:, 0]  # noqa: E731
    torch.testing.assert_close(at(sequential), at(reference), atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(sequential[real], reference[real], atol=1e-5, rtol=1e-5)
    # every row's reward token moves, by far more than the equality tolerance above
    assert (at(mrope) - at(reference)).abs().amax(dim=-1).min() > 1e-3
    first_vision = int((ids[0] == backbone.config.image_token_id).int().argmax())
    # before the first vision token the two schemes give the same positions, hence the same states
    torch.testing.assert_close(mrope[:, :first_vision], sequential[:, :first_vision], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown position scheme 'rope3d'.*sequential.*mrope"):
        _qwen.last_hidden(backbone, ids, mask, vision="image", positions="rope3d", **batch)
