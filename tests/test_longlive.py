"""LongLive parity on the tiny model: the re-cache mask, the sink on an early switch, short text contexts.

The LongLive preset's own sampler (12-frame window, 3-frame sink, 3-frame blocks) runs the tiny DiT on 4×4
latents; each test rebuilds the cache a switch should leave behind by explicit `commit` calls and compares it with
the one the rollout's next block actually reads.
"""

from dataclasses import replace

import pytest
import torch

from astrolabe_rl.models import get_family
from astrolabe_rl.models.families import SamplerConfig
from astrolabe_rl.rollout import PromptSwitch, rollout

HW = (4, 4)
LONGLIVE = get_family("longlive").sampler
W, S = LONGLIVE.cache.window_frames, LONGLIVE.cache.sink_frames


def _text(seed):
    return torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed))


OLD, NEW = _text(1), _text(2)


def _switched(model, monkeypatch, sampler, at, frames=None):
    """Roll out with a switch at latent frame ``at``; returns the clean latents and, per layer, the K and V that the
    first block after the switch reads from the cache."""
    seen = {}
    denoise = model.denoise

    def spy(cache, x, t, start_frame=None, **kw):
        if start_frame == at and not seen:
            ctx = [cache.context(layer, x.shape[1]) for layer in range(len(model.blocks))]
            seen["kv"] = [(torch.cat(k, 1).clone(), torch.cat(v, 1).clone()) for k, v in ctx]
        return denoise(cache, x, t, start_frame=start_frame, **kw)

    monkeypatch.setattr(model, "denoise", spy)
    r = rollout(model, OLD, num_frames=frames or at + 3, latent_hw=HW, sampler=sampler, seeds=[0],
                switches=[PromptSwitch(at, NEW)])
    monkeypatch.setattr(model, "denoise", denoise)
    return r.latents, seen["kv"]


def _committed(model, clean, at):
    """A cache that committed ``clean[:, :at]`` block by block under the old prompt (what precedes a switch)."""
    cache = model.new_cache(1, HW, at + 3, LONGLIVE.cache)
    cache.text = model.encode_text(OLD)
    for s in range(0, at, LONGLIVE.frames_per_block):
        model.commit(cache, clean[:, s : s + LONGLIVE.frames_per_block], start_frame=s)
    return cache


def _reads(model, cache, n=3):
    return [tuple(torch.cat(p, 1) for p in cache.context(layer, n)) for layer in range(len(model.blocks))]


def _assert_kv(a, b, atol=1e-6):
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        torch.testing.assert_close(ka, kb, atol=atol, rtol=0)
        torch.testing.assert_close(va, vb, atol=atol, rtol=0)


def _max_diff(a, b):
    return max((x - y).abs().max().item() for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_longlive_defaults_to_the_bidirectional_recache_the_others_to_block_causal():
    assert LONGLIVE.recache_mask == "bidirectional"
    assert get_family("self_forcing").sampler.recache_mask == "block_causal"
    assert LONGLIVE.with_recache_mask("auto") is LONGLIVE
    assert LONGLIVE.with_recache_mask("block_causal").recache_mask == "block_causal"
    with pytest.raises(ValueError, match="choose one of block_causal, bidirectional"):
        replace(LONGLIVE, recache_mask="causal")
    with pytest.raises(ValueError, match="recache_mask"):
        SamplerConfig(LONGLIVE.steps, recache_mask="none")


def test_bidirectional_recache_equals_an_unmasked_commit_of_the_window(tiny, monkeypatch):
    """A late switch (the window has rolled): the sink keeps its old-prompt K/V and the last W - S frames are
    re-encoded under the new prompt in one unmasked pass that also sees the sink."""
    at = 18
    clean, seen = _switched(tiny, monkeypatch, LONGLIVE, at)
    ref = _committed(tiny, clean, at)
    ref.reset(keep_sink=True)
    ref.text = tiny.encode_text(NEW)
    tiny.commit(ref, clean[:, at - (W - S) : at], start_frame=at - (W - S))  # one call, no block mask
    _assert_kv(seen, _reads(tiny, ref))

    # block_causal commits the same frames block by block instead, and that is measurably different
    _, seen_bc = _switched(tiny, monkeypatch, LONGLIVE.with_recache_mask("block_causal"), at)
    ref_bc = _committed(tiny, clean, at)
    ref_bc.reset(keep_sink=True)
    ref_bc.text = tiny.encode_text(NEW)
    for s in range(at - (W - S), at, 3):
        tiny.commit(ref_bc, clean[:, s : s + 3], start_frame=s)
    _assert_kv(seen_bc, _reads(tiny, ref_bc))
    assert _max_diff(seen, seen_bc) > 1e-3


@pytest.mark.parametrize("at", [6, W])
def test_an_early_switch_reencodes_the_sink_under_the_new_prompt(tiny, monkeypatch, at):
    """A switch at frame <= W: LongLive's re-cache pass starts at frame 0, which is not a 'recompute', so every
    committed frame, the sink included, is re-encoded under the new prompt (in one unmasked pass)."""
    clean, seen = _switched(tiny, monkeypatch, LONGLIVE, at)
    ref = tiny.new_cache(1, HW, at + 3, LONGLIVE.cache)
    ref.text = tiny.encode_text(NEW)
    tiny.commit(ref, clean[:, :at], start_frame=0)
    _assert_kv(seen, _reads(tiny, ref))
    # layer 0's K/V come before any attention; the last layer's sink shows the new prompt
    old_sink = _reads(tiny, _committed(tiny, clean, at))[-1][0][:, : S * 4]
    assert (seen[-1][0][:, : S * 4] - old_sink).abs().max() > 1e-3


def test_a_late_switch_keeps_the_first_prompts_sink(tiny, monkeypatch):
    at = W + 3
    clean, seen = _switched(tiny, monkeypatch, LONGLIVE, at)
    old = _reads(tiny, _committed(tiny, clean, at))
    tokens = S * 4  # 2×2 patches of a 4×4 latent: 4 tokens per frame
    for (k, v), (k_old, v_old) in zip(seen, old):
        assert torch.equal(k[:, :tokens], k_old[:, :tokens]) and torch.equal(v[:, :tokens], v_old[:, :tokens])


def test_a_short_text_context_equals_its_zero_padded_form(tiny):
    short = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([short, torch.zeros(2, tiny.config.text_len - 5, 16)], dim=1)
    for (k, v), (kp, vp) in zip(tiny.encode_text(short), tiny.encode_text(padded), strict=True):
        assert k.shape[1] == tiny.config.text_len
        assert torch.equal(k, kp) and torch.equal(v, vp)
    # the padded rows matter: dropping them (attending to the 5 tokens only) changes the output
    x = torch.randn(2, 3, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny(x, 500.0, short, frames_per_block=3)
        kv = [(blk.cross_attn.text_kv(tiny.text_embedding(short))) for blk in tiny.blocks]
        unpadded = tiny(x, 500.0, kv, frames_per_block=3)
    assert (full - unpadded).abs().max() > 1e-4


def test_a_text_context_longer_than_text_len_is_rejected(tiny):
    with pytest.raises(ValueError, match="more than the model's text_len=8; truncate"):
        tiny.encode_text(torch.randn(1, 9, 16))


def test_generate_recache_mask_flag(tmp_path):
    """``astrolabe generate --recache-mask``: auto keeps the family's mask (tiny: block_causal); the other mask
    changes only the frames after the scene switch."""
    from safetensors.torch import load_file

    from astrolabe_rl.cli import build_parser
    from astrolabe_rl.generate import generate, options_from_args

    def latents(*flags):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        args = build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "a red ball [1.5s] | a blue cube",
                                          "--latent-frames", "9", "--latents-out", str(out), "--quiet", *flags])
        generate(options_from_args(args))
        return load_file(out)["latents"]

    auto, causal, bidir = latents(), latents("--recache-mask", "block_causal"), latents("--recache-mask",
                                                                                        "bidirectional")
    assert torch.equal(auto, causal)
    switch = 6  # 1.5 s at 16 fps: pixel frame 24, latent frame 6 (two blocks re-encoded)
    assert torch.equal(bidir[:, :switch], auto[:, :switch])
    assert (bidir[:, switch:] - auto[:, switch:]).abs().max() > 1e-4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--recache-mask", "causal"])
