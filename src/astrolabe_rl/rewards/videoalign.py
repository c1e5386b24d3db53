"""VideoAlign / VideoReward (Liu et al., arXiv 2501.13918): a Qwen2-VL-2B video reward with three heads.

One linear head (``rm_head``, hidden -> 1, no bias) is read at three special tokens placed in a long rubric:
``<|VQ_reward|>`` (visual quality), ``<|MQ_reward|>`` (motion quality; its rubric scores static videos low) and
``<|TA_reward|>`` (text alignment). Each raw logit is z-normalised with the checkpoint's inference statistics
(`reference/rewards.md` §2.1).

Astrolabe's in-memory path (`reference/astrolabe.md` §4.1, `reference/rewards.md` §2.1), done here in torch on the
reward's device: 8-bit quantise, 10 frames at ``linspace(0, T-1, 10).round()``, one bicubic antialiased resize of
the 8-bit frames to 336×588 whatever the aspect ratio (rounded once, as torchvision resizes uint8 tensors; no PIL
anywhere in the released video path), grayscale of the resized RGB (3 channels) for MQ and RGB for VQ / TA, CLIP
normalisation, Qwen2-VL patchify (5 temporal patches × 24 × 42 -> 1260 visual tokens). The language model runs
with 1-D sequential positions over the whole sequence, as the checkpoint was trained and as its official forward
runs it (`_qwen.POSITIONS`; ``positions="mrope"`` switches).

Each head is its own reward (``videoalign_vq``, ``videoalign_mq``, ``videoalign_ta``), and all of them share one
model instance per (checkpoint, device, dtype, position scheme). ``videoalign`` is "Overall": here the **mean** of
the three z-scores, as Astrolabe uses it. Upstream VideoAlign's ``inference.py`` reports the **sum** (3× ours);
multiply by 3 to compare with numbers quoted from it.

Files (nothing is downloaded):
    checkpoint  the ``KwaiVGI/VideoReward`` (a.k.a. ``KlingTeam/VideoReward``) folder: ``model_config.json`` and
                ``checkpoint-<step>/`` holding either ``model.pth`` (full state dict) or ``adapter_model.safetensors``
                + ``non_lora_state_dict.pth`` (LoRA + the trained non-LoRA weights; merged at load).
                Default: ``$ASTROLABE_REWARD_ROOT/VideoReward``.
    base        a local ``Qwen/Qwen2-VL-2B-Instruct`` folder (config, tokenizer, and the weights the LoRA layout
                builds on). Default: ``$ASTROLABE_REWARD_ROOT/Qwen2-VL-2B-Instruct``, else the checkpoint's
                ``model_name_or_path`` when that is a local folder.
"""

from __future__ import annotations

import json
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from astrolabe_rl.rewards import _qwen
from astrolabe_rl.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    find_path,
    normalize,
    quantize,
    resize_once,
    resolve_device,
    resolve_dtype,
    reward_root,
    seeded,
    shared,
    uniform_indices,
)
from astrolabe_rl.rewards.base import check_videos, register_reward

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen2VLConfig

HEADS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
NUM_FRAMES = 10
FRAME_SIZE = (336, 588)

# Inference statistics of the released checkpoint (its model_config.json "inference_config"), used when a
# checkpoint folder does not carry them (tiny stand-ins).
DEFAULT_STATS = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}

# The "detailed_special" rubric the checkpoint was trained with; part of its input format, so it must match the
# training text exactly. `{prompt}` is the generation prompt.
TEMPLATE = (
    "\nYou are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being "
    "the worst and 10 being the best. Each evaluation should be independent of the others.\n\n"
    "**Visual Quality:**  \nEvaluate the overall visual quality of the video, with a focus on static factors. The "
    "following sub-dimensions should be considered:\n- **Reasonableness:** The video should not contain any "
    "significant biological or logical errors, such as abnormal body structures or nonsensical environmental "
    "setups.\n- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy "
    "to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail in "
    "textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic and "
    "Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, "
    "depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\nPlease provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n"
    "**Motion Quality:**  \nAssess the dynamic aspects of the video, with a focus on dynamic factors. Consider the "
    "following sub-dimensions:\n- **Stability:** Evaluate the continuity and stability between frames. There should "
    "be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, "
    "textures, or missing body parts).\n- **Naturalness:** The movement should align with physical laws and be "
    "realistic. For example, clothing should flow naturally with motion, and facial expressions should change "
    "appropriately (e.g., blinking, mouth movements).\n- **Aesthetic Quality:** The movement should be smooth and "
    "fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic "
    "feel should be visually pleasing.\n- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, "
    "hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste "
    "effects.\n- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
    "where the video might have blurry or unsteady sections that hinder visual continuity.\n- **Amplitude:** If the "
    "video is largely static or has little movement, assign a low score for motion quality.\n\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n"
    "**Text Alignment:**  \nAssess how well the video matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, "
    "animal, object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, "
    "posture, facial expressions like talking or blinking) align with the described prompt. The motion should match "
    "the prompt in terms of type, scale, and direction.\n- **Environment Relevance:** Assess whether the background "
    "and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, "
    "though some stylistic adaptation is acceptable.  \n- **Style Relevance:** If the prompt specifies a particular "
    "artistic or stylistic style, evaluate how well the video adheres to this style.\n- **Camera Movement "
    "Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the "
    "expected behavior from the prompt.\n\nTextual prompt - {prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
)


def user_text(prompt: str) -> str:
    """The user turn's text for one generation prompt."""
    return TEMPLATE.replace("{prompt}", prompt)


def sample_frames(video: Tensor, num_frames: int = NUM_FRAMES, size: tuple[int, int] = FRAME_SIZE,
                  grayscale: bool = False) -> Tensor:
    """One video ``[T, 3, H, W]`` in [0, 1] -> the model's normalised frames ``[num_frames, 3, *size]``.

    Steps (the released in-memory path): 8-bit quantise; frames ``linspace(0, T-1, n).round()``; one bicubic
    antialiased resize of the 8-bit frames to ``size``, rounded once (`resize_once`); for MQ, ITU-R 601 luma
    ``0.2989 R + 0.587 G + 0.114 B`` of the resized frames, truncated to 8 bits (as torchvision does on uint8) and
    repeated to three channels; CLIP normalisation.
    """
    levels = resize_once(quantize(video[uniform_indices(video.shape[0], num_frames)]), size)
    if grayscale:
        w = torch.tensor([0.2989, 0.587, 0.114], device=levels.device).view(1, 3, 1, 1)
        levels = (levels * w).sum(dim=1, keepdim=True).floor().expand(-1, 3, -1, -1)
    return normalize(levels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@dataclass(frozen=True)
class NormStats:
    """Per-head ``(mean, std)`` of the raw logits; ``z = (raw - mean) / std``."""

    stats: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_STATS))

    @classmethod
    def from_inference_config(cls, cfg: dict[str, Any] | None) -> "NormStats":
        if not cfg:
            return cls()
        return cls({h: (float(cfg[f"{h}_mean"]), float(cfg[f"{h}_std"])) for h in HEADS})

    def z(self, raw: Tensor) -> Tensor:
        """``raw [B, 3]`` (VQ, MQ, TA) -> z-scores ``[B, 3]``."""
        mean = torch.tensor([self.stats[h][0] for h in HEADS], dtype=raw.dtype)
        std = torch.tensor([self.stats[h][1] for h in HEADS], dtype=raw.dtype)
        return (raw - mean) / std


class VideoAlignModel(nn.Module):
    """Qwen2-VL + ``Linear(hidden, 1, bias=False)`` read at the VQ, MQ, TA tokens; ``forward`` -> ``[B, 3]`` fp32.

    Build it with `VideoAlignModel.from_pretrained` (the released checkpoint) or `VideoAlignModel.tiny`.
    ``positions`` is the language model's rotary position scheme (`_qwen.POSITIONS`): "sequential", the scheme the
    released checkpoint was trained with, or "mrope" for a checkpoint trained on Qwen2-VL's 3-D index.
    """

    def __init__(self, config: "Qwen2VLConfig", token_ids: list[int], *, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, init: bool = True, positions: str = "sequential") -> None:
        super().__init__()
        self.positions = _qwen.check_positions(positions)
        self.backbone = _qwen.build_backbone(config, device, dtype, init)
        self.head = nn.Linear(config.text_config.hidden_size, 1, bias=False, device=device)
        self.token_ids = list(token_ids)
        self.geometry = _qwen.VisionGeometry.of(config)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values_videos: Tensor,
                video_grid_thw: Tensor) -> Tensor:
        """One video per row: ``input_ids [B, L]``, patches ``[Σ, 1176]``, grids ``[B, 3]`` -> raw ``[B, 3]``."""
        hidden = _qwen.last_hidden(self.backbone, input_ids, attention_mask, pixel_values=pixel_values_videos,
                                   grid=video_grid_thw, vision="video", positions=self.positions)
        return self.head(_qwen.gather_tokens(hidden, input_ids, self.token_ids).float())[..., 0]

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, base: str | Path | None = None, *,
                        step: int | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, positions: str = "sequential",
                        ) -> tuple["VideoAlignModel", "PreTrainedTokenizerBase", NormStats]:
        """Load the released model (either checkpoint layout, see the module docstring).

        Args:
            step: which ``checkpoint-<step>`` folder (default: the highest).
            positions: the language model's position scheme (`_qwen.POSITIONS`).
        Returns:
            The model, its tokenizer (base + the three reward tokens) and the normalisation statistics.
        """
        root = find_path(checkpoint, "VideoReward", "VideoReward checkpoint folder",
                         "Download it with: huggingface-cli download KwaiVGI/VideoReward --local-dir <folder>")
        cfg = _read_json(root / "model_config.json", "VideoReward's model_config.json")
        base_dir = _find_base(base, cfg)
        ckpt = _checkpoint_dir(root, step)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        tokenizer = _qwen.load_tokenizer(base_dir, REWARD_TOKENS)
        weights, trained = _checkpoint_weights(ckpt, base_dir, cfg)
        embed_key = "backbone.language_model.embed_tokens.weight"
        if embed_key not in weights:
            raise ValueError(f"{ckpt} and {base_dir} hold no token embeddings; is {base_dir} a Qwen2-VL folder?")
        weights[embed_key] = _fit_embeddings(weights[embed_key], len(tokenizer), embed_key in trained, ckpt)
        config = _qwen.load_config(base_dir, vocab_size=weights[embed_key].shape[0])
        model = cls(config, tokenizer.convert_tokens_to_ids(REWARD_TOKENS), device=dev, dtype=dt, init=False,
                    positions=positions)
        _qwen.load_weights(model, weights.items(), str(ckpt))
        return model, tokenizer, NormStats.from_inference_config(cfg.get("inference_config"))

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", positions: str = "sequential",
             ) -> tuple["VideoAlignModel", "PreTrainedTokenizerBase", NormStats]:
        """A seeded random 2-layer stand-in with the real tokens, template and head."""
        tokenizer = _qwen.tiny_tokenizer(REWARD_TOKENS, words=user_text("a cat").split())
        ids = tokenizer.convert_tokens_to_ids(REWARD_TOKENS)
        config = _qwen.make_config(tokenizer, **_qwen.TINY)
        model = seeded(seed, lambda: cls(config, ids, device=torch.device(device), positions=positions))
        return model, tokenizer, NormStats()


# ------------------------------------------------------------------------------------------ checkpoint files


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}")
    return json.loads(path.read_text())


def _find_base(base: str | Path | None, cfg: dict[str, Any]) -> Path:
    """The Qwen2-VL-2B-Instruct folder: ``base``, else the reward root's copy, else a local ``model_name_or_path``."""
    if base is not None:
        return find_path(base, "", "Qwen2-VL-2B-Instruct folder", "")
    named = cfg.get("model_config", {}).get("model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct")
    candidates = [reward_root() / "Qwen2-VL-2B-Instruct", Path(named).expanduser()]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        f"the VideoReward base model ({named}) was not found; looked at {', '.join(map(str, candidates))}. Pass "
        "base=<folder> or download it with: huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir <folder>"
    )


def _checkpoint_dir(root: Path, step: int | None) -> Path:
    """``root/checkpoint-<step>`` (the highest step when ``step`` is None)."""
    found = {int(p.name.split("-")[-1]): p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()}
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folder in {root}")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"no checkpoint-{step} in {root}; available steps: {sorted(found)}")
    return found[step]


def _mapped(items: Any) -> dict[str, Tensor]:
    """Official keys -> our keys (``rm_head.weight`` -> ``head.weight``), LM head dropped."""
    out = {}
    for key, value in items:
        ours = _qwen.official_key(key)
        if ours is not None:
            out["head.weight" if ours == "rm_head.weight" else ours] = value
    return out


def _checkpoint_weights(ckpt: Path, base: Path, cfg: dict[str, Any]) -> tuple[dict[str, Tensor], set[str]]:
    """Our-keyed weights of either layout, with any LoRA merged into the base weights, and the keys that came
    from the reward checkpoint itself (not from the base model)."""
    full, adapter, non_lora = ckpt / "model.pth", ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    if full.is_file():
        weights = _mapped(_qwen.iter_tensors(full))
        trained = set(weights)
    elif adapter.is_file() and non_lora.is_file():
        weights = {}
        for f in _qwen.hf_weight_files(base):
            weights.update(_mapped(_qwen.iter_tensors(f)))
        own = _mapped(_qwen.iter_tensors(non_lora))
        trained = set(own)
        weights.update(own)
        weights.update(_mapped(_qwen.iter_tensors(adapter)))
    else:
        raise FileNotFoundError(
            f"{ckpt} holds neither model.pth nor adapter_model.safetensors + non_lora_state_dict.pth "
            "(the two VideoReward checkpoint layouts)"
        )
    lora = {k: weights.pop(k) for k in [k for k in weights if ".lora_" in k]}
    if lora:
        adapter_cfg = ckpt / "adapter_config.json"
        lora_cfg = (_read_json(adapter_cfg, "adapter_config.json") if adapter_cfg.is_file()
                    else cfg.get("peft_lora_config", {}))
        _qwen.merge_lora(weights, lora, _qwen.lora_scale(lora_cfg), str(ckpt))
    return weights, trained


def _fit_embeddings(embed: Tensor, vocab: int, trained: bool, source: Path) -> Tensor:
    """Size the token embeddings to the tokenizer, as the training code's ``resize_token_embeddings`` did.

    The released checkpoint stores the trained table, reward tokens included (``trained``). Taken from the base
    model instead, the table is cut to the tokenizer (or grown with mean rows) and the reward tokens are untrained,
    which we warn about.
    """
    if not trained:
        warnings.warn(f"{source} stores no token embeddings; the reward tokens keep the base model's rows")
    if embed.shape[0] >= vocab:
        return embed[:vocab]
    extra = embed.float().mean(dim=0, keepdim=True).expand(vocab - embed.shape[0], -1).to(embed.dtype)
    return torch.cat([embed, extra])


# ------------------------------------------------------------------------------------------------- rewards


@dataclass
class VideoAlignScorer:
    """Runs the model on batches of videos; one instance per model, shared by every head's reward.

    Args:
        num_frames, size: frame sampling and resize (Astrolabe: 10 frames at 336×588).
        video_batch: videos per forward pass.
    """

    model: VideoAlignModel
    tokenizer: Any
    stats: NormStats
    num_frames: int = NUM_FRAMES
    size: tuple[int, int] = FRAME_SIZE
    video_batch: int = 4
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last: tuple | None = field(default=None, repr=False)

    def raw(self, videos: Tensor, prompts: list[str], grayscale: bool) -> Tensor:
        """Raw logits ``[B, 3]`` (VQ, MQ, TA) on the CPU.

        The last result is kept against the very same ``videos`` object (a weak reference plus its in-place
        version counter), so asking for VQ and then TA of one batch runs the model once.
        """
        key = (tuple(prompts), grayscale, videos._version, self.num_frames, self.size)
        with self._lock:
            if self._last is not None and self._last[0]() is videos and self._last[1] == key:
                return self._last[2]
            out = torch.cat([self._forward(videos[i:i + self.video_batch], prompts[i:i + self.video_batch], grayscale)
                             for i in range(0, videos.shape[0], self.video_batch)])
            self._last = (weakref.ref(videos), key, out)
            return out

    def _forward(self, videos: Tensor, prompts: list[str], grayscale: bool) -> Tensor:
        device = self.model.head.weight.device
        geo = self.model.geometry
        patches = [_qwen.patchify(sample_frames(v.to(device), self.num_frames, self.size, grayscale), geo)
                   for v in videos]
        texts = [_qwen.chat_text(user_text(p), "video", geo.tokens(g)) for p, (_, g) in zip(prompts, patches)]
        input_ids, mask = _qwen.tokenize(self.tokenizer, texts, device)
        grid = torch.tensor([g for _, g in patches], device=device)
        return self.model(input_ids, mask, torch.cat([p for p, _ in patches]), grid).cpu()


@dataclass
class VideoAlignReward:
    """One VideoAlign head as a reward: ``head`` in VQ / MQ / TA, or "Overall": the mean of the three z-scores (raw
    logits with ``normalize=False``), as Astrolabe combines them; upstream's ``inference.py`` sums them instead.

    ``extras`` holds ``raw`` ``[B, 3]`` and ``z`` ``[B, 3]`` (VQ, MQ, TA) after each call.
    """

    scorer: VideoAlignScorer
    head: str
    grayscale: bool = False
    normalize: bool = True
    name: str = "videoalign"
    needs: frozenset[str] = frozenset({"video", "prompts"})
    scale: tuple[float, float] | None = (-3.0, 3.0)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        check_videos(videos, prompts)
        raw = self.scorer.raw(videos, prompts, self.grayscale)
        z = self.scorer.stats.z(raw)
        self.extras = {"raw": raw, "z": z}
        scores = z if self.normalize else raw
        return scores.mean(dim=1) if self.head == "Overall" else scores[:, HEADS.index(self.head)]


def _scorer(checkpoint: str | None, base: str | None, device: str | None, dtype: str | None, tiny: bool, seed: int,
            num_frames: int, video_batch: int, positions: str) -> VideoAlignScorer:
    """The shared scorer for a model config (one model in memory however many heads are used)."""
    dev = resolve_device(device)
    _qwen.check_positions(positions)
    if tiny:
        key = ("videoalign-tiny", seed, str(dev), positions)
        parts = shared(key, lambda: VideoAlignModel.tiny(seed, dev, positions))
        size = (56, 56)
    else:
        key = ("videoalign", str(checkpoint), str(base), str(dev), str(resolve_dtype(dtype, dev)), positions)
        parts = shared(key, lambda: VideoAlignModel.from_pretrained(checkpoint, base, device=dev, dtype=dtype,
                                                                    positions=positions))
        size = FRAME_SIZE
    return shared(key + ("scorer", num_frames, video_batch),
                  lambda: VideoAlignScorer(*parts, num_frames=num_frames, size=size, video_batch=video_batch))


def _factory(head: str, default_gray: bool, name: str):
    def build(checkpoint: str | None = None, base: str | None = None, *, device: str | None = None,
              dtype: str | None = None, grayscale: bool = default_gray, normalize: bool = True,
              num_frames: int = NUM_FRAMES, video_batch: int = 4, positions: str = "sequential", tiny: bool = False,
              seed: int = 0) -> VideoAlignReward:
        scorer = _scorer(checkpoint, base, device, dtype, tiny, seed, num_frames, video_batch, positions)
        return VideoAlignReward(scorer, head, grayscale, normalize, name=name)

    what = "the mean of the VQ, MQ, TA z-scores (upstream sums them)" if head == "Overall" else head
    build.__doc__ = (f"VideoAlign {what} reward ({'grayscale' if default_gray else 'RGB'} input by default); "
                     "files as in the module docstring; ``positions`` is the language model's position scheme "
                     "(`_qwen.POSITIONS`, the checkpoint's is \"sequential\"); ``tiny=True`` for a random stand-in "
                     "(56×56 frames).")
    return build


register_reward("videoalign_vq")(_factory("VQ", False, "videoalign_vq"))
register_reward("videoalign_mq")(_factory("MQ", True, "videoalign_mq"))
register_reward("videoalign_ta")(_factory("TA", False, "videoalign_ta"))
register_reward("videoalign")(_factory("Overall", False, "videoalign"))
