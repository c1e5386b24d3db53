"""Model-family presets: architecture, sampler, cache policy and checkpoint key of every supported model.

A family is data, not a subclass: the same `CausalWan` and the same `rollout` run all of them
(`reference/ar_models.md` §4.6, §8.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from astrolabe_rl.models.attention import block_bounds
from astrolabe_rl.models.kv_cache import CachePolicy
from astrolabe_rl.models.schedule import (
    StepSchedule,
    causal_forcing_pp_steps,
    causvid_steps,
    self_forcing_steps,
)
from astrolabe_rl.models.wan import WanConfig


RECACHE_MASKS = ("block_causal", "bidirectional")


@dataclass(frozen=True)
class SamplerConfig:
    """How a family generates.

    Attributes:
        steps: the warped few-step timesteps (see `schedule`).
        frames_per_block: latent frames generated per block (3 chunk-wise; 1 frame-wise).
        first_block_frames: a different size for the first block, or None.
        cache: KV-cache policy (global, or rolling window + sink for long video).
        recache_on_switch: on a prompt switch, re-encode the last window of clean frames under the new prompt
            (LongLive); otherwise only the cross-attention K/V change.
        keep_sink_on_switch: keep the sink's K/V from the first prompt during a re-cache (LongLive ``global_sink``).
            Only once the window has rolled: a switch at latent frame ``s <= window_frames`` re-encodes every
            committed frame, the sink included, under the new prompt (LongLive's re-cache pass then starts at frame
            0, which its cache does not treat as a recompute, so the sink is overwritten).
        recache_mask: attention among the re-encoded frames of a re-cache. ``block_causal``: each block sees the
            blocks before it, exactly as when they were first committed. ``bidirectional``: one unmasked pass, every
            re-encoded frame sees all of them. LongLive uses ``bidirectional``: its pipeline builds a block-causal
            mask for the re-cache but never hands it to the model, so its released checkpoint was trained and is
            run with an unmasked re-cache; the preset follows the checkpoint, not the evident intent.
    """

    steps: StepSchedule
    frames_per_block: int = 3
    first_block_frames: int | None = None
    cache: CachePolicy = field(default_factory=CachePolicy)
    recache_on_switch: bool = True
    keep_sink_on_switch: bool = True
    recache_mask: Literal["block_causal", "bidirectional"] = "block_causal"

    def __post_init__(self) -> None:
        if self.recache_mask not in RECACHE_MASKS:
            raise ValueError(f"recache_mask={self.recache_mask!r}; choose one of {', '.join(RECACHE_MASKS)}")

    def with_recache_mask(self, mask: str) -> "SamplerConfig":
        """This sampler with a user's re-cache mask; ``auto`` keeps the family's (what its checkpoint was run with)."""
        return self if mask == "auto" else replace(self, recache_mask=mask)

    def block_bounds(self, num_frames: int, start_frame: int = 0) -> list[tuple[int, int]]:
        """Blocks covering ``[start_frame, start_frame + num_frames)``; only the video's first block is special."""
        first = self.first_block_frames if start_frame == 0 else None
        return block_bounds(num_frames, self.frames_per_block, first, start_frame)



@dataclass(frozen=True)
class Family:
    """Everything family-specific.

    Attributes:
        name: preset name (`FAMILIES` key, the CLI's ``--model``).
        model: the DiT geometry.
        sampler: steps, block size and cache policy.
        latent_hw: latent height × width (60×104 = 480×832 pixels).
        horizon_frames: latent frames the model was trained on (21 = 81 pixel frames); longer videos with a
            global cache switch to a rolling window of this size.
        checkpoint_key: entry of the official ``.pt`` dict holding the weights to generate with.
        temporal_stride: pixel frames per latent frame after the first (the Wan VAE's 4; the toy VAE's 1).
        description: one line for ``--help``.
        loader: ``"module:attribute"`` of the object that builds its DiT, text encoder and decoder
            (`models.build.FamilyLoader`), imported only when a model is built: a family defined outside
            `astrolabe_rl.models` (the toy world's) registers its own without `models` importing it.
    """

    name: str
    model: WanConfig
    sampler: SamplerConfig
    latent_hw: tuple[int, int] = (60, 104)
    horizon_frames: int = 21
    checkpoint_key: str = "generator_ema"
    temporal_stride: int = 4
    description: str = ""
    loader: str = "astrolabe_rl.models.build:OFFICIAL"

    def sampler_for(self, num_frames: int) -> SamplerConfig:
        """The sampler for a video of ``num_frames`` latent frames: beyond the training horizon a global cache
        becomes a rolling window of ``horizon_frames`` (attention never spans more than the model was trained on)."""
        if num_frames > self.horizon_frames and not self.sampler.cache.rolling:
            return replace(self.sampler, cache=CachePolicy(window_frames=self.horizon_frames))
        return self.sampler


_SF = SamplerConfig(self_forcing_steps())


# The shipped toy model (`astrolabe_rl.toy`), written out so that `models` never imports the toy world (a test checks
# it against the toy VAE's 48 channels and the toy text encoder's 10 × 32 embeddings): 4 layers, width 256, on
# 8×8×48 toy-VAE latents. Its 2×2 patches of 48 channels make 192-wide tokens; the residual stream is wider (as Wan's
# 1536 is to its 64-wide patches) because the velocity head must reproduce the input noise almost exactly at σ ≈ 1:
# at width 192 that copy plateaued and the 4-step samples stayed noisy.
TOY_WAN = WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=4, freq_dim=128, text_dim=32, text_len=10,
                    in_dim=48, out_dim=48)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("self_forcing", WanConfig.wan_1_3b(), _SF, checkpoint_key="generator_ema",
               description="Self-Forcing DMD (self_forcing_dmd.pt), 3-frame blocks, 4 steps"),
        Family("causal_forcing", WanConfig.wan_1_3b(), _SF, checkpoint_key="generator",
               description="Causal Forcing chunk-wise (chunkwise/causal_forcing.pt), 3-frame blocks, 4 steps"),
        Family("causal_forcing_frame", WanConfig.wan_1_3b(), replace(_SF, frames_per_block=1),
               description="Causal Forcing frame-wise (framewise/causal_forcing.pt), 1-frame blocks, 4 steps"),
        Family("causal_forcing_pp_2step", WanConfig.wan_1_3b(),
               SamplerConfig(causal_forcing_pp_steps(2), frames_per_block=1),
               description="Causal Forcing++ frame-wise 2-step (first block 4 steps)"),
        Family("causal_forcing_pp_1step", WanConfig.wan_1_3b(),
               SamplerConfig(causal_forcing_pp_steps(1), frames_per_block=1),
               description="Causal Forcing++ frame-wise 1-step (first block 4 steps)"),
        Family("longlive", WanConfig.wan_1_3b(),
               replace(_SF, cache=CachePolicy(window_frames=12, sink_frames=3), recache_mask="bidirectional"),
               checkpoint_key="generator",
               description="LongLive 1.3B (base + LoRA), 12-frame window with a 3-frame sink, KV re-cache"),
        Family("causvid", WanConfig.wan_1_3b(), SamplerConfig(causvid_steps()), checkpoint_key="generator",
               description="CausVid autoregressive, shift 8, 3 steps"),
        Family("krea14b", WanConfig.wan_14b(), _SF, checkpoint_key="generator_ema",
               description="Krea Realtime 14B (Self-Forcing on Wan2.1-14B)"),
        Family("tiny", WanConfig.tiny(), _SF, latent_hw=(8, 8), horizon_frames=9,
               description="a 2-layer random-weight model for CPU smoke tests",
               loader="astrolabe_rl.models.build:TINY"),
        Family("toy", TOY_WAN, _SF, latent_hw=(8, 8), horizon_frames=9, temporal_stride=1,
               description="the shipped toy-world model (astrolabe demo): a DMD-distilled 4-step student, 32×32 px",
               loader="astrolabe_rl.toy.model:LOADER"),
        Family("toy_fm", TOY_WAN, _SF, latent_hw=(8, 8), horizon_frames=9, temporal_stride=1,
               description="the toy student's flow-matching base (4-step sampling of an undistilled model)",
               loader="astrolabe_rl.toy.model:FM_LOADER"),
        # LongLive's cache at the toy's scale: a 3-frame sink + 3 recent frames + the 3-frame block being generated,
        # the 9 frames the student was trained to attend to
        Family("toy_long", TOY_WAN, replace(_SF, cache=CachePolicy(window_frames=9, sink_frames=3)), latent_hw=(8, 8),
               horizon_frames=9, temporal_stride=1,
               description="the toy student extended to long videos (astrolabe demo --long): rolling window 9, sink 3",
               loader="astrolabe_rl.toy.model:LONG_LOADER"),
    )
}


def get_family(name: str) -> Family:
    """Look a preset up by name, with an error listing the choices."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
