"""HPSv3 (Ma et al., ICCV 2025): a Qwen2-VL-7B image preference model, applied to every frame of a video.

The model reads the last hidden state at the ``<|Reward|>`` token with a small MLP ("ranknet" head, fp32) that
outputs ``(μ, σ)``; μ is the preference score (unbounded, about −1…12 on its benchmark), σ its uncertainty
(`reference/rewards.md` §2.2). As in Astrolabe (`reference/astrolabe.md` §4.1), every frame is scored against the
prompt and the video reward is the mean of the top 30 % of frame μ; the all-frame mean is kept in ``extras``.

Preprocessing is the checkpoint's fixed 448×448-area image input, done in torch on the reward's device:
8-bit quantise, ``smart_resize`` with ``min_pixels = max_pixels = 448²`` (480×832 -> 336×588: 252 visual tokens),
bicubic antialiased resize emulating PIL's two 8-bit passes (HPSv3 really resizes PIL images), CLIP normalisation,
Qwen2-VL patchify. The language model runs with 1-D sequential positions over the whole sequence, as the
checkpoint was trained and as its official forward runs it (`_qwen.POSITIONS`; ``positions="mrope"`` switches).

Files (nothing is downloaded):
    checkpoint  ``HPSv3.safetensors`` (HF ``MizzenAI/HPSv3``): the complete model, official key layout
                (``model.*`` / ``visual.*`` / ``lm_head.*`` / ``rm_head.*``), vocabulary resized by one token.
                Default: ``$ASTROLABE_REWARD_ROOT/HPSv3/HPSv3.safetensors``.
    base        a local ``Qwen/Qwen2-VL-7B-Instruct`` folder; only ``config.json`` and the tokenizer files are read.
                Default: ``$ASTROLABE_REWARD_ROOT/Qwen2-VL-7B-Instruct``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from astrolabe_rl.rewards import _qwen
from astrolabe_rl.rewards._common import (
    find_path,
    resolve_device,
    resolve_dtype,
    seeded,
    shared,
    top_frac_mean,
    uniform_indices,
)
from astrolabe_rl.rewards.base import check_videos, register_reward

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen2VLConfig

REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # the checkpoint's fixed image area: 200,704 = 448²

# The instruction HPSv3 was trained with. It is part of the model's input format, so it must match the training
# text exactly (including spacing); `{prompt}` is the generation prompt.
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 "
    "being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The following "
    "sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any significant "
    "biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail in "
    "textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic and "
    "Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, "
    "depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, "
    "animal, object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular artistic or "
    "stylistic style, evaluate how well the image adheres to this style.\n- **Contextual Consistency**: Assess "
    "whether the background, setting, and surrounding elements in the image logically fit the scenario described in "
    "the prompt. The environment should support and enhance the subject without contradictions.\n- **Attribute "
    "Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, "
    "expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical "
    "attributes should be preserved.\n- **Semantic Coherence**: Evaluate whether the overall meaning and intent of "
    "the prompt are captured in the image. The generated content should not introduce elements that conflict with "
    "or distort the original description.\nTextual prompt - {prompt}\n\n\n"
    "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
)


def user_text(prompt: str) -> str:
    """The user turn's text for one generation prompt."""
    return INSTRUCTION.replace("{prompt}", prompt)


class RankHead(nn.Module):
    """The "ranknet" head: Linear layers with ReLU between them (dropout is inactive at inference), run in fp32.

    Args:
        dims: widths ``[hidden, 1024, 16, 2]`` for the released checkpoint.
        bias: whether each Linear has a bias.
    """

    def __init__(self, dims: list[int], bias: list[bool] | None = None) -> None:
        super().__init__()
        bias = bias or [True] * (len(dims) - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bb) for a, b, bb in zip(dims[:-1], dims[1:], bias))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


def _head_layer_order(prefix: str) -> tuple[int, int]:
    """Sort key of an official ``rm_head`` Linear: ``0`` < ``3`` < ``5`` (nn.Sequential), or
    ``0`` < ``layer_1.0`` < ... < ``output_layer`` (the ``rm_head_kwargs`` variant)."""
    if prefix.isdigit():
        return (0, int(prefix))
    if m := re.fullmatch(r"layer_(\d+)\.\d+", prefix):
        return (1, int(m[1]))
    if prefix == "output_layer":
        return (2, 0)
    raise ValueError(f"unrecognised rm_head layer {prefix!r} in the HPSv3 checkpoint")


def head_key_map(keys: list[str]) -> dict[str, str]:
    """Official ``rm_head.<layer>.{weight,bias}`` -> our ``head.layers.<i>.{weight,bias}`` (layers in order)."""
    prefixes = sorted({k[len("rm_head."):].rsplit(".", 1)[0] for k in keys if k.startswith("rm_head.")},
                      key=_head_layer_order)
    out = {}
    for i, p in enumerate(prefixes):
        for leaf in ("weight", "bias"):
            out[f"rm_head.{p}.{leaf}"] = f"head.layers.{i}.{leaf}"
    return out


class HPSv3Model(nn.Module):
    """Qwen2-VL + ranknet head read at the ``<|Reward|>`` token. ``forward`` returns ``[N, 2]`` = (μ, σ) in fp32.

    Build it with `HPSv3Model.from_pretrained` (the official checkpoint) or `HPSv3Model.tiny` (random, for tests).
    ``positions`` is the language model's rotary position scheme (`_qwen.POSITIONS`): "sequential", the scheme the
    released checkpoint was trained with, or "mrope" for a checkpoint trained on Qwen2-VL's 3-D index.
    """

    def __init__(self, config: "Qwen2VLConfig", reward_token_id: int, head_dims: list[int],
                 head_bias: list[bool] | None = None, *, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, init: bool = True, positions: str = "sequential") -> None:
        super().__init__()
        self.positions = _qwen.check_positions(positions)
        self.backbone = _qwen.build_backbone(config, device, dtype, init)
        self.head = RankHead([config.text_config.hidden_size, *head_dims], head_bias).to(device)
        self.reward_token_id = reward_token_id
        self.geometry = _qwen.VisionGeometry.of(config)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                image_grid_thw: Tensor) -> Tensor:
        """One image per row: ``input_ids [N, L]``, patches ``[Σ, 1176]``, grids ``[N, 3]`` -> ``[N, 2]``."""
        hidden = _qwen.last_hidden(self.backbone, input_ids, attention_mask, pixel_values=pixel_values,
                                   grid=image_grid_thw, vision="image", positions=self.positions)
        return self.head(_qwen.gather_tokens(hidden, input_ids, [self.reward_token_id])[:, 0])

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, base: str | Path | None = None, *,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        positions: str = "sequential") -> tuple["HPSv3Model", "PreTrainedTokenizerBase"]:
        """Load the released model: ``HPSv3.safetensors`` + the Qwen2-VL-7B-Instruct config and tokenizer.

        Returns the model and its tokenizer (the base tokenizer with ``<|Reward|>`` appended).
        """
        from safetensors import safe_open

        ckpt = find_path(checkpoint, "HPSv3/HPSv3.safetensors", "HPSv3 checkpoint",
                         "Download it with: huggingface-cli download MizzenAI/HPSv3 HPSv3.safetensors")
        base_dir = find_path(base, "Qwen2-VL-7B-Instruct", "Qwen2-VL-7B-Instruct folder (config + tokenizer)",
                             "Download it with: huggingface-cli download Qwen/Qwen2-VL-7B-Instruct "
                             "--include '*.json' '*.txt' (weights are not needed)")
        dev = resolve_device(device)
        with safe_open(str(ckpt), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        vocab = next((s[0] for k, s in shapes.items() if k.endswith("embed_tokens.weight")), None)
        if vocab is None:
            raise ValueError(f"{ckpt} has no embed_tokens weight; it is not an HPSv3 checkpoint")
        heads = head_key_map(list(shapes))
        weights = [k for k in heads if k.endswith(".weight")]
        dims, bias = [shapes[k][0] for k in weights], [k.replace(".weight", ".bias") in shapes for k in weights]
        tokenizer = _qwen.load_tokenizer(base_dir, [REWARD_TOKEN])
        token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if token_id >= vocab:
            raise ValueError(f"{REWARD_TOKEN} has id {token_id} but {ckpt} embeds {vocab} tokens; "
                             f"the tokenizer in {base_dir} does not match the checkpoint")
        config = _qwen.load_config(base_dir, vocab_size=vocab)
        model = cls(config, token_id, dims, bias, device=dev, dtype=resolve_dtype(dtype, dev), init=False,
                    positions=positions)
        items = ((heads.get(k) or _qwen.official_key(k), v) for k, v in _qwen.iter_tensors(ckpt))
        _qwen.load_weights(model, ((k, v) for k, v in items if k is not None), str(ckpt))
        return model, tokenizer

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", positions: str = "sequential",
             ) -> tuple["HPSv3Model", "PreTrainedTokenizerBase"]:
        """A seeded random 2-layer stand-in with the real head shape pattern and the real tokenizer protocol."""
        tokenizer = _qwen.tiny_tokenizer([REWARD_TOKEN], words=user_text("a cat").split())
        token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        config = _qwen.make_config(tokenizer, **_qwen.TINY)
        model = seeded(seed, lambda: cls(config, token_id, [16, 8, 2], device=torch.device(device),
                                         positions=positions))
        return model, tokenizer


@dataclass
class HPSv3Reward:
    """The HPSv3 video reward: every (or every sampled) frame scored, pooled by the top-``top_frac`` mean of μ.

    After each call ``extras`` holds ``mean_all`` ``[B]`` (the all-frame mean of μ), ``frame_mu`` and
    ``frame_sigma`` ``[B, T']`` (CPU, float32).

    Args:
        model, tokenizer: from `HPSv3Model.from_pretrained` or `HPSv3Model.tiny`.
        top_frac: fraction of frames averaged (0.3 as in Astrolabe; None = plain mean).
        frames: frames scored per video, spread uniformly (None = all, as in Astrolabe).
        frame_batch: frames per forward pass (memory knob; 4-8 on one GPU for the 7B model).
        pixels: the fixed image area fed to the model (the checkpoint's 448²; smaller only for tiny models).
    """

    model: HPSv3Model
    tokenizer: Any
    top_frac: float | None = 0.3
    frames: int | None = None
    frame_batch: int = 8
    pixels: int = PIXELS
    name: str = "hpsv3"
    needs: frozenset[str] = frozenset({"video", "prompts"})
    scale: tuple[float, float] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """``videos [B, T, 3, H, W]`` in [0, 1] -> ``[B]`` top-fraction mean of frame μ."""
        check_videos(videos, prompts)
        idx = uniform_indices(videos.shape[1], self.frames)
        mu_sigma = self.score_frames(videos[:, idx], prompts)  # [B, T', 2]
        mu = mu_sigma[..., 0]
        self.extras = {"mean_all": mu.mean(dim=1), "frame_mu": mu, "frame_sigma": mu_sigma[..., 1]}
        return top_frac_mean(mu, self.top_frac)

    def score_frames(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """``[B, T, 3, H, W]`` -> ``[B, T, 2]`` (μ, σ) per frame, on the CPU in float32."""
        b, t = videos.shape[:2]
        flat = videos.flatten(0, 1)
        flat_prompts = [p for p in prompts for _ in range(t)]
        out = [self._score_images(flat[i:i + self.frame_batch], flat_prompts[i:i + self.frame_batch])
               for i in range(0, b * t, self.frame_batch)]
        return torch.cat(out).view(b, t, 2)

    def _score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        """One forward pass on ``images [N, 3, H, W]`` with their prompts -> ``[N, 2]`` on the CPU."""
        device = self.model.head.layers[0].weight.device
        geo = self.model.geometry
        size = _qwen.smart_resize(*images.shape[-2:], geo.factor, self.pixels, self.pixels)
        frames = _qwen.preprocess(images.to(device), size)
        patches = [_qwen.patchify(f.unsqueeze(0), geo) for f in frames]
        pixel_values = torch.cat([p for p, _ in patches])
        grid = torch.tensor([g for _, g in patches], device=device)
        texts = [_qwen.chat_text(user_text(p), "image", geo.tokens(g)) for p, (_, g) in zip(prompts, patches)]
        input_ids, mask = _qwen.tokenize(self.tokenizer, texts, device)
        with self._lock:  # one forward at a time per reward (async scorers and the server share instances)
            return self.model(input_ids, mask, pixel_values, grid).cpu()


@register_reward("hpsv3")
def hpsv3_reward(checkpoint: str | None = None, base: str | None = None, *, device: str | None = None,
                 dtype: str | None = None, top_frac: float | None = 0.3, frames: int | None = None,
                 frame_batch: int = 8, positions: str = "sequential", tiny: bool = False,
                 seed: int = 0) -> HPSv3Reward:
    """Build the HPSv3 reward (see the module docstring for the files). ``positions`` is the language model's
    position scheme (`_qwen.POSITIONS`; the released checkpoint's is "sequential"). ``tiny=True`` gives a seeded
    random stand-in (no files) for tests and plumbing; it uses a 56×56 image area."""
    dev = resolve_device(device)
    _qwen.check_positions(positions)
    if tiny:
        model, tok = shared(("hpsv3-tiny", seed, str(dev), positions), lambda: HPSv3Model.tiny(seed, dev, positions))
        return HPSv3Reward(model, tok, top_frac, frames, frame_batch, pixels=56 * 56)
    key = ("hpsv3", str(checkpoint), str(base), str(dev), str(resolve_dtype(dtype, dev)), positions)
    model, tok = shared(key, lambda: HPSv3Model.from_pretrained(checkpoint, base, device=dev, dtype=dtype,
                                                                positions=positions))
    return HPSv3Reward(model, tok, top_frac, frames, frame_batch)
