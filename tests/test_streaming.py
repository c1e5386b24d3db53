"""Streaming RL: the window's training passes against one masked teacher-forcing call, window-only decoding, window
starts, and the recipe in train.mode=streaming (run, resume, misconfiguration)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from astrolabe_rl.config import StreamingConfig
from astrolabe_rl.models import CachePolicy, CausalWan, WanConfig, get_family
from astrolabe_rl.train.streaming import WindowPasses, commit_history, decode_window, window_start

HW = (4, 4)
SF = get_family("self_forcing").sampler
ROLLING = replace(get_family("longlive").sampler, cache=CachePolicy(window_frames=9, sink_frames=3))


def _model() -> CausalWan:
    torch.manual_seed(0)
    return CausalWan(WanConfig.tiny())


@pytest.mark.parametrize("sampler", [SF, ROLLING], ids=["global", "rolling+sink"])
def test_window_step_gradient_equals_one_masked_teacher_forcing_call(sampler):
    model = _model()
    g = torch.Generator().manual_seed(1)
    s, w = 9, 6
    history, x0 = torch.randn(2, s, 16, 4, 4, generator=g), torch.randn(2, w, 16, 4, 4, generator=g)
    x_t, text, weight = torch.randn(2, w, 16, 4, 4, generator=g), torch.randn(2, 8, 16, generator=g), torch.randn(2, w, 16, 4, 4, generator=g)
    t = 750.0

    passes = WindowPasses(history, s, sampler, HW, seeds=[0, 1])
    v = passes.velocity(model, x_t, t, text, x0)
    grads = torch.autograd.grad((v * weight).sum(), list(model.parameters()))

    # one call over [history ; window]: clean stream (detached) = [history ; x0], noisy stream = [anything ; x_t]
    noisy = torch.cat([torch.randn(2, s, 16, 4, 4, generator=g), x_t], dim=1)
    times = torch.cat([torch.zeros(2, s), torch.full((2, w), t)], dim=1)
    v_ref = model(noisy, times, text, frames_per_block=3, clean=torch.cat([history, x0], dim=1), policy=sampler.cache)
    ref_grads = torch.autograd.grad((v_ref[:, s:] * weight).sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(v, v_ref[:, s:], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-4)
    assert sum(float(a.abs().sum()) for a in grads) > 0


def test_shared_history_cache_gives_the_same_velocity_as_committing_it_again():
    model = _model()
    g = torch.Generator().manual_seed(2)
    history, x0, x_t = (torch.randn(1, n, 16, 4, 4, generator=g) for n in (6, 3, 3))
    text = torch.randn(1, 8, 16, generator=g)
    own = WindowPasses(history, 6, ROLLING, HW, seeds=[0])
    shared = replace(own, shared=commit_history(model, history, text, ROLLING, HW, [0], 3))
    with torch.no_grad():
        torch.testing.assert_close(own.velocity(model, x_t, 500.0, text, x0),
                                   shared.velocity(model, x_t, 500.0, text, x0), atol=0, rtol=0)
        shared.velocity(model, x_t, 500.0, text, x0)  # the shared cache is cloned, never consumed


def test_window_only_decode_equals_decoding_the_whole_video_and_slicing():
    from astrolabe_rl.models.vae import WanVAE, random_vae, tiny_vae_config

    vae = WanVAE(random_vae(tiny_vae_config(), seed=0))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 7, 16, 4, 4, generator=g)
    whole = vae.decode(z)  # 1 + 4·6 = 25 frames
    # two candidates of prompt 1 and one of prompt 0: the history is decoded once per prompt
    owner = torch.tensor([1, 1, 0])
    window = decode_window(vae, z[:, :4], z[owner, 4:], owner)  # latent frames 4..6 -> pixel frames 13..24
    torch.testing.assert_close(window, whole[owner, 13:], atol=1e-5, rtol=0)
    warm = decode_window(vae, z[:, :4], z[owner, 4:], owner, warmup=2)  # a partial warm-up is an approximation
    assert warm.shape == window.shape


def test_window_start_choices():
    cfg = StreamingConfig(video_frames=30, window=9, start="choices", choices=[3, 9, 15])
    starts = {window_start(cfg, SF, seed) for seed in range(40)}
    assert starts == {3, 9, 15}
    assert window_start(cfg, SF, 5) == window_start(cfg, SF, 5)
    assert window_start(replace(cfg, start="first"), SF, 0) == 0
    assert window_start(replace(cfg, start="last"), SF, 0) == 21
    assert {window_start(replace(cfg, start="random"), SF, s) for s in range(60)} == {0, 3, 6, 9, 12, 15, 18, 21}


def test_memory_of_a_window_step_does_not_depend_on_the_video_length():
    """The mechanism behind bench/streaming_memory.py: with a rolling cache, the cache's buffers and every tensor
    saved for the backward pass have the same shapes whether the window starts at frame 6 or at frame 30."""
    model = _model()

    def saved_shapes(start: int) -> tuple[list, list]:
        g = torch.Generator().manual_seed(4)
        history = torch.randn(1, start, 16, 4, 4, generator=g)
        x0, x_t = torch.randn(2, 6, 16, 4, 4, generator=g), torch.randn(2, 6, 16, 4, 4, generator=g)
        text = torch.randn(2, 8, 16, generator=g)
        cache = commit_history(model, history, text[:1], ROLLING, HW, [0], 6)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            WindowPasses(history, start, ROLLING, HW, seeds=[0]).velocity(model, x_t, 500.0, text, x0).sum()
        return [tuple(t.shape) for t in cache.tensors()], sorted(shapes)

    short, long = saved_shapes(6), saved_shapes(30)
    assert short[0] == long[0] and short[1] == long[1] and long[1]


# ------------------------------------------------------------------------------------------------ the recipe


def _streaming_cfg(run_dir, *extra):
    from test_train import _cfg

    return _cfg(run_dir, "train.mode=streaming", "streaming.video_frames=12", "streaming.window=6",
                "streaming.choices=[3, 6]", *extra)


@pytest.fixture()
def _single_process():
    from astrolabe_rl.train.dist import shutdown

    yield
    shutdown()


def test_streaming_run_trains_the_window_and_resumes_bit_identically(tmp_path, _single_process):
    from test_train import _params, crash_and_resume

    from astrolabe_rl.train import recipe

    world = recipe.setup(_streaming_cfg(tmp_path / "first", "streaming.per=prompt"))
    batch = recipe.streaming_rollout_phase(world, world.sampler_plan.epoch_plan(0))
    world.logger.close()
    assert batch.latents.shape[1] == 6 and {w.start for w in batch.windows} <= {3, 6}
    assert all(w.history.shape[:2] == (1, w.start) for w in batch.windows)  # one history per prompt
    full, _ = crash_and_resume(tmp_path, _streaming_cfg, "streaming.per=prompt", "streaming.history_kv=old",
                               epochs=3, crash_at=1)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in _params(full, "default").items() if "lora_B" in k)

@pytest.mark.parametrize("overrides, field", [
    (["streaming.window=13"], "streaming.window=13"),
    (["streaming.choices=[9]"], r"streaming.choices \[9\] start past the end"),
    (["streaming.choices=[4]"], "block starts"),
    (["streaming.decode_warmup=-1"], "streaming.decode_warmup"),
    (["streaming.overlap=6"], "streaming.overlap=6"),
    (["streaming.overlap=2"], "whole blocks"),
])
def test_bad_streaming_configs_fail_before_anything_runs(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        _streaming_cfg(tmp_path, *overrides)


@pytest.mark.parametrize("switch", [None, 9, 3], ids=["one prompt", "switch in the window", "switch in the history"])
def test_window_passes_reproduce_the_rollouts_last_step_with_prompt_switches(switch):
    """The training passes see exactly what the sampler saw: at the window's last sampling step, x̂0 of the passes
    (history re-committed, the prompt switched and LongLive's re-cache run where the rollout did them, earlier window
    blocks clean) equals the rollout's output."""
    from astrolabe_rl.models.schedule import sigma_of, x0_from_velocity
    from astrolabe_rl.rollout import PromptSwitch, rollout_window

    model = _model().eval()
    g = torch.Generator().manual_seed(5)
    text0, text1 = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    switches = [] if switch is None else [PromptSwitch(switch, text1)]
    out = rollout_window(model, text0, start=6, window=6, latent_hw=HW, sampler=ROLLING, history_seeds=[3],
                         seeds=[4, 5], candidates=2, switches=switches, record=True)
    t_last = out.traces[0].timesteps[-1]
    x_t = torch.cat([tr.inputs[:, -1] for tr in out.traces], dim=1)  # each block's input at its last step
    passes = WindowPasses(out.history, 6, ROLLING, HW, seeds=[0], switches={sw.frame: sw.text for sw in switches})
    with torch.no_grad():
        v = passes.velocity(model, x_t, t_last, text0.expand(2, -1, -1), out.latents)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma_of(t_last)), out.latents, atol=1e-5, rtol=0)


def test_window_scenes_and_their_frame_weighted_scores():
    from concurrent.futures import Future

    from astrolabe_rl.train.recipe import WindowScore, window_scenes

    # scene "a" on latent frames [0, 6), "b" from 6; a window of 6 latent frames from frame 3, 4 pixel frames each
    assert window_scenes([0, 6], ["a", "b"], 3, 6, 4) == [(0, 12, "a"), (12, 24, "b")]
    assert window_scenes([0, 6], ["a", "b"], 0, 6, 4) == [(0, 21, "a")]  # the video's first frame decodes to one
    assert window_scenes([0, 6], ["a", "b"], 6, 3, 1) == [(0, 3, "b")]

    def done(x):
        f = Future()
        f.set_result({"r": torch.tensor(x)})
        return f

    got = WindowScore([(done([1.0, 0.0]), 12), (done([4.0, 3.0]), 24)]).result()
    torch.testing.assert_close(got["r"], torch.tensor([3.0, 2.0]))


def test_a_scheduled_prompt_switches_inside_the_streaming_window(tmp_path, _single_process):
    from astrolabe_rl.train import recipe

    world = recipe.setup(_streaming_cfg(tmp_path, "streaming.choices=[3]",
                                        'data.prompts=["a red ball [1.4s] | a blue cube", "a green cone"]'))
    batch = recipe.streaming_rollout_phase(world, world.sampler_plan.epoch_plan(0))
    scheduled = [w for w in batch.windows if world.prompts[int(batch.prompt_ids[w.rows.start])].startswith("a red")]
    if not scheduled:
        pytest.skip("this epoch drew no scheduled prompt")
    assert list(scheduled[0].switches) == [6] and scheduled[0].start == 3
    scores, _, _ = recipe.score_phase(world, batch)
    assert all(torch.isfinite(v).all() for v in scores.values())
    world.logger.close()


def test_overlap_trains_the_boundary_frames_toward_the_history(tmp_path, _single_process):
    from astrolabe_rl.train import recipe

    world = recipe.setup(_streaming_cfg(tmp_path, "streaming.choices=[6]", "streaming.overlap=3",
                                        "streaming.boundary_weight=2.0"))
    m = recipe.run_epoch(world)
    world.logger.close()
    assert m["loss/boundary"] > 0
    # the loss is the NFT objective on the window plus 2 × the boundary term on the overlap
    assert m["loss/loss"] == pytest.approx(m["loss/policy_loss"] + 1e-4 * m["loss/kl_selected"]
                                           + 2.0 * m["loss/boundary"], rel=1e-5)


def test_window_frames_cut_a_video_into_its_decoded_windows():
    from astrolabe_rl.train.streaming import window_frames

    assert window_frames(12, 6, 4) == [(0, 21), (21, 45)]  # Wan: latent 0 -> 1 frame, each later one -> 4
    assert window_frames(45, 9, 1) == [(0, 9), (9, 18), (18, 27), (27, 36), (36, 45)]
    assert window_frames(20, 9, 1) == [(0, 9), (9, 18)]  # the partial last window is dropped


def test_streaming_evaluation_scores_the_videos_window_by_window(tmp_path, _single_process):
    from astrolabe_rl.rewards.base import score_all
    from astrolabe_rl.train import recipe
    from astrolabe_rl.train.streaming import window_frames

    world = recipe.setup(_streaming_cfg(tmp_path, "rollout.num_frames=12", "data.eval_inline=[a red ball]"))
    metrics = recipe.evaluate(world)
    world.logger.close()
    with world.policy.ema_sampling_model() as model:
        ((_, _, videos),) = recipe.sample_videos(world, model, world.io.encode(["a red ball"]), [0])
    windows = window_frames(12, 6, world.family.temporal_stride)
    assert len(windows) == 2 and videos.shape[1] == windows[-1][1]
    got = [score_all(world.rewards, videos[:, a:b], ["a red ball"])[0]["sharpness"] for a, b in windows]
    assert metrics["eval/reward/sharpness"] == pytest.approx(float(torch.stack(got).mean()), rel=1e-5)
    assert metrics["eval/last_window/reward/sharpness"] == pytest.approx(float(got[-1]), rel=1e-5)
    assert "eval/last_window/reward/total" in metrics and "eval/kl_base" in metrics
