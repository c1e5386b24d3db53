"""Pixel rewards on hand-made videos, the reward registry, score_all's failure isolation, and the combiner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrolabe_rl.rewards import (
    FunctionReward,
    Reward,
    available_rewards,
    build_reward,
    combine_rewards,
    score_all,
)
from astrolabe_rl.rewards.pixel import (
    brightness,
    colour_entropy,
    motion_energy,
    saturation,
    sharpness,
    temporal_flicker,
)

PIXEL = ["brightness", "saturation", "sharpness", "colour_entropy", "temporal_flicker", "motion_energy"]


def solid(rgb: tuple[float, float, float], t: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """One video [1, T, 3, H, W] of a single colour."""
    return torch.tensor(rgb).view(1, 1, 3, 1, 1).expand(1, t, 3, h, w).clone()


def checkerboard(t: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    """Grey one-pixel 0/1 checkerboard video [1, T, 3, H, W]."""
    ij = torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)
    frame = (ij % 2).float()
    return frame.view(1, 1, 1, h, w).expand(1, t, 3, h, w).clone()


def moving_square(t: int = 4, size: int = 8, side: int = 2, step: int = 2) -> torch.Tensor:
    """White side×side square on black, moving `step` px right per frame (no overlap between frames)."""
    v = torch.zeros(1, t, 3, size, size)
    for k in range(t):
        v[0, k, :, 3 : 3 + side, k * step : k * step + side] = 1.0
    return v


# ------------------------------------------------------------------------------------------------ pixel rewards


def test_brightness():
    videos = torch.cat([solid((0.2, 0.2, 0.2)), solid((0.8, 0.8, 0.8)), solid((0.0, 1.0, 0.0))])
    # grey g -> luma g; pure green -> its BT.601 weight 0.587
    torch.testing.assert_close(brightness(videos), torch.tensor([0.2, 0.8, 0.587]))


def test_saturation():
    videos = torch.cat([solid((0.5, 0.5, 0.5)), solid((1.0, 0.0, 0.0)), solid((1.0, 0.5, 0.5)), solid((0, 0, 0))])
    # grey 0, pure red 1, (1 − .5)/1 = .5, black 0 (not 0/0)
    torch.testing.assert_close(saturation(videos), torch.tensor([0.0, 1.0, 0.5, 0.0]))


def test_sharpness_checkerboard_vs_blurred():
    sharp = checkerboard()
    # Laplacian of a 0/1 checkerboard is ±4 everywhere, mean 0 -> variance 16; a constant frame -> 0
    assert sharpness(sharp).item() == pytest.approx(16.0, rel=1e-5)
    assert sharpness(solid((0.3, 0.3, 0.3))).item() == pytest.approx(0.0, abs=1e-10)
    # 3×3 box blur (reflect padding keeps the size): far less sharp
    b, t, c, h, w = sharp.shape
    frames = F.pad(sharp.view(b * t * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    blurred = F.avg_pool2d(frames, 3, stride=1).view(b, t, c, h, w)
    assert sharpness(blurred).item() < 16.0 / 4


def test_colour_entropy():
    one = solid((0.3, 0.6, 0.9))
    half = torch.zeros(1, 2, 3, 4, 4)
    half[..., :, 2:] = 1.0  # half the pixels black, half white: 1 bit of 3·log2(bins) bits
    assert colour_entropy(one).item() == pytest.approx(0.0, abs=1e-6)
    assert colour_entropy(half).item() == pytest.approx(1 / 9)
    assert colour_entropy(half, bins=2).item() == pytest.approx(1 / 3)
    noise = torch.rand(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert colour_entropy(noise).item() > 0.8  # 1024 pixels over 512 colours: close to uniform


def test_temporal_flicker_vs_steady_and_motion():
    steady = solid((0.5, 0.5, 0.5), t=4)
    flicker = steady.clone()
    flicker[:, 0::2] = 0.2
    flicker[:, 1::2] = 0.8
    # |Δ mean luma| = .6 between every pair of frames
    out = temporal_flicker(torch.cat([steady, flicker, moving_square()]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.6, 0.0]), atol=1e-6, rtol=0)
    assert temporal_flicker(solid((1, 1, 1), t=1)).item() == 0.0


def test_motion_energy_static_vs_moving_vs_flicker():
    moving = moving_square()
    static = moving[:, :1].expand_as(moving).clone()
    flicker = solid((0.2, 0.2, 0.2), t=4)
    flicker[:, 1::2] = 0.9
    # moving: 4 px leave and 4 px arrive per frame pair, |Δ| = 1 on 8 of 64 px -> 0.125 (frame means are equal)
    out = motion_energy(torch.cat([static, moving, flicker]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.125, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", PIXEL)
def test_registered_pixel_rewards_follow_the_protocol(name):
    reward = build_reward(name)
    assert isinstance(reward, Reward) and reward.name == name and reward.needs == frozenset({"video"})
    videos = torch.rand(3, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = reward(videos, ["a", "b", "c"])
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    lo, hi = reward.scale
    assert ((out >= lo) & (out <= hi)).all()
    # bf16 input is accepted and agrees with fp32
    torch.testing.assert_close(reward(videos.bfloat16(), ["a", "b", "c"]), out, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="uint8|float"):
        reward((videos * 255).to(torch.uint8), ["a", "b", "c"])


def test_monitor_flags():
    monitors = {n for n in PIXEL if build_reward(n).monitor}
    assert monitors == {"brightness", "saturation", "colour_entropy", "temporal_flicker"}
    assert build_reward("sharpness", monitor=True).monitor


# ------------------------------------------------------------------------------------------------ registry


def test_registry():
    assert set(PIXEL) <= set(available_rewards())
    sharp = build_reward("sharpness")
    assert sharp(checkerboard(), ["x"]).item() == pytest.approx(16.0, rel=1e-5)
    assert build_reward("sharpness") is sharp  # identical configs share one instance
    a, b = build_reward("colour_entropy", bins=4), build_reward("colour_entropy", bins=4)
    assert a is b and build_reward("colour_entropy", bins=2) is not a
    with pytest.raises(ValueError, match="Did you mean sharpness"):
        build_reward("sharpnes")
    with pytest.raises(ValueError, match="bins"):
        build_reward("colour_entropy", bins=1000)


def test_score_all_marks_only_the_failing_sample():
    def fragile(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if (videos.flatten(1).amax(1) == 0).any():
            raise RuntimeError("cannot score an all-black video")
        return brightness(videos) + 1

    videos = torch.cat([solid((0.5, 0.5, 0.5)), solid((0, 0, 0)), solid((0.25, 0.25, 0.25))])
    rewards = {"brightness": build_reward("brightness"), "fragile": FunctionReward("fragile", fragile)}
    scores, errors = score_all(rewards, videos, ["p", "q", "r"])
    torch.testing.assert_close(scores["brightness"], torch.tensor([0.5, 0.0, 0.25]))
    assert torch.isnan(scores["fragile"][1])
    torch.testing.assert_close(scores["fragile"][[0, 2]], torch.tensor([1.5, 1.25]))
    assert set(errors) == {"fragile"} and "all-black" in errors["fragile"]


# ------------------------------------------------------------------------------------------------ combiner

GROUPS = torch.tensor([0, 0, 1, 1])


def test_combine_raw_by_hand():
    scores = {"a": torch.tensor([1.0, 3.0, 10.0, 20.0]), "b": torch.tensor([0.0, 2.0, 5.0, 5.0])}
    total, norm = combine_rewards(scores, {"a": 1.0, "b": 2.0}, GROUPS, mode="raw")
    torch.testing.assert_close(total, torch.tensor([1.0, 7.0, 20.0, 30.0]))  # a + 2b
    for k in scores:
        torch.testing.assert_close(norm[k], scores[k])  # raw mode sums the raw values


def test_combine_group_z_by_hand():
    scores = {"a": torch.tensor([1.0, 3.0, 10.0, 20.0]), "b": torch.tensor([0.0, 2.0, 5.0, 5.0])}
    total, norm = combine_rewards(scores, {"a": 1.0, "b": 2.0}, GROUPS, mode="group_z")
    # a: group 0 mean 2 std 1 -> [−1, 1]; group 1 mean 15 std 5 -> [−1, 1]
    # b: group 0 mean 1 std 1 -> [−1, 1]; group 1 constant -> [0, 0]
    torch.testing.assert_close(norm["a"], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm["b"], torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(total, torch.tensor([-3.0, 3.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_combine_nan_aware():
    scores = {
        "a": torch.tensor([1.0, 3.0, float("nan"), 20.0]),
        "b": torch.tensor([0.0, 2.0, 5.0, 5.0]),
        "monitor": torch.tensor([float("nan")] * 4),  # a failed monitor must not poison the total
    }
    total, norm = combine_rewards(scores, {"a": 1.0, "b": 1.0, "monitor": 0.0}, GROUPS, mode="raw")
    assert torch.isnan(total[2]) and torch.isfinite(total[[0, 1, 3]]).all()
    total, norm = combine_rewards(scores, {"a": 1.0, "b": 1.0}, GROUPS, mode="group_z")
    # group 1 of "a" has one finite value (20) -> z 0; the NaN stays NaN
    assert torch.isnan(norm["a"][2]) and norm["a"][3].item() == 0.0
    assert torch.isnan(total[2]) and total[3].item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isnan(norm["monitor"]).all()


def test_combine_errors():
    scores = {"a": torch.zeros(4)}
    with pytest.raises(ValueError, match="not scored"):
        combine_rewards(scores, {"hpsv3": 1.0}, GROUPS)
    with pytest.raises(ValueError, match="non-zero"):
        combine_rewards(scores, {"a": 0.0}, GROUPS)
    with pytest.raises(ValueError, match="mode"):
        combine_rewards(scores, {"a": 1.0}, GROUPS, mode="zscore")  # type: ignore[arg-type]
