"""Our DiT with weights renamed to diffusers names equals diffusers' WanTransformer3DModel (bidirectional case)."""

import pytest
import torch

from astrolabe_rl.models import CausalWan, WanConfig
from astrolabe_rl.models.loading import diffusers_to_original, original_to_diffusers

diffusers = pytest.importorskip("diffusers")


def _diffusers_twin(cfg: WanConfig):
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_frames,
    ).eval()


@pytest.mark.parametrize("frames, t", [(3, 625.0), (2, 937.5), (4, 17.0)])
def test_matches_diffusers_wan_transformer(frames, t):
    torch.manual_seed(0)
    cfg = WanConfig.tiny()
    ours = CausalWan(cfg).eval()
    theirs = _diffusers_twin(cfg)
    theirs.load_state_dict(original_to_diffusers(ours.state_dict()), strict=True)

    x = torch.randn(2, frames, cfg.in_dim, 8, 6)  # non-square latent: catches an h/w mix-up
    text = torch.randn(2, 8, cfg.text_dim)
    with torch.no_grad():
        mine = ours(x, t, text, frames_per_block=frames)  # one block = bidirectional attention
        ref = theirs(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            timestep=torch.full((2,), t),
            encoder_hidden_states=text,
            return_dict=False,
        )[0].permute(0, 2, 1, 3, 4)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-4)


def test_diffusers_weights_load_back_into_causal_wan():
    torch.manual_seed(1)
    cfg = WanConfig.tiny()
    theirs = _diffusers_twin(cfg)
    ours = CausalWan(cfg)
    ours.load_state_dict(diffusers_to_original(theirs.state_dict()), strict=True)
    for k, v in original_to_diffusers(ours.state_dict()).items():
        assert torch.equal(v, theirs.state_dict()[k]), k
