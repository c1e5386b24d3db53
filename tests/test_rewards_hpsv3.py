"""HPSv3: the real Qwen2-VL class at a tiny size, the official checkpoint layouts mapped onto it, frame pooling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from astrolabe_rl.rewards import _qwen, build_reward, hpsv3
from astrolabe_rl.rewards._common import seeded, top_frac_mean

PROMPTS = ["a cat", "a red ball rolling to the right on a long table"]  # different lengths: padding is exercised


def to_official(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our HPSv3Model state dict -> the released file's key layout (written independently of the loader).

    v4.45: ``model.*`` (LLM), ``visual.*``, ``rm_head.{0,3,5}`` (nn.Sequential with ReLU/Dropout between).
    v4.52-kwargs: ``model.language_model.*``, ``model.visual.*``, ``rm_head.{0,layer_1.0,output_layer}``.
    """
    heads = ["0", "3", "5"] if layout == "v4.45" else ["0", "layer_1.0", "output_layer"]
    llm, vis = ("model.", "visual.") if layout == "v4.45" else ("model.language_model.", "model.visual.")
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.language_model."):
            out[llm + k[len("backbone.language_model."):]] = v.clone()
        elif k.startswith("backbone.visual."):
            out[vis + k[len("backbone.visual."):]] = v.clone()
        elif k.startswith("head.layers."):
            i, leaf = k[len("head.layers."):].split(".")
            out[f"rm_head.{heads[int(i)]}.{leaf}"] = v.clone()
    vocab, hidden = state["backbone.language_model.embed_tokens.weight"].shape
    out["lm_head.weight"] = torch.randn(vocab, hidden)  # present in the file, unused by a reward
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A base folder (config + tokenizer without the reward token) and a source model sharing its token ids."""
    base = tmp_path_factory.mktemp("Qwen2-VL-7B-Instruct")
    _qwen.tiny_tokenizer([], words=hpsv3.user_text("a cat red ball").split()).save_pretrained(base)
    tok = _qwen.load_tokenizer(base, [hpsv3.REWARD_TOKEN])
    config = _qwen.make_config(tok, **_qwen.TINY)
    config.save_pretrained(base)
    token_id = tok.convert_tokens_to_ids(hpsv3.REWARD_TOKEN)
    source = seeded(7, lambda: hpsv3.HPSv3Model(config, token_id, [16, 8, 2]))
    return base, source, tok


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 5, 3, 40, 64, generator=g)


@pytest.mark.parametrize("layout", ["v4.45", "v4.52-kwargs"])
def test_official_checkpoint_maps_onto_the_model(released, video, tmp_path, layout):
    base, source, tok = released
    ckpt = tmp_path / "HPSv3.safetensors"
    save_file(to_official(source.state_dict(), layout), ckpt)
    model, loaded_tok = hpsv3.HPSv3Model.from_pretrained(ckpt, base)
    assert loaded_tok.convert_tokens_to_ids(hpsv3.REWARD_TOKEN) == model.reward_token_id == source.reward_token_id
    for (k, a), (_, b) in zip(sorted(source.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), k
    small = dict(top_frac=0.3, pixels=56 * 56)
    torch.testing.assert_close(hpsv3.HPSv3Reward(model, loaded_tok, **small)(video, PROMPTS),
                               hpsv3.HPSv3Reward(source, tok, **small)(video, PROMPTS))


def test_missing_files_name_where_they_were_looked_for(released, tmp_path, monkeypatch):
    base, source, _ = released
    monkeypatch.setenv("ASTROLABE_REWARD_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/HPSv3/HPSv3.safetensors.*MizzenAI/HPSv3"):
        hpsv3.HPSv3Model.from_pretrained(None, base)
    ckpt = tmp_path / "HPSv3.safetensors"
    save_file(to_official(source.state_dict(), "v4.45"), ckpt)
    with pytest.raises(FileNotFoundError, match="Qwen2-VL-7B-Instruct"):
        hpsv3.HPSv3Model.from_pretrained(ckpt, None)
    broken = to_official(source.state_dict(), "v4.45")
    del broken["model.norm.weight"]
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="1 missing.*norm"):
        hpsv3.HPSv3Model.from_pretrained(tmp_path / "broken.safetensors", base)


def test_reward_is_the_top_30_percent_mean_of_frame_mu(video):
    reward = build_reward("hpsv3", tiny=True)
    mu_sigma = reward.score_frames(video, PROMPTS)
    assert mu_sigma.shape == (2, 5, 2)
    scores = reward(video, PROMPTS)
    top = mu_sigma[..., 0].topk(1, dim=1).values.mean(1)  # int(5 · 0.3) = 1 frame
    torch.testing.assert_close(scores, top)
    torch.testing.assert_close(reward.extras["mean_all"], mu_sigma[..., 0].mean(1))
    assert reward.extras["frame_sigma"].shape == (2, 5)


def test_frames_are_scored_independently_of_batching_and_sampling(video):
    one = build_reward("hpsv3", tiny=True, frame_batch=1)
    many = build_reward("hpsv3", tiny=True, frame_batch=7)
    assert one.model is many.model  # one model per config
    torch.testing.assert_close(one.score_frames(video, PROMPTS), many.score_frames(video, PROMPTS),
                               atol=1e-5, rtol=1e-5)
    sampled = build_reward("hpsv3", tiny=True, frames=3)
    sampled(video, PROMPTS)
    full = one.score_frames(video, PROMPTS)[..., 0]
    torch.testing.assert_close(sampled.extras["frame_mu"], full[:, [0, 2, 4]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top_frac_mean(full[:, [0, 2, 4]], 0.3), sampled(video, PROMPTS), atol=1e-5, rtol=1e-5)


def test_prompt_reaches_the_model(video):
    reward = build_reward("hpsv3", tiny=True)
    a = reward.score_frames(video[:1], ["a cat"])
    b = reward.score_frames(video[:1], ["a red ball"])
    assert not torch.allclose(a, b)
    text = _qwen.chat_text(hpsv3.user_text("a cat"), "image", 4)
    assert text.count("<|image_pad|>") == 4 and text.count(hpsv3.REWARD_TOKEN) == 1
    assert "Textual prompt - a cat\n" in text


def test_position_scheme_is_an_option_defaulting_to_sequential(video):
    default = build_reward("hpsv3", tiny=True)
    mrope = build_reward("hpsv3", tiny=True, positions="mrope")
    assert default.model.positions == "sequential" and mrope.model.positions == "mrope"
    a = default.score_frames(video[:1, :1], ["a cat"])
    b = mrope.score_frames(video[:1, :1], ["a cat"])
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="unknown position scheme"):
        build_reward("hpsv3", tiny=True, positions="M-RoPE")
