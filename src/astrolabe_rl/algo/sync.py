"""Old-policy soft update and the evaluation EMA (DESIGN §3; reference/nft.md §1.5, reference/astrolabe.md §2.2).

After optimiser step ``step``:   θ_old ← η·θ_old + (1−η)·θ   with η = ``old_decay(step, schedule)``,
and, separately, the eval/checkpoint EMA:   θ_ema ← d·θ_ema + (1−d)·θ   with d = ``ema_decay(n_updates)``.
Both are the same in-place interpolation, ``soft_update_``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def old_decay(step: int, schedule: int = 1, rate: float = 0.001, cap: float = 0.5) -> float:
    """η, the weight kept on θ_old after optimiser step ``step`` (≥ 0, counting optimiser steps, not epochs).

    schedule 0: η = 0, a hard copy (fully on-policy).
    schedule 1: η = min(rate·step, cap)  (release: rate 0.001, cap 0.5): a copy early on, at most half-old later.
                A short run (the toy demo's 60 steps) raises ``rate`` to reach the released off-policy regime, which
                a real run reaches at step 500; at η ≈ 0 θ_old ≈ θ and β only scales the gradient (Adam undoes it).
    schedule 2: η = 0 for step < 75, then min(0.0075·(step − 75), 0.999)  (upstream's "delayed" OCR schedule;
                η reaches 0.999 near step 208, after which the old policy almost freezes).
    """
    if step < 0:
        raise ValueError(f"step must be ≥ 0 (optimiser steps done); got {step}")
    if schedule == 0:
        return 0.0
    if schedule == 1:
        return min(rate * step, cap)
    if schedule == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"unknown old-policy decay schedule {schedule!r}; use 0 (copy), 1 (release) or 2 (delayed)")


def ema_decay(num_updates: int, decay: float = 0.9) -> float:
    """EMA decay with warm-up  d = min((1 + n)/(10 + n), decay), n = EMA updates already done (0 at the first).

    The warm-up keeps the first EMA values close to the live weights instead of to the initialisation.
    """
    if num_updates < 0:
        raise ValueError(f"num_updates must be ≥ 0; got {num_updates}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1] (DESIGN default 0.9); got {decay}")
    return min((1.0 + num_updates) / (10.0 + num_updates), decay)


def _pairs(target: Iterable[Tensor], source: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    tgt, src = list(target), list(source)
    if len(tgt) != len(src):
        raise ValueError(f"target has {len(tgt)} tensors but source has {len(src)}; pass matching parameter lists")
    for i, (t, s) in enumerate(zip(tgt, src)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: target shape {tuple(t.shape)} != source shape {tuple(s.shape)}")
    return tgt, src


@torch.no_grad()
def soft_update_(target: Iterable[Tensor], source: Iterable[Tensor], eta: float) -> None:
    """In place:  target ← η·target + (1−η)·source,  tensor by tensor (lists in matching order).

    η = 0 is an exact copy (bit-identical), η = 1 leaves target untouched. Sources in another dtype or device
    are cast to the target's. One fused ``_foreach`` call (torch groups the tensors by device and dtype itself).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta}")
    tgt, src = _pairs(target, source)
    if not tgt or eta == 1.0:
        return
    src = [s.to(device=t.device, dtype=t.dtype) for t, s in zip(tgt, src)]
    if eta == 0.0:
        torch._foreach_copy_(tgt, src)
        return
    # lerp(t, s, 1 − η) = t + (1 − η)(s − t) = η·t + (1 − η)·s
    torch._foreach_lerp_(tgt, src, 1.0 - eta)


def ema_update_(ema: Iterable[Tensor], params: Iterable[Tensor], decay: float = 0.9) -> None:
    """In place:  ema ← decay·ema + (1−decay)·params  (the eval/checkpoint EMA; see ``ema_decay`` for warm-up)."""
    soft_update_(ema, params, decay)
