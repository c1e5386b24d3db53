"""The heart of the suite: streaming (denoise + commit) equals one masked call, and the cache stays pure."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.models import CachePolicy, CausalWan, WanConfig
from astrolabe_rl.models.attention import block_bounds

from conftest import tensor_digest

B, C, H, W = 2, 16, 4, 4


def _inputs(frames: int):
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(B, frames, C, H, W, generator=g)
    xt = torch.randn(B, frames, C, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000  # per-frame timesteps
    text = torch.randn(B, 8, 16, generator=g)
    return x0, xt, t, text


def _stream(model, x0, xt, t, text, fpb, first, policy):
    """Block by block: denoise the noisy block against the cache, then commit its clean version."""
    cache = model.new_cache(B, (H, W), x0.shape[1], policy)
    cache.text = model.encode_text(text)
    outs = []
    for s, e in block_bounds(x0.shape[1], fpb, first):
        outs.append(model.denoise(cache, xt[:, s:e], t[:, s:e]))
        model.commit(cache, x0[:, s:e])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("fpb, first, frames", [(3, None, 9), (1, None, 5), (3, 1, 7), (2, 3, 7)])
def test_streaming_equals_teacher_forcing_masked_call(tiny, fpb, first, frames):
    x0, xt, t, text = _inputs(frames)
    with torch.no_grad():
        masked = tiny(xt, t, text, frames_per_block=fpb, first_block_frames=first, clean=x0)
        streamed = _stream(tiny, x0, xt, t, text, fpb, first, CachePolicy())
    torch.testing.assert_close(streamed, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window, sink, fpb", [(6, 3, 3), (5, 1, 1), (4, 0, 2), (7, 1, 3)])
def test_rolling_cache_with_sink_equals_windowed_mask(tiny, window, sink, fpb):
    frames = 12  # longer than the window: frames are evicted while the sink stays
    x0, xt, t, text = _inputs(frames)
    policy = CachePolicy(window_frames=window, sink_frames=sink)
    with torch.no_grad():
        masked = tiny(xt, t, text, frames_per_block=fpb, clean=x0, policy=policy)
        streamed = _stream(tiny, x0, xt, t, text, fpb, None, policy)
        global_attn = tiny(xt, t, text, frames_per_block=fpb, clean=x0)
    torch.testing.assert_close(streamed, masked, atol=1e-5, rtol=0)
    # the window must matter for late frames, or the test above proves nothing
    assert (masked[:, -fpb:] - global_attn[:, -fpb:]).abs().max() > 1e-3


def test_rolling_cache_memory_is_bounded(tiny):
    cache = tiny.new_cache(B, (H, W), max_frames=10_000, policy=CachePolicy(window_frames=6, sink_frames=3))
    assert cache.k[0].shape[1] == 6 * 4  # window × tokens per frame, whatever the video length


def test_denoise_leaves_cache_bit_identical_even_with_grad_and_checkpointing(tiny):
    x0, xt, t, text = _inputs(6)
    cache = tiny.new_cache(B, (H, W), 6, CachePolicy(window_frames=5, sink_frames=1))
    cache.text = tiny.encode_text(text)
    tiny.commit(cache, x0[:, :3])
    before = tensor_digest(cache.tensors())
    pointers = (list(cache.sink_positions), cache.roll_first, cache.roll_count, cache.next_frame)
    tiny.gradient_checkpointing = True
    x = xt[:, 3:6].clone().requires_grad_(True)
    v = tiny.denoise(cache, x, t[:, 3:6])
    v.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert tensor_digest(cache.tensors()) == before
    assert (list(cache.sink_positions), cache.roll_first, cache.roll_count, cache.next_frame) == pointers


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    x0, xt, t, text = _inputs(6)
    grads = []
    for ckpt in (False, True):
        tiny.zero_grad()
        tiny.gradient_checkpointing = ckpt
        tiny(xt, t, text, frames_per_block=3, clean=x0).square().mean().backward()
        grads.append([p.grad.clone() for p in tiny.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", [CachePolicy(), CachePolicy(window_frames=6, sink_frames=3)])
def test_multi_block_commit_equals_block_by_block(tiny, policy):
    x0, _, _, text = _inputs(12)
    caches = []
    for one_call in (True, False):
        cache = tiny.new_cache(B, (H, W), 12, policy)
        cache.text = tiny.encode_text(text)
        if one_call:
            tiny.commit(cache, x0, frames_per_block=3)
        else:
            for s in range(0, 12, 3):
                tiny.commit(cache, x0[:, s : s + 3])
        caches.append(cache)
    a, b = caches
    assert (a.sink_positions, a.roll_first, a.roll_count, a.next_frame) == (
        b.sink_positions, b.roll_first, b.roll_count, b.next_frame
    )
    n = a.committed_frames * a.tokens_per_frame
    for ka, kb in zip(a.k + a.v, b.k + b.v):
        torch.testing.assert_close(ka[:, :n], kb[:, :n], atol=1e-5, rtol=0)


def test_block_causal_layout_hides_the_future(tiny):
    _, xt, t, text = _inputs(9)
    with torch.no_grad():
        out = tiny(xt, t, text, frames_per_block=3)
        changed = xt.clone()
        changed[:, 6:] += 1.0  # perturb the last block only
        out2 = tiny(changed, t, text, frames_per_block=3)
    torch.testing.assert_close(out[:, :6], out2[:, :6], atol=0, rtol=0)
    assert (out[:, 6:] - out2[:, 6:]).abs().max() > 1e-3


def test_per_frame_timesteps_modulate_per_frame(tiny):
    _, xt, t, text = _inputs(3)
    with torch.no_grad():
        a = tiny(xt, t, text, frames_per_block=3)
        t2 = t.clone()
        t2[:, 2] = 999.0
        b = tiny(xt, t2, text, frames_per_block=3)
    # a frame's own timestep changes it; bidirectional attention inside the block passes it on to the others
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3
    assert (a[:, 0] - b[:, 0]).abs().max() > 0


def test_scalar_and_per_batch_timesteps_broadcast(tiny):
    _, xt, _, text = _inputs(3)
    with torch.no_grad():
        a = tiny(xt, 500.0, text, frames_per_block=3)
        b = tiny(xt, torch.full((B,), 500.0), text, frames_per_block=3)
        c = tiny(xt, torch.full((B, 3), 500.0), text, frames_per_block=3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_rope_uses_absolute_frame_positions(tiny):
    # RoPE is relative within a call, so the offset shows only against cached keys at their own positions.
    x0, xt, t, text = _inputs(3)
    cache = tiny.new_cache(B, (H, W), 20)
    cache.text = tiny.encode_text(text)
    tiny.commit(cache, x0)
    with torch.no_grad():
        near = tiny.denoise(cache, xt, t, start_frame=3)
        far = tiny.denoise(cache, xt, t, start_frame=12)
    assert (near - far).abs().max() > 1e-4


def test_unpatchify_inverts_patchify_layout(tiny):
    # _patchify and _unpatchify must agree on the (p_h, p_w, C) order the official head uses
    x = torch.randn(B, 3, C, H, W)
    _, ph, pw = tiny.config.patch_size
    tokens = x.reshape(B, 3, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 4, 6, 2).reshape(B, 12, -1)
    torch.testing.assert_close(tiny._unpatchify(tokens, 3, H, W), x, atol=0, rtol=0)


def test_errors_teach(tiny):
    _, xt, t, text = _inputs(9)
    with pytest.raises(ValueError, match="do not split into blocks"):
        tiny(xt[:, :8], t[:, :8], text, frames_per_block=3)
    with pytest.raises(ValueError, match="text_dim"):
        tiny(xt, t, torch.randn(B, 8, 5), frames_per_block=3)
    with pytest.raises(ValueError, match="must match"):
        tiny(xt, t, text, frames_per_block=3, clean=xt[:, :3])
    cache = tiny.new_cache(B, (H, W), 3)
    with pytest.raises(ValueError, match="no prompt"):
        tiny.denoise(cache, xt[:, :3], t[:, :3])
    cache.text = tiny.encode_text(text)
    tiny.commit(cache, xt[:, :3])
    with pytest.raises(ValueError, match="global KV cache holds 3 frames"):
        tiny.commit(cache, xt[:, 3:6])
    with pytest.raises(ValueError, match="RoPE range"):
        tiny.denoise(cache, xt[:, :3], t[:, :3], start_frame=1023)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        WanConfig.tiny(num_heads=5)
    with pytest.raises(ValueError, match="must exceed sink_frames"):
        CachePolicy(window_frames=3, sink_frames=3)
    with pytest.raises(ValueError, match="needs a window"):
        CachePolicy(sink_frames=3)


def test_commit_out_of_order_is_refused(tiny):
    _, xt, _, text = _inputs(9)
    cache = tiny.new_cache(B, (H, W), 9)
    cache.text = tiny.encode_text(text)
    tiny.commit(cache, xt[:, :3])
    with pytest.raises(ValueError, match="must start at frame 3"):
        tiny.commit(cache, xt[:, 3:6], start_frame=6)


def test_real_geometry_is_derived_from_config():
    cfg = WanConfig.wan_1_3b()
    assert (cfg.head_dim, cfg.tokens_per_frame(60, 104)) == (128, 1560)
    with torch.device("meta"):
        model = CausalWan(cfg)
        n = sum(p.numel() for p in model.parameters())
        big = CausalWan(WanConfig.wan_14b())
    assert 1.40e9 < n < 1.45e9  # ≈ 1.42 B (reference/ar_models.md §1.2)
    assert len(big.blocks) == 40 and big.blocks[0].self_attn.q.weight.shape == (5120, 5120)


def test_state_dict_has_original_wan_names(tiny):
    keys = set(tiny.state_dict())
    for k in (
        "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
        "time_projection.1.weight", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight",
        "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.1.cross_attn.o.bias", "blocks.1.ffn.0.weight",
        "blocks.1.ffn.2.weight", "blocks.1.modulation", "head.head.weight", "head.modulation",
    ):
        assert k in keys, k
    assert not any("norm1" in k or "norm2" in k or "head.norm" in k or "freqs" in k for k in keys)
    assert tiny.state_dict()["patch_embedding.weight"].shape == (24, 16, 1, 2, 2)
