"""The DiT, its KV cache, attention backends, flow schedule and family presets (torch, einops, safetensors only)."""

from astrolabe_rl.models.families import FAMILIES, Family, SamplerConfig, get_family
from astrolabe_rl.models.kv_cache import CachePolicy, KVCache
from astrolabe_rl.models.schedule import StepSchedule
from astrolabe_rl.models.wan import CausalWan, WanConfig

__all__ = [
    "FAMILIES", "CachePolicy", "CausalWan", "Family", "KVCache", "SamplerConfig", "StepSchedule", "WanConfig",
    "get_family",
]
