"""The toy "VAE": a fixed, exactly invertible map between world frames and DiT latents (nothing to learn).

    encode:  frames [B, T, 3, 32, 32] in [0, 1]  ->  z = 16·(x − ½), pixel-unshuffled by 4  ->  [B, T, 48, 8, 8]
    decode:  the inverse, then clamped to [0, 1] (the identity on encoded frames; model outputs overshoot)

Spatial stride 4 (like Wan's 8 it trades resolution for channels; 48 channels = 3 colours × 4 × 4 pixels).
The scale 16 gives the world's latents a spread of about 1.6 against the unit noise of the flow: the object stands
out of the noise at the sampler's last step (σ = 0.625), and a given latent error costs half as much in pixels as
at scale 8, which a 4-layer model trained for minutes needs (at scale 8 its 4-step samples were mostly noise).
A power of two with a shift of ½ is exact in float32 on the world's 1/1024 pixel grid, so
``decode(encode(x)) == x`` bit for bit for every rendered video.

Temporal stride 1, documented rather than honoured: Wan packs 4 pixel frames into each latent frame after the
first (T = 1 + 4·(F − 1)). Packing frames into channels here would make tokens 4× wider than the tiny DiT's
hidden width, and a DiT whose tokens are wider than its residual stream cannot pass the noise through to its
velocity output (x̂0 keeps noise). So one latent frame is one pixel frame: T = F. Nothing else in the project
assumes the 4× ratio for the toy family.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

FACTOR = 4  # pixels per latent cell along each side
CHANNELS = 3 * FACTOR * FACTOR  # latent channels (the DiT's in_dim)
SCALE = 16.0  # latent = SCALE · (pixel − ½)
TEMPORAL_STRIDE = 1  # pixel frames per latent frame


def encode(frames: Tensor) -> Tensor:
    """Frames ``[B, T, 3, H, W]`` in [0, 1] -> latents ``[B, T, 48, H/4, W/4]`` (float32)."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"toy encode takes frames [B, T, 3, H, W]; got {tuple(frames.shape)}")
    b, t, _, h, w = frames.shape
    if h % FACTOR or w % FACTOR:
        raise ValueError(f"frame size {h}×{w} must be divisible by {FACTOR}")
    z = SCALE * (frames.float() - 0.5)
    return F.pixel_unshuffle(z.reshape(b * t, 3, h, w), FACTOR).view(b, t, CHANNELS, h // FACTOR, w // FACTOR)


def decode(latents: Tensor) -> Tensor:
    """Latents ``[B, F, 48, h, w]`` (any float dtype) -> frames ``[B, F, 3, 4h, 4w]`` in [0, 1] (float32)."""
    if latents.dim() != 5 or latents.shape[2] != CHANNELS:
        raise ValueError(f"toy decode takes latents [B, F, {CHANNELS}, h, w]; got {tuple(latents.shape)}")
    b, f, _, h, w = latents.shape
    x = F.pixel_shuffle(latents.float().reshape(b * f, CHANNELS, h, w), FACTOR) / SCALE + 0.5
    return x.clamp(0, 1).view(b, f, 3, h * FACTOR, w * FACTOR)
