"""Text conditioning: the encoder protocol and a deterministic hashing encoder for tiny models and tests.

Real models use umT5-XXL (512 tokens × 4096, padding rows zeroed, `reference/ar_models.md` §1.4). A tiny model needs
no language model: `HashTextEncoder` maps each word to a fixed random vector, so prompts that share words share
features and the same prompt always gives the same embedding, on any machine.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import torch
from torch import Tensor


class TextEncoder(Protocol):
    """Turns prompts into the DiT's text embeddings ``[B, text_len, text_dim]`` (zero rows after the prompt)."""

    def __call__(self, prompts: list[str]) -> Tensor: ...


class HashTextEncoder:
    """Word-level embeddings from a seeded random table indexed by a stable hash (crc32) of each word.

    Args:
        text_dim: embedding width (the DiT's ``text_dim``).
        text_len: tokens per prompt; longer prompts are truncated, shorter ones zero-padded.
        vocab: hash buckets.
        seed: seed of the table.
    """

    def __init__(self, text_dim: int, text_len: int, vocab: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, text_dim, generator=g)
        self.text_len = text_len

    def token_ids(self, prompt: str) -> list[int]:
        words = prompt.lower().split()[: self.text_len]
        return [zlib.crc32(w.encode()) % self.table.shape[0] for w in words]

    def __call__(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.table.shape[1])
        for i, p in enumerate(prompts):
            ids = self.token_ids(p)
            if not ids:
                raise ValueError(f"prompt {i} is empty; give at least one word")
            out[i, : len(ids)] = self.table[ids]
        return out
