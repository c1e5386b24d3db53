import pytest
import torch

from astrolabe_rl.models import CausalWan, WanConfig
from astrolabe_rl.policy import Policy, merge_lora

X = torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))


def _policy(rank=4, alpha=8.0):
    torch.manual_seed(0)
    return Policy(CausalWan(WanConfig.tiny()), rank=rank, alpha=alpha)


def _out(model):
    with torch.no_grad():
        return model(X, 500.0, TEXT, frames_per_block=3)


def _perturb(params, scale=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_lora_on_every_block_linear_and_only_default_trains():
    pol = _policy()
    names = {n for n, p in pol.model.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 10 * 2  # A and B × 10 linears × 2 blocks
    assert all(".default." in n and ".lora_" in n for n in names)
    assert not any("norm_q.lora" in n or "norm_k.lora" in n for n, _ in pol.model.named_parameters())


def test_adapters_start_at_the_base_and_switch_cleanly():
    pol = _policy()
    torch.manual_seed(0)
    base = _out(CausalWan(WanConfig.tiny()))
    torch.testing.assert_close(_out(pol.model), base, atol=0, rtol=0)  # B = 0: LoRA starts as identity
    _perturb(pol.adapter_params("default"))
    with pol.use("old") as m:
        old = _out(m)
    with pol.use("base") as m:
        ref = _out(m)
    torch.testing.assert_close(old, base, atol=0, rtol=0)
    torch.testing.assert_close(ref, base, atol=0, rtol=0)
    assert (_out(pol.model) - base).abs().max() > 1e-3
    trainable = {n for n, p in pol.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # switching back restored requires_grad


def test_soft_update_moves_old_by_the_scheduled_amount():
    pol = _policy()
    _perturb(pol.adapter_params("default"))
    before = {k: v.clone() for k, v in pol.adapter_params("old").items()}
    theta = {k: v.clone() for k, v in pol.adapter_params("default").items()}
    pol.soft_update("old", 0.3)
    for k, p in pol.adapter_params("old").items():
        torch.testing.assert_close(p, 0.3 * before[k] + 0.7 * theta[k])


def test_ema_swap_restores_the_trained_weights():
    pol = _policy()
    _perturb(pol.adapter_params("default"))
    trained = _out(pol.model)
    with pol.ema_weights() as m:
        ema_out = _out(m)
    torch.testing.assert_close(_out(pol.model), trained, atol=0, rtol=0)
    assert (ema_out - trained).abs().max() > 1e-3  # the EMA is still the initial adapter


def test_state_dict_round_trip_and_mismatch_error():
    pol = _policy()
    _perturb(pol.adapter_params("default"))
    state = pol.state_dict()
    other = _policy()
    other.load_state_dict(state)
    torch.testing.assert_close(_out(other.model), _out(pol.model), atol=0, rtol=0)
    with pytest.raises(ValueError, match="check lora.rank"):
        _policy(rank=8).load_state_dict(state)


def test_saved_adapter_loads_in_peft_and_merges_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    pol = _policy()
    _perturb(pol.adapter_params("default"))
    expected = _out(pol.model)
    pol.save_adapter(tmp_path / "adapter", weights="default")
    torch.manual_seed(0)
    base = CausalWan(WanConfig.tiny())
    peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_out(base), expected, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    merged = merge_lora(CausalWan(WanConfig.tiny()), tmp_path / "adapter")
    assert isinstance(merged, CausalWan) and not any(".lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(_out(merged), expected, atol=1e-5, rtol=0)


def test_warm_start_from_a_lora_file(tmp_path):
    pol = _policy()
    _perturb(pol.adapter_params("default"))
    pol.save_adapter(tmp_path / "a", weights="default")
    fresh = _policy()
    fresh.load_adapter(tmp_path / "a")
    torch.testing.assert_close(_out(fresh.model), _out(pol.model), atol=0, rtol=0)
    with fresh.use("old") as m:
        torch.testing.assert_close(_out(m), _out(pol.model), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError):
        fresh.load_adapter(tmp_path / "missing")


def test_seeded_adapter_init_is_reproducible_and_leaves_the_global_generator_alone():
    def lora_a(seed, global_seed):
        torch.manual_seed(0)
        base = CausalWan(WanConfig.tiny())  # same base weights each time
        torch.manual_seed(global_seed)  # the global generator's state must not matter when a seed is given
        pol = Policy(base, rank=4, alpha=8.0, seed=seed)
        return {k: v.clone() for k, v in pol.adapter_params("default").items() if "lora_A" in k}

    a, b, c = lora_a(7, 123), lora_a(7, 456), lora_a(8, 123)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(5)
    Policy(CausalWan(WanConfig.tiny()), rank=4, alpha=8.0, seed=1)
    after_model = torch.rand(3)
    torch.manual_seed(5)
    CausalWan(WanConfig.tiny())
    assert torch.equal(after_model, torch.rand(3))  # only the model's own init consumed the global generator


def _rollout(model, seeds=(0, 1)):
    from astrolabe_rl.models import get_family
    from astrolabe_rl.rollout import rollout

    return rollout(model, TEXT.expand(2, -1, -1), num_frames=6, latent_hw=(4, 4),
                   sampler=get_family("self_forcing").sampler, seeds=list(seeds)).latents


def test_merged_sampling_copy_generates_what_the_unmerged_adapter_generates():
    policy = _policy()
    _perturb(policy.adapter_params("old"))  # lora_B starts at zero: make the adapter matter
    with policy.use("old") as model:
        unmerged = _rollout(model)
    merged = _rollout(policy.sampling_model())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    with policy.use("base") as model:
        assert (_rollout(model) - unmerged).abs().max() > 1e-3  # the adapter changes the videos
    assert not any(p.requires_grad for p in policy.sampling_model().parameters())
    assert not any(".lora_" in n for n, _ in policy.sampling_model().named_parameters())


def test_sampling_copy_follows_every_change_of_old():
    policy = _policy()
    copy = policy.sampling_model()
    for change in (
        lambda: (_perturb(policy.adapter_params("default"), seed=5), policy.soft_update("old", 0.5)),
        lambda: policy.load_state_dict({**policy.state_dict(), "old": {
            k: v + 0.05 for k, v in policy.state_dict()["old"].items()}}),
        lambda: policy.copy_("old", "default"),
    ):
        before = [p.clone() for p in copy.parameters()]
        change()
        assert policy.sampling_model() is copy  # refreshed in place: compiled code and CUDA graphs stay valid
        assert any(not torch.equal(a, b) for a, b in zip(before, copy.parameters()))
        with policy.use("old") as model:
            torch.testing.assert_close(_out(copy), _out(model), atol=1e-5, rtol=0)


def test_lora_computes_in_bf16_with_fp32_master_weights():
    torch.manual_seed(0)
    policy = Policy(CausalWan(WanConfig.tiny()).to(torch.bfloat16), rank=4, alpha=8.0)
    params = policy.trainable_parameters()
    assert all(p.dtype == torch.float32 for p in params)
    _perturb(policy.adapter_params("default"))
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
             for n, m in policy.model.named_modules() if n.endswith("lora_A.default")]
    out = policy.model(X.bfloat16(), 500.0, TEXT.bfloat16(), frames_per_block=3)
    for h in hooks:
        h.remove()
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0
    assert policy.sampling_model().dtype == torch.bfloat16


def test_the_ema_sampling_copy_generates_what_the_ema_adapter_generates():
    """Evaluation samples through the sampling copy with the EMA folded in; θ_old is back for the next rollout."""
    from astrolabe_rl.models import get_family
    from astrolabe_rl.rollout import rollout

    fam = get_family("tiny")
    torch.manual_seed(0)
    pol = Policy(CausalWan(fam.model), rank=4, alpha=8, seed=0)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(std=0.05)
    pol.update_ema(0.0)  # EMA = θ
    pol.soft_update("old", 0.5)  # θ_old ≠ θ
    text = torch.randn(2, fam.model.text_len, fam.model.text_dim)
    go = lambda m: rollout(m, text, num_frames=3, latent_hw=fam.latent_hw, sampler=fam.sampler, seeds=[1, 2]).latents  # noqa: E731
    with torch.no_grad():
        old = go(pol.sampling_model())
        with pol.ema_weights() as m:
            ema_ref = go(m)
        with pol.ema_sampling_model() as m:
            ema = go(m)
        again = go(pol.sampling_model())
    assert torch.allclose(ema, ema_ref, atol=1e-5) and (ema - old).abs().amax() > 1e-4
    assert torch.equal(again, old)
