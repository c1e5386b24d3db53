"""``astrolabe generate``: prompts -> mp4 videos (and/or latents) with any model family.

The pipeline, one function per phase:

1. `plan`: prompt lines -> samples (prompt schedule, seed, output path). A line ``scene one [10s] | scene two``
   switches prompt after 10 s (16 fps -> latent frame, snapped to a block boundary), with the LongLive re-cache.
2. The model, built the one way every command builds it (`models.build`): the family's files are checked at once
   (each missing file reported with where it was looked for and how to download it); every distinct prompt is
   encoded once (through the on-disk prompt cache with ``--text-cache``) and the 11 GB encoder is freed before the
   DiT loads; a trained adapter (``--adapter``) is folded into the DiT, so sampling runs merged weights.
3. `generate`: batches of samples that share a switch schedule through `rollout`, then the streaming decode block
   by block (long videos never hold the whole decode on the GPU), then one mp4 per sample, named by `video_names`
   with the full prompts in ``videos.json`` beside them (what ``astrolabe evaluate`` reads back).

``--model tiny`` needs no files (random DiT weights from ``--init-seed``, a hashing text encoder, a tiny random
``AutoencoderKLWan``); ``--model toy`` runs the shipped toy-world model. Both write real mp4s on a CPU in seconds.

The module imports no torch at import time, so ``astrolabe --help`` starts fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import Tensor

    from astrolabe_rl.models import CausalWan
    from astrolabe_rl.models.build import Decoder, ModelSource
    from astrolabe_rl.models.families import Family, SamplerConfig

FPS = 16
SIDECAR = "videos.json"  # {file name: {"prompt", "index", "seed"}} beside a folder of generated videos
_NAME_CHARS = 80  # prompt characters kept in a file name (the full prompt is in the sidecar)


class GenerateError(ValueError):
    """A user-fixable problem (missing file, bad prompt line); the CLI prints it without a traceback."""


def _default_source() -> "ModelSource":
    from astrolabe_rl.models.build import ModelSource  # imported when used: this module stays light for --help

    return ModelSource()


@dataclass
class GenerateOptions:
    """Everything ``astrolabe generate`` does, typed (the CLI flags map one to one; ``evaluate`` builds one directly).

    Attributes:
        model: family preset (`models.FAMILIES`).
        source: where the weights come from (`models.build.ModelSource`: checkpoint, adapter, wan_dir, ...).
        prompt: one prompt line (used when ``prompts`` is None).
        prompts: a prompt file, one line per video group.
        frames: pixel frames (None: the family's training horizon); ``latent_frames`` overrides it.
        seed: seed of the first video; video i uses seed + i.
        num_videos: videos per prompt line.
        batch: videos generated together.
        out: ``x.mp4`` (one video) or a folder; None with ``latents_out``: no videos.
        latents_out: a ``.safetensors`` receiving the latents ``[B, F, C, H, W]``.
        recache_mask: attention among the frames re-encoded at a prompt switch (`SamplerConfig.recache_mask`):
            ``auto`` (what the family's checkpoint was trained with: bidirectional for LongLive, block_causal
            otherwise), ``block_causal`` or ``bidirectional``.
        device, dtype: None: cuda + bfloat16 when available, else cpu + float32.
        quiet: no progress bar.
    """

    model: str = "tiny"
    source: "ModelSource" = field(default_factory=_default_source)
    prompt: str = "a red ball rolling to the right"
    prompts: str | None = None
    frames: int | None = None
    latent_frames: int | None = None
    seed: int = 0
    num_videos: int = 1
    batch: int = 1
    out: str | None = None
    latents_out: str | None = None
    recache_mask: str = "auto"
    device: str | None = None
    dtype: str | None = None
    quiet: bool = False


# ---------------------------------------------------------------------------------------------- frames


def latent_frames_for(pixel_frames: int, frames_per_block: int, first_block_frames: int | None = None,
                      temporal_stride: int = 4) -> int:
    """Latent frames for a pixel-frame count, ``F = (T - 1) // stride + 1`` as the official code counts (81 -> 21,
    960 -> 240; the toy VAE has stride 1), then rounded up to whole blocks."""
    if pixel_frames < 1:
        raise GenerateError(f"--frames must be >= 1, got {pixel_frames}")
    f = (pixel_frames - 1) // temporal_stride + 1
    first = first_block_frames or 0
    rest = max(0, f - first)
    return first + -(-rest // frames_per_block) * frames_per_block


def latent_frame_at(seconds: float, fps: int = FPS, temporal_stride: int = 4) -> int:
    """The latent frame holding the pixel frame shown at ``seconds`` (pixel 0 is latent 0, then ``stride`` pixel
    frames per latent frame)."""
    pixel = round(seconds * fps)
    return 0 if pixel <= 0 else (pixel - 1) // temporal_stride + 1


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


def switch_frames(scenes: list[Scene], sampler: "SamplerConfig", num_frames: int, temporal_stride: int = 4) -> list[int]:
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
        latent = latent_frame_at(t, temporal_stride=temporal_stride)
        if latent >= num_frames:
            seconds = (1 + temporal_stride * (num_frames - 1)) / FPS
            raise GenerateError(
                f"scene {scene.prompt!r} starts at {t:g}s, after the video ends ({num_frames} latent frames = "
                f"{seconds:.2f}s); raise --frames"
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
    text: str  # the whole prompt line (scenes and all)
    scenes: list[Scene]
    starts: list[int]  # latent start frame of each scene
    seed: int
    index: int  # its number among the videos of the same prompt line (0 .. num_videos - 1)
    out: Path | None = None
    prompts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = [s.prompt for s in self.scenes]


def read_prompt_lines(opts: GenerateOptions) -> list[str]:
    from astrolabe_rl.models.text import read_prompt_file

    if not opts.prompts:
        return [opts.prompt]
    try:
        return read_prompt_file(opts.prompts)
    except (ValueError, FileNotFoundError) as e:
        raise GenerateError(str(e)) from None


def video_name(prompt: str, index: int) -> str:
    """The one naming scheme of generated videos, read back by ``astrolabe evaluate``: ``{prompt}-{index}.mp4`` (the
    VBench convention) with the prompt made file-safe (``/`` and control characters become ``_``); a prompt longer
    than 80 characters is cut and tagged with a hash of the whole, whose full text lives in the sidecar."""
    safe = re.sub(r"[/\\\x00-\x1f]", "_", prompt).strip() or "_"
    if len(safe) > _NAME_CHARS:
        safe = f"{safe[:_NAME_CHARS].rstrip()}~{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"
    return f"{safe}-{index}.mp4"


def video_paths(out: str | None, samples: list[Sample]) -> list[Path | None]:
    """``x.mp4`` for a single video; a folder gets `video_name` files (several videos given ``x.mp4`` go into ``x/``)."""
    if out is None:
        return [None] * len(samples)
    base = Path(out)
    if base.suffix == ".mp4":
        if len(samples) == 1:
            return [base]
        base = base.with_suffix("")
    return [base / video_name(s.text, s.index) for s in samples]


def plan(opts: GenerateOptions, sampler: "SamplerConfig", num_frames: int, temporal_stride: int) -> list[Sample]:
    """Samples in prompt-line order, ``num_videos`` per line, seeds ``seed, seed + 1, ...``, videos under ``out``."""
    samples = []
    for i, line in enumerate(read_prompt_lines(opts)):
        scenes = parse_prompt_line(line)
        starts = switch_frames(scenes, sampler, num_frames, temporal_stride)
        for k in range(opts.num_videos):
            samples.append(Sample(i, line, scenes, starts, opts.seed + len(samples), k))
    paths = video_paths(opts.out, samples)
    if len({p for p in paths if p is not None}) < sum(p is not None for p in paths):
        raise GenerateError("two prompt lines are identical, so their videos would get the same name; "
                            "raise --num-videos instead of repeating a line")
    for sample, path in zip(samples, paths):
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


# ---------------------------------------------------------------------------------------------- generate


def generate(opts: GenerateOptions) -> dict[str, Any]:
    """Run the whole command; returns the summary printed as JSON."""
    import torch
    from tqdm import tqdm

    from astrolabe_rl.models import build
    from astrolabe_rl.models.families import get_family

    family = get_family(opts.model)
    if opts.out is None and opts.latents_out is None:
        opts.out = "outputs"
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, opts.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if device.type == "cuda":  # the VAE decoder repeats a few conv shapes: let cuDNN pick the fastest once
        torch.backends.cudnn.benchmark = True
    base = family.sampler
    pixel = opts.frames or 1 + family.temporal_stride * (family.horizon_frames - 1)
    frames = opts.latent_frames or latent_frames_for(pixel, base.frames_per_block, base.first_block_frames,
                                                     family.temporal_stride)
    sampler = family.sampler_for(frames).with_recache_mask(opts.recache_mask)

    samples = plan(opts, sampler, frames, family.temporal_stride)
    source = opts.source
    if family.loader == build.OFFICIAL_LOADER:
        build.check_official_files(family, source, need_vae=opts.out is not None)
    encode = build.build_text_encoder(family, source, device, dtype)
    prompts = list(dict.fromkeys(p for s in samples for p in s.prompts))
    embeds = dict(zip(prompts, encode(prompts).cpu()))
    del encode  # the encoder is gone: hand its memory back before the DiT loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build.build_dit(family, source, device, dtype)
    decoder = build.build_decoder(family, source, device, dtype) if opts.out is not None else None

    groups = batches(samples, opts.batch)
    blocks = len(sampler.block_bounds(frames))
    bar = tqdm(total=blocks * len(groups), desc="blocks", unit="block", file=sys.stderr, disable=opts.quiet)
    all_latents, written = [], []
    for group in groups:
        done = bar.n
        latents = rollout_group(model, group, embeds, family, sampler, frames,
                                progress=lambda i, n, done=done: bar.update(done + i - bar.n))
        if opts.latents_out:
            all_latents.append(latents.float().cpu())
        if decoder is not None:
            written += write_videos(decoder, latents, group, sampler)
    bar.close()
    if written and not (len(samples) == 1 and Path(opts.out).suffix == ".mp4"):  # a folder of videos
        write_sidecar(samples)
    if opts.latents_out:
        save_latents(opts, family, samples, torch.cat(all_latents), frames)
    return {"latents": [len(samples), frames, family.model.in_dim, *family.latent_hw],
            "seeds": [s.seed for s in samples], "latents_out": opts.latents_out, "videos": written}


def rollout_group(model: "CausalWan", group: list[Sample], embeds: dict[str, "Tensor"], family: "Family",
                  sampler: "SamplerConfig", frames: int, progress: Callable[[int, int], None]) -> "Tensor":
    """One rollout for samples sharing a scene schedule -> latents ``[B, F, C, h, w]``; each later scene becomes a
    `PromptSwitch` at its block (re-cached under the new prompt where the family does that)."""
    import torch

    from astrolabe_rl.rollout import PromptSwitch, rollout

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    stack = lambda j: torch.stack([embeds[s.prompts[j]] for s in group]).to(device, dtype)  # noqa: E731
    switches = [PromptSwitch(frame, stack(j)) for j, frame in enumerate(group[0].starts[1:], start=1)]
    result = rollout(model, stack(0), num_frames=frames, latent_hw=family.latent_hw, sampler=sampler,
                     seeds=[s.seed for s in group], switches=switches, progress=progress)
    return result.latents


def write_videos(decoder: "Decoder", latents: "Tensor", group: list[Sample], sampler: "SamplerConfig") -> list[str]:
    """Decode ``latents`` ``[B, F, C, h, w]`` block by block (frames collected on the CPU) and write one mp4 each."""
    import torch

    from astrolabe_rl.video import write_mp4

    stream = decoder.stream()
    pieces = [stream(latents[:, s:e]).cpu() for s, e in sampler.block_bounds(latents.shape[1])]
    videos = torch.cat(pieces, dim=1)  # [B, T, 3, H, W] in [0, 1]
    return [str(write_mp4(s.out, videos[i], fps=FPS)) for i, s in enumerate(group)]


def write_sidecar(samples: list[Sample]) -> None:
    """``videos.json`` in each output folder: every video's full prompt line, index and seed (file names may cut
    a long prompt; ``astrolabe evaluate`` reads the prompts from here)."""
    by_folder: dict[Path, dict[str, Any]] = {}
    for s in samples:
        if s.out is not None:
            by_folder.setdefault(s.out.parent, {})[s.out.name] = {"prompt": s.text, "index": s.index, "seed": s.seed}
    for folder, entries in by_folder.items():
        path = folder / SIDECAR
        old, problem = read_sidecar(folder)
        if problem:  # keep what it held for a person to read; the new videos get a sidecar that works
            path.replace(path.with_name(f"{SIDECAR}.unreadable"))
            print(f"warning: {problem}; moved it to {SIDECAR}.unreadable and wrote a new one", file=sys.stderr)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**old, **entries}, indent=1, ensure_ascii=False))
        tmp.replace(path)


def read_sidecar(folder: Path) -> tuple[dict[str, Any], str | None]:
    """A folder's ``videos.json`` as ``{file name: entry}`` (empty when there is none) and what is wrong with it
    (None when nothing is): a file that is not JSON (cut off by a crash?) or not a JSON object reads as empty with
    the problem said; the entries are checked by whoever reads them (`sidecar_prompt`)."""
    path = folder / SIDECAR
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return {}, f"{path} is not valid JSON ({e})"
    if not isinstance(data, dict):
        return {}, f"{path} must hold a JSON object {{file name: {{\"prompt\": ...}}}}; it holds a {type(data).__name__}"
    return data, None


def sidecar_prompt(entry: Any) -> tuple[str, int | None]:
    """The prompt and index of one ``videos.json`` entry: ``{"prompt": str, "index": int, ...}``, or a bare prompt
    string; raises ValueError saying what the entry should be."""
    if isinstance(entry, str):
        return entry, None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise ValueError(f'its {SIDECAR} entry must be {{"prompt": "...", "index": 0}} or a prompt string; got '
                         f"{json.dumps(entry)[:80]}")
    index = entry.get("index")
    return entry["prompt"], index if isinstance(index, int) and not isinstance(index, bool) else None


def save_latents(opts: GenerateOptions, family: "Family", samples: list[Sample], latents: "Tensor",
                 frames: int) -> None:
    from safetensors.torch import save_file

    meta = {
        "model": family.name,
        "prompts": json.dumps([s.text for s in samples]),
        "seeds": json.dumps([s.seed for s in samples]),
        "init_seed": str(opts.source.init_seed),
        "latent_frames": str(frames),
        "layout": "[B, F, C, H, W]",
    }
    Path(opts.latents_out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, opts.latents_out, metadata=meta)


# ---------------------------------------------------------------------------------------------- command line


_DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = ("model family preset: self_forcing, causal_forcing, causal_forcing_frame, causal_forcing_pp_{1,2}step, "
              "longlive, causvid, krea14b, toy (the shipped toy-world model), tiny (random weights; default)")


def add_weight_flags(g: argparse._ArgumentGroup) -> None:
    """The flags that say where a model's weights come from (shared by ``generate``, ``evaluate``, ``merge-lora``)."""
    g.add_argument("--model", "--preset", dest="model", default="tiny", help=MODEL_HELP)
    g.add_argument("--checkpoint", default=None,
                   help="the family's .pt / .safetensors (default: where its README downloads it; toy: the shipped "
                        "weights; tiny: random weights)")
    g.add_argument("--checkpoint-key", default=None,
                   help="entry of the .pt dict to load (default: the family's, e.g. generator_ema)")
    g.add_argument("--adapter", default=None,
                   help="an adapter trained with astrolabe: a run folder, one of its checkpoints, or a peft folder "
                        "(folded into the DiT)")
    g.add_argument("--wan-dir", default=None,
                   help="Wan2.1-T2V folder with the umT5 encoder, tokenizer and VAE, original or diffusers layout "
                        "(default: wan_models/Wan2.1-T2V-1.3B)")
    g.add_argument("--lora", default=None, help="LoRA to merge (LongLive: lora.pt, found by default); 'none' to skip")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank, LongLive's 256/256)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled Python objects in .pt files (only for files you trust)")
    g.add_argument("--init-seed", type=int, default=0, help="weight seed of the random tiny model")


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    """The `GenerateOptions` named by parsed flags (flags another command lacks keep their defaults)."""
    from astrolabe_rl.models.build import ModelSource

    given = vars(args)
    source = {f.name for f in fields(ModelSource)}
    names = {f.name for f in fields(GenerateOptions)} - {"source"}
    return GenerateOptions(source=ModelSource(**{k: v for k, v in given.items() if k in source}),
                           **{k: v for k, v in given.items() if k in names})


def cmd_generate(args: argparse.Namespace) -> int:
    summary = generate(options_from_args(args))
    print(json.dumps(summary))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``astrolabe generate``: the flags, grouped as a user reads them."""
    g = sub.add_parser("generate", help="generate videos with a streaming AR model",
                       description="Generate mp4 videos (and/or latents) with a streaming AR model.")
    add_weight_flags(g.add_argument_group("weights"))
    p = g.add_argument_group("prompts and videos")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=GenerateOptions.prompt,
                     help="one prompt; 'scene one [10s] | scene two' switches prompt after 10 s")
    src.add_argument("--prompts", help="a text file, one prompt (or 'a [10s] | b [10s] | c' scene list) per line")
    p.add_argument("--frames", type=int, default=None,
                   help="pixel frames at 16 fps (default: the model's training length, 81 = 21 latent frames; "
                        "240/480/960 for long video through the rolling cache; rounded up to whole blocks)")
    p.add_argument("--latent-frames", type=int, default=None, help="latent frames (overrides --frames)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first video; video i uses seed + i")
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt line")
    p.add_argument("--batch", type=int, default=1, help="videos generated together (memory grows with it)")
    p.add_argument("--recache-mask", default="auto", choices=("auto", "block_causal", "bidirectional"),
                   help="attention among the frames re-encoded under the new prompt at a scene switch; auto: what "
                        "the model was trained with (LongLive: bidirectional, its official re-cache)")
    o = g.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="x.mp4 (one video) or a folder of '{prompt}-{i}.mp4' files with their full prompts in "
                        f"{SIDECAR} (default: outputs/, unless only --latents-out is given)")
    o.add_argument("--latents-out", default=None, help="write the latents [B, F, C, H, W] to this .safetensors")
    o.add_argument("--text-cache", default=None, help="folder caching prompt embeddings (skips the encoder)")
    r = g.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", default=None, choices=_DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    r.add_argument("--vae-chunk", type=int, default=3, help="latent frames per VAE decoder call (speed vs memory)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
