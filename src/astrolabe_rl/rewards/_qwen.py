"""Qwen2-VL plumbing shared by the HPSv3 and VideoAlign reward models.

Both rewards are a ``transformers.Qwen2VLModel`` (vision tower + language model, no LM head) whose last hidden
state is read at special reward tokens by a small head. This module holds what they share:

* torch-only vision preprocessing: ``smart_resize`` (the processor's rule for the resized size) and ``patchify``
  (the processor's flat patch layout), so frames never leave the device or pass through PIL;
* the Qwen2-VL chat text the checkpoints were trained on, tokenisation and the multimodal token types;
* the position scheme of the language model (`POSITIONS`): the released reward checkpoints were trained with plain
  1-D positions over the whole sequence, not Qwen2-VL's 3-D M-RoPE index;
* checkpoint reading: the official key layouts (transformers 4.45: ``model.*`` = language model, ``visual.*``;
  transformers >= 4.52: ``model.language_model.*``, ``model.visual.*``; peft-wrapped: ``base_model.model.*``,
  ``.base_layer.``, ``.modules_to_save.default.``), LoRA merging, strict loading with errors naming what is missing;
* tiny stand-ins (a word-level tokenizer and a 2-layer config) for tests and plumbing checks.

transformers is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from astrolabe_rl.rewards._common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, quantize, resize_levels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLModel

SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)

# ------------------------------------------------------------------------------------------ vision preprocessing


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The size the Qwen2-VL processor resizes an ``height × width`` frame to: both sides multiples of ``factor``
    (patch × merge = 28), area within ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible.

    With ``min_pixels = max_pixels = 448²`` (HPSv3) a 480×832 frame becomes 336×588.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {height}×{width} is beyond 200:1; Qwen2-VL cannot take this frame")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class VisionGeometry:
    """The vision tower's patching: 14-px patches, 2×2 merged into one LLM token, 2 frames per temporal patch."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def of(cls, config: "Qwen2VLConfig") -> "VisionGeometry":
        v = config.vision_config
        return cls(v.patch_size, v.spatial_merge_size, v.temporal_patch_size)

    @property
    def factor(self) -> int:
        """Frame sides must be multiples of this (28 for the released models)."""
        return self.patch_size * self.merge_size

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """LLM tokens of a ``(t, h, w)`` patch grid (one per merged 2×2 group)."""
        t, h, w = grid
        return t * h * w // self.merge_size**2


def patchify(frames: Tensor, geo: VisionGeometry) -> tuple[Tensor, tuple[int, int, int]]:
    """Normalised frames ``[T, C, H, W]`` -> the processor's flat patches ``[t·h·w, C·tp·p·p]``, grid ``(t, h, w)``.

    Rows run over (t, h/m, w/m, m, m), the merge group innermost so the vision merger can concatenate 4 rows;
    each row is (C, tp, p, p). T is padded to a multiple of ``tp`` by repeating the last frame, so a single image
    becomes two identical temporal slices, as the image processor does.
    """
    p, m, tp = geo.patch_size, geo.merge_size, geo.temporal_patch_size
    n, c, height, width = frames.shape
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frames are {height}×{width}; both sides must be multiples of {p * m} (resize first)")
    if pad := -n % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, h, w = frames.shape[0] // tp, height // p, width // p
    x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, tp, p, p
    return x.reshape(t * h * w, c * tp * p * p), (t, h, w)


def preprocess(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Float frames ``[N, 3, H, W]`` in [0, 1] -> the processor's normalised pixels ``[N, 3, *size]``: 8-bit
    quantised, bicubic-antialias resized (rounded to 8-bit levels), CLIP-normalised; in torch on their device."""
    return normalize(resize_levels(quantize(frames), size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


# ------------------------------------------------------------------------------------------------- text


def chat_text(user_text: str, vision: str, n_tokens: int) -> str:
    """The Qwen2-VL chat the reward models were trained on: the default system turn, one user turn holding the
    image or video (``n_tokens`` placeholder tokens) followed by ``user_text``, and the open assistant turn."""
    pad = {"image": "<|image_pad|>", "video": "<|video_pad|>"}[vision]
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{pad * n_tokens}<|vision_end|>{user_text}<|im_end|>\n<|im_start|>assistant\n"
    )


def tokenize(tokenizer: "PreTrainedTokenizerBase", texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` ``[B, L]`` (reward tokens are read by position, so the
    side only has to be consistent; the checkpoints were trained right-padded)."""
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# Position schemes of the language model (rotary positions of every token, vision placeholders included):
#   "sequential": 0, 1, ..., L-1 along the sequence, the same value in M-RoPE's three (t, h, w) sections, i.e.
#                 plain 1-D RoPE. The released HPSv3 and VideoAlign checkpoints were trained and are served this
#                 way: their forwards embed the vision tokens themselves and call the language model with no
#                 position ids, which under the transformers release they pin (4.45) means 1-D positions.
#   "mrope":      Qwen2-VL's 3-D index (vision tokens get (t, h, w) grid positions, later text resumes after the
#                 largest), what a current ``Qwen2VLModel`` computes when given none; for a checkpoint trained so.
POSITIONS = ("sequential", "mrope")


def check_positions(positions: str) -> str:
    """``positions`` if it is one of `POSITIONS`, else a ValueError saying what to pass."""
    if positions not in POSITIONS:
        raise ValueError(f"unknown position scheme {positions!r}; use 'sequential' (how the released HPSv3 and "
                         "VideoAlign checkpoints were trained) or 'mrope' (Qwen2-VL's 3-D index)")
    return positions


def last_hidden(backbone: "Qwen2VLModel", input_ids: Tensor, attention_mask: Tensor, *, pixel_values: Tensor,
                grid: Tensor, vision: str, positions: str = "sequential") -> Tensor:
    """Run the backbone on one batch; returns the final hidden states ``[B, L, D]``.

    Args:
        input_ids, attention_mask: ``[B, L]``, right-padded (`tokenize`), so sequential positions of real tokens
            do not depend on the padding.
        pixel_values: every item's patches concatenated ``[Σ t·h·w, C·tp·p·p]``.
        grid: ``[B, 3]`` (t, h, w) per item.
        vision: "image" or "video" (which placeholder token the patches replace).
        positions: the rotary position scheme, one of `POSITIONS` ("sequential": ``position_ids = arange(L)``
            for every row, which the model broadcasts to its three M-RoPE sections; "mrope": the model's 3-D index).
    """
    cfg = backbone.config
    types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
    pixels = pixel_values.to(backbone.visual.dtype)
    kwargs = ({"pixel_values": pixels, "image_grid_thw": grid} if vision == "image"
              else {"pixel_values_videos": pixels, "video_grid_thw": grid})
    if check_positions(positions) == "sequential":
        kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types, use_cache=False,
                   **kwargs)
    return out.last_hidden_state


def gather_tokens(hidden: Tensor, input_ids: Tensor, token_ids: list[int]) -> Tensor:
    """Hidden states ``[B, k, D]`` at the first occurrence of each of the ``k`` special ``token_ids`` per row."""
    picked = []
    for tid in token_ids:
        hit = input_ids == tid
        if not bool(hit.any(dim=1).all()):
            raise ValueError(f"reward token id {tid} is missing from a prompt; the tokenizer does not know it")
        picked.append(hit.int().argmax(dim=1))
    pos = torch.stack(picked, dim=1)  # [B, k]
    return hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(base: Path, reward_tokens: list[str]) -> "PreTrainedTokenizerBase":
    """The base model's tokenizer with the reward tokens appended (as the reward checkpoints were trained)."""
    from transformers import AutoTokenizer

    if not any((base / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"no tokenizer in {base} (looked for tokenizer.json / vocab.json / tokenizer_config.json); point `base` "
            "at a local copy of the Qwen2-VL-Instruct repository (huggingface-cli download Qwen/Qwen2-VL-7B-Instruct)"
        )
    tok = AutoTokenizer.from_pretrained(str(base), padding_side="right", local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": list(reward_tokens)})
    return tok


def load_config(base: Path, vocab_size: int | None = None) -> "Qwen2VLConfig":
    """``config.json`` of the base model, optionally with the LLM vocabulary resized to the reward checkpoint's."""
    from transformers import Qwen2VLConfig

    path = base / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {base}; point `base` at a local Qwen2-VL-Instruct folder")
    config = Qwen2VLConfig.from_pretrained(str(base), local_files_only=True)
    if vocab_size is not None:
        config.text_config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    return config


def build_backbone(config: "Qwen2VLConfig", device: torch.device, dtype: torch.dtype, init: bool) -> "Qwen2VLModel":
    """A ``Qwen2VLModel`` on ``device`` in ``dtype``; ``init=False`` skips the random init (weights come next)."""
    from contextlib import nullcontext

    from transformers import Qwen2VLModel
    from transformers.initialization import no_init_weights

    with torch.device(device), (nullcontext() if init else no_init_weights()):
        model = Qwen2VLModel._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def iter_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """Lazily yield ``(key, tensor)`` from a .safetensors file, or from a pickle-free torch file (.pth/.bin/.pt).

    Torch files are opened with ``weights_only=True``: a reward checkpoint is a dict of tensors, and nothing else
    is ever unpickled.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
        return
    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    yield from obj.items()


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (sharded safetensors with an index, one file, or .bin)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"no weights in {folder}; looked for model.safetensors.index.json, model.safetensors, pytorch_model.bin"
    )


_PEFT_PREFIX = re.compile(r"^(base_model\.model\.|module\.)+")


def official_key(key: str) -> str | None:
    """An official Qwen2-VL reward checkpoint key -> our module path (``backbone.*`` / ``rm_head.*``), or None for
    weights we do not use (the LM head). peft wrapping is undone here; LoRA factors keep their suffix."""
    key = _PEFT_PREFIX.sub("", key)
    key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    if key.startswith("lm_head.") or ".original_module." in key:
        return None
    for old, new in (("model.language_model.", "backbone.language_model."), ("model.visual.", "backbone.visual."),
                     ("visual.", "backbone.visual."), ("model.", "backbone.language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(\.default)?\.weight$")


def merge_lora(weights: dict[str, Tensor], lora: dict[str, Tensor], scale: float, source: str) -> None:
    """Fold LoRA factors into the base weights in place: ``W += scale · B @ A`` (float32 accumulate).

    Args:
        weights: our-path weights, e.g. ``backbone.language_model.layers.0.self_attn.q_proj.weight``.
        lora: our-path factors ``<module>.lora_A.weight`` ``[r, in]`` and ``<module>.lora_B.weight`` ``[out, r]``.
        scale: ``lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA).
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in lora.items():
        m = _LORA.match(key)
        if m is None:
            raise ValueError(f"{source}: {key!r} is not a LoRA factor (expected <module>.lora_A/B.weight)")
        pairs.setdefault(m["module"], {})[m["which"]] = value
    for module, ab in pairs.items():
        target = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{source}: {module} has lora_{''.join(ab)} but not both factors")
        if target not in weights:
            raise ValueError(f"{source}: LoRA targets {target}, which is not in the base model")
        w = weights[target]
        weights[target] = (w.float() + scale * (ab["B"].float() @ ab["A"].float())).to(w.dtype)


def lora_scale(adapter_config: dict[str, Any]) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) from a peft ``adapter_config.json`` or VideoAlign's
    ``peft_lora_config`` (``lora_r`` / ``lora_alpha``)."""
    r = adapter_config.get("r", adapter_config.get("lora_r"))
    alpha = adapter_config.get("lora_alpha")
    if r is None or alpha is None:
        raise ValueError(f"adapter config lacks r / lora_alpha: {sorted(adapter_config)}")
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def load_weights(module: nn.Module, items: Iterable[tuple[str, Tensor]], source: str) -> None:
    """Copy ``(our_key, tensor)`` pairs into ``module``'s parameters, then insist every parameter was set.

    Raises:
        ValueError: listing missing / unexpected keys and shape mismatches, with the file they came from.
    """
    params = dict(module.named_parameters())
    loaded, unexpected, bad_shape = set(), [], []
    with torch.no_grad():
        for key, value in items:
            if key not in params:
                unexpected.append(key)
            elif params[key].shape != value.shape:
                bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(params[key].shape)}")
            else:
                params[key].copy_(value)
                loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing or unexpected or bad_shape:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shape mismatches: {bad_shape[:3]}" if bad_shape else ""]
        raise ValueError(
            f"{source} does not fit the model: {'; '.join(p for p in parts if p)}. Is it the right checkpoint for "
            "this reward, and is `base` the matching Qwen2-VL size (2B for VideoAlign, 7B for HPSv3)?"
        )


# -------------------------------------------------------------------------------------- tiny stand-ins


def tiny_tokenizer(reward_tokens: list[str], words: Iterable[str] = ()) -> "PreTrainedTokenizerBase":
    """A word-level tokenizer with the Qwen2-VL special tokens, ``reward_tokens`` and ``words`` (others map to
    ``[UNK]``). Built in memory with the ``tokenizers`` library: no files, no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*QWEN_SPECIAL_TOKENS, *reward_tokens, "[UNK]", *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*QWEN_SPECIAL_TOKENS, *reward_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   padding_side="right")


# Released geometries (`reference/rewards.md` §5), for random-weight benchmarks at the real size.
QWEN2VL_2B = dict(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vision_depth=32, vision_dim=1280,
                  vision_heads=16, mrope=(16, 24, 24))
QWEN2VL_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, vision_depth=32, vision_dim=1280,
                  vision_heads=16, mrope=(16, 24, 24))
TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=37, vision_depth=2, vision_dim=32, vision_heads=4,
            mrope=(2, 1, 1))


def make_config(tokenizer: "PreTrainedTokenizerBase", *, hidden: int, layers: int, heads: int, kv_heads: int,
                ffn: int, vision_depth: int, vision_dim: int, vision_heads: int, mrope: tuple[int, int, int],
                vocab_size: int | None = None) -> "Qwen2VLConfig":
    """A Qwen2-VL config whose special-token ids are ``tokenizer``'s, with the real patch geometry (14-px patches,
    2×2 merge, 2-frame temporal patches). ``mrope`` splits ``head_dim / 2`` over (t, h, w); ``vocab_size``
    defaults to the tokenizer's (benchmarks pass the real 151,658 to get the real embedding size)."""
    from transformers import Qwen2VLConfig

    if 2 * sum(mrope) != hidden // heads:
        raise ValueError(f"mrope sections {mrope} must sum to head_dim/2 = {hidden // heads // 2}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=ffn,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=vision_heads,
                           mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config._attn_implementation = "sdpa"
    return config
