"""The Wan2.1 VAE: diffusers ``AutoencoderKLWan`` + the official latent normalisation + a fast streaming decoder.

Conventions (`reference/ar_models.md` §1.5):

* Latents here are what the DiT sees: *normalised*, ``z_norm = (z - mean) / std`` per channel, laid out
  ``[B, F, C, h, w]`` (frames second). diffusers works on raw latents ``[B, C, F, h, w]`` and never applies the
  normalisation itself, so every entry point here does it.
* Pixels are ``[B, T, 3, H, W]`` floats in ``[0, 1]`` with ``T = 1 + 4·(F - 1)`` (81 <-> 21) and ``H, W = 8·h, 8·w``.

Decoding. The Wan decoder is causal in time: it consumes one latent frame at a time and carries a per-conv feature
cache (the last two frames of every causal conv's input). diffusers' ``decode`` runs that loop but clears the cache
at the start and end of each call, so it cannot continue a video. `StreamingDecoder` drives the decoder itself with
a cache it owns, which gives

* *streaming*: decode block after block while the DiT generates, equal to decoding the whole video at once;
* *speed*: after the first latent frame (which the decoder must see alone) it feeds ``chunk_frames`` latent
  frames per call. Every op of the Wan2.1 decoder is causal or per-frame, so chunks give the same result with
  fewer, larger kernels; the whole batch is decoded together, optionally with channels-last weights and compiled
  residual blocks.

The loop uses diffusers' private decoder API; it was written against diffusers **0.42.1**
(``decoder(x, feat_cache=list, feat_idx=[0], first_chunk=bool)``, ``post_quant_conv``, one cache slot per causal conv),
and `StreamingDecoder` checks that API up front and after every call, failing with a message rather than decoding
garbage. ``WanVAE.decode_reference`` (plain ``AutoencoderKLWan.decode``) is the oracle the tests compare against.

diffusers is imported inside the functions that need it (`astrolabe_rl.models` stays importable without it).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

# Official per-channel latent statistics of the Wan2.1 VAE (z_dim = 16).
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
TEMPORAL_STRIDE, SPATIAL_STRIDE = 4, 8
WRITTEN_AGAINST_DIFFUSERS = "0.42.1"


def pixel_frames(latent_frames: int) -> int:
    """``T = 1 + 4·(F - 1)``: 21 latent frames decode to 81 pixel frames."""
    return 1 + TEMPORAL_STRIDE * (latent_frames - 1) if latent_frames > 0 else 0


def tiny_vae_config() -> dict[str, Any]:
    """A CPU-test VAE with the real one's structure (4 levels, 2 res blocks, ×8 space, ×4 time) and 4 base channels.

    ``dim_mult`` keeps the official ``[1, 2, 4, 4]`` so the original-checkpoint key layout (and diffusers' converter
    for it) applies unchanged.
    """
    return dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def random_vae(
    config: dict[str, Any] | None = None, seed: int = 0, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> "AutoencoderKLWan":
    """An ``AutoencoderKLWan`` with seeded random weights (default config = the real Wan2.1 VAE's geometry)."""
    from diffusers import AutoencoderKLWan

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoencoderKLWan(**(config or {}))
    finally:  # building a VAE must not shift the caller's random stream
        torch.random.set_rng_state(state)
    return move(model, device, dtype).eval().requires_grad_(False)


def move(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``model.to(device, dtype)`` without diffusers' ModelMixin warning about fp32 modules (the Wan VAE keeps none)."""
    return nn.Module.to(model, device=device, dtype=dtype)


class WanVAE:
    """Normalised-latent encode/decode around an ``AutoencoderKLWan``.

    Args:
        model: the diffusers VAE (any device/dtype; inputs are moved to it).
        chunk_frames: latent frames per decoder call after the first (1 reproduces diffusers' frame-by-frame loop;
            larger is faster and uses more memory: ~``B · 4·chunk · 96 · H · W`` activations at the top level).
        channels_last: store conv weights (and feed activations) channels-last, which cuDNN prefers in bf16.
    """

    def __init__(self, model: "AutoencoderKLWan", *, chunk_frames: int = 3, channels_last: bool = False) -> None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        if getattr(model.config, "patch_size", None) is not None or getattr(model.config, "is_residual", False):
            raise ValueError("this is a Wan2.2-style VAE (patchified / residual); only the Wan2.1 VAE is supported")
        self.model = model.eval().requires_grad_(False)
        self.chunk_frames = chunk_frames
        self.channels_last = channels_last
        z = model.config.z_dim
        mean = getattr(model.config, "latents_mean", None) or LATENTS_MEAN
        std = getattr(model.config, "latents_std", None) or LATENTS_STD
        if len(mean) != z or len(std) != z:
            raise ValueError(f"latents_mean/std have {len(mean)}/{len(std)} entries, the VAE has z_dim={z}")
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        if channels_last:
            _to_channels_last(model)

    @property
    def device(self) -> torch.device:
        return self.model.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.post_quant_conv.weight.dtype

    # ------------------------------------------------------------------ normalisation

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """mean, std shaped ``[1, 1, C, 1, 1]`` for ``[B, F, C, h, w]`` latents, float32 on their device."""
        shape = (1, 1, -1, 1, 1)
        return self.mean.to(like.device).view(shape), self.std.to(like.device).view(shape)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw VAE latents ``[B, F, C, h, w]`` -> the DiT's latents ``(z - mean) / std`` (float32)."""
        mean, std = self._stats(z)
        return (z.float() - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """The DiT's latents ``[B, F, C, h, w]`` -> raw VAE latents ``z·std + mean`` (float32)."""
        mean, std = self._stats(z)
        return z.float() * std + mean

    # ------------------------------------------------------------------ decode

    def stream(self) -> "StreamingDecoder":
        """A decoder for one batch of videos, fed block by block (see `StreamingDecoder`)."""
        return StreamingDecoder(self)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, F, C, h, w]`` -> frames ``[B, 1 + 4(F-1), 3, 8h, 8w]`` in [0, 1] (fast path)."""
        return self.stream()(latents)

    @torch.no_grad()
    def decode_reference(self, latents: Tensor) -> Tensor:
        """The same through diffusers' own ``AutoencoderKLWan.decode`` (the oracle; one latent frame per call)."""
        _check_latents(latents, self.model.config.z_dim)
        z = self.denormalize(latents).to(self.device, self.dtype).permute(0, 2, 1, 3, 4)
        video = self.model.decode(z).sample  # [B, 3, T, H, W] in [-1, 1]
        return _to_unit(video)

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """Frames ``[B, T, 3, H, W]`` in [0, 1] (``T = 1 + 4k``) -> normalised latents ``[B, 1 + k, C, H/8, W/8]``
        (the posterior mode), e.g. to continue a video from its last frames."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W]; got {tuple(frames.shape)}")
        t, h, w = frames.shape[1], frames.shape[3], frames.shape[4]
        if (t - 1) % TEMPORAL_STRIDE or h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
            raise ValueError(
                f"frames {t}×{h}×{w}: need T = 1 + 4k frames and H, W divisible by 8 (trim or pad the clip)"
            )
        x = (frames.to(self.device, self.dtype) * 2 - 1).permute(0, 2, 1, 3, 4)
        z = self.model.encode(x).latent_dist.mode()  # [B, C, F, h, w]
        return self.normalize(z.permute(0, 2, 1, 3, 4))

    def compile_decoder(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` every residual and attention block of the decoder in place (GPU; fuses the
        norm/SiLU/pad chains around the convs). Parameter names are unchanged."""
        # All blocks share one forward code object, and each is specialised on its cache slot index and on the
        # first/later chunk shapes: dynamo needs room for those variants or it silently falls back to eager.
        dynamo = torch._dynamo.config
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
        dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 1024)
        for module in self.model.decoder.modules():
            if type(module).__name__ in ("WanResidualBlock", "WanAttentionBlock"):
                module.compile(**compile_kwargs)


class StreamingDecoder:
    """Decodes one batch of latent videos block by block, carrying the decoder's causal feature cache between calls.

    ``dec = vae.stream(); frames = torch.cat([dec(z[:, s:e]) for s, e in blocks], dim=1)`` equals
    ``vae.decode(z)``: the first call emits ``1 + 4·(f - 1)`` frames for ``f`` latent frames, later calls ``4·f``.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        decoder = vae.model.decoder
        _check_private_api(vae.model)
        self.cache: list[Any] = [None] * sum(type(m).__name__ == "WanCausalConv3d" for m in decoder.modules())
        self.latent_frames = 0  # latent frames decoded so far
        self._slots_used: int | None = None

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, f, C, h, w]`` (the next ``f`` frames) -> frames ``[B, T_f, 3, 8h, 8w]``, [0, 1]."""
        vae = self.vae
        _check_latents(latents, vae.model.config.z_dim)
        z = vae.denormalize(latents).to(vae.device, vae.dtype).permute(0, 2, 1, 3, 4)  # [B, C, f, h, w]
        if vae.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        x = vae.model.post_quant_conv(z)  # a 1×1×1 conv: per frame, so applying it per block is exact
        pieces = []
        start = 0
        while start < x.shape[2]:
            # The very first latent frame must go alone: the temporal upsamplers treat the first call specially.
            n = 1 if self.latent_frames == 0 else vae.chunk_frames
            pieces.append(self._step(x[:, :, start : start + n]))
            start += n
        video = torch.cat(pieces, dim=2)  # [B, 3, T, H, W]
        return _to_unit(video.clamp(-1, 1))

    def take(self, index: Tensor) -> "StreamingDecoder":
        """A decoder whose video ``j`` continues this one's video ``index[j]``: every cached feature is gathered along
        the batch, so a history decoded once per prompt serves each of its candidates' windows."""
        out = StreamingDecoder.__new__(StreamingDecoder)
        out.vae, out.latent_frames, out._slots_used = self.vae, self.latent_frames, self._slots_used
        out.cache = [c.index_select(0, index.to(c.device)) if isinstance(c, Tensor) else c for c in self.cache]
        return out

    def _step(self, x: Tensor) -> Tensor:
        idx = [0]
        out = self.vae.model.decoder(x, feat_cache=self.cache, feat_idx=idx, first_chunk=self.latent_frames == 0)
        # Every call must visit the same cache slots, within the list we sized; otherwise diffusers' internals
        # changed and the cache would be misaligned (silently wrong frames).
        if idx[0] > len(self.cache) or (self._slots_used is not None and idx[0] != self._slots_used):
            raise RuntimeError(_api_changed(f"the decoder used {idx[0]} feature-cache slots (expected "
                                            f"{self._slots_used or len(self.cache)})"))
        self._slots_used = idx[0]
        expected = 1 + TEMPORAL_STRIDE * (x.shape[2] - 1) if self.latent_frames == 0 else TEMPORAL_STRIDE * x.shape[2]
        if out.shape[2] != expected:
            raise RuntimeError(_api_changed(f"{x.shape[2]} latent frames gave {out.shape[2]} frames, not {expected}"))
        self.latent_frames += x.shape[2]
        return out


# ---------------------------------------------------------------------------------------------------- helpers


def _to_unit(video: Tensor) -> Tensor:
    """``[B, 3, T, H, W]`` in [-1, 1] -> ``[B, T, 3, H, W]`` in [0, 1], float32."""
    return (video.float() * 0.5 + 0.5).permute(0, 2, 1, 3, 4)


def _check_latents(latents: Tensor, z_dim: int) -> None:
    if latents.dim() != 5 or latents.shape[2] != z_dim:
        raise ValueError(f"latents must be [B, F, {z_dim}, h, w] (frames second); got {tuple(latents.shape)}")


def _api_changed(what: str) -> str:
    import diffusers

    return (
        f"AutoencoderKLWan's private decoder API changed: {what}. The streaming decoder was written against "
        f"diffusers {WRITTEN_AGAINST_DIFFUSERS}, this is {diffusers.__version__}. Use WanVAE.decode_reference() "
        f"(whole video, diffusers' own loop) or install diffusers=={WRITTEN_AGAINST_DIFFUSERS}."
    )


def _check_private_api(model: nn.Module) -> None:
    """Fail early, with the version story, if the decoder no longer has the hooks the streaming loop drives."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not isinstance(getattr(model, "post_quant_conv", None), nn.Module):
        raise RuntimeError(_api_changed("no `decoder` / `post_quant_conv` sub-modules"))
    params = inspect.signature(decoder.forward).parameters
    missing = [p for p in ("feat_cache", "feat_idx", "first_chunk") if p not in params]
    if missing:
        raise RuntimeError(_api_changed(f"decoder.forward has no {', '.join(missing)} argument"))
    if not any(type(m).__name__ == "WanCausalConv3d" for m in decoder.modules()):
        raise RuntimeError(_api_changed("the decoder has no WanCausalConv3d layers"))


def _to_channels_last(model: nn.Module) -> None:
    """Conv3d weights to channels_last_3d and Conv2d weights to channels_last (``Module.to`` cannot mix them)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------------- loading

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"


def convert_original_vae(
    state_dict: dict[str, Tensor], source: str = "Wan VAE", config: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    """Original Wan2.1 VAE names (``decoder.upsamples.N.residual.M``, ``decoder.middle.K``, ``conv1``/``conv2``) ->
    ``AutoencoderKLWan`` names, through diffusers' own single-file converter, then validated against the key set and
    shapes of ``AutoencoderKLWan(**config)`` (default: the real Wan2.1 VAE) so a partial or foreign file fails with
    the missing/unexpected keys named."""
    from astrolabe_rl.models.loading import check_state_dict

    try:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    except ImportError as e:  # the converter is internal to diffusers and may move
        raise RuntimeError(
            f"this diffusers has no convert_wan_vae_to_diffusers (written against {WRITTEN_AGAINST_DIFFUSERS}); "
            "point at the diffusers layout instead (a `vae/` folder with config.json)"
        ) from e
    converted = convert_wan_vae_to_diffusers(dict(state_dict))
    check_state_dict(converted, _expected_shapes(config), what="Wan2.1 VAE (AutoencoderKLWan)", source=source)
    return converted


def _expected_shapes(config: dict[str, Any] | None = None) -> dict[str, torch.Size]:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(**(config or {}))
    return {k: v.shape for k, v in model.state_dict().items()}


def load_vae(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, chunk_frames: int = 3,
    channels_last: bool = False, config: dict[str, Any] | None = None,
) -> WanVAE:
    """Load the Wan2.1 VAE from the original ``Wan2.1_VAE.pth`` (a file, or a Wan folder holding it) or from the
    diffusers layout (a folder with ``config.json``, or a diffusers Wan folder with ``vae/``).

    ``config``: the ``AutoencoderKLWan`` arguments an original ``.pth`` must fit (None: the real Wan2.1 VAE); the
    diffusers layout carries its own ``config.json``."""
    from diffusers import AutoencoderKLWan

    from astrolabe_rl.models.loading import read_checkpoint

    path = Path(path)
    candidates = [path, path / ORIGINAL_VAE_FILE, path / "vae"]
    if path.is_file() or (path / ORIGINAL_VAE_FILE).is_file():
        file = path if path.is_file() else path / ORIGINAL_VAE_FILE
        sd = convert_original_vae(read_checkpoint(file), source=str(file), config=config)
    elif (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
        folder = path if (path / "config.json").is_file() else path / "vae"
        model = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        return WanVAE(move(model, device, dtype), chunk_frames=chunk_frames, channels_last=channels_last)
    else:
        looked = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"no Wan2.1 VAE found; looked for {looked} (original `{ORIGINAL_VAE_FILE}` or a diffusers `vae/` folder). "
            "Download it with: huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B"
        )
    with torch.device("meta"):
        model = AutoencoderKLWan(**(config or {}))
    model.load_state_dict(sd, strict=True, assign=True)
    return WanVAE(move(model, device, dtype), chunk_frames=chunk_frames, channels_last=channels_last)
