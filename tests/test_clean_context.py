"""`train.context=clean`: the teacher-forcing history is clean and detached, so the masked clean-context call has the
θ gradient of commit (no grad) + denoise over the same blocks (issue 14, item 6)."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.models import CachePolicy, CausalWan, WanConfig
from astrolabe_rl.models.attention import block_bounds

B, C, H, W = 2, 16, 4, 4


def _model() -> CausalWan:
    torch.manual_seed(0)
    model = CausalWan(WanConfig.tiny())
    with torch.no_grad():  # Wan's zero-initialised head would give zero gradients upstream
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().train()  # float64: the comparison tests the maths, not float32 summation order


def _inputs(frames: int):
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(B, frames, C, H, W, generator=g, dtype=torch.float64)
    noisy = torch.randn(B, frames, C, H, W, generator=g, dtype=torch.float64)
    t = torch.rand(B, frames, generator=g) * 1000
    text = torch.randn(B, 8, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(B, frames, C, H, W, generator=g, dtype=torch.float64)  # a random linear loss: every output element counts
    return clean, noisy, t, text, weight


def _grads(model: CausalWan) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fpb, first, frames, policy", [(3, None, 9, CachePolicy()), (1, None, 4, CachePolicy()),
                                                        (2, 1, 7, CachePolicy(window_frames=5, sink_frames=1))])
def test_clean_context_gradient_equals_commit_plus_denoise(fpb, first, frames, policy):
    model = _model()
    clean, noisy, t, text, weight = _inputs(frames)
    history = clean.clone().requires_grad_(True)
    masked = model(noisy, t, text, frames_per_block=fpb, first_block_frames=first, clean=history, policy=policy)
    (masked * weight).sum().backward()
    g_masked = _grads(model)
    assert history.grad is None  # the clean part carries no gradient

    model.zero_grad(set_to_none=True)
    cache = model.new_cache(B, (H, W), frames, policy)
    cache.text = model.encode_text(text)
    outs = []
    for s, e in block_bounds(frames, fpb, first):
        outs.append(model.denoise(cache, noisy[:, s:e], t[:, s:e], start_frame=s))
        model.commit(cache, clean[:, s:e], start_frame=s)  # no grad: what the cache path does
    streamed = torch.cat(outs, dim=1)
    (streamed * weight).sum().backward()
    g_stream = _grads(model)

    torch.testing.assert_close(masked.detach(), streamed.detach(), atol=1e-5, rtol=0)
    assert g_masked.keys() == g_stream.keys() and len(g_masked) > 10
    for name in g_masked:
        torch.testing.assert_close(g_masked[name], g_stream[name], atol=1e-5, rtol=0, msg=name)


def test_the_history_gets_no_gradient_but_the_noisy_stream_does():
    model = _model()
    clean, noisy, t, text, weight = _inputs(9)
    noisy = noisy.clone().requires_grad_(True)
    history = clean.clone().requires_grad_(True)
    (model(noisy, t, text, frames_per_block=3, clean=history) * weight).sum().backward()
    assert history.grad is None
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    # the history still shapes the output: other clean frames give another velocity for blocks after the first
    with torch.no_grad():
        a = model(noisy, t, text, frames_per_block=3, clean=clean)
        b = model(noisy, t, text, frames_per_block=3, clean=clean + 1.0)
    assert torch.equal(a[:, :3], b[:, :3]) and (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
