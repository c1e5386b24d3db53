"""One way to build a model (`models.build`): every family through its loader, the toy one registered from outside
`models`, adapters folded in, and a command line that starts without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from astrolabe_rl.models import build, get_family


def test_models_never_imports_the_toy_world_and_its_preset_matches_it():
    code = "import sys, astrolabe_rl.models; print('astrolabe_rl.toy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from astrolabe_rl.toy import text, vae

    cfg = get_family("toy").model
    assert (cfg.in_dim, cfg.out_dim, cfg.text_dim, cfg.text_len) == (vae.CHANNELS, vae.CHANNELS, text.TEXT_DIM,
                                                                      text.TEXT_LEN)


def test_help_starts_without_torch():
    code = "import sys; from astrolabe_rl import cli; cli.build_parser(['--help']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_each_family_builds_its_three_parts(name):
    family = get_family(name)
    io = build.load_model_io(family, build.ModelSource())
    text = io.encode(["a large red circle moving left quickly over stripes"])
    assert text.shape == (1, family.model.text_len, family.model.text_dim)
    latents = torch.randn(1, 3, family.model.in_dim, *family.latent_hw)
    whole = io.decode(latents)
    stream = io.decoder.stream()
    assert torch.allclose(torch.cat([stream(latents[:, :1]), stream(latents[:, 1:])], 1), whole, atol=1e-5)
    assert not any(p.requires_grad for p in io.model.parameters())


def test_tiny_weights_are_a_function_of_the_seed_and_leave_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a = build.build_dit(get_family("tiny"), build.ModelSource(init_seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build.build_dit(get_family("tiny"), build.ModelSource(init_seed=3))
    c = build.build_dit(get_family("tiny"), build.ModelSource(init_seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.head.weight, c.head.head.weight)


def test_an_adapter_path_may_be_a_run_a_checkpoint_or_a_peft_folder(tmp_path):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    assert build.resolve_adapter(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert build.resolve_adapter(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter"
    with pytest.raises(build.ModelFilesError, match="no adapter at"):
        build.resolve_adapter(tmp_path / "nothing")
