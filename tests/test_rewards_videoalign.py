"""VideoAlign: the real Qwen2-VL class at a tiny size, both released checkpoint layouts (full ``model.pth``, LoRA
adapter + non-LoRA weights on the base model) mapped onto it, Astrolabe's frame path, heads and normalisation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from astrolabe_rl.rewards import _qwen, build_reward, videoalign
from astrolabe_rl.rewards._common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_levels, seeded

PROMPTS = ["a cat", "a red ball rolling to the right"]
STATS = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}


def official_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our key layout -> the transformers-4.45 one the checkpoints use (``model.*`` = LLM, ``visual.*``)."""
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.language_model."):
            out[prefix + "model." + k[len("backbone.language_model."):]] = v.clone()
        elif k.startswith("backbone.visual."):
            out[prefix + "visual." + k[len("backbone.visual."):]] = v.clone()
        elif k == "head.weight":
            out[prefix + "rm_head.weight"] = v.clone()
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A base folder (tokenizer without the reward tokens, config, base weights with a padded vocabulary) and the
    tokenizer the loader will produce."""
    base = tmp_path_factory.mktemp("Qwen2-VL-2B-Instruct")
    _qwen.tiny_tokenizer([], words=videoalign.user_text("a cat red ball").split()).save_pretrained(base)
    tok = _qwen.load_tokenizer(base, videoalign.REWARD_TOKENS)
    config = _qwen.make_config(tok, **_qwen.TINY)
    config.save_pretrained(base)
    ids = tok.convert_tokens_to_ids(videoalign.REWARD_TOKENS)
    return base, tok, config, ids


def write_config(root, stats=STATS) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_config.json").write_text(json.dumps({
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1},
        "peft_lora_config": {"lora_r": 4, "lora_alpha": 8},
        "inference_config": stats,
    }))


def test_full_checkpoint_layout(parts, tmp_path):
    base, tok, config, ids = parts
    source = seeded(3, lambda: videoalign.VideoAlignModel(config, ids))
    root = tmp_path / "VideoReward"
    write_config(root)
    (root / "checkpoint-100").mkdir()
    full = official_keys(source.state_dict())
    full["lm_head.weight"] = torch.randn_like(full["model.embed_tokens.weight"])
    torch.save(full, root / "checkpoint-100" / "model.pth")
    model, loaded_tok, stats = videoalign.VideoAlignModel.from_pretrained(root, base)
    assert model.token_ids == ids == loaded_tok.convert_tokens_to_ids(videoalign.REWARD_TOKENS)
    for (k, a), (_, b) in zip(sorted(source.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), k
    assert stats.stats["MQ"] == (-1.0, 0.5)


def test_lora_checkpoint_layout_is_merged_onto_the_base(parts, tmp_path):
    """Base weights (padded vocab) + adapter (peft names, no adapter name) + non-LoRA weights (reward-token
    embeddings, head); the highest checkpoint step is used unless one is asked for."""
    base, tok, config, ids = parts
    g = torch.Generator().manual_seed(0)
    base_model = seeded(1, lambda: videoalign.VideoAlignModel(config, ids))
    weights = official_keys(base_model.state_dict())
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.cat([embed[:-3], torch.randn(8, embed.shape[1])])  # padded
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
    save_file(weights, base / "model.safetensors")

    targets = {"model.layers.0.self_attn.q_proj": (32, 32), "visual.blocks.1.attn.qkv": (96, 32)}
    adapter = {}
    for module, (out_dim, in_dim) in targets.items():
        adapter[f"base_model.model.{module}.lora_A.weight"] = torch.randn(4, in_dim, generator=g)
        adapter[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g)
    trained_embed = torch.randn(embed.shape, generator=g)
    head = torch.randn(1, 32, generator=g)
    root = tmp_path / "VideoReward"
    write_config(root)
    for step, scale in ((50, 0.0), (200, 1.0)):
        ckpt = root / f"checkpoint-{step}"
        ckpt.mkdir()
        save_file(adapter, ckpt / "adapter_model.safetensors")
        (ckpt / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        torch.save({"base_model.model.model.embed_tokens.weight": trained_embed,
                    "base_model.model.rm_head.weight": head * scale}, ckpt / "non_lora_state_dict.pth")

    model, _, _ = videoalign.VideoAlignModel.from_pretrained(root, base)
    expected = dict(base_model.state_dict())
    expected["backbone.language_model.embed_tokens.weight"] = trained_embed
    expected["head.weight"] = head
    for module in targets:
        key = _qwen.official_key(module + ".weight")
        a = adapter[f"base_model.model.{module}.lora_A.weight"]
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        expected[key] = expected[key] + 2.0 * b @ a  # alpha / r = 8 / 4
    got = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, msg=k)
    early, _, _ = videoalign.VideoAlignModel.from_pretrained(root, base, step=50)
    assert early.head.weight.abs().sum() == 0
    with pytest.raises(FileNotFoundError, match=r"available steps: \[50, 200\]"):
        videoalign.VideoAlignModel.from_pretrained(root, base, step=7)


def test_missing_files_are_named(parts, tmp_path, monkeypatch):
    base, *_ = parts
    monkeypatch.setenv("ASTROLABE_REWARD_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/VideoReward.*KwaiVGI/VideoReward"):
        videoalign.VideoAlignModel.from_pretrained()
    write_config(tmp_path / "VideoReward")
    (tmp_path / "VideoReward" / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match="Qwen2-VL-2B-Instruct.*looked at"):
        videoalign.VideoAlignModel.from_pretrained()
    with pytest.raises(FileNotFoundError, match="neither model.pth nor adapter_model.safetensors"):
        videoalign.VideoAlignModel.from_pretrained(base=base)


def test_frame_path_samples_10_frames_and_grays_mq():
    """Frame t of an 81-frame video has level 3t: the sampled levels reveal the indices; MQ input is gray."""
    t = torch.arange(81, dtype=torch.float32)
    video = (3 * t / 255).view(81, 1, 1, 1).expand(81, 3, 28, 50).clone()
    video[:, 0] = 1.0  # a red cast: the grayscale version must differ from RGB
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    rgb = videoalign.sample_frames(video, 10, (56, 84)) * std + mean
    assert rgb.shape == (10, 3, 56, 84)
    assert (rgb[:, 1, 0, 0] * 255).round().long().tolist() == [3 * i for i in [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]]
    gray = (videoalign.sample_frames(video, 10, (56, 84), grayscale=True) * std + mean) * 255
    torch.testing.assert_close(gray[:, 0], gray[:, 2], atol=1e-3, rtol=0)
    level = 3 * 9
    assert gray[1, 0, 5, 5].round().item() == int(0.2989 * 255 + 0.587 * level + 0.114 * level)  # truncated


def test_frames_are_resized_once_as_uint8_tensors():
    """The released path resizes the sampled uint8 frames once in torch (bicubic, antialiased) and rounds once;
    MQ's grayscale is taken of the resized RGB. On detailed frames a PIL-like two-pass resize is levels away."""
    g = torch.Generator().manual_seed(2)
    video = torch.rand(12, 3, 90, 150, generator=g)  # noise: the detail where resize rules disagree
    size = (56, 84)
    u8 = (video * 255).round().clamp(0, 255).to(torch.uint8)[[0, 1, 2, 4, 5, 6, 7, 9, 10, 11]]
    resized = F.interpolate(u8.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    resized = resized.round().clamp(0, 255)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    levels = lambda x: (x * std + mean) * 255  # noqa: E731 - undo the normalisation
    rgb = levels(videoalign.sample_frames(video, 10, size))
    torch.testing.assert_close(rgb, resized, atol=1e-3, rtol=0)
    luma = (0.2989 * resized[:, 0] + 0.587 * resized[:, 1] + 0.114 * resized[:, 2]).floor()
    gray = levels(videoalign.sample_frames(video, 10, size, grayscale=True))
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma, atol=1e-3, rtol=0)
    two_pass = resize_levels(u8.float(), size)
    assert (two_pass - resized).abs().max() >= 3  # the old PIL-emulating path really is different here


def test_heads_share_one_model_and_normalise():
    vq, mq, ta = (build_reward(f"videoalign_{h}", tiny=True) for h in ("vq", "mq", "ta"))
    overall = build_reward("videoalign", tiny=True)
    assert vq.scorer is mq.scorer is ta.scorer is overall.scorer
    assert mq.grayscale and not vq.grayscale and not ta.grayscale
    video = torch.rand(2, 12, 3, 30, 50, generator=torch.Generator().manual_seed(0))
    calls = []
    forward = vq.scorer._forward
    vq.scorer._forward = lambda *a: calls.append(a[2]) or forward(*a)
    try:
        s_vq, s_ta, s_all = vq(video, PROMPTS), ta(video, PROMPTS), overall(video, PROMPTS)
        s_mq = mq(video, PROMPTS)
    finally:
        del vq.scorer._forward
    assert calls == [False, True]  # RGB once for VQ, TA and Overall; grayscale once for MQ
    raw = ta.extras["raw"]
    z = vq.scorer.stats.z(raw)
    released = (torch.tensor([3.6757, 1.1646, 2.8105]), torch.tensor([2.2476, 1.3811, 2.5121]))
    torch.testing.assert_close(z, (raw - released[0]) / released[1])
    torch.testing.assert_close(s_vq, z[:, 0])
    torch.testing.assert_close(s_ta, z[:, 2])
    torch.testing.assert_close(s_all, z.mean(dim=1))
    torch.testing.assert_close(s_mq, mq.extras["z"][:, 1])
    raw_mq = build_reward("videoalign_mq", tiny=True, normalize=False)(video, PROMPTS)
    torch.testing.assert_close(raw_mq, mq.extras["raw"][:, 1])


def test_batching_does_not_change_scores():
    video = torch.rand(3, 10, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a red ball rolling to the right", "x"]
    one = build_reward("videoalign_ta", tiny=True, video_batch=1)
    three = build_reward("videoalign_ta", tiny=True, video_batch=3)
    torch.testing.assert_close(one(video, prompts), three(video.clone(), prompts), atol=1e-5, rtol=1e-5)


def test_template_carries_the_three_tokens_in_order():
    text = videoalign.user_text("a corgi")
    positions = [text.index(t) for t in videoalign.REWARD_TOKENS]
    assert positions == sorted(positions)
    assert "Textual prompt - a corgi\n" in text
    assert videoalign.NormStats.from_inference_config(STATS).stats["TA"] == (0.0, 4.0)


def test_position_scheme_is_an_option_defaulting_to_sequential():
    video = torch.rand(1, 10, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    default = build_reward("videoalign_ta", tiny=True)
    mrope = build_reward("videoalign_ta", tiny=True, positions="mrope")
    assert default.scorer.model.positions == "sequential" and mrope.scorer.model.positions == "mrope"
    assert default.scorer is not mrope.scorer
    default(video, PROMPTS[:1])
    mrope(video, PROMPTS[:1])
    assert not torch.allclose(default.extras["raw"], mrope.extras["raw"])
    with pytest.raises(ValueError, match="unknown position scheme"):
        build_reward("videoalign_vq", tiny=True, positions="3d")
