from dataclasses import replace

import pytest
import torch

from astrolabe_rl.models import CachePolicy, get_family
from astrolabe_rl.models.schedule import renoise, sigma_of, x0_from_velocity
from astrolabe_rl.rollout import NoiseSource, PromptSwitch, rollout

HW = (4, 4)
SF = get_family("self_forcing").sampler
LONGLIVE_TINY = replace(get_family("longlive").sampler, cache=CachePolicy(window_frames=6, sink_frames=3))


def _text(p=2, seed=0):
    return torch.randn(p, 8, 16, generator=torch.Generator().manual_seed(seed))


def test_replay_is_bit_identical_and_seeds_matter(tiny):
    a = rollout(tiny, _text(), num_frames=6, latent_hw=HW, sampler=SF, seeds=[3, 4])
    b = rollout(tiny, _text(), num_frames=6, latent_hw=HW, sampler=SF, seeds=[3, 4])
    c = rollout(tiny, _text(), num_frames=6, latent_hw=HW, sampler=SF, seeds=[5, 6])
    assert torch.equal(a.latents, b.latents)
    assert (a.latents - c.latents).abs().max() > 1e-2
    assert a.latents.shape == (2, 6, 16, 4, 4) and a.seeds == [3, 4]


def test_a_sample_depends_only_on_its_seed_not_its_batch(tiny):
    batch = rollout(tiny, _text(), num_frames=3, latent_hw=HW, sampler=SF, seeds=[10, 11], candidates=1)
    alone = rollout(tiny, _text()[1:], num_frames=3, latent_hw=HW, sampler=SF, seeds=[11])
    torch.testing.assert_close(alone.latents[0], batch.latents[1], atol=1e-5, rtol=0)


def test_candidates_share_the_prompt_and_differ_by_noise(tiny):
    r = rollout(tiny, _text(2), num_frames=3, latent_hw=HW, sampler=SF, seeds=0, candidates=3)
    assert r.latents.shape[0] == 6 and r.seeds == list(range(6))
    # sample p·K + k: candidates of prompt 0 are 0..2; with equal seeds they would be equal
    same = rollout(tiny, _text(2), num_frames=3, latent_hw=HW, sampler=SF, seeds=[7, 7, 7, 8, 8, 8], candidates=3)
    assert torch.equal(same.latents[0], same.latents[1])
    assert not torch.equal(same.latents[0], same.latents[3])
    with pytest.raises(ValueError, match="seeds"):
        rollout(tiny, _text(2), num_frames=3, latent_hw=HW, sampler=SF, seeds=[1, 2], candidates=3)


def test_recorded_traces_replay_the_sampler_exactly(tiny):
    """Re-run every recorded step by hand with a fresh cache: the recorded x_t's are the sampler's inputs."""
    text = _text(1)
    r = rollout(tiny, text, num_frames=6, latent_hw=HW, sampler=SF, seeds=[42], record=True)
    noise = NoiseSource([42], torch.device("cpu"))
    cache = tiny.new_cache(1, HW, 6)
    cache.text = tiny.encode_text(text)
    for trace in r.traces:
        assert trace.timesteps == SF.steps.timesteps
        x = noise.draw((3, 16, 4, 4), torch.float32)
        for k, t_k in enumerate(trace.timesteps):
            assert torch.equal(trace.inputs[:, k], x)
            with torch.no_grad():
                x0 = x0_from_velocity(x, tiny.denoise(cache, x, t_k), sigma_of(t_k))
            if k + 1 < len(trace.timesteps):
                x = renoise(x0, sigma_of(trace.timesteps[k + 1]), noise.draw((3, 16, 4, 4), torch.float32))
        assert torch.equal(r.latents[:, trace.start : trace.end], x0)
        tiny.commit(cache, x0)


def test_first_block_gets_its_own_steps(tiny):
    sampler = get_family("causal_forcing_pp_2step").sampler
    r = rollout(tiny, _text(1), num_frames=3, latent_hw=HW, sampler=sampler, seeds=0, record=True)
    assert [len(t.timesteps) for t in r.traces] == [4, 2, 2]
    assert [t.end - t.start for t in r.traces] == [1, 1, 1]


def test_long_video_through_the_rolling_cache(tiny, monkeypatch):
    sizes = []
    new_cache = tiny.new_cache
    monkeypatch.setattr(tiny, "new_cache", lambda *a, **k: sizes.append(new_cache(*a, **k)) or sizes[-1])
    r = rollout(tiny, _text(1), num_frames=60, latent_hw=HW, sampler=LONGLIVE_TINY, seeds=0)
    assert r.latents.shape[1] == 60 and torch.isfinite(r.latents).all()
    assert sizes[0].k[0].shape[1] == 6 * 4  # the cache holds the window, not the video


def test_global_family_beyond_its_horizon_rolls():
    fam = get_family("self_forcing")
    assert not fam.sampler_for(21).cache.rolling
    assert fam.sampler_for(240).cache == CachePolicy(window_frames=21)
    assert get_family("longlive").sampler_for(240).cache == CachePolicy(window_frames=12, sink_frames=3)
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("sora")


def test_history_is_committed_first_and_conditions_the_continuation(tiny):
    text = _text(1)
    hist = torch.randn(1, 6, 16, 4, 4)
    r = rollout(tiny, text, num_frames=3, latent_hw=HW, sampler=SF, seeds=[1], history=hist)
    assert r.start_frame == 6 and r.latents.shape[1] == 3
    # reference: commit the history block by block, then sample the block at frame 6
    noise = NoiseSource([1], torch.device("cpu"))
    cache = tiny.new_cache(1, HW, 9)
    cache.text = tiny.encode_text(text)
    tiny.commit(cache, hist[:, :3])
    tiny.commit(cache, hist[:, 3:])
    x = noise.draw((3, 16, 4, 4), torch.float32)
    steps = SF.steps.timesteps
    for k, t_k in enumerate(steps):
        with torch.no_grad():
            x0 = x0_from_velocity(x, tiny.denoise(cache, x, t_k), sigma_of(t_k))
        if k + 1 < len(steps):
            x = renoise(x0, sigma_of(steps[k + 1]), noise.draw((3, 16, 4, 4), torch.float32))
    torch.testing.assert_close(r.latents, x0, atol=1e-5, rtol=0)
    other = rollout(tiny, text, num_frames=3, latent_hw=HW, sampler=SF, seeds=[1], history=hist + 1)
    assert (other.latents - r.latents).abs().max() > 1e-3


def _spy_commits(model, monkeypatch):
    calls = []
    commit = model.commit

    def spy(cache, x0, start_frame=None, **kw):
        calls.append((start_frame, x0.shape[1], cache.text[0][0].clone()))
        return commit(cache, x0, start_frame=start_frame, **kw)

    monkeypatch.setattr(model, "commit", spy)
    return calls


def test_prompt_switch_resets_cross_attention_and_recaches_the_window(tiny, monkeypatch):
    old, new = _text(1, seed=1), _text(1, seed=2)
    calls = _spy_commits(tiny, monkeypatch)
    rollout(tiny, old, num_frames=18, latent_hw=HW, sampler=LONGLIVE_TINY, seeds=0,
            switches=[PromptSwitch(12, new)])
    new_k = tiny.encode_text(new)[0][0]
    old_k = tiny.encode_text(old)[0][0]
    starts = [(s, n) for s, n, _ in calls]
    # blocks 0..3 under the old prompt, then the re-cache of the window (sink kept: W - S = 3 frames at 9),
    # then blocks 4..5 under the new prompt
    assert starts == [(0, 3), (3, 3), (6, 3), (9, 3), (9, 3), (12, 3), (15, 3)]
    assert all(torch.equal(k, old_k) for _, _, k in calls[:4])
    assert all(torch.equal(k, new_k) for _, _, k in calls[4:])


def test_prompt_switch_without_kept_sink_recaches_sink_and_window(tiny, monkeypatch):
    calls = _spy_commits(tiny, monkeypatch)
    sampler = replace(LONGLIVE_TINY, keep_sink_on_switch=False)
    rollout(tiny, _text(1), num_frames=18, latent_hw=HW, sampler=sampler, seeds=0,
            switches=[PromptSwitch(12, _text(1, seed=5))])
    assert [(s, n) for s, n, _ in calls][4] == (6, 6)  # the whole window (6 frames) re-encoded in one call


def test_switch_to_the_same_prompt_changes_nothing_and_recache_matters(tiny):
    # window 9 with sink 3: a 3-frame block sees the sink and the 3 frames before it, so the re-cache shows
    sampler = replace(LONGLIVE_TINY, cache=CachePolicy(window_frames=9, sink_frames=3))
    text, other = _text(1, seed=1), _text(1, seed=2)

    def run(switch_text=None, **kw):
        switches = [PromptSwitch(6, switch_text)] if switch_text is not None else []
        return rollout(tiny, text, num_frames=12, latent_hw=HW, sampler=replace(sampler, **kw), seeds=0,
                       switches=switches).latents

    base = run()
    # re-encoding under the same prompt block by block rebuilds the same cache; LongLive's unmasked re-cache does not
    torch.testing.assert_close(run(text, recache_mask="block_causal"), base, atol=1e-4, rtol=0)
    assert (run(text)[:, 6:] - base[:, 6:]).abs().max() > 1e-3
    with_recache, no_recache = run(other), run(other, recache_on_switch=False)
    torch.testing.assert_close(with_recache[:, :6], base[:, :6], atol=0, rtol=0)
    assert (with_recache[:, 6:] - base[:, 6:]).abs().max() > 1e-3
    assert (with_recache[:, 6:] - no_recache[:, 6:]).abs().max() > 1e-4


def test_switch_must_fall_on_a_block_boundary(tiny):
    with pytest.raises(ValueError, match="not the start of a generated block"):
        rollout(tiny, _text(1), num_frames=9, latent_hw=HW, sampler=SF, seeds=0,
                switches=[PromptSwitch(4, _text(1))])


# ------------------------------------------------------------------------------------------------ streaming windows


@pytest.mark.parametrize("sampler", [SF, LONGLIVE_TINY], ids=["global", "rolling+sink"])
def test_window_candidates_share_one_history_and_continue_it(tiny, sampler):
    from astrolabe_rl.rollout import rollout_window

    text = _text(2)
    w = rollout_window(tiny, text, start=9, window=6, latent_hw=HW, sampler=sampler, history_seeds=[7, 8],
                       seeds=[1, 2, 3, 4, 5, 6], candidates=3)
    chunked = rollout_window(tiny, text, start=9, window=6, latent_hw=HW, sampler=sampler, history_seeds=[7, 8],
                             seeds=[1, 2, 3, 4, 5, 6], candidates=3, micro_batch=4)
    torch.testing.assert_close(chunked.latents, w.latents, atol=1e-6, rtol=0)  # chunks straddle the two prompts
    assert w.history.shape == (2, 9, 16, 4, 4) and w.latents.shape == (6, 6, 16, 4, 4) and w.start == 9
    # the history is each prompt's own rollout (its seed), generated once
    whole = rollout(tiny, text, num_frames=9, latent_hw=HW, sampler=sampler, seeds=[7, 8])
    assert torch.equal(w.history, whole.latents)
    # every candidate continues exactly that history: the same as extending the video from it with its own seed
    for i in range(6):
        alone = rollout(tiny, text[i // 3 : i // 3 + 1], num_frames=6, latent_hw=HW, sampler=sampler, seeds=[i + 1],
                        history=w.history[i // 3 : i // 3 + 1])
        torch.testing.assert_close(w.latents[i], alone.latents[0], atol=1e-5, rtol=0)
    assert (w.latents[0] - w.latents[1]).abs().max() > 1e-2  # candidates differ by their noise


def test_window_must_start_on_a_block_and_seeds_must_match(tiny):
    from astrolabe_rl.rollout import rollout_window

    kw = dict(latent_hw=HW, sampler=SF, history_seeds=[0], seeds=[1, 2], candidates=2)
    with pytest.raises(ValueError, match="not a block start"):
        rollout_window(tiny, _text(1), start=4, window=5, **kw)
    with pytest.raises(ValueError, match="history seeds"):
        rollout_window(tiny, _text(1), start=3, window=3, **{**kw, "seeds": [1]})
