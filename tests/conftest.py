"""Shared fixtures: a tiny random CausalWan in float32 on CPU, fixed seeds."""

from __future__ import annotations

import pytest
import torch

from astrolabe_rl.models import CausalWan, WanConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and OpenMP spin-waits make them crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> CausalWan:
    torch.manual_seed(1234)
    return CausalWan(WanConfig.tiny()).eval()


def tensor_digest(tensors: list[torch.Tensor]) -> list[bytes]:
    """Exact byte images of tensors (for bit-identity checks)."""
    return [t.detach().cpu().contiguous().numpy().tobytes() for t in tensors]
