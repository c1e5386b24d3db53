"""Helpers every learned reward shares: where checkpoints live, one model per config, frame pooling, dtypes.

Checkpoints are never downloaded. Each reward takes explicit paths; a path left out is looked up under the reward
root, ``$ASTROLABE_REWARD_ROOT`` (default ``~/.cache/astrolabe_rl/rewards``), at the layout its loader documents.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def reward_root() -> Path:
    """The folder holding reward checkpoints: ``$ASTROLABE_REWARD_ROOT`` or ``~/.cache/astrolabe_rl/rewards``."""
    return Path(os.environ.get("ASTROLABE_REWARD_ROOT", Path.home() / ".cache" / "astrolabe_rl" / "rewards"))


def find_path(given: str | os.PathLike | None, default: str, what: str, how: str) -> Path:
    """Resolve a checkpoint path: ``given`` if set, else ``reward_root() / default``.

    Raises:
        FileNotFoundError: naming what is missing, every place looked, and how to get it.
    """
    path = Path(given).expanduser() if given is not None else reward_root() / default
    if path.exists():
        return path
    looked = f"{path}" if given is not None else f"{path} (set ASTROLABE_REWARD_ROOT or pass the path explicitly)"
    raise FileNotFoundError(f"{what} not found; looked at {looked}. {how}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means the current CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 on a GPU and float32 on the CPU (CPU bf16 matmuls are slow and imprecise)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def shared(key: tuple, build: Callable[[], T]) -> T:
    """One instance per ``key`` for the life of the process (e.g. one CLIP-L for both aesthetic and CLIPScore).

    The key must name everything that changes the weights or their placement: model kind, checkpoint paths,
    device and dtype.
    """
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = build()
        return _SHARED[key]


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` under ``torch.manual_seed(seed)``, restoring the caller's CPU random stream afterwards (building a
    random stand-in model must not shift the rollout noise of the code that asked for it)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def top_frac_mean(scores: Tensor, frac: float | None) -> Tensor:
    """Pool per-frame scores ``[B, T]`` into ``[B]``: the mean of the best ``max(1, int(frac·T))`` frames, or
    the plain mean when ``frac`` is None. Astrolabe pools HPSv3 and HPSv2 with ``frac = 0.3``."""
    if frac is None:
        return scores.mean(dim=1)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"top_frac must be in (0, 1], got {frac}")
    k = max(1, int(scores.shape[1] * frac))
    return scores.topk(k, dim=1).values.mean(dim=1)


def uniform_indices(total: int, n: int | None) -> list[int]:
    """``n`` frame indices spread evenly over ``[0, total)``, ends included: ``linspace(0, total-1, n).round()``
    (81 frames, n = 10 -> 0, 9, 18, 27, 36, 44, 53, 62, 71, 80). ``n=None`` or ``n >= total`` keeps every frame."""
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"need at least one frame, got n={n}")
    return torch.linspace(0, total - 1, n, dtype=torch.float64).round().long().tolist()


def quantize(x: Tensor) -> Tensor:
    """Float frames in [0, 1] -> float levels {0, ..., 255}: ``(x·255).round().clamp(0, 255)``.

    The reward models were trained on 8-bit images, and the reference pipelines cast to uint8 before their
    processors; we keep the value set (not the dtype) so the rest of the pipeline stays in float on the device.
    """
    return (x.float() * 255.0).round().clamp(0.0, 255.0)


def bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """One bicubic, antialiased resize of ``[N, C, H, W]`` to ``size`` (no rounding, no clamping): the kernel
    PIL and torchvision both use (``F.interpolate(..., mode="bicubic", antialias=True, align_corners=False)``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def resize_levels(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of 8-bit levels ``[N, C, H, W]``, emulating PIL on an 8-bit image.

    For the pipelines that really resize with PIL (HPSv3's Qwen2-VL image processor, the CLIP image processor):
    PIL resizes the width, stores the intermediate as 8-bit, then resizes the height; torch's antialiased bicubic
    kernel is PIL's. Doing the same two passes with rounding in between matches the processors to one level even
    on noise (a single pass differs by up to ~12 levels where the bicubic overshoot is clipped).
    """
    h, w = size
    for target in ((x.shape[-2], w), (h, w)):
        x = bicubic(x, target).round().clamp(0.0, 255.0)
    return x


def resize_once(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of 8-bit levels ``[N, C, H, W]`` in one pass, rounded once to 8-bit levels.

    What torchvision's ``resize`` does to a uint8 tensor (interpolate in float, clamp to [0, 255], round): the
    pipelines that resize uint8 frames in torch (VideoAlign's video path, Astrolabe's in-memory path) use it.
    """
    return bicubic(x, size).round().clamp(0.0, 255.0)


def normalize(levels: Tensor, mean: tuple[float, ...], std: tuple[float, ...], full: float = 255.0) -> Tensor:
    """Pixels ``[N, C, H, W]`` -> ``(x/full - mean) / std`` per channel; ``full`` is the value of full intensity
    (255 for 8-bit levels, 1 for float frames in [0, 1])."""
    m = torch.tensor(mean, device=levels.device, dtype=levels.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=levels.device, dtype=levels.dtype).view(1, -1, 1, 1)
    return (levels / full - m) / s


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_reward_kwargs(text: str | None) -> dict[str, dict[str, Any]]:
    """``{reward: {kwarg: value}}`` from a JSON string or a .json / .yaml file (command-line helper)."""
    if not text:
        return {}
    path = Path(text).expanduser()
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        from astrolabe_rl.config import yaml_load

        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--reward-kwargs file {path} is not UTF-8 text") from None
        obj = _json_strict(text, str(path)) if path.suffix == ".json" else yaml_load(text, str(path))
    else:
        obj = _json_strict(text, "--reward-kwargs (neither a .json/.yaml file nor JSON)")
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise ValueError('reward kwargs must map reward names to keyword dicts, e.g. {"hpsv3": {"frames": 16}}')
    return obj


def _json_strict(text: str, where: str) -> Any:
    """``json.loads`` refusing a key given twice in one object (json keeps the last one silently)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"{where}: key {twice[0]!r} is given twice in one object; keep one")
        return dict(items)

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON: {e}") from None


def build_rewards(names: list[str], kwargs: dict[str, dict[str, Any]], device: str | None = None,
                  dtype: str | None = None) -> dict[str, Any]:
    """Build rewards by registry name; ``device`` / ``dtype`` go to every factory that takes them (a reward's own
    kwargs win). Identical configurations share one instance (`build_reward`)."""
    from astrolabe_rl.rewards import base

    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"reward kwargs given for {sorted(unknown)}, which are not among the rewards {names}")
    base.available_rewards()  # registers the built-in rewards
    out = {}
    for name in names:
        kw = dict(kwargs.get(name, {}))
        params = inspect.signature(base._REGISTRY[name]).parameters if name in base._REGISTRY else {}
        for key, value in (("device", device), ("dtype", dtype)):
            if value is not None and key in params:
                kw.setdefault(key, value)
        out[name] = base.build_reward(name, **kw)
    return out
