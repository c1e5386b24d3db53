"""The toy text encoder: a fixed embedding table over the grammar's words (implements `models.text.TextEncoder`).

Each word of `world.vocabulary()` owns one row of a seeded Gaussian table; a prompt becomes its words' rows,
zero-padded to ``text_len`` tokens, like umT5's zeroed padding. The DiT's cross-attention has no positions on
the text side, so this is a bag of words; that is enough because every attribute slot uses its own words.
"""

from __future__ import annotations

import torch
from torch import Tensor

from astrolabe_rl.toy.world import PROMPT_WORDS, vocabulary

TEXT_DIM = 32
TEXT_LEN = 10  # ≥ the grammar's 9 words: one zero row, as real encoders always pad


class ToyTextEncoder:
    """Prompts -> embeddings ``[B, text_len, text_dim]`` (float32); unknown words raise, naming the vocabulary."""

    def __init__(self, text_dim: int = TEXT_DIM, text_len: int = TEXT_LEN, seed: int = 0) -> None:
        if text_len < PROMPT_WORDS:
            raise ValueError(f"text_len={text_len} is shorter than the grammar's {PROMPT_WORDS}-word prompts")
        self.words = {w: i for i, w in enumerate(vocabulary())}
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(self.words), text_dim, generator=g)
        self.text_len = text_len
        self.cache_id = f"toy-{text_dim}x{text_len}-s{seed}"

    def __call__(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.table.shape[1])
        for i, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.words]
            if unknown or not words or len(words) > self.text_len:
                raise ValueError(
                    f"toy prompt {prompt!r} must be 1..{self.text_len} words of the toy grammar "
                    f"(unknown: {unknown}); vocabulary: {' '.join(self.words)}"
                )
            out[i, : len(words)] = self.table[[self.words[w] for w in words]]
        return out
