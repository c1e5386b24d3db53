"""The Wan VAE wrapper: normalisation, fast and streaming decode == diffusers' decode, encode, checkpoint layouts."""

from __future__ import annotations

import math
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from astrolabe_rl.models.loading import CheckpointError  # noqa: E402
from astrolabe_rl.models.vae import (  # noqa: E402
    LATENTS_MEAN,
    LATENTS_STD,
    WanVAE,
    load_vae,
    pixel_frames,
    random_vae,
    tiny_vae_config,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


@pytest.fixture(scope="module")
def model():
    return random_vae(tiny_vae_config(), seed=0)


@pytest.fixture
def latents() -> torch.Tensor:
    """Normalised latents ``[B=2, F=7, 16, 4, 6]`` (non-square: catches an h/w mix-up)."""
    return torch.randn(2, 7, 16, 4, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(model):
    z = torch.randn(2, 7, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    return WanVAE(model).decode_reference(z)


def test_official_constants_and_normalisation(model, latents):
    with torch.device("meta"):
        default = diffusers.AutoencoderKLWan()
    assert tuple(default.config.latents_mean) == LATENTS_MEAN and tuple(default.config.latents_std) == LATENTS_STD
    vae = WanVAE(model)
    raw = vae.denormalize(latents)
    mean, std = torch.tensor(LATENTS_MEAN), torch.tensor(LATENTS_STD)
    torch.testing.assert_close(raw[:, :, 3], latents[:, :, 3] * std[3] + mean[3])
    torch.testing.assert_close(vae.normalize(raw), latents)


def test_reference_decode_shape_and_range(reference):
    assert reference.shape == (2, pixel_frames(7), 3, 32, 48) == (2, 25, 3, 32, 48)
    assert reference.min() >= 0 and reference.max() <= 1 and reference.std() > 1e-3


@pytest.mark.parametrize("chunk, channels_last", [(1, False), (2, False), (3, False), (7, False), (3, True)])
def test_fast_decode_equals_diffusers_decode(model, latents, reference, chunk, channels_last):
    fast = WanVAE(random_vae(tiny_vae_config(), seed=0), chunk_frames=chunk, channels_last=channels_last)
    torch.testing.assert_close(fast.decode(latents), reference, rtol=0, atol=2e-5)


@pytest.mark.parametrize("blocks", [[(0, 3), (3, 6), (6, 7)], [(0, 1), (1, 4), (4, 7)], [(0, 2), (2, 7)]])
def test_streaming_decode_equals_whole_video_decode(model, latents, reference, blocks):
    decoder = WanVAE(model, chunk_frames=2).stream()
    pieces = [decoder(latents[:, s:e]) for s, e in blocks]
    assert [p.shape[1] for p in pieces] == [pixel_frames(blocks[0][1])] + [4 * (e - s) for s, e in blocks[1:]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=0, atol=2e-5)


def test_encode_matches_diffusers_and_normalises(model):
    vae = WanVAE(model)
    frames = torch.rand(1, 9, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    z = vae.encode(frames)
    assert z.shape == (1, 3, 16, 4, 2)
    raw = model.encode(frames.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode().permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(vae.denormalize(z), raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        vae.encode(torch.rand(1, 8, 3, 32, 16))


def test_changed_private_api_fails_clearly(model, monkeypatch):
    def forward(self, x, feat_cache=None):  # a future decoder without feat_idx / first_chunk
        return x

    monkeypatch.setattr(type(model.decoder), "forward", forward)
    with pytest.raises(RuntimeError, match=r"written against diffusers 0\.42\.1.*decode_reference"):
        WanVAE(model).stream()


# ----------------------------------------------------------------------------------- checkpoint layouts


def to_original_names(key: str) -> str:
    """diffusers AutoencoderKLWan name -> the original Wan2.1 VAE name (module tree of ``wan/modules/vae.py``:
    flat ``downsamples`` / ``upsamples`` lists, ``middle.{0,1,2}``, ``head.{0,2}``, ``residual.{0,2,3,6}``)."""
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
              "conv2": "residual.6", "conv_shortcut": "shortcut"}

    def res(tail: str) -> str:
        for new, old in resnet.items():
            if tail.startswith(new + ".") or tail == new:
                return old + tail[len(new):]
        return tail

    key = re.sub(r"^quant_conv\.", "conv1.", key)
    key = re.sub(r"^post_quant_conv\.", "conv2.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
    if m := re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)$", key):
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[2], m[3])]
        return f"{m[1]}.middle.{slot}." + (res(m[4]) if m[2] == "resnets" else m[4])
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", key):
        return f"encoder.downsamples.{m[1]}." + res(m[2])
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}." + res(m[3])
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    return key


def test_the_original_layout_covers_the_full_size_vae():
    """diffusers' converter maps the original naming of the *full* VAE's every key back one to one."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        keys = list(diffusers.AutoencoderKLWan().state_dict())
    original = {to_original_names(k): k for k in keys}
    assert len(original) == len(keys)
    assert "decoder.upsamples.4.shortcut.weight" in original and "decoder.middle.1.to_qkv.weight" in original
    back = convert_wan_vae_to_diffusers({k: torch.zeros(1) for k in original})
    assert sorted(back) == sorted(keys)


def test_load_original_pth_file_folder_and_diffusers_layout(tmp_path, model, latents, reference):
    tiny = tiny_vae_config()  # the real geometry is too big for a test; the key layout is the same
    original = {to_original_names(k): v.clone() for k, v in model.state_dict().items()}
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    for path in (tmp_path / "Wan2.1_VAE.pth", tmp_path):
        vae = load_vae(path, config=tiny)
        torch.testing.assert_close(vae.decode(latents), reference, rtol=0, atol=2e-5)

    model.save_pretrained(tmp_path / "diffusers" / "vae")
    torch.testing.assert_close(load_vae(tmp_path / "diffusers").decode(latents), reference, rtol=0, atol=2e-5)

    del original["decoder.upsamples.4.shortcut.weight"]
    torch.save(original, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 of \d+ keys: decoder.up_blocks.1.resnets.0.conv_shortcut"):
        load_vae(tmp_path / "partial.pth", config=tiny)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_vae(tmp_path / "Wan2.1_VAE.pth")  # a tiny file is not the real VAE
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        load_vae(tmp_path / "empty")


def test_rollout_bench_reports_the_decode_split(capsys):
    """``bench/rollout.py --tiny`` times our decode against diffusers' and checks they agree."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).parents[1] / "bench" / "rollout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--tiny", "--batches", "2", "--frames", "3", "--repeats", "1", "--warmup", "0",
                      "--compare-reference"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    assert out["decode"] == "fast" and out["decode_chunk"] == 3
    (row,) = out["results"]
    assert row["decode_max_abs_diff"] < 1e-4  # timings and their ratio: reported, not asserted (issue 26)
    assert all(math.isfinite(row[k]) and row[k] >= 0 for k in ("decode_s_median", "decode_speedup"))
    total = row["dit_s_median"] + row["decode_s_median"]
    assert row["frames_per_s"] == pytest.approx(2 * out["pixel_frames"] / total)
    assert row["decode_share"] == pytest.approx(row["decode_s_median"] / total)
