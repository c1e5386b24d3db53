import pytest
import torch

from astrolabe_rl.models.attention import AttentionMask, FrameLayout, attention, block_bounds, frame_mask


def test_block_bounds():
    assert block_bounds(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert block_bounds(7, 3, first_block_frames=1) == [(0, 1), (1, 4), (4, 7)]
    assert block_bounds(6, 3, start_frame=9) == [(9, 12), (12, 15)]
    with pytest.raises(ValueError, match="do not split"):
        block_bounds(8, 3)


def test_block_causal_mask_by_hand():
    layout = FrameLayout.of_blocks(block_bounds(4, 2))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(frame_mask(layout, layout), expected)


def test_teacher_forcing_mask_by_hand():
    bounds = block_bounds(4, 2)
    layout = FrameLayout.of_blocks(bounds) + FrameLayout.of_blocks(bounds, noisy=True)
    m = frame_mask(layout, layout).int()
    # rows/cols: clean 0..3, noisy 0..3
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],  # noisy block 0 sees only itself
            [0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 1],  # noisy block 1 sees clean block 0 and itself
            [1, 1, 0, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_window_and_sink_mask_by_hand():
    layout = FrameLayout.of_blocks(block_bounds(6, 1), sink_frames=1)
    m = frame_mask(layout, layout, window_frames=3, sink_frames=1).int()
    # window 3 with sink 1: a frame sees the sink, the previous frame and itself
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_flex_backend_equals_sdpa_with_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6 * 16, 2, 8, generator=g) for _ in range(3))
    layout = FrameLayout.of_blocks(block_bounds(6, 2), sink_frames=1)
    mask = AttentionMask(frame_mask(layout, layout, window_frames=4, sink_frames=1), tokens_per_frame=16)
    dense = attention(q, k, v, mask, backend="sdpa")
    flex = attention(q, k, v, mask, backend="flex")
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    # and the mask really is applied
    assert (attention(q, k, v, None, backend="sdpa") - dense).abs().max() > 1e-3


def test_unknown_backend():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, None, backend="xformers")


@pytest.mark.parametrize("case", ["teacher_forcing", "window_sink"])
def test_grouped_sdpa_equals_one_call_with_the_dense_mask_values_and_gradients(case):
    """The CPU path runs one unmasked SDPA per group of query frames with the same visible keys; it must equal the
    dense boolean mask it replaces, forward and backward."""
    import torch.nn.functional as F

    if case == "teacher_forcing":
        bounds = block_bounds(6, 2)
        layout = FrameLayout.of_blocks(bounds) + FrameLayout.of_blocks(bounds, noisy=True)
        frames = frame_mask(layout, layout)
    else:
        layout = FrameLayout.of_blocks(block_bounds(6, 1), sink_frames=1)
        frames = frame_mask(layout, layout, window_frames=3, sink_frames=1)
    t = 4
    mask = AttentionMask(frames, tokens_per_frame=t)
    assert 1 < len(mask.groups) < frames.shape[0] or case == "window_sink"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, frames.shape[0] * t, 3, 8, generator=g, requires_grad=True) for _ in range(3))
    weight = torch.randn(2, frames.shape[0] * t, 3, 8, generator=g)
    dense = frames.repeat_interleave(t, 0).repeat_interleave(t, 1)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=dense).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    out = attention(q, k, v, mask, backend="sdpa")
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_query_frame_that_sees_nothing_is_an_error():
    frames = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="sees no key frame"):
        attention(*(torch.randn(1, 4, 1, 8) for _ in range(3)), AttentionMask(frames, 2), backend="sdpa")
