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
