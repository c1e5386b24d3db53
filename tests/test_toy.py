"""The toy world: renderer, exact VAE, word table, rewards and their hack, shipped weights, pretraining, the demo."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch

from astrolabe_rl.models.families import get_family
from astrolabe_rl.rewards.base import available_rewards, build_reward
from astrolabe_rl.toy import rewards as R
from astrolabe_rl.toy import vae, world
from astrolabe_rl.toy.model import WEIGHTS
from astrolabe_rl.toy.text import ToyTextEncoder
from astrolabe_rl.train.dist import shutdown

PROMPTS = ["a large red circle moving right quickly over stripes", "a small blue triangle moving up slowly over checks",
           "a large yellow square moving down slowly over ripples", "a small cyan circle moving left quickly over checks"]


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return world.render(PROMPTS, [3, 4, 5, 6])


# ------------------------------------------------------------------------------------------------ world


def test_render_is_deterministic_and_independent_of_the_batch(clean):
    assert clean.shape == (4, world.WORLD.frames, 3, world.WORLD.size, world.WORLD.size)
    assert torch.equal(world.render(PROMPTS, [3, 4, 5, 6]), clean)
    assert torch.equal(world.render(PROMPTS[2:3], [5])[0], clean[2])
    assert not torch.equal(world.render(PROMPTS[:1], [4])[0], clean[0])  # the seed matters


def test_rendered_object_has_the_prompted_colour_and_velocity(clean):
    mass, centre = R._centroids(R.object_mask(clean))
    for i, prompt in enumerate(PROMPTS):
        spec = world.parse_prompt(prompt)
        steps = centre[i, 1:] - centre[i, :-1]
        torch.testing.assert_close(steps, torch.tensor(spec.velocity).expand_as(steps), atol=0.05, rtol=0)
        inside = R.object_mask(clean)[i] > 0.99
        core_rgb = clean[i].permute(1, 0, 2, 3)[:, inside].median(dim=1).values  # edge pixels are blended
        torch.testing.assert_close(core_rgb, torch.tensor(spec.rgb), atol=1e-3, rtol=0)


def test_splits_are_disjoint_compositional_and_cover_the_vocabulary():
    train, held = world.split("train"), world.split("held_out")
    assert len(train) + len(held) == len(world.all_specs()) and not set(train) & set(held)
    held_pairs = {(s.colour, s.shape) for s in map(world.parse_prompt, held)}
    assert held_pairs == set(world.HELD_OUT_PAIRS)
    train_words = {w for p in train for w in p.split()}
    assert train_words == set(world.vocabulary())  # every held-out word was seen in training
    assert set(world.eval_prompts(12)) <= set(held) and len(set(world.eval_prompts(12))) == 12


def test_parse_prompt_round_trips_and_names_the_bad_word():
    spec = world.parse_prompt(PROMPTS[0])
    assert spec.prompt == PROMPTS[0] and spec.velocity == (2.0, 0.0)
    with pytest.raises(ValueError, match="'purple' is not a colour"):
        world.parse_prompt("a large purple circle moving right quickly over stripes")
    with pytest.raises(ValueError, match="words"):
        world.parse_prompt("a red ball")


# ------------------------------------------------------------------------------------------------ vae, text


def test_toy_vae_round_trips_exactly(clean):
    z = vae.encode(clean)
    assert z.shape == (4, world.WORLD.frames, vae.CHANNELS, 8, 8)
    assert torch.equal(vae.decode(z), clean)
    assert torch.equal(vae.encode(vae.decode(z)), z)
    assert 0.3 < float(z.std()) < 2.0  # roughly unit spread, like normalised Wan latents
    assert vae.CHANNELS == get_family("toy").model.in_dim
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 2, 3, 30, 30))


def test_toy_text_encoder_is_a_fixed_word_table():
    enc = ToyTextEncoder()
    e = enc(PROMPTS[:2])
    assert e.shape == (2, 10, 32)
    assert torch.equal(e, ToyTextEncoder()(PROMPTS[:2]))
    assert torch.equal(e[:, 9], torch.zeros(2, 32))  # padding rows are zero
    assert torch.equal(e[0, 4], e[1, 4]) and not torch.equal(e[0, 3], e[1, 3])  # "moving"; "circle" ≠ "triangle"
    with pytest.raises(ValueError, match="vocabulary"):
        enc(["a corgi surfing"])


# ------------------------------------------------------------------------------------------------ rewards


def _blur(v: torch.Tensor) -> torch.Tensor:
    b, t, c, h, w = v.shape
    x = torch.nn.functional.pad(v.reshape(b * t, c, h, w), (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(x, torch.ones(c, 1, 3, 3) / 9, groups=c).view_as(v)


def test_hackable_quality_prefers_sharp_and_is_fooled_by_noise(clean):
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    q_clean, q_blur, q_noisy = (R.quality_hackable(v, PROMPTS) for v in (clean, _blur(clean), noisy))
    assert (q_clean > q_blur).all()
    assert (q_noisy > q_clean).all(), "the hackable reward should be fooled by noise"
    n_clean, n_noisy = R.noise_level(clean, PROMPTS), R.noise_level(noisy, PROMPTS)
    assert (n_clean < 0.015).all() and (n_noisy > 2 * n_clean + 0.01).all(), "the monitor must expose the hack"
    # the other axes are not fooled: noise does not raise them
    assert (R.motion(noisy, PROMPTS) <= R.motion(clean, PROMPTS) + 1e-6).all()
    assert (R.text_alignment(noisy, PROMPTS) <= R.text_alignment(clean, PROMPTS) + 1e-6).all()


def test_motion_prefers_the_prompted_motion(clean):
    good = R.motion(clean, PROMPTS)
    assert (good > 0.95).all()
    for bad in (clean.flip(1), clean[:, :1].expand_as(clean), clean[:, [0, 2, 1, 3, 5, 4, 6, 8, 7]]):
        assert (R.motion(bad, PROMPTS) < good - 0.1).all()


def test_text_alignment_prefers_the_prompted_colour_and_shape(clean):
    good = R.text_alignment(clean, PROMPTS)
    seeds = [3, 4, 5, 6]
    specs = [world.parse_prompt(p) for p in PROMPTS]
    other_colour = {"red": "green", "blue": "magenta", "yellow": "cyan", "cyan": "red"}
    other_shape = {"circle": "square", "triangle": "circle", "square": "triangle"}
    recoloured = world.render([replace(s, colour=other_colour[s.colour]).prompt for s in specs], seeds)
    reshaped = world.render([replace(s, shape=other_shape[s.shape]).prompt for s in specs], seeds)
    assert (R.text_alignment(recoloured, PROMPTS) < good - 0.2).all()
    assert (R.text_alignment(reshaped, PROMPTS) < good - 0.05).all()


def test_toy_rewards_are_registered():
    assert {"toy_quality", "toy_quality_hackable", "toy_motion", "toy_text", "toy_noise", "toy_coherence"} <= set(
        available_rewards())
    assert build_reward("toy_noise").monitor and not build_reward("toy_quality").monitor


def test_the_oracle_is_registered_as_an_evaluation_monitor_that_ranks_renders_first():
    from astrolabe_rl.toy.oracle import degrade

    judge = build_reward("toy_oracle")
    assert judge.monitor  # logged, never optimised
    prompts = world.eval_prompts(4, split="dev")
    real = world.render(prompts, list(range(4)))
    clean, blurred = judge(real, prompts), judge(degrade(real, "blur"), prompts)
    assert clean.shape == (4,) and (clean > 0.9).all() and (blurred < clean).all()


# ------------------------------------------------------------------------------------------------ model


needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason="toy weights are not shipped yet: build them with python -m astrolabe_rl.toy.pretrain"
)


@needs_weights
@pytest.mark.parametrize("which, keys", [("toy", {"recipe", "teacher", "dmd", "oracle_comparison", "model", "wall_s"}),
                                         ("toy_fm", {"seed", "steps", "val_loss", "model", "wall_s"}),
                                         ("toy_long", {"recipe", "teacher", "dmd", "long_comparison", "model"})])
def test_shipped_weights_load_and_are_on_prompt(which, keys):
    from astrolabe_rl.models.wan import CausalWan
    from astrolabe_rl.rollout import rollout
    from astrolabe_rl.toy.model import FM_WEIGHTS, LONG_WEIGHTS, WEIGHTS, load_toy_model

    # the distilled student, the fm base it came from, and the student extended to long videos
    path = {"toy": WEIGHTS, "toy_fm": FM_WEIGHTS, "toy_long": LONG_WEIGHTS}[which]
    record = json.loads(path.with_suffix(".json").read_text())
    assert keys <= set(record)
    assert record["model"] == json.loads(json.dumps(get_family("toy").model.to_dict()))  # the geometry it was built with
    fam = get_family("toy")
    prompts = world.eval_prompts(8)
    text = ToyTextEncoder()(prompts)
    torch.manual_seed(0)
    scores = {}
    for name, model in (("shipped", load_toy_model(path)), ("random", CausalWan(fam.model).eval())):
        z = rollout(model, text, num_frames=9, latent_hw=fam.latent_hw, sampler=fam.sampler, seeds=0).latents
        scores[name] = R.text_alignment(vae.decode(z), prompts).mean() + R.motion(vae.decode(z), prompts).mean()
    # held-out prompts, one seed: the shipped base scores ≈ 0.50 (its caption noise costs it some), random ≈ 0.18
    assert scores["shipped"] > scores["random"] + 0.25


def test_miscaptioned_clips_differ_only_in_the_noisy_slots_and_never_show_held_out_pairs():
    from astrolabe_rl.toy import pretrain

    captions = world.split("train") * 4
    assert pretrain.miscaption(captions, 0.0, torch.Generator().manual_seed(0)) == captions
    shown = pretrain.miscaption(captions, 0.25, torch.Generator().manual_seed(0))
    assert shown == pretrain.miscaption(captions, 0.25, torch.Generator().manual_seed(0))
    assert set(shown) <= set(world.split("train"))  # held-out colour-shape pairs stay unseen
    changed = {name: 0 for name in pretrain.NOISY_SLOTS}
    for caption, clip in zip(captions, shown):
        a, b = world.parse_prompt(caption), world.parse_prompt(clip)
        assert (a.size, a.background) == (b.size, b.background)
        for name in changed:
            changed[name] += getattr(a, name) != getattr(b, name)
    # a slot is re-drawn with probability 0.25 and lands on another word with probability (n-1)/n
    # (colour and shape a little less: re-draws onto a held-out pair are undone)
    for name, n in (("colour", 6), ("shape", 3), ("direction", 4), ("speed", 2)):
        assert 0.6 * 0.25 * (n - 1) / n < changed[name] / len(captions) < 1.2 * 0.25 * (n - 1) / n, name


def test_pretrain_script_runs_the_three_stages_a_few_steps_each_on_its_world(tmp_path):
    from astrolabe_rl.toy import pretrain
    from astrolabe_rl.toy.model import load_toy_model

    out = tmp_path / "toy.safetensors"
    args = ["--steps", "2", "--stage2-steps", "2", "--stage3-steps", "1", "--batch", "2", "--work",
            str(tmp_path / "w"), "--out", str(out)]
    out.with_suffix(".json").write_text('{"stale": true}')  # a record already at --out does not skip the last stage
    assert pretrain.main(args) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert "stale" not in record and record["steps"] == 1 and record["val_loss"] > 0 and record["init"] == "stage2.safetensors"
    assert record["stage2"]["steps"] == 2 and record["stage2"]["init"] == "stage1.safetensors"
    assert record["stage2"]["stage1"]["steps"] == 2 and "first blocks at sigma 1" in record["sigma_sampling"]
    # stages 1 and 2 render the first bed's texture, stage 3 today's world
    assert record["stage2"]["world"]["texture"] == record["stage2"]["stage1"]["world"]["texture"] == 0.06
    assert record["world"]["texture"] == world.WORLD.texture
    load_toy_model(out)


def test_the_texture_scales_only_the_background_pattern():
    prompts, seeds = world.split("train")[:4], [0, 1, 2, 3]
    faint = world.render(prompts, seeds, replace(world.WORLD, texture=0.02))
    strong = world.render(prompts, seeds, replace(world.WORLD, texture=0.06))
    flat = world.render(prompts, seeds, replace(world.WORLD, texture=0.0))
    # the pattern is the difference from the flat world, three times as large at 0.06 (up to the 1/1024 grid)
    assert torch.allclose(strong - flat, 3 * (faint - flat), atol=4 / world.QUANT)
    assert (strong - flat).abs().amax() > 0.05


def test_stage_two_puts_first_blocks_at_sigma_one_and_leaves_the_stage_one_stream_alone():
    from astrolabe_rl.toy import pretrain

    grid = (1.0, 0.9375, 0.8333, 0.625)
    draw = lambda *opts: pretrain.training_sigmas(64, 3, grid, 5.0, torch.Generator().manual_seed(0), *opts)
    assert torch.equal(draw(), pretrain.sample_sigmas(64, 3, grid, 5.0, torch.Generator().manual_seed(0)))
    assert (draw(0.0, 1.0)[:, 0] == 1.0).all()
    half = draw(0.0, 0.5)
    assert torch.equal(half[:, 1:], draw()[:, 1:])  # only the first block changes
    assert 0.3 < (half[:, 0] == 1.0).float().mean() < 0.8


def test_interrupted_pretraining_resumes_bit_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from astrolabe_rl.toy import pretrain

    args = dict(steps=3, batch=2, lr=1e-3, warmup=2, weight_decay=0.01, ema=0.9, seed=1, caption_noise=0.25,
                save_every=2)
    pretrain.pretrain(**args, out=tmp_path / "full.safetensors")
    real, calls = pretrain.flow_loss, []

    def dies_at_step_three(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pretrain, "flow_loss", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(**args, out=tmp_path / "cut.safetensors")
    assert (tmp_path / "cut.state.pt").is_file()
    monkeypatch.setattr(pretrain, "flow_loss", real)
    pretrain.pretrain(**args, out=tmp_path / "cut.safetensors")
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "cut.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and not (tmp_path / "cut.state.pt").exists()


# ------------------------------------------------------------------------------------------------ demo


def test_demo_parser_registers_the_flags():
    from astrolabe_rl.toy.demo import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--quick", "--epochs", "3", "--out", "x", "--seed", "2", "train.lr=1e-4"])
    assert (args.quick, args.epochs, args.out, args.seed, args.overrides) == (True, 3, "x", 2, ["train.lr=1e-4"])
    assert args.func.__name__ == "cmd_demo"


@pytest.fixture
def _single_process():
    yield
    shutdown()


@needs_weights
def test_reduced_quick_demo_is_judged_on_the_oracle(tmp_path, _single_process):
    """The smallest `--quick` demo: it trains, writes what a person reads, keeps the KL to the base bounded, and
    reports its headline on the oracle (test split, never optimised). Whether that headline rises is issue 27's open
    bar: on the distilled student the release defaults do not reliably raise the test oracle (bench/distilled_rl.md:
    the oracle gap closed is 0.015 ± 0.023 over 3 seeds at 24 epochs; the full demo's seed 0 closes 0.006), so that
    part is reported as an expected failure until the recipe does, then must hold."""
    from astrolabe_rl.toy.demo import run_demo

    summary = run_demo(tmp_path, quick=True, epochs=10, progress=False, test_prompts=4, overrides=[
        "rollout.prompts_per_epoch=4", "rollout.candidates=4", "eval.every=5"])
    for name in ("grid-seed0.png", "curves.png", "summary.json", "run/adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert summary["kl_base_max"] is not None and summary["kl_base_max"] < 1.0
    oracle = summary["oracle"]["oracle"]
    assert set(summary["oracle"]) >= {"agreement", "render", "colour", "shape", "direction", "speed"}
    curve = summary["selected"]["dev_oracle_curve"]  # the base, then every evaluation (epochs 5 and 10)
    assert [c["epoch"] for c in curve] == [0, 5, 10]
    best = max(curve[1:], key=lambda c: c["oracle"])
    assert summary["selected"]["epoch"] == best["epoch"]
    # RL against reranking (issue 27): the after oracle beside the base's best of 4 chosen by the training total
    from astrolabe_rl.toy.oracle import ATTRIBUTES

    block = summary["best_of_4"]
    assert block["oracle"]["after"] == pytest.approx(oracle["after"], abs=2e-4)
    assert summary["rl_minus_best_of_4"] == pytest.approx(block["oracle"]["after"] - block["oracle"]["best_of_4"],
                                                          abs=2e-4)
    assert summary["rl_minus_best_of_4_se"] >= 0
    assert set(block["attributes"]) == {*ATTRIBUTES, "agreement", "render"}
    assert all(set(v) == {"after", "best_of_4", "delta", "delta_se"} for v in block["attributes"].values())
    assert block["total"]["best_of_4"] >= summary["rewards"]["total"]["before"] - 2e-4  # chosen by the total
    if summary["oracle_worse"] or not oracle["after"] > oracle["before"]:
        pytest.xfail(f"issue 27's open bar: oracle {oracle['before']} -> {oracle['after']}, "
                     f"worse: {summary['oracle_worse']}")


def test_dev_selection_keeps_the_best_ema_and_puts_it_back(monkeypatch):
    """Early stopping on the dev split: the EMA of the best dev-oracle evaluation is what the demo reports."""
    from types import SimpleNamespace

    from astrolabe_rl.toy import demo, oracle

    monkeypatch.setattr(demo, "held_out_videos", lambda world, which, prompts, seeds: torch.zeros(len(prompts)))
    monkeypatch.setattr(oracle, "oracle_scores", lambda videos, prompts: {"oracle": torch.tensor([0.30])})
    fake = SimpleNamespace(epoch=0, policy=SimpleNamespace(ema={"w": torch.zeros(2)}), eval_prompts=["a prompt"])
    sel = demo.DevSelection()
    sel.start(fake)  # the base: 0.30
    for epoch, w, dev in ((4, 9.0, None), (5, 1.0, 0.50), (10, 2.0, 0.40)):  # the curve peaks at 5 and falls
        fake.epoch = epoch
        fake.policy.ema["w"].fill_(w)
        sel.watch(fake, {"reward/total": 1.0} | ({} if dev is None else {sel.metric: dev}))
    assert sel.restore_best(fake)
    assert fake.policy.ema["w"].tolist() == [1.0, 1.0]  # epoch 5's EMA, in place
    report = sel.report()
    assert report["epoch"] == 5 and "peaked at epoch 5" in report["why"]
    assert [c["oracle"] for c in report["dev_oracle_curve"]] == [0.3, 0.5, 0.4]  # epoch 4 had no evaluation


def test_the_demo_headline_does_not_rise_for_a_run_that_only_hacks():
    """Videos that only add noise raise the hackable proxy but not the demo's headline (the oracle gap closed)."""
    from types import SimpleNamespace

    from astrolabe_rl.toy.demo import compare, headline, score
    from astrolabe_rl.toy.oracle import degrade

    prompts, seeds = world.eval_prompts(4, split="test"), [0, 1]
    real = world.render([p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds])
    base = degrade(real, "blur")
    hacked = degrade(base, "noise", strength=0.5)
    fake = SimpleNamespace(rewards={"toy_quality_hackable": build_reward("toy_quality_hackable")},
                           weights={"toy_quality_hackable": 1.0}, monitors={"toy_noise": build_reward("toy_noise")})
    results = compare(*(score(fake, v, prompts, seeds) for v in (base, hacked, real)))
    assert results["total"]["delta"] > 0  # the proxy the run would have optimised went up...
    assert results["toy_noise"]["delta"] > 0  # ...its monitor saw the hack...
    assert headline(results)["oracle_gap_closed"] <= 0.0  # ...and the headline did not move up
    assert "render" in headline(results)["oracle_worse"]


def test_long_videos_extend_the_clip_world_bounce_wrap_and_switch():
    from astrolabe_rl.toy.world import render, render_long

    p = "a small red circle moving right quickly over stripes"
    clip = render([p], [3])
    long = render_long([[(0, p)]], [3], 40)
    assert long.shape == (1, 40, 3, 32, 32)
    assert torch.equal(long[:, :9], clip)  # the first frames are the clip world's
    # bouncing: the object's red mass stays whole in every frame and comes back leftwards
    red = (long[0, :, 0] > 0.8) & (long[0, :, 1] < 0.3)
    area = red.flatten(1).sum(1)
    assert (area > 0.6 * area[0]).all()
    xs = torch.stack([torch.nonzero(m)[:, 1].float().mean() for m in red])
    assert xs[20] < xs[12] or xs[30] < xs[20]  # moving left again after a bounce
    wrapped = render_long([[(0, p)]], [3], 40, boundary="wrap")
    assert not torch.equal(wrapped, long)
    # a scene switch at frame 10 turns the object blue where it is
    switched = render_long([[(0, p), (10, p.replace("red", "blue"))]], [3], 20)
    assert torch.equal(switched[:, :10], long[:, :10])
    blue = (switched[0, 10:, 2] > 0.8) & (switched[0, 10:, 0] < 0.3)
    assert blue.flatten(1).any(1).all()
    with pytest.raises(ValueError, match="background stays"):
        render_long([[(0, p), (5, p.replace("stripes", "checks"))]], [0], 10)


def test_coherence_holds_for_the_worlds_long_renders_and_falls_when_the_object_drifts():
    from astrolabe_rl.toy.rewards import coherence
    from astrolabe_rl.toy.world import render_long

    p = "a large green square moving down slowly over checks"
    steady = render_long([[(0, p)], [(0, p.replace("slowly", "quickly"))]], [1, 2], 36)
    assert (coherence(steady) > 0.8).all()  # bounces included
    recoloured = render_long([[(0, p), (18, p.replace("green", "magenta"))]], [1], 36)
    assert coherence(recoloured)[0] < 0.1
    faster = render_long([[(0, p), (18, p.replace("slowly", "quickly"))]], [1], 36)
    assert coherence(faster)[0] < 0.3  # a speed it was not asked to change
    lost = steady.clone()
    lost[:, 27:] = lost[:, 27:, :, :1, :1]  # the last window shows only the background's corner colour
    assert (coherence(lost) == 0).all()
    assert coherence(steady[:, :9]).tolist() == [1.0, 1.0]  # one window: nothing to drift from


@pytest.fixture(scope="module")
def long_renders() -> tuple[list[str], torch.Tensor]:
    prompts = world.eval_prompts(8, "test")  # every direction and speed once, both sizes
    return prompts, world.render_long([[(0, p)] for p in prompts], list(range(8)), 45)


def test_long_motion_accepts_bounces_and_still_wants_the_prompted_axis_and_speed(long_renders):
    prompts, long = long_renders
    windows = [long[:, k * 9:(k + 1) * 9] for k in range(5)]
    scores = torch.stack([R.motion_long(w, prompts) for w in windows], dim=1)  # [8, 5]
    assert bool((scores.mean(dim=0) >= 0.9).all()), scores
    assert bool((scores > 0.75).all())  # the worst window: one step through a bounce that stops the object
    assert bool((R.motion(windows[1], prompts) < scores[:, 1] - 0.1).any())  # the plain reward punishes bounces
    assert bool((R.motion_long(windows[0], prompts) >= R.motion(windows[0], prompts)).all())
    frozen = windows[2][:, :1].expand_as(windows[2])
    assert bool((R.motion_long(frozen, prompts) < 0.65).all())
    turn = {"left": "up", "right": "down", "up": "right", "down": "left"}
    specs = [world.parse_prompt(p) for p in prompts]
    sideways = world.render_long([[(0, replace(s, direction=turn[s.direction]).prompt)] for s in specs],
                                 list(range(8)), 18)[:, 9:]
    assert bool((R.motion_long(sideways, prompts) < 0.45).all())
    assert torch.equal(build_reward("toy_motion_long").fn(windows[1], prompts), scores[:, 1])
    assert not build_reward("toy_motion_long").monitor


def test_boundary_jump_is_about_one_for_renders_and_rises_at_a_seam(long_renders):
    prompts, long = long_renders
    jump = R.boundary_jump(long, 9)
    assert jump.shape == (8,) and bool((jump < 1.2).all()), jump
    # a large object moving quickly bounces at every window boundary (its path spans the frame in 9 frames): its
    # boundary steps are short, so it scores below 1, never like a seam
    fast_large = torch.tensor([(s.size, s.speed) == ("large", "quickly") for s in map(world.parse_prompt, prompts)])
    assert bool(((jump > 0.8) | fast_large).all()) and bool((jump[fast_large] < 1).all())
    step = torch.zeros(1, 45, 3, 1, 1)
    for k in range(5):  # a colour step at every window boundary: the tint swings by ±0.1 in red and blue
        step[:, k * 9:(k + 1) * 9] = 0.05 * (-1) ** k * torch.tensor([1.0, 0.0, -1.0])[:, None, None]
    seamed = (long + step).clamp(0, 1)
    assert bool((R.boundary_jump(seamed, 9) > 3).all()), R.boundary_jump(seamed, 9)
    grey = torch.full((1, 27, 3, 32, 32), 0.5)
    assert R.boundary_jump(grey, 9).tolist() == [1.0]  # static: the floor, 1 without a seam
    assert float(R.boundary_jump((grey + step[:, :27]).clamp(0, 1), 9)) > 50
    with pytest.raises(ValueError, match="no window boundary"):
        R.boundary_jump(long[:, :9], 9)
    with pytest.raises(ValueError, match="window must be"):
        R.boundary_jump(long, 1)
