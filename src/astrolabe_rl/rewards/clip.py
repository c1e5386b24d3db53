"""The CLIP family, per frame: LAION aesthetic v2, CLIPScore, PickScore and HPSv2(.1) (`reference/rewards.md`
§2.3, §2.4, §2.6, §2.7).

All four are a CLIP model (``transformers.CLIPModel``) scoring frames against the prompt:

=========== ================================================= ============================ ====================
reward      score per frame                                   weights                      default pooling
=========== ================================================= ============================ ====================
aesthetic   MLP(L2-normalised CLIP-L/14 image embedding)      CLIP-L/14 + MLP head         mean
clipscore   2.5 · max(cos(image, "A photo depicts " + p), 0)  CLIP-L/14                    mean
clip_cosine cos(image, text)  (NFT / Flow-GRPO convention)    CLIP-L/14                    mean
pickscore   exp(logit_scale) · cos / divisor                  PickScore_v1 (CLIP-H/14)     mean
hpsv2       cos(image, text)                                  HPS_v2(.1) (open_clip H/14)  top 30 % (Astrolabe)
=========== ================================================= ============================ ====================

``clipscore`` is CLIPScore as published (Hessel et al. 2021, `reference/rewards.md` §2.7): weight w = 2.5, clamped
at 0, the caption prefixed with "A photo depicts " (their ViT-B/32 is one ``clip=`` folder away; we default to
CLIP-L/14 like torchmetrics, whose ``max(100·cos, 0)`` is ours × 40 without the prefix). The plain cosine that
Flow-GRPO / DiffusionNFT call "CLIP score" is ``clip_cosine``.

Preprocessing is torch-only on the reward's device, as each model was trained and released:

* CLIP processor (aesthetic, clipscore, clip_cosine, pickscore): 8-bit quantise, resize the short side + centre crop
  emulating PIL's two 8-bit passes, OpenAI CLIP normalisation; the Hugging Face tokenizer padded to 77.
* open_clip (hpsv2): one bicubic antialiased resize of the float frames (long side to 224, no 8-bit rounding), zero
  padding to a centred square, normalisation, as the official tensor transform does; open_clip's tokenisation:
  ``ftfy.fix_text`` + HTML unescape + whitespace cleaning, ``<|endoftext|>`` ends the text and zeros follow it, and
  ``!`` is an ordinary token (the laion tokenizer folder's ``"!"`` pad token is dropped; see `open_clip_tokenizer`).

Models with the same weights, device and dtype are one instance (aesthetic and clipscore share CLIP-L/14).

Files (nothing is downloaded; defaults under ``$ASTROLABE_REWARD_ROOT``):
    clip-vit-large-patch14/                 HF ``openai/clip-vit-large-patch14`` (aesthetic, clipscore)
    aesthetic/sac+logos+ava1-l14-linearMSE.pth   the improved-aesthetic-predictor head (keys ``layers.{0,2,4,6,7}``)
    PickScore_v1/                           HF ``yuvalkirstain/PickScore_v1``
    CLIP-ViT-H-14-laion2B-s32B-b79K/        HF ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (tokenizer for PickScore
                                            and HPSv2; only the tokenizer files are read)
    HPSv2/HPS_v2.1_compressed.pt            HF ``xswu/HPSv2`` (open_clip ViT-H-14 state dict, converted at load;
                                            the laion base weights are not needed)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from astrolabe_rl.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    bicubic,
    find_path,
    normalize,
    quantize,
    resize_levels,
    resolve_device,
    resolve_dtype,
    seeded,
    shared,
    top_frac_mean,
    uniform_indices,
)
from astrolabe_rl.rewards.base import check_videos, register_reward

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

# ------------------------------------------------------------------------------------------ preprocessing


def resize_crop(frames: Tensor, size: int) -> Tensor:
    """The CLIP image processor in torch: frames ``[N, 3, H, W]`` in [0, 1] -> normalised ``[N, 3, size, size]``.

    8-bit quantise, resize the short side to ``size`` (long side ``int(size · long / short)``) bicubic with
    antialiasing, centre crop (offset ``(dim - size) // 2``), normalise.
    """
    h, w = frames.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    levels = resize_levels(quantize(frames), (size, new_long) if h <= w else (new_long, size))
    top, left = (levels.shape[-2] - size) // 2, (levels.shape[-1] - size) // 2
    return normalize(levels[..., top:top + size, left:left + size], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def resize_pad(frames: Tensor, size: int) -> Tensor:
    """open_clip's ``ResizeMaxSize`` on a float tensor, as HPSv2's official tensor transform runs it: frames
    ``[N, 3, H, W]`` in [0, 1] -> normalised ``[N, 3, size, size]``.

    Long side -> ``size`` (short side ``round(dim · scale)``) in one bicubic antialiased pass on the float values
    (no 8-bit quantisation or rounding, no clamping of the bicubic overshoot), zero-pad (black, before
    normalisation) to a centred square, normalise.
    """
    h, w = frames.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = bicubic(frames.float(), (nh, nw))
    ph, pw = size - nh, size - nw
    x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, full=1.0)


# ------------------------------------------------------------------------------------------------ models


class AestheticHead(nn.Module):
    """The improved LAION aesthetic predictor's MLP, key-compatible with ``sac+logos+ava1-l14-linearMSE.pth``.

    Linear layers with dropout between and no activation (as released): 768 -> 1024 -> 128 -> 64 -> 16 -> 1.
    """

    def __init__(self, dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        d = dims
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[N, 768]`` -> scores ``[N]`` (about 1-10)."""
        return self.layers(embeds.float())[:, 0]

    @classmethod
    def from_file(cls, path: Path) -> "AestheticHead":
        """Load the released head (its widths are read from the file: 768 -> ... -> 1 for CLIP-L/14)."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        try:
            dims = (state["layers.0.weight"].shape[1], *(state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)))
        except KeyError as e:
            raise ValueError(f"{path} is not an aesthetic-predictor head (no {e.args[0]}); expected keys "
                             "layers.{0,2,4,6,7}.{weight,bias}") from e
        head = cls(dims)
        head.load_state_dict(state)
        return head.eval().requires_grad_(False)


@dataclass
class ClipScorer:
    """A CLIP model with torch preprocessing; embeddings come back L2-normalised in float32.

    Args:
        fit: "crop" (CLIP processor, `resize_crop`) or "pad" (open_clip ResizeMaxSize on floats, `resize_pad`).
        text: "hf" (the Hugging Face tokenizer, padded with its pad token) or "open_clip" (`open_clip_ids`).
    """

    model: "CLIPModel"
    tokenizer: Any
    fit: str = "crop"
    text: str = "hf"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def pixels(self, frames: Tensor) -> Tensor:
        """Frames ``[N, 3, H, W]`` in [0, 1] -> the model's normalised input ``[N, 3, S, S]``."""
        fit = resize_crop if self.fit == "crop" else resize_pad
        return fit(frames.to(self.device), self.image_size)

    @torch.no_grad()
    def image_embeds(self, frames: Tensor) -> Tensor:
        """``[N, 3, H, W]`` -> ``[N, E]`` unit vectors."""
        pixels = self.pixels(frames).to(self.model.dtype)
        with self._lock:
            out = self.model.get_image_features(pixel_values=pixels)
        return nn.functional.normalize(_features(out).float(), dim=-1)

    def tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``input_ids`` and ``attention_mask`` ``[P, 77]`` (the model's length; truncated, padded) as the model's
        own pipeline makes them (``text``)."""
        length = self.model.config.text_config.max_position_embeddings
        if self.text == "open_clip":
            return open_clip_ids(self.tokenizer, prompts, length)
        enc = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        """``P`` prompts -> ``[P, E]`` unit vectors."""
        ids, mask = self.tokens(prompts)
        with self._lock:
            out = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return nn.functional.normalize(_features(out).float(), dim=-1)


def open_clip_ids(tokenizer: "PreTrainedTokenizerBase", prompts: list[str], length: int) -> tuple[Tensor, Tensor]:
    """open_clip's tokenisation (HPSv2 was trained and released with it) through a CLIP BPE tokenizer: ``[P, length]``
    ids and attention mask.

    The text is cleaned as open_clip cleans it (``ftfy.fix_text``, HTML unescaped twice, whitespace collapsed; the
    tokenizer lower-cases), wrapped in ``<|startoftext|> … <|endoftext|>``, truncated to ``length`` (the end token
    kept), and zero-filled after the end token. ``tokenizer`` must not treat ``!`` (id 0) as a special token: use
    `open_clip_tokenizer` for a Hugging Face CLIP tokenizer folder.
    """
    from astrolabe_rl.models.text import clean_prompt

    enc = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt")
    mask = enc["attention_mask"]
    return enc["input_ids"].masked_fill(mask == 0, 0), mask


def open_clip_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    """A Hugging Face CLIP tokenizer folder made to tokenise as open_clip does.

    The laion ViT-H-14 folder declares ``"!"`` (id 0) its pad token, so the Hugging Face tokenizer splits every
    ``!`` of a prompt off as that special token (one id 0 per character, no end-of-word BPE). open_clip has no pad
    token: ``!`` is ordinary text (``"!</w>"`` = 256, ``"!!</w>"`` = 748) and zeros merely fill the row after
    ``<|endoftext|>``. So the BPE pipeline is rebuilt with only the start and end tokens special, padding with
    ``<|endoftext|>`` (`open_clip_ids` then writes the zeros).
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = _clip_tokenizer(folder)
    if not base.is_fast:
        raise ValueError(f"{folder}: need a fast (tokenizer.json-backed) CLIP tokenizer to rebuild open_clip's")
    spec = json.loads(base.backend_tokenizer.to_str())
    ends = ("<|startoftext|>", "<|endoftext|>")
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["content"] in ends]
    if len(spec["added_tokens"]) != 2:
        raise ValueError(f"{folder} is not a CLIP BPE tokenizer: it lacks {ends[0]} / {ends[1]}")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=ends[0],
                                   eos_token=ends[1], pad_token=ends[1], unk_token=ends[1])


def _features(out: Any) -> Tensor:
    """transformers >= 5 returns a model output from ``get_*_features`` (the projection in ``pooler_output``);
    older versions return the tensor itself."""
    return out if isinstance(out, Tensor) else out.pooler_output


def load_hf_clip(model_dir: Path, tokenizer_dir: Path, device: torch.device, dtype: torch.dtype,
                 fit: str = "crop") -> ClipScorer:
    """A ``CLIPModel`` saved in the Hugging Face layout (``config.json`` + weights) and a CLIP tokenizer."""
    from transformers import CLIPModel

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}; expected a Hugging Face CLIPModel folder")
    model = CLIPModel.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    return ClipScorer(model.to(device).eval().requires_grad_(False), _clip_tokenizer(tokenizer_dir), fit)


def _clip_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"no CLIP tokenizer in {folder} (looked for tokenizer.json, vocab.json)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def vit_h14_config() -> "CLIPConfig":
    """The open_clip ViT-H-14 architecture (HPSv2's) as a transformers ``CLIPConfig``."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"),
        projection_dim=1024,
    )


def open_clip_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP state dict -> ``transformers.CLIPModel`` names (fused ``in_proj`` split into q, k, v;
    projection matrices transposed into Linear weights). Non-parameter buffers (``attn_mask``) are dropped."""
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        key = key.removeprefix("module.")
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        tower, rest = ("vision_model", key[len("visual."):]) if key.startswith("visual.") else ("text_model", key)
        if rest.startswith("transformer.resblocks."):
            _map_block(out, f"{tower}.encoder.layers.", rest[len("transformer.resblocks."):], v)
            continue
        out.update(_map_leaf(tower, rest, v))
    return out


def _map_block(out: dict[str, Tensor], prefix: str, rest: str, v: Tensor) -> None:
    """One residual-block tensor (``<i>.<name>``)."""
    i, name = rest.split(".", 1)
    p = f"{prefix}{i}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if name.endswith("weight") else "bias"
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
            out[f"{p}self_attn.{part}.{leaf}"] = chunk
        return
    renames = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
               "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
    for old, new in renames.items():
        if name.startswith(old):
            out[p + new + name[len(old):]] = v
            return
    raise ValueError(f"unrecognised open_clip block tensor {rest!r}")


def _map_leaf(tower: str, rest: str, v: Tensor) -> dict[str, Tensor]:
    """Embeddings, norms, projections and the logit scale."""
    vision = {"class_embedding": "vision_model.embeddings.class_embedding",
              "positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
              "ln_post.weight": "vision_model.post_layernorm.weight",
              "ln_post.bias": "vision_model.post_layernorm.bias"}
    text = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "ln_final.weight": "text_model.final_layer_norm.weight",
            "ln_final.bias": "text_model.final_layer_norm.bias", "logit_scale": "logit_scale"}
    if tower == "vision_model" and rest == "proj":
        return {"visual_projection.weight": v.t().contiguous()}
    if tower == "text_model" and rest == "text_projection":
        return {"text_projection.weight": v.t().contiguous()}
    table = vision if tower == "vision_model" else text
    if rest not in table:
        raise ValueError(f"unrecognised open_clip tensor {('visual.' if tower == 'vision_model' else '') + rest!r}")
    return {table[rest]: v}


def load_open_clip_checkpoint(path: Path, config: "CLIPConfig", tokenizer_dir: Path, device: torch.device,
                              dtype: torch.dtype) -> ClipScorer:
    """An open_clip-format checkpoint (``{"state_dict": ...}`` or a bare state dict) into a ``CLIPModel``."""
    from transformers import CLIPModel

    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    state = open_clip_to_hf(obj.get("state_dict", obj))
    with torch.device("meta"):
        model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit a ViT-H-14 CLIP: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _rebuild_position_ids(model)
    return ClipScorer(model.to(device, dtype).eval().requires_grad_(False), open_clip_tokenizer(tokenizer_dir), "pad",
                      "open_clip")


def _rebuild_position_ids(model: nn.Module) -> None:
    """Position-id buffers are not in checkpoints; after a meta-device build they must be recreated."""
    for module in model.modules():
        if "position_ids" in getattr(module, "_buffers", {}):
            n = module.position_ids.shape[-1]
            module.register_buffer("position_ids", torch.arange(n).unsqueeze(0), persistent=False)


# ---------------------------------------------------------------------------------------- tiny stand-ins


def tiny_clip_tokenizer(words: list[str] = ()) -> "PreTrainedTokenizerBase":
    """A word-level stand-in for the CLIP BPE tokenizer (BOS ... EOS, padded), built in memory.

    As in the real vocabulary, ``<|startoftext|>`` and ``<|endoftext|>`` are the two highest ids, so the text tower
    pools at the end token whichever rule it uses (the first ``eos_token_id``, or the largest id when the config's
    end id is the legacy 2).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ordered = ["<|pad|>", "[UNK]", *words, "<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(ordered))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()  # CLIP lower-cases its text
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|pad|>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>")


def tiny_clip_config(tokenizer: "PreTrainedTokenizerBase", image_size: int = 32) -> "CLIPConfig":
    """A 2-layer CLIP (width 32, 8-px patches) matching ``tokenizer``."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        projection_dim=32,
    )


def tiny_scorer(seed: int, device: torch.device, fit: str = "crop", text: str = "hf") -> ClipScorer:
    """A seeded random tiny CLIP (built without moving the caller's random stream)."""
    from transformers import CLIPModel

    words = "a red ball cat dog rolling to the right left blue square photo depicts".split()
    tok = tiny_clip_tokenizer(words)
    model = seeded(seed, lambda: CLIPModel(tiny_clip_config(tok)))
    return ClipScorer(model.to(device).eval().requires_grad_(False), tok, fit, text)


# ------------------------------------------------------------------------------------------------- rewards

CLIPSCORE_PREFIX = "A photo depicts "  # Hessel et al. prepend it to every caption
CLIPSCORE_W = 2.5  # Hessel et al.'s rescaling weight


def clipscore(image_embeds: Tensor, text_embeds: Tensor, w: float = CLIPSCORE_W) -> Tensor:
    """CLIPScore (Hessel et al. 2021, eq. 1): ``w · max(cos(image, text), 0)`` with ``w = 2.5``.

    Args:
        image_embeds: ``[..., E]``; text_embeds: ``[..., E]`` (broadcast against each other); need not be unit
            vectors. The captions behind ``text_embeds`` should carry `CLIPSCORE_PREFIX`, as published.
    Returns:
        ``[...]`` scores in ``[0, w]``.
    """
    cos = nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return w * cos.clamp(min=0.0)


@dataclass
class ClipFrameReward:
    """A per-frame CLIP score pooled over frames.

    Args:
        kind: "aesthetic", "clipscore", "clip_cosine", "pickscore" or "hpsv2" (the score rule, see the module
            table).
        head: the aesthetic MLP (aesthetic only).
        frames: frames scored per video, spread uniformly (None = all).
        top_frac: pool the best fraction of frames (None = mean).
        frame_batch: frames per forward pass.
        divisor: PickScore is divided by it (Flow-GRPO / DiffusionNFT use 26 to land near [0, 1]).
    ``extras`` holds ``frame`` scores ``[B, T']`` after each call.
    """

    name: str
    scorer: ClipScorer
    kind: str
    head: AestheticHead | None = None
    frames: int | None = None
    top_frac: float | None = None
    frame_batch: int = 64
    divisor: float = 1.0
    needs: frozenset[str] = frozenset({"video", "prompts"})
    scale: tuple[float, float] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        check_videos(videos, prompts)
        idx = uniform_indices(videos.shape[1], self.frames)
        b, t = videos.shape[0], len(idx)
        flat = videos[:, idx].flatten(0, 1)
        images = torch.cat([self.scorer.image_embeds(flat[i:i + self.frame_batch])
                            for i in range(0, b * t, self.frame_batch)]).view(b, t, -1)
        frame = self._frame_scores(images, prompts).cpu()
        self.extras = {"frame": frame}
        return top_frac_mean(frame, self.top_frac)

    def _frame_scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Unit image embeddings ``[B, T, E]`` -> per-frame scores ``[B, T]``."""
        if self.kind == "aesthetic":
            return self.head(images.flatten(0, 1)).view(images.shape[:2])
        if self.kind == "clipscore":
            return clipscore(images, self.scorer.text_embeds([CLIPSCORE_PREFIX + p for p in prompts])[:, None])
        cos = (images * self.scorer.text_embeds(prompts)[:, None]).sum(-1)
        if self.kind == "pickscore":
            return self.scorer.model.logit_scale.float().exp() * cos / self.divisor
        return cos


def _placement(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def _clip_l(clip: str | None, dev: torch.device, dt: torch.dtype, tiny: bool, seed: int) -> ClipScorer:
    """The shared CLIP-L/14 (aesthetic and clipscore use the same instance)."""
    if tiny:
        return shared(("clip-tiny", seed, str(dev)), lambda: tiny_scorer(seed, dev))
    path = find_path(clip, "clip-vit-large-patch14", "CLIP ViT-L/14 folder",
                     "Download it with: huggingface-cli download openai/clip-vit-large-patch14 --local-dir <folder>")
    return shared(("hf-clip", str(path), str(dev), str(dt)), lambda: load_hf_clip(path, path, dev, dt))


@register_reward("aesthetic")
def aesthetic_reward(clip: str | None = None, head: str | None = None, *, device: str | None = None,
                     dtype: str | None = None, frames: int | None = None, top_frac: float | None = None,
                     frame_batch: int = 64, tiny: bool = False, seed: int = 0) -> ClipFrameReward:
    """LAION aesthetic v2 (about 1-10) on CLIP-L/14 image embeddings; the MLP runs in float32."""
    dev, dt = _placement(device, dtype)
    scorer = _clip_l(clip, dev, dt, tiny, seed)
    if tiny:
        dims = (scorer.model.config.projection_dim, 16, 8, 8, 4, 1)
        mlp = seeded(seed, lambda: AestheticHead(dims)).eval().requires_grad_(False)
    else:
        path = find_path(head, "aesthetic/sac+logos+ava1-l14-linearMSE.pth", "aesthetic MLP head",
                         "Get sac+logos+ava1-l14-linearMSE.pth from the LAION improved-aesthetic-predictor release")
        mlp = shared(("aesthetic-head", str(path)), lambda: AestheticHead.from_file(path))
    return ClipFrameReward("aesthetic", scorer, "aesthetic", mlp.to(dev), frames, top_frac, frame_batch,
                           scale=(1.0, 10.0))


@register_reward("clipscore")
def clipscore_reward(clip: str | None = None, *, device: str | None = None, dtype: str | None = None,
                     frames: int | None = None, top_frac: float | None = None, frame_batch: int = 64,
                     tiny: bool = False, seed: int = 0) -> ClipFrameReward:
    """CLIPScore as published: ``2.5 · max(cos, 0)`` of the frame and "A photo depicts <prompt>" (`clipscore`),
    on CLIP-L/14 by default (Hessel et al. used ViT-B/32: pass its folder as ``clip``). About 0.4-0.9."""
    dev, dt = _placement(device, dtype)
    return ClipFrameReward("clipscore", _clip_l(clip, dev, dt, tiny, seed), "clipscore", None, frames, top_frac,
                           frame_batch, scale=(0.4, 1.0))


@register_reward("clip_cosine")
def clip_cosine_reward(clip: str | None = None, *, device: str | None = None, dtype: str | None = None,
                       frames: int | None = None, top_frac: float | None = None, frame_batch: int = 64,
                       tiny: bool = False, seed: int = 0) -> ClipFrameReward:
    """Plain cosine of CLIP-L/14 image and prompt embeddings, what Flow-GRPO / DiffusionNFT call "CLIP score"
    (``logits_per_image / 100``; no prefix, no clamp). About 0.15-0.4."""
    dev, dt = _placement(device, dtype)
    return ClipFrameReward("clip_cosine", _clip_l(clip, dev, dt, tiny, seed), "clip_cosine", None, frames, top_frac,
                           frame_batch, scale=(0.15, 0.4))


@register_reward("pickscore")
def pickscore_reward(model: str | None = None, tokenizer: str | None = None, *, device: str | None = None,
                     dtype: str | None = None, divisor: float = 1.0, frames: int | None = None,
                     top_frac: float | None = None, frame_batch: int = 32, tiny: bool = False,
                     seed: int = 0) -> ClipFrameReward:
    """PickScore: ``exp(logit_scale) · cos`` (about 18-24) divided by ``divisor``."""
    dev, dt = _placement(device, dtype)
    if tiny:
        scorer = shared(("clip-tiny", seed, str(dev)), lambda: tiny_scorer(seed, dev))
    else:
        path = find_path(model, "PickScore_v1", "PickScore_v1 folder",
                         "Download it with: huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir <folder>")
        tok = _tokenizer_dir(tokenizer, path)
        scorer = shared(("hf-clip", str(path), str(dev), str(dt)), lambda: load_hf_clip(path, tok, dev, dt))
    return ClipFrameReward("pickscore", scorer, "pickscore", None, frames, top_frac, frame_batch, divisor=divisor)


@register_reward("hpsv2")
def hpsv2_reward(checkpoint: str | None = None, tokenizer: str | None = None, *, version: str = "v2.1",
                 device: str | None = None, dtype: str | None = None, frames: int | None = None,
                 top_frac: float | None = 0.3, frame_batch: int = 32, tiny: bool = False,
                 seed: int = 0) -> ClipFrameReward:
    """HPSv2 / HPSv2.1: cosine of the fine-tuned ViT-H-14 embeddings (about 0.2-0.35), top-30 % frames."""
    dev, dt = _placement(device, dtype)
    if tiny:
        scorer = shared(("clip-tiny-open-clip", seed, str(dev)),
                        lambda: tiny_scorer(seed, dev, fit="pad", text="open_clip"))
    else:
        file = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}.get(version)
        if file is None:
            raise ValueError(f"unknown HPSv2 version {version!r}; use 'v2.1' or 'v2.0'")
        path = find_path(checkpoint, f"HPSv2/{file}", f"HPSv2 checkpoint ({file})",
                         f"Download it with: huggingface-cli download xswu/HPSv2 {file}")
        tok = _tokenizer_dir(tokenizer, None)
        scorer = shared(("open-clip-h14", str(path), str(dev), str(dt)),
                        lambda: load_open_clip_checkpoint(path, vit_h14_config(), tok, dev, dt))
    return ClipFrameReward("hpsv2", scorer, "hpsv2", None, frames, top_frac, frame_batch, scale=(0.2, 0.35))


def _tokenizer_dir(given: str | None, model_dir: Path | None) -> Path:
    """The CLIP tokenizer folder: ``given``, the model folder when it has one, else the laion ViT-H-14 copy."""
    if given is None and model_dir is not None and any((model_dir / f).is_file()
                                                       for f in ("tokenizer.json", "vocab.json")):
        return model_dir
    return find_path(given, "CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP tokenizer folder",
                     "Any CLIP tokenizer works (same BPE); e.g. huggingface-cli download "
                     "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' '*.txt'")
