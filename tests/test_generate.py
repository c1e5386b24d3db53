"""`astrolabe generate`: scene schedules, the real-model pipeline on tiny stand-in files, mp4 output, missing files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from astrolabe_rl import cli
from astrolabe_rl.generate import GenerateError, Scene, latent_frame_at, parse_prompt_line, switch_frames
from astrolabe_rl.models import FAMILIES, CausalWan, WanConfig, get_family

pytest.importorskip("diffusers")
pytest.importorskip("av")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


# ------------------------------------------------------------------------------------------- scene schedules


def test_parse_scene_lines():
    assert parse_prompt_line("a corgi surfing") == [Scene("a corgi surfing", None)]
    assert parse_prompt_line(" scene one [10s] | scene two [ 2.5 s ]|scene three") == [
        Scene("scene one", 10.0), Scene("scene two", 2.5), Scene("scene three", None)]
    with pytest.raises(GenerateError, match="empty scene"):
        parse_prompt_line("a [10s] | | b")


def test_switch_times_become_block_boundaries():
    scenes = parse_prompt_line("one [10s] | two [10s] | three")
    assert latent_frame_at(10.0) == 40 and latent_frame_at(0) == 0 and latent_frame_at(0.25) == 1
    # LongLive's interactive config switches at latent frames 40, 80: frame-wise blocks land there exactly.
    frame_wise = get_family("causal_forcing_frame").sampler
    assert switch_frames(scenes, frame_wise, 240) == [0, 40, 80]
    chunk = get_family("longlive").sampler_for(240)
    assert switch_frames(scenes, chunk, 240) == [0, 39, 81]  # 40 -> 39 and 80 -> 81, the nearest 3-frame starts


@pytest.mark.parametrize("line, frames, message", [
    ("one | two", 21, "needs a duration"),
    ("one [10s] | two", 21, "after the video ends"),
    ("one [0.1s] | two", 21, "not after the previous scene"),
])
def test_bad_schedules_say_what_to_change(line, frames, message):
    with pytest.raises(GenerateError, match=message):
        switch_frames(parse_prompt_line(line), get_family("self_forcing").sampler, frames)


# ------------------------------------------------------------------------------------------- tiny, end to end


def _run(*args: str) -> None:
    assert cli.main(["generate", "--quiet", *args]) == 0


def test_tiny_writes_a_playable_mp4_matching_the_latent_decode(tmp_path):
    from astrolabe_rl.models.vae import WanVAE, random_vae, tiny_vae_config
    from astrolabe_rl.video import read_mp4

    exe = [shutil.which("astrolabe")] if shutil.which("astrolabe") else [sys.executable, "-m", "astrolabe_rl.cli"]
    proc = subprocess.run(
        [*exe, "generate", "--model", "tiny", "--frames", "9", "--seed", "3", "--prompts", str(_prompts(tmp_path)),
         "--out", str(tmp_path / "v.mp4"), "--latents-out", str(tmp_path / "z.safetensors"), "--quiet"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["videos"] == [str(tmp_path / "v" / "a red ball rolling to the right-0.mp4"),
                                 str(tmp_path / "v" / "a blue cube-0.mp4")]

    latents = load_file(tmp_path / "z.safetensors")["latents"]
    decoded = WanVAE(random_vae(tiny_vae_config(), seed=0)).decode_reference(latents)  # [2, 9, 3, 64, 64]
    # The random VAE paints pixel-level noise, which yuv420p's chroma subsampling cannot keep: compare 8×8 means.
    pooled = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # noqa: E731
    for i, path in enumerate(summary["videos"]):
        frames, fps = read_mp4(path)
        assert fps == 16 and frames.shape == (9, 3, 64, 64)
        own = (pooled(frames) - pooled(decoded[i])).abs().mean()
        assert own < 0.015, own
        assert own < 0.5 * (pooled(frames) - pooled(decoded[1 - i])).abs().mean()  # this video, not the other one


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red ball rolling to the right\n\n a blue cube \n")
    return path


def test_scene_switch_changes_only_the_frames_after_it(tmp_path):
    common = ["--model", "tiny", "--latent-frames", "9", "--seed", "5", "--batch", "2"]
    _run(*common, "--prompt", "a red ball", "--latents-out", str(tmp_path / "one.safetensors"))
    # 0.5 s = pixel frame 8 = latent frame 2 -> the block starting at latent frame 3
    _run(*common, "--prompt", "a red ball [0.5s] | a blue cube", "--latents-out", str(tmp_path / "two.safetensors"))
    one, two = (load_file(tmp_path / f"{n}.safetensors")["latents"] for n in ("one", "two"))
    assert torch.equal(one[:, :3], two[:, :3])
    assert (one[:, 3:] - two[:, 3:]).abs().amax() > 1e-3  # the random tiny DiT listens to text only weakly


# ------------------------------------------------------------------------------------------- the real-model path


@pytest.fixture
def fake_wan(tmp_path, monkeypatch):
    """A Wan2.1 folder (original umT5 .pth + tokenizer, diffusers VAE) and a Self-Forcing checkpoint, all tiny,
    with the self_forcing preset shrunk to the tiny geometry: `generate` runs its real-model code path."""
    from astrolabe_rl.models.text import hf_to_wan_t5, tiny_umt5_encoder
    from astrolabe_rl.models.vae import random_vae, tiny_vae_config

    cfg = WanConfig.tiny()
    family = replace(get_family("self_forcing"), model=cfg, latent_hw=(8, 8), horizon_frames=9)
    monkeypatch.setitem(FAMILIES, "self_forcing", family)
    wan = tmp_path / "wan"
    text = tiny_umt5_encoder(["a", "red", "ball"], d_model=cfg.text_dim, text_len=cfg.text_len)
    wan.mkdir()
    torch.save(hf_to_wan_t5(text.model.state_dict()), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    text.tokenizer.save_pretrained(wan / "google" / "umt5-xxl")
    random_vae(tiny_vae_config(), seed=1).save_pretrained(wan / "vae")
    torch.manual_seed(2)
    dit = CausalWan(cfg)
    torch.save({"generator_ema": {"model." + k: v for k, v in dit.state_dict().items()}}, tmp_path / "sf.pt")
    return tmp_path


def test_real_model_path_with_tiny_files(fake_wan, monkeypatch):
    import astrolabe_rl.models.text as text

    loads = []
    real_load = text.load_umt5
    monkeypatch.setattr(text, "load_umt5", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    common = ["--model", "self_forcing", "--checkpoint", str(fake_wan / "sf.pt"), "--wan-dir", str(fake_wan / "wan"),
              "--frames", "9", "--prompt", "a red ball", "--text-cache", str(fake_wan / "cache")]
    _run(*common, "--out", str(fake_wan / "a.mp4"), "--latents-out", str(fake_wan / "a.safetensors"))
    _run(*common, "--latents-out", str(fake_wan / "b.safetensors"))
    assert loads == [1]  # the second run took the prompt from the cache
    assert (fake_wan / "a.mp4").stat().st_size > 1000
    a, b = (load_file(fake_wan / f"{n}.safetensors")["latents"] for n in ("a", "b"))
    assert a.shape == (1, 3, 16, 8, 8) and torch.equal(a, b)


def test_missing_weights_are_listed_with_where_it_looked(tmp_path, capsys):
    rc = cli.main(["generate", "--model", "longlive", "--wan-dir", str(tmp_path / "wan"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "checkpoint: longlive_models/models/longlive_base.pt does not exist" in err
    assert "LoRA: longlive_models/models/lora.pt does not exist" in err
    assert "models_t5_umt5-xxl-enc-bf16.pth" in err and "Wan2.1_VAE.pth" in err
    assert "huggingface-cli download Efficient-Large-Model/LongLive-1.3B" in err


def test_a_wrong_checkpoint_fails_with_the_teaching_error(fake_wan, capsys):
    torch.save({"generator_ema": {"model.head.head.weight": torch.ones(64, 24)}}, fake_wan / "partial.pt")
    rc = cli.main(["generate", "--model", "self_forcing", "--checkpoint", str(fake_wan / "partial.pt"),
                   "--wan-dir", str(fake_wan / "wan"), "--frames", "9", "--quiet", "--out", str(fake_wan / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit the Wan DiT" in err and "missing" in err


def test_toy_model_generates_and_takes_an_adapter(tmp_path):
    """The toy family builds through the same loader as every family: generate, then the same with an adapter."""
    from astrolabe_rl.policy import Policy
    from astrolabe_rl.toy.model import load_toy_model

    prompt = "a large red circle moving left quickly over stripes"
    _run("--model", "toy", "--prompt", prompt, "--latents-out", str(tmp_path / "base.safetensors"))
    pol = Policy(load_toy_model(), rank=4, alpha=4, seed=0)
    for p in pol.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    pol.copy_("old", "default")
    pol.ema = {k: v.detach().clone() for k, v in pol.adapter_params("default").items()}
    pol.save_adapter(tmp_path / "adapter")
    _run("--model", "toy", "--prompt", prompt, "--adapter", str(tmp_path / "adapter"),
         "--latents-out", str(tmp_path / "tuned.safetensors"), "--out", str(tmp_path / "tuned.mp4"))
    base, tuned = (load_file(tmp_path / f"{n}.safetensors")["latents"] for n in ("base", "tuned"))
    assert base.shape == (1, 9, 48, 8, 8) and (base - tuned).abs().amax() > 1e-2
    assert (tmp_path / "tuned.mp4").stat().st_size > 1000
