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
    grey = (torch.full((3,), 0.5) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)  # not 8-bit
    h = round(480 * 224 / 832)  # 129 rows of content, centred
    top = (224 - h) // 2
    torch.testing.assert_close(out[0, :, top + h // 2, 112], grey)
    torch.testing.assert_close(out[0, :, top - 1, 112], black)
    torch.testing.assert_close(out[0, :, top + h, 112], black)


def test_resize_pad_is_one_float_pass():
    """HPSv2's official transform resizes the float tensor once: no 8-bit quantisation, rounding or clipping."""
    blocks = (torch.rand(2, 3, 9, 15, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    frames = F.interpolate(blocks, scale_factor=10, mode="nearest")  # hard edges: bicubic overshoots them
    ours = clip.resize_pad(frames, 64)
    inner = F.interpolate(frames, size=(38, 64), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ours[:, :, 13:51], (inner - mean) / std, atol=1e-5, rtol=0)
    assert inner.max() > 1.0 or inner.min() < 0.0  # the bicubic overshoot an 8-bit path would clip is kept


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
    assert (scorer.fit, scorer.text) == ("pad", "open_clip")
    reference = clip.ClipScorer(model, tok, "pad", "open_clip")
    frames = smooth(3, 48, 80)
    torch.testing.assert_close(scorer.image_embeds(frames), reference.image_embeds(frames))
    torch.testing.assert_close(scorer.text_embeds(PROMPTS), reference.text_embeds(PROMPTS))
    bad = dict(sd)
    bad["visual.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unrecognised open_clip tensor 'visual.extra'"):
        clip.load_open_clip_checkpoint(tmp_path / "bad.pt", model.config, folder, torch.device("cpu"), torch.float32)


def test_hf_layout_scores_follow_each_rule(tiny_clip, tmp_path):
    """clip_cosine = cos, clipscore = 2.5·max(cos with "A photo depicts " + prompt, 0), pickscore =
    exp(logit_scale)·cos / divisor (= CLIPModel's own logits_per_image), aesthetic = MLP(normalised embedding)
    loaded from the released head layout."""
    folder, model, tok = tiny_clip
    head = seeded(0, lambda: clip.AestheticHead((32, 16, 8, 8, 4, 1))).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    assert sorted(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    video = smooth(2 * 4, 40, 72).view(2, 4, 3, 40, 72)

    cos_reward = build_reward("clip_cosine", clip=str(folder))
    cs = build_reward("clipscore", clip=str(folder))
    aes = build_reward("aesthetic", clip=str(folder), head=str(tmp_path / "head.pth"))
    pick = build_reward("pickscore", model=str(folder), divisor=26.0)
    assert cs.scorer is aes.scorer is pick.scorer is cos_reward.scorer  # same weights, device and dtype: one model

    first = video[:, 0]

    def logits(prompts):
        enc = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
        with torch.no_grad():
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         pixel_values=clip.resize_crop(first, 32)).logits_per_image.diagonal()

    single = video[:, :1]
    torch.testing.assert_close(pick(single, PROMPTS), logits(PROMPTS) / 26.0, atol=1e-5, rtol=1e-5)
    scale = model.logit_scale.exp()
    torch.testing.assert_close(cos_reward(single, PROMPTS), logits(PROMPTS) / scale, atol=1e-5, rtol=1e-5)
    prefixed = logits(["A photo depicts " + p for p in PROMPTS]) / scale
    torch.testing.assert_close(cs(single, PROMPTS), 2.5 * prefixed.clamp(min=0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(prefixed, logits(PROMPTS) / scale)  # the prefix reaches the text tower

    emb = cs.scorer.image_embeds(video.flatten(0, 1))
    torch.testing.assert_close(aes(video, PROMPTS), head(emb).view(2, 4).mean(1))
    assert aes.extras["frame"].shape == (2, 4)


def test_hpsv2_pools_the_top_30_percent_and_files_are_named(tmp_path, monkeypatch):
    reward = build_reward("hpsv2", tiny=True)
    video = smooth(2 * 10, 32, 48).view(2, 10, 3, 32, 48)
    scores = reward(video, PROMPTS)
    top3 = reward.extras["frame"].topk(3, dim=1).values.mean(1)
    torch.testing.assert_close(scores, top3)
    assert (reward.scorer.fit, reward.scorer.text) == ("pad", "open_clip")
    monkeypatch.setenv("ASTROLABE_REWARD_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt.*xswu/HPSv2"):
        build_reward("hpsv2")
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14.*openai/clip-vit-large-patch14"):
        build_reward("clipscore")
    with pytest.raises(ValueError, match="unknown HPSv2 version"):
        build_reward("hpsv2", version="v3")


def test_clipscore_is_the_published_definition_on_hand_made_embeddings():
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [-1.0, 1.0]])
    # cosines 0.6, -1 (clamped), 1, 0  ->  2.5 · max(cos, 0)
    expected = torch.tensor([1.5, 0.0, 2.5, 0.0])
    torch.testing.assert_close(clip.clipscore(image, text), expected)
    pairs = clip.clipscore(image[:, None], text[None])  # [4, 4] by broadcasting
    torch.testing.assert_close(pairs.diagonal(), expected)
    assert pairs[0, 2].item() == pytest.approx(2.5 * 0.8)  # (3, 4) vs (0, 5)


# ----------------------------------------------------------------------------- HPSv2 tokenisation ("!")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's BPE works on (GPT-2's table): printable Latin-1 bytes map
    to themselves, the others to code points from 256 up; "!" (0x21) comes first."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_laion_folder(folder, merges: list[str]) -> list[str]:
    """A CLIP BPE vocabulary (bytes, bytes + "</w>", one token per merge, start and end) saved the way the laion
    ViT-H-14 folder has it: a Hugging Face tokenizer whose pad token is "!". Returns the vocabulary."""
    import json

    from transformers import CLIPTokenizerFast

    symbols = byte_symbols()
    vocab = [*symbols, *(c + "</w>" for c in symbols), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    raw = folder / "raw"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizerFast.from_pretrained(str(raw), pad_token="!").save_pretrained(str(folder))
    return vocab


def test_hpsv2_keeps_exclamation_marks_as_tokens(tmp_path):
    """Pinned on a hand-made CLIP vocabulary: "!" is the first byte symbol, so "!</w>" has id 256 (as in the real
    vocabulary), "!!</w>" is a merge; open_clip zero-fills after <|endoftext|>. The laion folder's own tokenizer
    turns each "!" into its pad token (id 0) instead."""
    vocab = write_laion_folder(tmp_path, ["c a", "ca t</w>", "! !</w>"])
    ids = {t: i for i, t in enumerate(vocab)}
    assert (ids["!</w>"], ids["a</w>"], ids["!!</w>"]) == (256, 320, 514)
    tok = clip.open_clip_tokenizer(tmp_path)
    got, mask = clip.open_clip_ids(tok, ["a cat!", "cat!!"], 8)
    sot, eot = ids["<|startoftext|>"], ids["<|endoftext|>"]
    assert got.tolist() == [[sot, 320, ids["cat</w>"], 256, eot, 0, 0, 0], [sot, ids["cat</w>"], 514, eot, 0, 0, 0, 0]]
    assert mask.tolist() == [[1] * 5 + [0] * 3, [1] * 4 + [0] * 4]
    laion = clip._clip_tokenizer(tmp_path)
    assert laion(["a cat!"])["input_ids"][0][3] == 0  # what the folder's tokenizer does with "!"


def _open_clip_tokenizer_module():
    """open_clip's tokenizer module, loaded from the installed distribution without importing the package (its
    ``__init__`` needs torchvision, which may not exist for this torch)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip (pip install open-clip-torch) is not installed; test_hpsv2_keeps_exclamation_marks_"
                    "as_tokens still pins the '!' ids")
    pytest.importorskip("regex", reason="open_clip's tokenizer needs the regex package")
    path = Path(spec.submodule_search_locations[0])
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path / "tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, path / "bpe_simple_vocab_16e6.txt.gz"


def test_hpsv2_token_ids_equal_open_clips(tmp_path):
    """The real CLIP vocabulary (open_clip's wheel ships it) in a laion-style folder: our HPSv2 ids equal
    open_clip's own tokenizer's, "!" and text that needs ftfy / HTML cleaning included."""
    import gzip

    module, bpe = _open_clip_tokenizer_module()
    merges = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    write_laion_folder(tmp_path, merges)
    prompts = ["a cat!! jumping, hello! \u201cquoted\u201d \ufb01ne", "Wow!",
               "\uff21\uff22\uff23  caf\u00c3\u00a9  &amp;amp; x", "e\u0301t\u00e9 don't \tstop!?",
               "a dog " * 40 + "!"]  # truncated: the end token is kept
    ours, _ = clip.open_clip_ids(clip.open_clip_tokenizer(tmp_path), prompts, 77)
    reference = module.SimpleTokenizer()(prompts, context_length=77)
    assert ours.tolist() == reference.tolist()
    assert reference[1, :4].tolist() == [49406, 2781, 256, 49407]  # "wow", "!" as a token
