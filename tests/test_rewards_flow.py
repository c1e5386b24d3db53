"""Optical-flow motion reward: flow ≈ the true shift on translating frames, a static video is never the maximiser,
shaking scores below steady motion, and RAFT is either usable or refused with a clear message."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrolabe_rl.rewards import build_reward, flow


def texture(h: int = 112, w: int = 160, seed: int = 0) -> torch.Tensor:
    """A smooth random texture [3, h, w] (upsampled noise), large enough to shift and crop."""
    low = torch.rand(1, 3, h // 6, w // 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]


def translating(steps: list[tuple[int, int]], crop: int = 16) -> torch.Tensor:
    """Frames [T, 3, H, W]: the texture shifted by the running sum of ``steps`` (dx, dy) pixels, then cropped so
    no wrapped border is visible."""
    base, frames, x, y = texture(), [], 0, 0
    for dx, dy in steps:
        x, y = x + dx, y + dy
        frames.append(torch.roll(base, shifts=(y, x), dims=(1, 2))[:, crop:-crop, crop:-crop])
    return torch.stack(frames)


@pytest.mark.parametrize("shift", [(3, 0), (0, -2), (4, 3), (1, 1)])
def test_lucas_kanade_recovers_the_true_shift(shift):
    frames = translating([(0, 0), shift])
    est = flow.lucas_kanade(frames[:1], frames[1:])[0, :, 12:-12, 12:-12]  # away from the borders
    dx, dy = est[0].median().item(), est[1].median().item()
    assert dx == pytest.approx(shift[0], abs=0.05) and dy == pytest.approx(shift[1], abs=0.05)
    assert (est[0] - shift[0]).abs().mean() < 0.05 and (est[1] - shift[1]).abs().mean() < 0.05


def test_static_video_is_not_the_maximiser():
    t = 9
    static = translating([(0, 0)] * t)
    steady = translating([(0, 0)] + [(2, 0)] * (t - 1))
    shaky = translating([(0, 0)] + [(2 * (-1) ** i, 0) for i in range(t - 1)])
    videos = torch.stack([static, steady, shaky])
    blend = build_reward("flow", backend="lk", size=80, frames=t)
    scores = blend(videos)
    terms = blend.extras
    assert terms["magnitude"][0] < 1e-3 and terms["smoothness"][0] < 1e-3 and scores[0] < 1e-3
    assert scores[1] > 0.5 and scores[1] > scores[2] > scores[0]
    assert terms["jitter"][1] < 0.1 and terms["jitter"][2] > 1.5  # reversing motion ≈ 2
    assert terms["magnitude"][2] > 0.5  # shaking moves pixels; only smoothness tells it apart
    assert terms["pixels_per_pair"][1] == pytest.approx(2.0 * 80 / 80, rel=0.25)  # 2 px per pair at 80 px short side
    for name in ("flow_magnitude", "flow_smoothness"):
        single = build_reward(name, backend="lk", size=80, frames=t)(videos)
        assert single[0] < 1e-3 and single.argmax() != 0


def test_terms_on_hand_made_flows():
    """2 px/pair steady translation on a 30×40 frame (diagonal 50): m = 0.04, jitter 0."""
    steady = torch.zeros(1, 4, 2, 30, 40)
    steady[:, :, 0] = 2.0
    terms = flow.motion_terms(steady, m0=0.04, k=2.0)
    assert terms["magnitude"].item() == pytest.approx(1 - torch.exp(torch.tensor(-1.0)).item())
    assert terms["jitter"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["smoothness"].item() == pytest.approx(terms["magnitude"].item())
    reversing = steady.clone()
    reversing[:, 1::2, 0] = -2.0
    assert flow.motion_terms(reversing)["jitter"].item() == pytest.approx(2.0, rel=1e-3)


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a mismatched wheel raises RuntimeError/OSError
        return False
    return True


@pytest.mark.skipif(_torchvision_works(), reason="torchvision works here; the RAFT path is tested instead")
def test_raft_without_torchvision_says_what_to_do():
    with pytest.raises(ImportError, match="working torchvision.*backend='lk'"):
        flow.RaftFlow(random_weights=True)


@pytest.mark.skipif(not _torchvision_works(), reason="needs a working torchvision")
def test_raft_random_weights_shapes_and_input_range(tmp_path):
    est = flow.RaftFlow(small=True, iters=2, random_weights=True)
    a, b = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    seen = []
    est.model.register_forward_pre_hook(lambda m, args: seen.append((args[0].min().item(), args[0].max().item())))
    out = est(a, b)
    assert out.shape == (2, 2, 64, 96)
    assert seen[0][0] >= -1.0 and seen[0][1] <= 1.0 and seen[0][0] < -0.5  # [0, 1] frames scaled to [-1, 1]
    torch.save(est.model.state_dict(), tmp_path / "raft.pth")
    loaded = flow.RaftFlow(str(tmp_path / "raft.pth"), small=True, iters=2)
    torch.testing.assert_close(loaded(a, b), out)
    with pytest.raises(FileNotFoundError, match="RAFT weights"):
        flow.RaftFlow(str(tmp_path / "missing.pth"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown flow backend"):
        build_reward("flow", backend="farneback")
