"""umT5 text encoder (tiny random config, offline tokenizer), Wan/diffusers layouts, and the prompt-embedding cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from astrolabe_rl.models.loading import CheckpointError  # noqa: E402
from astrolabe_rl.models.text import (  # noqa: E402
    HashTextEncoder,
    PromptCache,
    clean_prompt,
    hf_to_wan_t5,
    load_umt5,
    tiny_umt5_encoder,
    umt5_cache_id,
    wan_t5_to_hf,
)

WORDS = "a red ball blue cube rolls slowly to the left right over grass".split()
PROMPTS = ["a red ball rolls to the left", "blue cube", "a red ball rolls slowly over the grass to the right now"]


@pytest.fixture(scope="module")
def encoder():
    return tiny_umt5_encoder(WORDS, text_len=8, seed=0)


def test_padding_rows_are_zero_and_prompt_rows_are_not(encoder):
    emb = encoder(PROMPTS)
    assert emb.shape == (3, 8, 16)
    lengths = [7 + 1, 2 + 1, 8]  # words + </s>; the long prompt is truncated to 8 tokens
    for row, n in zip(emb, lengths):
        assert (row[:n].abs().amax(dim=-1) > 0).all()
        assert torch.equal(row[n:], torch.zeros_like(row[n:]))


def test_matches_the_masked_transformers_forward(encoder):
    tokens = encoder.tokenizer(PROMPTS[:2], padding="max_length", max_length=8, return_tensors="pt")
    assert tokens["input_ids"][1].tolist()[:4] == [6, 7, 1, 0]  # blue cube </s> <pad>
    with torch.no_grad():
        hidden = encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    assert hidden[1, 3:].abs().amax() > 0  # the encoder itself leaves padding rows non-zero ...
    expected = hidden * tokens["attention_mask"][..., None]
    torch.testing.assert_close(encoder(PROMPTS[:2]), expected)  # ... which is why we zero them


# Prompts a user may well write, and what Wan's cleaning (ftfy.fix_text, HTML unescape, whitespace) makes of them.
DIRTY = {
    "a cat on a mat": "a cat on a mat",
    "\u201cHello,\u201d she said \u2014 it\u2019s fine": '"Hello," she said \u2014 it\'s fine',  # curly quotes
    "an \ufb01ne \ufb02ower": "an fine flower",  # ligatures
    "\uff28\uff25\uff2c\uff2c\uff2f \uff57\uff4f\uff52\uff4c\uff44": "HELLO world",  # full-width
    "caf\u00c3\u00a9 au lait": "caf\u00e9 au lait",  # mojibake (UTF-8 read as Latin-1)
    "red\x00 ball\x1b here": "red ball here",  # control characters
    "cafe\u0301 cre\u0300me": "caf\u00e9 cr\u00e8me",  # decomposed accents -> composed (NFC)
    "  a &amp;amp;  red\n\tball ": "a & red ball",  # HTML escapes, whitespace
}


def test_prompt_is_cleaned_like_the_official_encoder(encoder):
    import html

    import ftfy

    for dirty, clean in DIRTY.items():
        assert clean_prompt(dirty) == " ".join(html.unescape(html.unescape(ftfy.fix_text(dirty))).split()) == clean
    without_ftfy = [d for d in DIRTY if " ".join(html.unescape(html.unescape(d)).split()) != DIRTY[d]]
    assert len(without_ftfy) == 6  # what the cleaning without ftfy got wrong
    torch.testing.assert_close(encoder(["  a   red\nball "]), encoder(["a red ball"]))
    torch.testing.assert_close(encoder(["\u201ca\u201d red\x00 ball"]), encoder(['"a" red ball']))


def test_non_finite_padding_rows_become_zero(encoder):
    """Padding rows are assigned zero, so whatever the encoder leaves there (here inf and nan) cannot survive."""
    def poison(module, args, kwargs, out):
        pad = kwargs["attention_mask"] == 0
        out.last_hidden_state[pad] = float("nan")
        b, t = pad.nonzero()[0].tolist()
        out.last_hidden_state[b, t] = float("inf")  # one padding row inf, the others nan
        return out

    handle = encoder.model.register_forward_hook(poison, with_kwargs=True)
    try:
        emb = encoder(PROMPTS[:2])
    finally:
        handle.remove()
    assert torch.isfinite(emb).all()
    assert torch.equal(emb[1, 3:], torch.zeros_like(emb[1, 3:]))  # blue cube </s>, then padding
    torch.testing.assert_close(emb[:, :3], encoder(PROMPTS[:2])[:, :3])


def test_wan_key_map_round_trips(encoder):
    hf = encoder.model.state_dict()
    wan = hf_to_wan_t5(hf)
    assert "blocks.1.ffn.gate.0.weight" in wan and "blocks.0.pos_embedding.embedding.weight" in wan
    assert "token_embedding.weight" in wan and "norm.weight" in wan and len(wan) == len(hf) - 1  # tied embedding
    back = wan_t5_to_hf(wan)
    assert sorted(back) == sorted(hf)
    with pytest.raises(CheckpointError, match="not Wan umT5-encoder names: blocks.0.attn.qkv.weight"):
        wan_t5_to_hf({**wan, "blocks.0.attn.qkv.weight": torch.ones(1)})


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_load_from_a_wan_folder(tmp_path, encoder, layout):
    if layout == "original":
        torch.save({k: v.to(torch.bfloat16) for k, v in hf_to_wan_t5(encoder.model.state_dict()).items()},
                   tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
        encoder.tokenizer.save_pretrained(tmp_path / "google" / "umt5-xxl")
    else:
        encoder.model.save_pretrained(tmp_path / "text_encoder")
        encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_umt5(tmp_path, text_len=8)
    assert loaded.model.config.num_layers == 2 and loaded.model.config.num_heads == 4
    atol = 0.05 if layout == "original" else 0.0  # the original file stores bf16 weights
    torch.testing.assert_close(loaded(PROMPTS), encoder(PROMPTS), rtol=0, atol=atol)
    assert loaded.cache_id == umt5_cache_id(tmp_path, torch.float32, 8)


def test_missing_folder_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="models_t5_umt5-xxl-enc-bf16.pth.*google/umt5-xxl.*text_encoder"):
        load_umt5(tmp_path)


def test_partial_t5_checkpoint_is_refused(tmp_path, encoder):
    wan = hf_to_wan_t5(encoder.model.state_dict())
    del wan["blocks.1.attn.o.weight"]
    torch.save(wan, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    encoder.tokenizer.save_pretrained(tmp_path / "google" / "umt5-xxl")
    with pytest.raises(CheckpointError, match=r"missing 1 of \d+ keys: encoder.block.1.layer.0.SelfAttention.o"):
        load_umt5(tmp_path)


class _Counting:
    def __init__(self, encoder) -> None:
        self.encoder, self.seen = encoder, []

    def __call__(self, prompts):
        self.seen += prompts
        return self.encoder(prompts)


def test_prompt_cache_encodes_each_prompt_once(tmp_path, encoder):
    counting = _Counting(encoder)
    cache = PromptCache(tmp_path, encoder.cache_id)
    cache.fill(PROMPTS + PROMPTS[:1], counting, batch_size=2)
    assert counting.seen == PROMPTS and len(list(tmp_path.glob("*.safetensors"))) == 3

    reopened = PromptCache(tmp_path, encoder.cache_id)  # a new run: everything comes from disk
    assert reopened.missing(PROMPTS) == []
    reopened.fill(PROMPTS, counting)
    assert counting.seen == PROMPTS
    torch.testing.assert_close(reopened(PROMPTS), encoder(PROMPTS), rtol=0, atol=0)

    other = PromptCache(tmp_path, HashTextEncoder(16, 8).cache_id)  # another encoder never sees these entries
    assert other.missing(PROMPTS) == PROMPTS
    with pytest.raises(KeyError, match="not cached yet"):
        other(PROMPTS)


def test_prompt_cache_key_covers_the_cleaned_prompt(tmp_path, encoder, monkeypatch):
    """An entry is reused only under the cleaning it was encoded with: when the cleaning of a prompt changes (as
    adding ftfy.fix_text did for curly quotes), its old entry is not found; prompts it leaves alone still are."""
    import html

    from astrolabe_rl.models import text

    curly, plain = "\u201ca\u201d red ball", "a red ball"
    old_rule = lambda t: " ".join(html.unescape(html.unescape(t)).split())  # noqa: E731 - the rule before ftfy
    monkeypatch.setattr(text, "clean_prompt", old_rule)
    old = PromptCache(tmp_path, encoder.cache_id)
    old.put(curly, torch.ones(8, 16))
    old.put(plain, torch.ones(8, 16))
    monkeypatch.undo()
    cache = PromptCache(tmp_path, encoder.cache_id)
    assert cache.missing([curly, plain]) == [curly]
    assert cache.get(plain) is not None
