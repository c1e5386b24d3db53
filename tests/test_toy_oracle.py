"""The toy oracle (fit to the world's parameters), the honest and hackable quality rewards, and the evaluation splits."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.rewards.base import build_reward
from astrolabe_rl.toy import oracle, world
from astrolabe_rl.toy import rewards as R

PROMPTS = ["a large red circle moving right quickly over stripes", "a small blue triangle moving up slowly over checks",
           "a large yellow square moving down slowly over ripples", "a small cyan circle moving left quickly over checks"]
SEEDS = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return world.render(PROMPTS, SEEDS)


@pytest.fixture(scope="module")
def clean_scores(clean) -> dict[str, torch.Tensor]:
    return oracle.oracle_scores(clean, PROMPTS)


def test_oracle_recovers_the_parameters_of_clean_renders(clean):
    for video, prompt, seed in zip(clean, PROMPTS, SEEDS):
        spec, fit = world.parse_prompt(prompt), oracle.fit_video(video)
        assert fit["found"]
        assert {a: fit[a] for a in ("colour", "shape", "size", "direction", "speed", "background")} == {
            a: getattr(spec, a) for a in ("colour", "shape", "size", "direction", "speed", "background")}
        true_start = world._start(spec, torch.Generator().manual_seed(seed), world.WORLD)  # render's first draw
        torch.testing.assert_close(fit["start"].double(), torch.tensor(true_start, dtype=torch.float64),
                                   atol=0.06, rtol=0)
        assert fit["residual"] < 0.004  # the fit's grids and the 1/1024 quantisation, nothing else


def test_clean_renders_agree_with_their_prompts_and_set_the_ceiling(clean_scores):
    for name in oracle.ATTRIBUTES + ("agreement",):
        assert torch.equal(clean_scores[name], torch.ones(len(PROMPTS))), name
    assert bool((clean_scores["oracle"] > 0.95).all())
    ceiling = oracle.render_ceiling(PROMPTS[:1], SEEDS[:1])["oracle"]
    assert torch.equal(ceiling, clean_scores["oracle"][:1])


@pytest.mark.parametrize("kind", ["blur", "noise", "grid", "blob"])
def test_degraded_renders_score_lower_on_the_residual(clean, clean_scores, kind):
    bad = oracle.oracle_scores(oracle.degrade(clean, kind, seed=1), PROMPTS)
    assert bool((bad["residual"] > 3 * clean_scores["residual"]).all()), (kind, bad["residual"])
    assert bool((bad["oracle"] < clean_scores["oracle"] - 0.1).all()), (kind, bad["oracle"])


def test_oracle_scores_each_attribute_against_the_prompt(clean):
    # the same videos judged against prompts that differ in one slot each
    wrong = ["a large green circle moving right quickly over stripes",  # colour
             "a small blue triangle moving down slowly over checks",  # direction
             "a large yellow square moving down quickly over ripples",  # speed
             "a small cyan circle moving left quickly over stripes"]  # background
    s = oracle.oracle_scores(clean, wrong)
    assert s["colour"].tolist() == [0, 1, 1, 1]
    assert s["direction"].tolist() == [1, 0, 1, 1]
    assert s["speed"].tolist() == [1, 1, 0, 1]
    assert s["background"].tolist() == [1, 1, 1, 0]
    assert torch.equal(s["shape"], torch.ones(4)) and torch.equal(s["size"], torch.ones(4))


def test_a_video_without_the_object_fails_every_object_attribute(clean):
    grey = torch.full_like(clean, 0.5)
    s = oracle.oracle_scores(grey, PROMPTS)
    for name in ("colour", "shape", "size", "direction", "speed", "position"):
        assert torch.equal(s[name], torch.zeros(4)), name


def test_gap_closed_and_bad_input():
    assert oracle.gap_closed(0.6, 0.5, 0.9) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ceiling"):
        oracle.gap_closed(0.6, 0.9, 0.8)
    with pytest.raises(ValueError, match="toy-world videos"):
        oracle.oracle_scores(torch.zeros(1, 9, 3, 16, 16), PROMPTS[:1])
    with pytest.raises(ValueError, match="unknown degradation"):
        oracle.degrade(torch.zeros(1, 9, 3, 32, 32), "jpeg")


# ------------------------------------------------------------------------------------------------ quality rewards


def test_honest_quality_ranks_the_renders_above_blurred_noised_and_gridded_ones(clean):
    q = R.quality(clean, PROMPTS)
    assert bool((q > 0.6).all())
    for kind in ("blur", "noise", "grid"):
        for strength in (0.5, 1.0):
            worse = R.quality(oracle.degrade(clean, kind, seed=2, strength=strength), PROMPTS)
            assert bool((worse < q).all()), (kind, strength, worse, q)
    # the hackable proxy, by contrast, prefers the noised and gridded copies (its ceiling is not the renders)
    for kind in ("noise", "grid"):
        assert bool((R.quality_hackable(oracle.degrade(clean, kind, seed=2), PROMPTS)
                     > R.quality_hackable(clean, PROMPTS)).all()), kind
    assert torch.equal(build_reward("toy_quality").fn(clean, PROMPTS), q)
    assert torch.equal(build_reward("toy_quality_hackable").fn(clean, PROMPTS), R.quality_hackable(clean, PROMPTS))


def test_honest_quality_is_zero_without_an_object():
    grey = torch.full((2, world.WORLD.frames, 3, world.WORLD.size, world.WORLD.size), 0.5)
    assert torch.equal(R.quality(grey, PROMPTS[:2]), torch.zeros(2))


# ------------------------------------------------------------------------------------------------ splits


def test_dev_and_test_halve_the_held_out_split_by_pair():
    dev, test, held = (set(world.split(n)) for n in ("dev", "test", "held_out"))
    assert dev | test == held and not dev & test and len(dev) == len(test) == len(held) // 2
    pairs = lambda prompts: {(s.colour, s.shape) for s in map(world.parse_prompt, prompts)}  # noqa: E731
    assert pairs(dev) == set(world.DEV_PAIRS) and pairs(test) == set(world.TEST_PAIRS)
    assert not pairs(dev) & pairs(test)
    with pytest.raises(ValueError, match="unknown split"):
        world.split("val")
    with pytest.raises(ValueError, match="evaluation sets come from"):
        world.eval_prompts(8, "train")


@pytest.mark.parametrize("split", ["held_out", "dev", "test"])
@pytest.mark.parametrize("n", [4, 8, 12, 16, 24])
def test_evaluation_sets_are_balanced_in_direction_and_speed(split, n):
    prompts = world.eval_prompts(n, split)
    assert len(set(prompts)) == n and set(prompts) <= set(world.split(split))
    specs = [world.parse_prompt(p) for p in prompts]
    for counts, groups in (([sum(s.direction == d for s in specs) for d in world.DIRECTIONS], 4),
                           ([sum(s.speed == v for s in specs) for v in world.SPEEDS], 2),
                           ([sum((s.direction, s.speed) == (d, v) for s in specs)
                             for d in world.DIRECTIONS for v in world.SPEEDS], 8)):
        assert max(counts) - min(counts) <= 1 and sum(counts) == n, (counts, groups)
    if n % 8 == 0:
        pair_counts = [sum((s.colour, s.shape) == pair for s in specs) for pair in {(s.colour, s.shape) for s in specs}]
        assert max(pair_counts) == min(pair_counts)


def test_an_evaluation_set_can_be_the_whole_split():
    for split in ("dev", "test"):
        assert sorted(world.eval_prompts(len(world.split(split)), split)) == sorted(world.split(split))
    with pytest.raises(ValueError, match="n must be in"):
        world.eval_prompts(97, "test")


# ------------------------------------------------------------------------------------------------ long videos


def _bounce_loop(start: float, vel: float, lo: float, hi: float, frames: int) -> tuple[list[float], list[float]]:
    """`world.render_long`'s per-step bounce on one axis, re-run in plain Python: positions and velocities."""
    pos, out, vels = start, [start], [vel]
    for _ in range(frames - 1):
        pos += vel
        if not lo <= pos <= hi:
            pos, vel = 2 * (lo if pos < lo else hi) - pos, -vel
        out.append(pos)
        vels.append(vel)
    return out, vels


def _long(prompt: str, seed: int, frames: int, drift: float = 0.0) -> torch.Tensor:
    """A one-scene bouncing long video ``[1, frames, 3, 32, 32]`` built from `shape_alpha` on the folded path, the
    object pushed sideways by ``drift`` px per frame (0: it must equal `render_long`'s)."""
    spec, size = world.parse_prompt(prompt), world.WORLD.size
    g = torch.Generator().manual_seed(seed)
    start = torch.tensor(world._start(spec, g, world.WORLD), dtype=torch.float64)
    bg = world._background(world.BACKGROUNDS.index(spec.background), g, size, world.WORLD.texture)
    t = torch.arange(frames, dtype=torch.float64)[:, None]
    path = oracle.fold(start + t * torch.tensor(spec.velocity, dtype=torch.float64), spec.radius + 1,
                       size - spec.radius - 1)
    across = torch.tensor([0.0, 1.0] if spec.velocity[0] else [1.0, 0.0], dtype=torch.float64)
    path = path + drift * t * across
    alpha = world.shape_alpha(torch.full((frames,), world.SHAPES.index(spec.shape)), path,
                              torch.full((frames,), spec.radius, dtype=torch.float64), size)[:, None]
    video = alpha * torch.tensor(spec.rgb, dtype=torch.float64)[:, None, None] + (1 - alpha) * bg
    return (torch.round(video * world.QUANT) / world.QUANT).float()[None]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("radius", [4.0, 6.0])
def test_fold_is_render_longs_bounce(radius):
    lo, hi = radius + 1, world.WORLD.size - radius - 1
    for vel in (-2.0, -1.0, 1.0, 2.0):
        for start in (lo, lo + 0.37, 16.0, 20.81, hi - 0.5, hi):
            loop = torch.tensor(_bounce_loop(start, vel, lo, hi, 60)[0], dtype=torch.float64)
            folded = oracle.fold(start + vel * torch.arange(60, dtype=torch.float64), lo, hi)
            torch.testing.assert_close(folded, loop, atol=1e-9, rtol=0)
    # and the frames themselves: every direction and speed, both sizes, 60 frames with several bounces
    size = next(w for w, r in world.SIZES.items() if r == radius)
    prompts = [world.Spec(size, "red", world.SHAPES[i % 3], d, v, world.BACKGROUNDS[i % 3]).prompt
               for i, (d, v) in enumerate((d, v) for d in world.DIRECTIONS for v in world.SPEEDS)]
    rendered = world.render_long([[(0, p)] for p in prompts], list(range(len(prompts))), 60)
    for i, prompt in enumerate(prompts):
        assert torch.equal(_long(prompt, i, 60)[0], rendered[i]), prompt


@pytest.mark.usefixtures("one_thread")
def test_bounce_fit_recovers_a_window_that_starts_anywhere_and_bounces():
    prompt = "a large yellow triangle moving down quickly over stripes"  # bounces every 9 frames
    long = world.render_long([[(0, prompt)]], [3], 27)[0]
    spec, size = world.parse_prompt(prompt), world.WORLD.size
    x, y = world._start(spec, torch.Generator().manual_seed(3), world.WORLD)
    ys, vys = _bounce_loop(y, spec.velocity[1], spec.radius + 1, size - spec.radius - 1, 27)
    path = torch.tensor([[x, yy] for yy in ys], dtype=torch.float64)
    for first in (0, 5, 9, 13):  # windows with a bounce at every place
        fit = oracle.fit_video(long[first:first + 9], bounce=True)
        assert (fit["colour"], fit["shape"], fit["size"], fit["speed"], fit["background"]) == (
            "yellow", "triangle", "large", "quickly", "stripes")
        assert fit["direction"] == ("down" if vys[first] > 0 else "up"), first  # its heading at the window's start
        torch.testing.assert_close(fit["path"].double(), path[first:first + 9], atol=0.06, rtol=0)
        assert fit["residual"] < 0.004
    # a clip fitted with bounce=True is the clip fitted as a line, while it does not bounce
    clip = world.render(PROMPTS[:1], SEEDS[:1])[0]
    line, bounce = oracle.fit_video(clip), oracle.fit_video(clip, bounce=True)
    assert {k: line[k] for k in oracle.ATTRIBUTES[:-1]} == {k: bounce[k] for k in oracle.ATTRIBUTES[:-1]}
    torch.testing.assert_close(bounce["start"], line["start"], atol=0.051, rtol=0)


@pytest.mark.usefixtures("one_thread")
def test_window_crops_score_candidates_as_the_whole_frame_does():
    video = world.render_long([[(0, PROMPTS[1])]], [4], 18)[0, 9:].float()
    fit = oracle.fit_video(video, bounce=True)
    shape_ids = torch.tensor([world.SHAPES.index(s) for s, _ in oracle._CLASSES])
    radii = torch.tensor([world.SIZES[z] for _, z in oracle._CLASSES], dtype=torch.float64)
    lo, hi = (radii + 1)[:, None, None], (world.WORLD.size - radii - 1)[:, None, None]
    starts = fit["path"][0].double().expand(len(radii), 2)
    vel = torch.tensor(world.DIRECTIONS[fit["direction"]], dtype=torch.float64) * world.SPEEDS[fit["speed"]]
    rgb, bg = torch.tensor(world.COLOURS[fit["colour"]]), video.median(0).values  # any background will do
    crops = oracle._crops(oracle._path(starts, vel, 9, lo, hi, True), video, bg)
    cands = starts[:, None] + 0.4 * torch.randn(len(radii), 7, 2, generator=torch.Generator().manual_seed(0))
    centres = oracle._path(cands, vel, 9, lo[..., None], hi[..., None], True)
    full = oracle._candidate_errors(shape_ids, radii, centres, rgb, bg, video, None)
    cropped = oracle._candidate_errors(shape_ids, radii, centres, rgb, bg, video, crops)
    torch.testing.assert_close(cropped, full, rtol=1e-5, atol=1e-9)


@pytest.fixture(scope="module")
def long_test_split():
    prompts = world.eval_prompts(8, "test")
    return prompts, world.render_long([[(0, p)] for p in prompts], list(range(8)), 45)


@pytest.mark.usefixtures("one_thread")
def test_long_renders_agree_in_every_window_and_degraded_ones_render_worse(long_test_split):
    prompts, long = long_test_split
    s = oracle.window_scores(long, prompts)
    assert set(s) == set(oracle.oracle_scores(long[:1, :9], prompts[:1]))
    assert all(v.shape == (8, 5) and v.dtype == torch.float32 for v in s.values())
    assert torch.equal(s["agreement"], torch.ones(8, 5))
    # not 1: the fit's start grid (0.05 px) and background grids leave the triangles' windows at 0.92-0.93, as the
    # clip oracle scores those clips
    assert bool((s["render"] > 0.9).all()) and float(s["render"].mean()) > 0.95
    first = oracle.oracle_scores(world.render(prompts, list(range(8))), prompts)["render"]
    torch.testing.assert_close(s["render"][:, 0], first, atol=2e-3, rtol=0)  # window 0 is the clip
    for kind in ("blur", "noise", "blob"):
        bad = oracle.window_scores(oracle.degrade(long[:2, :27], kind, seed=1), prompts[:2])
        assert bool((bad["render"] < s["render"][:2, :3] - 0.1).all()), (kind, bad["render"])


@pytest.mark.usefixtures("one_thread")
def test_a_window_whose_object_drifts_sideways_fails_position():
    prompt = "a small green circle moving right quickly over checks"
    steady, drifting = _long(prompt, 1, 36), _long(prompt, 1, 36, drift=0.25)  # 0.25 px/frame downwards
    s = oracle.window_scores(torch.cat([steady, drifting]), [prompt] * 2)
    assert s["position"][0].tolist() == [1.0] * 4
    assert s["position"][1, 1:].tolist() == [0.0] * 3  # 2.25 px off and more from window 1 on
    assert bool((s["direction"] == 1).all()) and bool((s["speed"] == 1).all())


def test_window_scores_cut_whole_windows_and_explain_bad_input(long_test_split):
    prompts, long = long_test_split
    s = oracle.window_scores(long[:1, :20], prompts[:1], window=9)  # 2 windows, the last 2 frames dropped
    assert s["render"].shape == (1, 2)
    with pytest.raises(ValueError, match="window"):
        oracle.window_scores(long[:1, :8], prompts[:1])
    with pytest.raises(ValueError, match="toy-world videos"):
        oracle.window_scores(long[0], prompts[:1])
