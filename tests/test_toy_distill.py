"""toy.distill: the DMD generator gradient, the self-forcing rollout's gradient path, and a resumable end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from astrolabe_rl.models.families import get_family
from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.toy import distill
from astrolabe_rl.toy.model import FM_WEIGHTS, WEIGHTS
from astrolabe_rl.toy.text import ToyTextEncoder

PROMPTS = ["a large red circle moving right quickly over stripes", "a small blue square moving up slowly over checks"]


def _random_model(seed: int) -> CausalWan:
    torch.manual_seed(seed)
    model = CausalWan(get_family("toy").model)
    with torch.no_grad():  # Wan's zero-initialised head would make every velocity 0
        model.head.head.weight.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    teacher, critic = _random_model(1), _random_model(2)
    text = ToyTextEncoder()(PROMPTS)
    x_hat = torch.randn(2, 9, 48, 8, 8).requires_grad_(True)
    loss, _ = distill.dmd_loss(x_hat, teacher, critic, text, torch.Generator().manual_seed(5))
    loss.backward()
    # the same draws, by hand (`distillation.md` §3): grad = (x0_fake − x0_real) / mean|x̂ − x0_real|, over numel
    sigma, _, x_t = distill._perturb(x_hat.detach(), torch.Generator().manual_seed(5))
    x0 = {name: x_t - sigma.float()[:, None, None, None, None] * distill.teacher_velocity(m, x_t, sigma, text)
          for name, m in (("real", teacher), ("fake", critic))}
    norm = (x_hat.detach() - x0["real"]).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (x0["fake"] - x0["real"]) / norm / x_hat.numel()
    torch.testing.assert_close(x_hat.grad, expected, atol=1e-9, rtol=1e-4)
    assert x_hat.grad.abs().max() > 0


def test_self_forcing_rollout_keeps_gradient_only_at_the_exit_step():
    student = _random_model(3).requires_grad_(True)
    text = ToyTextEncoder()(PROMPTS)
    with torch.no_grad():
        reference = distill.self_forcing_rollout(student, text, 2, 2, torch.Generator().manual_seed(0))
    out = distill.self_forcing_rollout(student, text, 2, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.detach(), reference, atol=1e-5, rtol=0)  # gradients change nothing in value
    assert out.shape == (2, 9, 48, 8, 8) and out.requires_grad
    out.square().mean().backward()
    assert student.head.head.weight.grad.abs().sum() > 0
    # exit step 0 of every block starts from pure noise: a different exit step gives other samples
    with torch.no_grad():
        early = distill.self_forcing_rollout(student, text, 2, 0, torch.Generator().manual_seed(0))
    assert (early - reference).abs().max() > 1e-3


@pytest.mark.skipif(not (FM_WEIGHTS.is_file() or WEIGHTS.is_file()), reason="no shipped toy weights to start from")
def test_distillation_runs_and_resumes_bit_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    base = FM_WEIGHTS if FM_WEIGHTS.is_file() else WEIGHTS
    tiny = ["--teacher-steps", "1", "--ode-pairs", "2", "--ode-steps", "4", "--ode-train-steps", "2", "--dmd-iters",
            "4", "--batch", "1", "--dmd-batch", "1", "--ema-start", "1", "--save-every", "1", "--log-every", "1",
            "--base", str(base)]
    full = tmp_path / "full"
    assert distill.main(tiny + ["--work", str(full), "--out", str(full / "student.safetensors")]) == 0
    record = json.loads((full / "student.json").read_text())
    assert {"recipe", "teacher", "ode_regression", "dmd", "wall_s", "model"} <= set(record)
    assert record["recipe"]["dmd_iters"] == 4 and len(record["dmd"]["curve"]) == 4

    real, calls = distill.critic_loss, []

    def dies_at_the_third_critic_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    cut = tmp_path / "cut"
    args = tiny + ["--work", str(cut), "--out", str(cut / "student.safetensors")]
    monkeypatch.setattr(distill, "critic_loss", dies_at_the_third_critic_step)
    with pytest.raises(KeyboardInterrupt):
        distill.main(args)
    monkeypatch.setattr(distill, "critic_loss", real)
    assert distill.main(args) == 0
    a, b = load_file(full / "student.safetensors"), load_file(cut / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the student moved away from its start (the ODE regression and DMD steps did something)
    start = load_file(base)
    assert any(not torch.equal(a[k], start[k]) for k in a)


def test_a_long_rollout_trains_only_its_last_window():
    """Self-Forcing++: the rollout runs 15 frames through toy_long's rolling cache; only the last 9 come back, and
    only their exit calls carry gradient. The clip rollout (the default) is the 9-frame case of the same code."""
    student = _random_model(3).requires_grad_(True)
    text = ToyTextEncoder()(PROMPTS)
    with torch.no_grad():
        clip = distill.self_forcing_rollout(student, text, 2, 1, torch.Generator().manual_seed(0))
        same = distill.self_forcing_rollout(student, text, 2, 1, torch.Generator().manual_seed(0), 9, "toy_long")
    torch.testing.assert_close(same, clip, atol=0, rtol=0)  # 9 frames fit the rolling window: nothing is evicted
    out = distill.self_forcing_rollout(student, text, 2, 1, torch.Generator().manual_seed(0), 15, "toy_long")
    assert out.shape == (2, 9, 48, 8, 8) and out.requires_grad
    out.square().mean().backward()
    assert student.head.head.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="no shipped toy student to extend")
def test_long_extension_runs_and_records_its_recipe(tmp_path):
    work = tmp_path / "long"
    assert distill.main(["--long", "--smoke", "--work", str(work), "--out", str(work / "long.safetensors")]) == 0
    record = json.loads((work / "long.json").read_text())
    assert record["recipe"]["long_frames"] == 15 and record["recipe"]["base"] == WEIGHTS.name
    assert "Self-Forcing++" in record["kind"] and "long bouncing videos" in record["teacher"]["data"]
    with pytest.raises(ValueError, match="--long-frames"):
        distill.main(["--long", "--smoke", "--long-frames", "10", "--work", str(tmp_path / "bad")])
