"""One way to build a model: a family's DiT, text encoder and decoder, used by training, ``generate``, ``evaluate``
and ``merge-lora`` alike.

    io = load_model_io(get_family("self_forcing"), ModelSource(checkpoint="ckpts/self_forcing_dmd.pt",
                                                                wan_dir="wan_models/Wan2.1-T2V-1.3B"))
    videos = io.decode(rollout(io.model, io.encode(["a corgi surfing"]), ...).latents)

A family preset names its loader (`Family.loader`, ``"module:attribute"``, imported when first used), so a family
that lives outside `astrolabe_rl.models` (the toy world's) registers itself without `models` importing it. A loader
has three builders, called separately where memory matters (``generate`` encodes every prompt and frees the 11 GB
umT5 before the DiT loads):

* ``dit(family, source, device, dtype) -> CausalWan`` (eval mode, frozen),
* ``text_encoder(family, source, device, dtype) -> TextEncoder`` (prompts -> ``[B, text_len, text_dim]``),
* ``decoder(family, source, device, dtype) -> Decoder`` (latents ``[B, F, C, h, w]`` -> videos ``[B, T, 3, H, W]``
  in [0, 1], whole or block by block).

A trained adapter (``source.adapter``: a peft folder, a run folder or one of its checkpoints) is folded into the
DiT by `dit` whatever the family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import Tensor

from astrolabe_rl.models.families import Family
from astrolabe_rl.models.wan import CausalWan

if TYPE_CHECKING:
    from astrolabe_rl.models.text import TextEncoder

DEFAULT_WAN_DIR = "wan_models/Wan2.1-T2V-1.3B"  # the 14B folder holds the same umT5 and VAE
WAN_DOWNLOAD = "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B"


class ModelFilesError(ValueError):
    """Weights that are missing or do not fit; the message lists each problem with where it looked."""


@dataclass(frozen=True)
class ModelSource:
    """Where a family's weights come from (every field optional: a family falls back to its defaults).

    Attributes:
        checkpoint: the DiT weights (.pt / .safetensors); None: the family's download location (real models), the
            shipped weights (toy) or random weights of ``init_seed`` (tiny).
        checkpoint_key: entry of a ``.pt`` dict to load (None: the family's, e.g. ``generator_ema``).
        lora: a LoRA merged into the base as it loads (LongLive's ``lora.pt``, found by default); ``"none"`` skips it.
        lora_alpha: that LoRA's alpha (None: = rank).
        adapter: an adapter trained by this project, folded in after loading: a peft folder (``run/adapter``), a
            run folder, or a checkpoint folder (``run/checkpoints/step-000300``, its EMA adapter).
        wan_dir: the Wan2.1-T2V folder with the umT5 encoder, tokenizer and VAE (None: ``wan_models/...-1.3B``).
        init_seed: seed of random weights (the tiny DiT and its hashing text encoder; the tiny VAE is fixed).
        trust_checkpoint: allow pickled Python objects in ``.pt`` files (only for files you trust).
        vae: the decoder: ``auto`` (the family's), ``wan``, ``tiny`` or ``toy``.
        vae_chunk: latent frames per Wan-VAE decoder call (speed vs memory).
        text_cache: a folder caching prompt embeddings on disk (the encoder loads only for new prompts).
    """

    checkpoint: str | None = None
    checkpoint_key: str | None = None
    lora: str | None = None
    lora_alpha: float | None = None
    adapter: str | None = None
    wan_dir: str | None = None
    init_seed: int = 0
    trust_checkpoint: bool = False
    vae: str = "auto"
    vae_chunk: int = 3
    text_cache: str | None = None


class Decoder(Protocol):
    """Latents ``[B, F, C, h, w]`` -> videos ``[B, T, 3, H, W]`` in [0, 1]."""

    def decode(self, latents: Tensor) -> Tensor: ...

    def stream(self) -> Callable[[Tensor], Tensor]:
        """A stateful decoder fed consecutive latent blocks; its outputs concatenate to `decode` of the whole. A
        stream with a temporal state also has ``take(index) -> stream`` (its state gathered along the batch); a
        frame-wise one (the toy VAE) needs none."""
        ...


class FamilyLoader(Protocol):
    def dit(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> CausalWan: ...

    def text_encoder(self, family: Family, source: ModelSource, device: torch.device,
                     dtype: torch.dtype) -> "TextEncoder": ...

    def decoder(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> Decoder: ...


@dataclass
class ModelIO:
    """A family's three parts, built by `load_model_io`."""

    model: CausalWan
    encode: Callable[[list[str]], Tensor]  # prompts -> text embeddings [B, L, D] on the model's device and dtype
    decoder: Decoder

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, F, C, h, w]`` -> videos ``[B, T, 3, H, W]`` in [0, 1] (the decoder's dtype)."""
        return self.decoder.decode(latents)


# ---------------------------------------------------------------------------------------------- entry points


def get_loader(family: Family) -> FamilyLoader:
    """The family's loader object (``Family.loader`` = ``"module:attribute"``)."""
    module, _, attr = family.loader.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_dit(family: Family, source: ModelSource, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> CausalWan:
    """The family's DiT (eval mode, every parameter frozen) with ``source.adapter`` folded in."""
    device = torch.device(device)
    model = get_loader(family).dit(family, source, device, dtype)
    if source.adapter:
        from astrolabe_rl.policy import merge_lora

        model = merge_lora(model, resolve_adapter(source.adapter))
    return model.to(device, dtype).eval().requires_grad_(False)


def build_text_encoder(family: Family, source: ModelSource, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Callable[[list[str]], Tensor]:
    """Prompts -> embeddings ``[B, text_len, text_dim]`` on ``device`` in ``dtype``; with ``source.text_cache`` the
    encoder is loaded only when a prompt is not cached yet."""
    device = torch.device(device)
    loader = get_loader(family)
    if source.text_cache is None:
        encoder = loader.text_encoder(family, source, device, dtype)
    else:
        encoder = _CachedEncoder(lambda: loader.text_encoder(family, source, device, dtype), source.text_cache,
                                 _encoder_id(family, source, dtype))

    def encode(prompts: list[str]) -> Tensor:
        return encoder(prompts).to(device, dtype)

    return encode


def build_decoder(family: Family, source: ModelSource, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Decoder:
    """The decoder ``source.vae`` names (``auto``: the family's own)."""
    device = torch.device(device)
    if source.vae == "auto":
        return get_loader(family).decoder(family, source, device, dtype)
    if source.vae not in VAE_LOADERS:
        raise ValueError(f"unknown decoder {source.vae!r}; choose auto, {', '.join(VAE_LOADERS)}")
    module, _, attr = VAE_LOADERS[source.vae].partition(":")
    return getattr(importlib.import_module(module), attr).decoder(family, source, device, dtype)


def load_model_io(family: Family, source: ModelSource, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> ModelIO:
    """The DiT, the text encoder and the decoder of ``family`` from ``source``."""
    return ModelIO(build_dit(family, source, device, dtype), build_text_encoder(family, source, device, dtype),
                   build_decoder(family, source, device, dtype))


# ---------------------------------------------------------------------------------------------- text cache


class _CachedEncoder:
    """A `PromptCache` in front of an encoder that is built only when some prompt is missing (then kept)."""

    def __init__(self, build: Callable[[], "TextEncoder"], folder: str, encoder_id: str) -> None:
        from astrolabe_rl.models.text import PromptCache

        self.cache = PromptCache(folder, encoder_id)
        self.build = build
        self.encoder: "TextEncoder | None" = None

    def __call__(self, prompts: list[str]) -> Tensor:
        missing = self.cache.missing(list(dict.fromkeys(prompts)))
        if missing:
            self.encoder = self.encoder or self.build()
            self.cache.fill(missing, self.encoder)
        return self.cache(prompts)


def _encoder_id(family: Family, source: ModelSource, dtype: torch.dtype) -> str:
    """The prompt cache's namespace: which encoder, at which length and precision."""
    from astrolabe_rl.models.text import umt5_cache_id

    if family.loader == OFFICIAL_LOADER:
        return umt5_cache_id(_wan_dir(source), dtype, family.model.text_len)
    return f"{family.name}-{family.model.text_dim}x{family.model.text_len}-s{source.init_seed}"


# ---------------------------------------------------------------------------------------------- adapters


def resolve_adapter(path: str | Path) -> Path:
    """The peft adapter folder behind a user's path: the folder itself (``adapter_model.safetensors``; a checkpoint
    folder is one, holding the EMA adapter saved with it) or a run folder (its ``adapter/``)."""
    p = Path(path)
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_model.safetensors").is_file() or (candidate.is_file() and candidate.suffix in
                                                                   (".safetensors", ".pt")):
            return candidate
    raise ModelFilesError(
        f"no adapter at {p}: expected a peft folder with adapter_model.safetensors, a run folder with adapter/, or "
        "a checkpoint folder (run/checkpoints/step-XXXXXX)"
    )


# ---------------------------------------------------------------------------------------------- official models


@dataclass(frozen=True)
class Download:
    """How a family's README fetches its official weights, and the checkpoint's path afterwards."""

    repo: str  # Hugging Face repository
    file: str | None  # None: the whole repository
    local_dir: str
    path: str  # the checkpoint, relative to the working directory

    @property
    def command(self) -> str:
        return " ".join(filter(None, ["huggingface-cli download", self.repo, self.file, "--local-dir", self.local_dir]))


DEFAULT_CHECKPOINTS: dict[str, Download] = {
    "self_forcing": Download("gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt", ".",
                             "checkpoints/self_forcing_dmd.pt"),
    "causal_forcing": Download("zhuhz22/Causal-Forcing", "chunkwise/causal_forcing.pt", "checkpoints",
                               "checkpoints/chunkwise/causal_forcing.pt"),
    "causal_forcing_frame": Download("zhuhz22/Causal-Forcing", "framewise/causal_forcing.pt", "checkpoints",
                                     "checkpoints/framewise/causal_forcing.pt"),
    "causal_forcing_pp_2step": Download("zhuhz22/Causal-Forcing", "causal-forcing++/framewise-2step.pt",
                                        "checkpoints", "checkpoints/causal-forcing++/framewise-2step.pt"),
    "causal_forcing_pp_1step": Download("zhuhz22/Causal-Forcing", "causal-forcing++/framewise-1step.pt",
                                        "checkpoints", "checkpoints/causal-forcing++/framewise-1step.pt"),
    "longlive": Download("Efficient-Large-Model/LongLive-1.3B", None, "longlive_models",
                         "longlive_models/models/longlive_base.pt"),
    "causvid": Download("tianweiy/CausVid", "autoregressive_checkpoint/model.pt", ".",
                        "autoregressive_checkpoint/model.pt"),
    "krea14b": Download("krea/krea-realtime-video", "krea-realtime-video-14b.safetensors", ".",
                        "krea-realtime-video-14b.safetensors"),
}
DEFAULT_LORAS = {"longlive": "longlive_models/models/lora.pt"}


def _wan_dir(source: ModelSource) -> Path:
    return Path(source.wan_dir or DEFAULT_WAN_DIR)


def _family_lora(family: Family, source: ModelSource) -> Path | None:
    if source.lora == "none" or not (source.lora or family.name in DEFAULT_LORAS):
        return None
    return Path(source.lora or DEFAULT_LORAS[family.name])


def check_official_files(family: Family, source: ModelSource, need_vae: bool = True) -> None:
    """Every file a real family needs, checked at once: one error lists each missing file, where it looked, and
    how to download it (before anything heavy loads)."""
    from astrolabe_rl.errors import path_problem
    from astrolabe_rl.models.text import find_text_encoder_files
    from astrolabe_rl.models.vae import ORIGINAL_VAE_FILE

    problems = []
    download = DEFAULT_CHECKPOINTS.get(family.name)
    checkpoint = Path(source.checkpoint or (download.path if download else ""))
    if path_problem(checkpoint, "checkpoint"):
        how = f"; download: {download.command}" if download else ""
        problems.append(f"{path_problem(checkpoint, 'checkpoint:')} (pass --checkpoint PATH{how})")
    lora = _family_lora(family, source)
    if lora is not None and path_problem(lora, "LoRA:"):
        how = f"; download: {download.command}" if download else ""
        problems.append(f"{path_problem(lora, 'LoRA:')} (pass --lora PATH, or --lora none for the base alone{how})")
    wan_dir = _wan_dir(source)
    try:
        find_text_encoder_files(wan_dir)
    except FileNotFoundError as e:
        problems.append(f"text encoder: {e}")
    vae_places = (wan_dir / ORIGINAL_VAE_FILE, wan_dir / "vae" / "config.json")
    if need_vae and source.vae in ("auto", "wan") and not any(p.is_file() for p in vae_places):
        problems.append(f"VAE: looked for {' and '.join(map(str, vae_places))} (pass --wan-dir DIR; download: "
                        f"{WAN_DOWNLOAD})")
    if source.adapter:
        try:
            resolve_adapter(source.adapter)
        except ModelFilesError as e:
            problems.append(f"adapter: {e}")
    if problems:
        raise ModelFilesError(f"--model {family.name} is missing files:\n  " + "\n  ".join(problems))


class _Official:
    """Real checkpoints: the family's DiT file (+ LoRA), umT5 and the Wan VAE from the Wan2.1 folder."""

    def dit(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> CausalWan:
        from astrolabe_rl.models.loading import load_causal_wan

        download = DEFAULT_CHECKPOINTS.get(family.name)
        checkpoint = source.checkpoint or (download.path if download else None)
        if checkpoint is None:
            raise ModelFilesError(f"--model {family.name} needs --checkpoint (model.checkpoint)")
        return load_causal_wan(checkpoint, family.model, key=source.checkpoint_key or family.checkpoint_key,
                               lora=_family_lora(family, source), lora_alpha=source.lora_alpha, device=device,
                               dtype=dtype, trust_pickle=source.trust_checkpoint)

    def text_encoder(self, family: Family, source: ModelSource, device: torch.device,
                     dtype: torch.dtype) -> "TextEncoder":
        from astrolabe_rl.models.text import load_umt5

        return load_umt5(_wan_dir(source), device=device, dtype=dtype, text_len=family.model.text_len,
                         trust_pickle=source.trust_checkpoint)

    def decoder(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> Decoder:
        from astrolabe_rl.models.vae import load_vae

        # the decode bench/rollout.py times: channels-last convolutions and a compiled decoder on CUDA
        cuda = device.type == "cuda"
        vae = load_vae(_wan_dir(source), device=device, dtype=dtype, chunk_frames=source.vae_chunk, channels_last=cuda)
        if cuda:
            vae.compile_decoder()
        return vae


class _Tiny:
    """Random weights for CPU smoke runs: the DiT from ``init_seed`` (or a checkpoint of the tiny geometry), a
    hashing text encoder, and a tiny random ``AutoencoderKLWan`` (the real VAE's structure)."""

    def dit(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> CausalWan:
        if source.checkpoint:
            return _Official().dit(family, source, device, dtype)
        with torch.random.fork_rng(devices=[]):  # building must not shift the caller's random stream
            torch.manual_seed(source.init_seed)
            return CausalWan(family.model)

    def text_encoder(self, family: Family, source: ModelSource, device: torch.device,
                     dtype: torch.dtype) -> "TextEncoder":
        from astrolabe_rl.models.text import HashTextEncoder

        return HashTextEncoder(family.model.text_dim, family.model.text_len, seed=source.init_seed)

    def decoder(self, family: Family, source: ModelSource, device: torch.device, dtype: torch.dtype) -> Decoder:
        from astrolabe_rl.models.vae import WanVAE, random_vae, tiny_vae_config

        return WanVAE(random_vae(tiny_vae_config(), seed=0, device=device, dtype=dtype), chunk_frames=source.vae_chunk)


OFFICIAL = _Official()
TINY = _Tiny()
OFFICIAL_LOADER = "astrolabe_rl.models.build:OFFICIAL"
# the decoders a user may pick by name (``model.vae`` / ``--vae``), whatever the family
VAE_LOADERS = {"wan": OFFICIAL_LOADER, "tiny": "astrolabe_rl.models.build:TINY", "toy": "astrolabe_rl.toy.model:LOADER"}
