"""`astrolabe generate` end to end in a subprocess, as a user runs it."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from astrolabe_rl.generate import latent_frames_for


def _generate(tmp_path, name, *extra):
    out = tmp_path / f"{name}.safetensors"
    exe = [shutil.which("astrolabe")] if shutil.which("astrolabe") else [sys.executable, "-m", "astrolabe_rl.cli"]
    proc = subprocess.run(
        [*exe, "generate", "--preset", "tiny", "--frames", "9", "--latents-out", str(out), "--quiet", *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return load_file(out)["latents"]


def test_generate_is_deterministic_per_seed(tmp_path):
    a = _generate(tmp_path, "a", "--seed", "0")
    b = _generate(tmp_path, "b", "--seed", "0")
    c = _generate(tmp_path, "c", "--seed", "1")
    assert a.shape == (1, 3, 16, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_generate_reports_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "astrolabe_rl.cli", "generate", "--preset", "tiny", "--prompts",
         str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "does not exist" in proc.stderr


@pytest.mark.parametrize("pixel, fpb, first, latent", [(81, 3, None, 21), (9, 3, None, 3), (960, 3, None, 240),
                                                       (240, 3, None, 60), (10, 3, None, 3), (13, 3, None, 6), (81, 1, None, 21)])
def test_pixel_to_latent_frames(pixel, fpb, first, latent):
    assert latent_frames_for(pixel, fpb, first) == latent
