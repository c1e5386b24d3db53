import pytest
import torch

from astrolabe_rl.models.schedule import (
    StepSchedule,
    causal_forcing_pp_steps,
    causvid_steps,
    renoise,
    self_forcing_steps,
    shift_sigma,
    velocity_from_x0,
    warp_timesteps,
    x0_from_velocity,
)


def test_warped_timesteps_match_reference_table():
    # reference/ar_models.md §2.6: shift 5 -> σ 1, .9375, .8333, .625; shift 8 -> 1, .96, .8889, .7273
    assert self_forcing_steps().timesteps == pytest.approx((1000.0, 937.5, 833.3333333, 625.0), abs=1e-6)
    assert warp_timesteps((1000, 750, 500, 250), 8.0) == pytest.approx((1000.0, 960.0, 888.8888889, 727.2727273))
    assert causvid_steps().timesteps == (1000.0, 757.0, 522.0)  # CausVid's list is not warped


def test_warp_equals_official_grid_lookup():
    # The official warp indexes the shifted 1000-point grid u_i = 1 - i/1000 at i = 1000 - t_raw.
    u = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    grid = torch.cat([1000 * shift_sigma(u, 5.0), torch.zeros(1, dtype=torch.float64)])
    raw = (1000, 750, 500, 250)
    expected = tuple(float(grid[1000 - t]) for t in raw)
    assert warp_timesteps(raw, 5.0) == pytest.approx(expected, abs=1e-9)


def test_causal_forcing_pp_first_block_has_four_steps():
    two = causal_forcing_pp_steps(2)
    assert two.timesteps == pytest.approx((1000.0, 833.3333333))
    assert len(two.for_block(first=True)) == 4 and len(two.for_block(first=False)) == 2
    assert causal_forcing_pp_steps(1).for_block(first=False) == (1000.0,)
    with pytest.raises(ValueError, match="1- and 2-step"):
        causal_forcing_pp_steps(3)


def test_x0_velocity_roundtrip_and_forward_process():
    x0, eps = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    sigma = torch.tensor([[0.3, 0.5, 0.9], [1.0, 0.2, 0.7]])  # per-frame σ [B, F]
    xt = renoise(x0, sigma, eps)
    s = sigma[..., None, None, None]
    torch.testing.assert_close(xt, (1 - s) * x0 + s * eps)
    v = eps - x0  # the flow target
    torch.testing.assert_close(x0_from_velocity(xt, v, sigma), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(velocity_from_x0(xt, x0, sigma), v, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="σ > 0"):
        velocity_from_x0(xt, x0, 0.0)


def test_x0_from_velocity_is_float64_inside():
    xt = torch.full((1, 1, 1, 1, 1), 1.0, dtype=torch.bfloat16)
    v = torch.full_like(xt, 1.0 + 2**-7)
    out = x0_from_velocity(xt, v, 0.6)
    assert out.dtype == torch.bfloat16
    assert out.item() == torch.tensor(1.0 - 0.6 * (1.0 + 2**-7)).to(torch.bfloat16).item()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"timesteps": ()}, "empty"),
        ({"timesteps": (1000.0, 1000.0)}, "strictly decreasing"),
        ({"timesteps": (1200.0,)}, r"\(0, 1000\]"),
        ({"timesteps": (1000.0,), "context_timestep": -1.0}, "context_timestep"),
    ],
)
def test_step_schedule_rejects_bad_lists(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepSchedule(**kwargs)
