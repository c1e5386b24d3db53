"""The CLIP family: torch preprocessing against the CLIP processor, the released layouts (Hugging Face folders,
the aesthetic head file, open_clip's HPSv2 state dict) mapped onto transformers' CLIPModel, and the score rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrolabe_rl.rewards import build_reward, clip
from astrolabe_rl.rewards._common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, quantize, seeded

LEVEL = 1 / 255 / min(OPENAI_CLIP_STD)  # one 8-bit level after normalisation
PROMPTS = ["a red ball", "a cat rolling to the left"]


def smooth(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    low = torch.rand(n, 3, max(2, h // 16), max(2, w // 16), generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("hw", [(480, 832), (833, 481), (224, 224), (100, 300)])
def test_resize_crop_matches_clip_image_processor(hw):
    from transformers import CLIPImageProcessor

    frames = smooth(2, *hw)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    u8 = quantize(frames).to(torch.uint8)
    ref = proc(images=[f.permute(1, 2, 0).numpy() for f in u8], return_tensors="pt")["pixel_values"]
    ours = clip.resize_crop(frames, 224)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    diff = (ours - ref).abs()
    assert diff.max() <= 2.01 * LEVEL
    assert (diff > 0.5 * LEVEL).float().mean() < 0.01


def test_resize_pad_keeps_the_whole_frame_on_black_bars():
    frames = torch.full((1, 3, 480, 832), 0.5)
    out = clip.resize_pad(frames, 224)
    black = (torch.zeros(3) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    grey = (torch.full((3,), 128 / 255) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    h = round(480 * 224 / 832)  # 129 rows of content, centred
    top = (224 - h) // 2
    torch.testing.assert_close(out[0, :, top + h // 2, 112], grey)
    torch.testing.assert_close(out[0, :, top - 1, 112], black)
    torch.testing.assert_close(out[0, :, top + h, 112], black)


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel names -> open_clip's (written for the test, independently of the loader)."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if ".encoder.layers." in k:
            tower, rest = k.split(".encoder.layers.")
            prefix = ("visual." if tower == "vision_model" else "") + "transformer.resblocks."
            i, name = rest.split(".", 1)
            for hf, oc in (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                           ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")):
                if name.startswith(hf):
                    out[f"{prefix}{i}.{oc}{name[len(hf):]}"] = v
            if name.startswith("self_attn.q_proj."):
                leaf = name.rsplit(".", 1)[1]
                qkv = [state[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}{i}.attn.in_proj_{leaf}"] = torch.cat(qkv)
            continue
        simple = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
                  "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                  "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                  "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                  "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                  "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                  "vision_model.post_layernorm.bias": "visual.ln_post.bias",
                  "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias", "logit_scale": "logit_scale"}
        if k in simple:
            out[simple[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t()
        elif k == "text_projection.weight":
            out["text_projection"] = v.t()
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIPModel + tokenizer saved as a Hugging Face folder."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("clip-vit-large-patch14")
    tok = clip.tiny_clip_tokenizer("a red ball cat rolling to the left".split())
    model = seeded(5, lambda: CLIPModel(clip.tiny_clip_config(tok))).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_open_clip_checkpoint_maps_onto_clip_model(tiny_clip, tmp_path):
    folder, model, tok = tiny_clip
    sd = hf_to_open_clip(model.state_dict())
    sd["attn_mask"] = torch.zeros(16, 16)  # open_clip keeps the causal mask as a buffer
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in sd and "text_projection" in sd
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "HPS_v2.1_compressed.pt")
    scorer = clip.load_open_clip_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", model.config, folder,
                                            torch.device("cpu"), torch.float32)
    reference = clip.ClipScorer(model, tok, "pad")
    frames = smooth(3, 48, 80)
    torch.testing.assert_close(scorer.image_embeds(frames), reference.image_embeds(frames))
    torch.testing.assert_close(scorer.text_embeds(PROMPTS), reference.text_embeds(PROMPTS))
    bad = dict(sd)
    bad["visual.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unrecognised open_clip tensor 'visual.extra'"):
        clip.load_open_clip_checkpoint(tmp_path / "bad.pt", model.config, folder, torch.device("cpu"), torch.float32)


def test_hf_layout_scores_follow_each_rule(tiny_clip, tmp_path):
    """clipscore = cos, pickscore = exp(logit_scale)·cos / divisor (= CLIPModel's own logits_per_image),
    aesthetic = MLP(normalised embedding) loaded from the released head layout."""
    folder, model, tok = tiny_clip
    head = seeded(0, lambda: clip.AestheticHead((32, 16, 8, 8, 4, 1))).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    assert sorted(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    video = smooth(2 * 4, 40, 72).view(2, 4, 3, 40, 72)

    cs = build_reward("clipscore", clip=str(folder))
    aes = build_reward("aesthetic", clip=str(folder), head=str(tmp_path / "head.pth"))
    pick = build_reward("pickscore", model=str(folder), divisor=26.0)
    assert cs.scorer is aes.scorer is pick.scorer  # same weights, device and dtype: one model

    first = video[:, 0]
    enc = tok(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=clip.resize_crop(first, 32)).logits_per_image.diagonal()
    single = video[:, :1]
    torch.testing.assert_close(pick(single, PROMPTS), logits / 26.0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cs(single, PROMPTS), logits / model.logit_scale.exp(), atol=1e-5, rtol=1e-5)

    emb = cs.scorer.image_embeds(video.flatten(0, 1))
    torch.testing.assert_close(aes(video, PROMPTS), head(emb).view(2, 4).mean(1))
    assert aes.extras["frame"].shape == (2, 4)


def test_hpsv2_pools_the_top_30_percent_and_files_are_named(tmp_path, monkeypatch):
    reward = build_reward("hpsv2", tiny=True)
    video = smooth(2 * 10, 32, 48).view(2, 10, 3, 32, 48)
    scores = reward(video, PROMPTS)
    top3 = reward.extras["frame"].topk(3, dim=1).values.mean(1)
    torch.testing.assert_close(scores, top3)
    assert reward.scorer.fit == "pad"
    monkeypatch.setenv("ASTROLABE_REWARD_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt.*xswu/HPSv2"):
        build_reward("hpsv2")
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14.*openai/clip-vit-large-patch14"):
        build_reward("clipscore")
    with pytest.raises(ValueError, match="unknown HPSv2 version"):
        build_reward("hpsv2", version="v3")
