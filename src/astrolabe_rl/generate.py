"""``astrolabe generate``: prompts -> mp4 videos (and/or latents) with any model family.

The pipeline, one function per phase:

1. `find_files`: the family's checkpoint (+ LongLive's LoRA) and the Wan2.1 folder's umT5 encoder, tokenizer and VAE;
   every missing file is reported at once with where it was looked for and how to download it.
2. `plan`: prompt lines -> samples (prompt schedule, seed, output path). A line ``scene one [10s] | scene two``
   switches prompt after 10 s (16 fps -> latent frame, snapped to a block boundary), with the LongLive re-cache.
3. `encode_prompts`: every distinct prompt once (through the on-disk `PromptCache` when ``--text-cache`` is set);
   the 11 GB encoder is freed before the DiT loads.
4. `generate`: batches of samples that share a switch schedule through `rollout`, then the streaming VAE decode block
   by block (long videos never hold the whole decode on the GPU), then one mp4 per sample.

``--model tiny`` needs no files: random DiT weights from ``--init-seed``, `HashTextEncoder`, and a tiny random
``AutoencoderKLWan`` (fixed seed), so it writes real (if meaningless) mp4s on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from astrolabe_rl.models.families import Family, SamplerConfig, get_family
from astrolabe_rl.models.text import read_prompt_file

if TYPE_CHECKING:
    from astrolabe_rl.models import CausalWan
    from astrolabe_rl.models.vae import WanVAE

FPS = 16
DEFAULT_WAN_DIR = "wan_models/Wan2.1-T2V-1.3B"  # the 14B folder holds the same umT5 and VAE


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
WAN_DOWNLOAD = "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B"


class GenerateError(ValueError):
    """A user-fixable problem (missing file, bad prompt line); the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------- frames


def latent_frames_for(pixel_frames: int, frames_per_block: int, first_block_frames: int | None = None) -> int:
    """Latent frames for a pixel-frame count, ``F = (T - 1) // 4 + 1`` as the official code counts (81 -> 21,
    960 -> 240), then rounded up to whole blocks."""
    if pixel_frames < 1:
        raise ValueError(f"--frames must be >= 1, got {pixel_frames}")
    f = (pixel_frames - 1) // 4 + 1
    first = first_block_frames or 0
    rest = max(0, f - first)
    return first + -(-rest // frames_per_block) * frames_per_block


def latent_frame_at(seconds: float, fps: int = FPS) -> int:
    """The latent frame holding the pixel frame shown at ``seconds`` (pixel 0 is latent 0, then 4 per latent)."""
    pixel = round(seconds * fps)
    return 0 if pixel <= 0 else (pixel - 1) // 4 + 1


# ---------------------------------------------------------------------------------------------- files


@dataclass
class Files:
    """Resolved weight files (None where the family needs none)."""

    checkpoint: Path | None = None
    lora: Path | None = None
    wan_dir: Path | None = None


def find_files(family: Family, args: argparse.Namespace, need_vae: bool) -> Files:
    """Resolve and check every file the family needs; one error lists everything missing, where it looked, and
    how to download it."""
    from astrolabe_rl.models.text import find_text_encoder_files
    from astrolabe_rl.models.vae import ORIGINAL_VAE_FILE

    if family.name == "tiny":  # random weights unless a checkpoint of the tiny geometry is given
        lora = Path(args.lora) if args.lora not in (None, "none") else None
        return Files(checkpoint=Path(args.checkpoint) if args.checkpoint else None, lora=lora)
    problems = []
    download = DEFAULT_CHECKPOINTS[family.name]
    checkpoint = Path(args.checkpoint or download.path)
    if not checkpoint.is_file():
        problems.append(f"checkpoint: {checkpoint} does not exist (pass --checkpoint PATH; download: "
                        f"{download.command})")
    lora = None
    if args.lora != "none" and (args.lora or family.name in DEFAULT_LORAS):
        lora = Path(args.lora or DEFAULT_LORAS[family.name])
        if not lora.is_file():
            problems.append(f"LoRA: {lora} does not exist (pass --lora PATH, or --lora none for the base alone; "
                            f"download: {download.command})")
    wan_dir = Path(args.wan_dir or DEFAULT_WAN_DIR)
    try:
        find_text_encoder_files(wan_dir)
    except FileNotFoundError as e:
        problems.append(f"text encoder: {e}")
    vae_places = (wan_dir / ORIGINAL_VAE_FILE, wan_dir / "vae" / "config.json")
    if need_vae and not any(p.is_file() for p in vae_places):
        problems.append(f"VAE: looked for {' and '.join(map(str, vae_places))} (pass --wan-dir DIR; download: "
                        f"{WAN_DOWNLOAD})")
    if problems:
        raise GenerateError(f"--model {family.name} is missing files:\n  " + "\n  ".join(problems))
    return Files(checkpoint, lora, wan_dir)


# ---------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Scene:
    prompt: str
    seconds: float | None  # None: runs to the end of the video


_SCENE = re.compile(r"^(?P<prompt>.*?)\s*(?:\[\s*(?P<sec>\d+(?:\.\d*)?)\s*s\s*\])?$")


def parse_prompt_line(line: str) -> list[Scene]:
    """``"scene one [10s] | scene two [5.5s] | scene three"`` -> scenes with durations (the last may omit it)."""
    scenes = []
    for part in line.split("|"):
        m = _SCENE.match(part.strip())
        if not m or not m.group("prompt"):
            raise GenerateError(f"empty scene in prompt line {line!r}; write 'scene one [10s] | scene two'")
        scenes.append(Scene(m.group("prompt"), float(m.group("sec")) if m.group("sec") else None))
    return scenes


def switch_frames(scenes: list[Scene], sampler: SamplerConfig, num_frames: int) -> list[int]:
    """Latent start frame of every scene (``[0, s1, s2, ...]``): the scene's start time at 16 fps, snapped to the
    nearest block boundary (ties go later)."""
    starts = [s for s, _ in sampler.block_bounds(num_frames)]
    frames, t = [0], 0.0
    for prev, scene in zip(scenes, scenes[1:]):
        if prev.seconds is None:
            raise GenerateError(
                f"scene {prev.prompt!r} needs a duration before the next one, e.g. '{prev.prompt} [10s]'"
            )
        t += prev.seconds
        latent = latent_frame_at(t)
        if latent >= num_frames:
            raise GenerateError(
                f"scene {scene.prompt!r} starts at {t:g}s, after the video ends ({num_frames} latent frames = "
                f"{(1 + 4 * (num_frames - 1)) / FPS:.2f}s); raise --frames"
            )
        snapped = min(starts, key=lambda s: (abs(s - latent), -s))
        if snapped <= frames[-1]:
            raise GenerateError(
                f"scene {scene.prompt!r} at {t:g}s snaps to latent frame {snapped}, not after the previous scene's "
                f"start {frames[-1]} (blocks are {sampler.frames_per_block} latent frames); lengthen the scenes"
            )
        frames.append(snapped)
    return frames


@dataclass
class Sample:
    """One video to generate."""

    line: int  # index of its prompt line
    scenes: list[Scene]
    starts: list[int]  # latent start frame of each scene
    seed: int
    out: Path | None = None
    prompts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = [s.prompt for s in self.scenes]


def read_prompt_lines(args: argparse.Namespace) -> list[str]:
    if not args.prompts:
        return [args.prompt]
    try:
        return read_prompt_file(args.prompts)
    except ValueError as e:
        raise GenerateError(str(e)) from None


def video_paths(out: str | None, samples: list[Sample]) -> list[Path | None]:
    """``x.mp4`` for a single video, ``x_<line>_s<seed>.mp4`` for several; a folder gets ``<line>_s<seed>.mp4``."""
    if out is None:
        return [None] * len(samples)
    base = Path(out)
    if base.suffix == ".mp4":
        if len(samples) == 1:
            return [base]
        return [base.with_name(f"{base.stem}_{s.line:03d}_s{s.seed}.mp4") for s in samples]
    return [base / f"{s.line:03d}_s{s.seed}.mp4" for s in samples]


def plan(args: argparse.Namespace, sampler: SamplerConfig, num_frames: int, out: str | None) -> list[Sample]:
    """Samples in prompt-line order, ``--num-videos`` per line, seeds ``--seed, --seed + 1, ...``, videos under
    ``out`` (None: no videos)."""
    samples = []
    for i, line in enumerate(read_prompt_lines(args)):
        scenes = parse_prompt_line(line)
        starts = switch_frames(scenes, sampler, num_frames)
        for _ in range(args.num_videos):
            samples.append(Sample(i, scenes, starts, args.seed + len(samples)))
    for sample, path in zip(samples, video_paths(out, samples)):
        sample.out = path
    return samples


def batches(samples: list[Sample], size: int) -> list[list[Sample]]:
    """Consecutive groups of at most ``size`` samples sharing a switch schedule (one rollout each)."""
    groups: list[list[Sample]] = []
    for s in samples:
        if groups and len(groups[-1]) < size and groups[-1][0].starts == s.starts:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


# ---------------------------------------------------------------------------------------------- components


def encode_prompts(family: Family, files: Files, prompts: list[str], args: argparse.Namespace,
                   device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Embeddings ``[text_len, text_dim]`` (CPU) of every distinct prompt, encoded once (cached on disk if asked)."""
    from astrolabe_rl.models.text import HashTextEncoder, PromptCache, umt5_cache_id

    distinct = list(dict.fromkeys(prompts))
    cfg = family.model
    if family.name == "tiny":
        encoder = HashTextEncoder(cfg.text_dim, cfg.text_len, seed=args.init_seed)
        return dict(zip(distinct, encoder(distinct)))
    if not args.text_cache:
        embeds = _encode_umt5(files, distinct, args, cfg.text_len, device, dtype)
    else:
        cache = PromptCache(args.text_cache, umt5_cache_id(files.wan_dir, dtype, cfg.text_len))
        missing = cache.missing(distinct)
        if missing:  # the encoder is loaded only when some prompt is new
            for prompt, emb in _encode_umt5(files, missing, args, cfg.text_len, device, dtype).items():
                cache.put(prompt, emb)
        embeds = dict(zip(distinct, cache(distinct)))
    if device.type == "cuda":  # the encoder is gone: hand its memory back before the DiT loads
        torch.cuda.empty_cache()
    return embeds


def _encode_umt5(files: Files, prompts: list[str], args: argparse.Namespace, text_len: int, device: torch.device,
                 dtype: torch.dtype, batch_size: int = 16) -> dict[str, Tensor]:
    """Load umT5 from ``--wan-dir`` and encode ``prompts`` onto the CPU; the encoder is dropped on return."""
    from astrolabe_rl.models.text import load_umt5

    encoder = load_umt5(files.wan_dir, device=device, dtype=dtype, text_len=text_len,
                        trust_pickle=args.trust_checkpoint)
    out: dict[str, Tensor] = {}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        out.update(zip(chunk, encoder(chunk).cpu()))
    return out


def load_model(
    family: Family, files: Files, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> "CausalWan":
    """The DiT: the family's checkpoint (LoRA merged); ``tiny`` without one gets random weights of ``--init-seed``."""
    from astrolabe_rl.models import CausalWan
    from astrolabe_rl.models.loading import load_causal_wan

    if files.checkpoint is None:
        torch.manual_seed(args.init_seed)  # the tiny model's random weights are a function of --init-seed
        return CausalWan(family.model).to(device, dtype).eval()
    return load_causal_wan(
        files.checkpoint, family.model, key=args.checkpoint_key or family.checkpoint_key, lora=files.lora,
        lora_alpha=args.lora_alpha, device=device, dtype=dtype, trust_pickle=args.trust_checkpoint,
    )


def load_decoder(
    family: Family, files: Files, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> "WanVAE":
    """The Wan VAE from ``--wan-dir``, or for ``tiny`` a random tiny ``AutoencoderKLWan`` (seed 0)."""
    from astrolabe_rl.models.vae import WanVAE, load_vae, random_vae, tiny_vae_config

    if family.name == "tiny":
        model = random_vae(tiny_vae_config(), seed=0, device=device, dtype=dtype)
        return WanVAE(model, chunk_frames=args.vae_chunk)
    return load_vae(files.wan_dir, device=device, dtype=dtype, chunk_frames=args.vae_chunk)


# ---------------------------------------------------------------------------------------------- generate


def generate(args: argparse.Namespace) -> dict:
    """Run the whole command; returns the summary printed as JSON."""
    from tqdm import tqdm

    family = get_family(args.model)
    out = "outputs" if args.out is None and args.latents_out is None else args.out
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if device.type == "cuda":  # the VAE decoder repeats a few conv shapes: let cuDNN pick the fastest once
        torch.backends.cudnn.benchmark = True
    base = family.sampler
    frames = args.latent_frames or latent_frames_for(args.frames, base.frames_per_block, base.first_block_frames)
    sampler = family.sampler_for(frames)

    samples = plan(args, sampler, frames, out)
    files = find_files(family, args, need_vae=out is not None)
    embeds = encode_prompts(family, files, [p for s in samples for p in s.prompts], args, device, dtype)
    model = load_model(family, files, args, device, dtype)
    vae = load_decoder(family, files, args, device, dtype) if out is not None else None

    groups = batches(samples, args.batch)
    blocks = len(sampler.block_bounds(frames))
    bar = tqdm(total=blocks * len(groups), desc="blocks", unit="block", file=sys.stderr, disable=args.quiet)
    all_latents, written = [], []
    for group in groups:
        done = bar.n
        latents = rollout_group(model, group, embeds, family, sampler, frames,
                                progress=lambda i, n, done=done: bar.update(done + i - bar.n))
        if args.latents_out:
            all_latents.append(latents.float().cpu())
        if vae is not None:
            written += write_videos(vae, latents, group, sampler)
    bar.close()
    if args.latents_out:
        save_latents(args, family, samples, torch.cat(all_latents), frames)
    return {"latents": [len(samples), frames, family.model.in_dim, *family.latent_hw],
            "seeds": [s.seed for s in samples], "latents_out": args.latents_out, "videos": written}


def rollout_group(model: "CausalWan", group: list[Sample], embeds: dict[str, Tensor], family: Family,
                  sampler: SamplerConfig, frames: int, progress: Callable[[int, int], None]) -> Tensor:
    """One rollout for samples sharing a scene schedule -> latents ``[B, F, C, h, w]``; each later scene becomes a
    `PromptSwitch` at its block (re-cached under the new prompt where the family does that)."""
    from astrolabe_rl.rollout import PromptSwitch, rollout

    text = torch.stack([embeds[s.prompts[0]] for s in group])
    switches = [PromptSwitch(frame, torch.stack([embeds[s.prompts[j]] for s in group]))
                for j, frame in enumerate(group[0].starts[1:], start=1)]
    result = rollout(model, text, num_frames=frames, latent_hw=family.latent_hw, sampler=sampler,
                     seeds=[s.seed for s in group], switches=switches, progress=progress)
    return result.latents


def write_videos(vae: "WanVAE", latents: Tensor, group: list[Sample], sampler: SamplerConfig) -> list[str]:
    """Decode ``latents`` ``[B, F, C, h, w]`` block by block (frames collected on the CPU) and write one mp4 each."""
    from astrolabe_rl.video import write_mp4

    decoder = vae.stream()
    pieces = [decoder(latents[:, s:e]).cpu() for s, e in sampler.block_bounds(latents.shape[1])]
    videos = torch.cat(pieces, dim=1)  # [B, T, 3, H, W] in [0, 1]
    return [str(write_mp4(s.out, videos[i], fps=FPS)) for i, s in enumerate(group)]


def save_latents(args: argparse.Namespace, family: Family, samples: list[Sample], latents: Tensor, frames: int) -> None:
    from safetensors.torch import save_file

    meta = {
        "model": family.name,
        "prompts": json.dumps([" | ".join(s.prompts) for s in samples]),
        "seeds": json.dumps([s.seed for s in samples]),
        "init_seed": str(args.init_seed),
        "latent_frames": str(frames),
        "layout": "[B, F, C, H, W]",
    }
    Path(args.latents_out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, args.latents_out, metadata=meta)
