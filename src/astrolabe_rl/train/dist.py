"""Distributed infrastructure: process group, collectives, DDP / FSDP2 wrapping, the prompt-group sampler.

This is the only module that knows ``torch.distributed``, DDP or FSDP2 (DESIGN §2). Everything degrades to a
no-op in a single process, so the recipe is written once and runs unchanged under ``python`` and ``torchrun``:

    ctx = init_distributed()                       # torchrun env -> process group; otherwise single process
    model = wrap_model(model.to(ctx.device), ctx, "ddp")
    sampler = GroupSampler(len(prompts), P, K, ctx.world_size, ctx.rank, seed)
    for sample in sampler.epoch_plan(epoch): ...   # this rank's share of the P·K rollouts
    rewards = all_gather_cat(ctx, local_rewards)   # [P·K] in global order, on every rank
    shutdown()

Hang hygiene (`reference/ecosystem.md` §2.2: ddpo-pytorch#13 hung because a collective ran on some ranks only):
every collective here must be called by *every* rank, in the same order. Keep them out of ``on_main`` bodies
and out of rank-dependent branches; do rank-0 I/O after the collective, with its result.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import operator
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, NamedTuple, ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["none", "ddp", "fsdp2"]
STRATEGIES: tuple[str, ...] = ("none", "ddp", "fsdp2")

# The variables torchrun exports to every worker; all present means "launched distributed".
_LAUNCH_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

_CONTEXT: DistContext | None = None


# ----------------------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 .. world_size-1``.
        world_size: number of processes (1 in a single-process run).
        local_rank: rank on this node; selects the GPU.
        device: the device this rank computes on (``cuda:<local_rank>`` under torchrun with CUDA).
        backend: ``"nccl"`` or ``"gloo"`` when a process group exists, ``None`` otherwise.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files, logs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process; collectives are no-ops otherwise."""
        return self.world_size > 1


def init_distributed(device: str | None = None, *, timeout: datetime.timedelta = _DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group when launched by torchrun, else return a single-process context.

    Idempotent: later calls return the first call's context.

    Args:
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). Under torchrun the CUDA index always
            comes from ``LOCAL_RANK``; in a single process an explicit index (``"cuda:1"``) is kept.
        timeout: how long a collective may wait for the other ranks before failing instead of hanging forever.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        if device is not None and torch.device(device).type != _CONTEXT.device.type:
            raise RuntimeError(f"init_distributed(device={device!r}) after the context was already created on "
                               f"{_CONTEXT.device}; call shutdown() first to change device")
        return _CONTEXT
    if dist.is_available() and dist.is_initialized():  # someone else created the group: adopt it
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), local_rank,
                               _resolve_device(device, local_rank, distributed=True), dist.get_backend())
    elif _launched_by_torchrun():
        _CONTEXT = _init_process_group(device, timeout)
    else:
        _CONTEXT = DistContext(0, 1, 0, _resolve_device(device, 0, distributed=False), None)
    return _CONTEXT


def shutdown() -> None:
    """Destroy the process group (if any) and forget the context; safe to call twice."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def _launched_by_torchrun() -> bool:
    present = [v for v in _LAUNCH_VARS if v in os.environ]
    if present and len(present) < len(_LAUNCH_VARS):
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        raise RuntimeError(f"found {present} in the environment but not {missing}: launch with "
                           f"`torchrun --nproc_per_node N ...`, or unset {present} for a single-process run")
    return bool(present)


def _init_process_group(device: str | None, timeout: datetime.timedelta) -> DistContext:
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed; "
                           "install a torch build with distributed support or run a single process")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = _resolve_device(device, local_rank, distributed=True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}  # lets NCCL bind eagerly
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return DistContext(rank, world_size, local_rank, dev, backend)


def _resolve_device(device: str | None, local_rank: int, *, distributed: bool) -> torch.device:
    requested = torch.device(device) if device is not None else None
    kind = requested.type if requested is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available; pass device='cpu'")
        index = local_rank if distributed or requested is None or requested.index is None else requested.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"this rank wants cuda:{index} but only {torch.cuda.device_count()} GPU(s) are "
                               "visible; lower --nproc_per_node or fix CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if distributed and kind != "cpu":
        raise RuntimeError(f"distributed runs support device 'cuda' or 'cpu', not {kind!r}")
    return requested if requested is not None else torch.device(kind)


# ----------------------------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process; results are detached: they carry statistics, not gradients)
# ----------------------------------------------------------------------------------------------------------------


def _group_ready(ctx: DistContext) -> bool:
    """Whether to communicate; raises if the context says distributed but the group is gone."""
    if not ctx.distributed:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"ctx says world_size={ctx.world_size} but no process group exists (was shutdown() "
                           "called?); call init_distributed() again")
    return True


def barrier(ctx: DistContext) -> None:
    """Wait until every rank reaches this point."""
    if not _group_ready(ctx):
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def all_gather_cat(ctx: DistContext, x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order; first-dim sizes may differ per rank.

    Args:
        x: ``[N_r, ...]``; the number of dims, the trailing dims and the dtype must agree across ranks.
    Returns:
        ``[sum_r N_r, ...]``, a new detached tensor on ``x``'s device (identical on every rank).
    """
    if x.dim() == 0:
        raise ValueError("all_gather_cat needs a tensor with a leading dim; pass x.reshape(1)")
    if not _group_ready(ctx):
        return x.detach().clone()
    local = x.detach().to(ctx.device)
    local = local.to(torch.uint8) if x.dtype == torch.bool else local  # gloo/nccl have no bool all_gather
    # Sizes first, so every rank can pad to the largest and trim afterwards (all_gather needs equal shapes).
    shape = torch.tensor(local.shape, dtype=torch.long, device=ctx.device)
    shapes = [torch.empty_like(shape) for _ in range(ctx.world_size)]
    dist.all_gather(shapes, shape)
    shapes_l = [s.tolist() for s in shapes]
    if any(s[1:] != shapes_l[0][1:] for s in shapes_l):  # every rank sees the same shapes, so all raise together
        raise ValueError(f"all_gather_cat: trailing dims differ across ranks: {shapes_l}; only dim 0 may differ")
    rows = [s[0] for s in shapes_l]
    padded = local.new_zeros((max(rows), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    out = torch.cat([g[:n] for g, n in zip(gathered, rows)])
    return out.to(device=x.device, dtype=x.dtype)


def all_reduce_sum(ctx: DistContext, x: Tensor) -> Tensor:
    """Element-wise sum of ``x`` over ranks; a new detached tensor on ``x``'s device."""
    if not _group_ready(ctx):
        return x.detach().clone()
    y = x.detach().to(ctx.device, copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_mean(ctx: DistContext, x: Tensor) -> Tensor:
    """Element-wise mean of ``x`` over ranks (integer inputs come back as floats); a new detached tensor."""
    if not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.get_default_dtype())
    return all_reduce_sum(ctx, x) / ctx.world_size


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects; the others' ``obj`` is ignored)."""
    if not 0 <= src < ctx.world_size:
        raise ValueError(f"broadcast_object: src={src} is not a rank of a world of {ctx.world_size}")
    if not _group_ready(ctx):
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def all_gather_object(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, as a list indexed by rank (``[obj]`` in a single process)."""
    if not _group_ready(ctx):
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model wrapping
# ----------------------------------------------------------------------------------------------------------------


def wrap_model(
    model: nn.Module,
    ctx: DistContext,
    strategy: Strategy = "none",
    *,
    block_attr: str = "blocks",
    static_graph: bool = False,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    block_methods: tuple[str, ...] = ("text_kv",),
) -> nn.Module:
    """Wrap ``model`` for data-parallel training; returns it unchanged for ``"none"`` or a single process.

    Args:
        model: already on ``ctx.device`` (``model.to(ctx.device)``).
        strategy: ``"none"``; ``"ddp"`` (replicated weights, gradients all-reduced in backward,
            ``find_unused_parameters=False``: every trainable parameter must receive a gradient each step);
            ``"fsdp2"`` (``fully_shard`` on each transformer block: their parameters, gradients and optimiser state
            sharded across ranks; modifies ``model`` in place). The rest (embeddings, head: ~2% of Wan) stays
            replicated and must be frozen, see `_shard_fsdp2`.
        block_attr: dotted attribute path of the ``nn.ModuleList`` of transformer blocks (FSDP2 only), e.g.
            ``"base_model.model.blocks"`` for a peft-wrapped model.
        static_graph: DDP's ``static_graph`` (same used parameters every iteration; enables some optimisations).
        reshard_after_forward: FSDP2: free gathered parameters after forward (less memory, one more all-gather).
        param_dtype: FSDP2 mixed precision: compute dtype of the gathered parameters (gradients reduce in fp32).
        block_methods: FSDP2: the block methods besides ``forward`` that the model calls from outside the blocks
            (those a block has are registered, so its sharded weights are gathered around them too). Default:
            `CausalWan`'s, whose ``encode_text`` calls every block's ``text_kv``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if isinstance(model, DistributedDataParallel) or _fsdp2_modules(model):
        raise ValueError("model is already wrapped; call wrap_model once (use unwrap(model) for the plain module)")
    if strategy == "fsdp2":  # checked in a single process too, so a bad config fails before an 8-GPU launch
        _find_blocks(model, block_attr)
        _import_fsdp2()
    if strategy == "none" or not ctx.distributed:
        return model
    _group_ready(ctx)
    if strategy == "ddp":
        return _wrap_ddp(model, ctx, static_graph)
    return _shard_fsdp2(model, ctx, block_attr, reshard_after_forward, param_dtype, block_methods)


def _wrap_ddp(model: nn.Module, ctx: DistContext, static_graph: bool) -> nn.Module:
    wrong = {str(p.device) for p in model.parameters() if p.device != ctx.device}
    if wrong:
        raise ValueError(f"DDP needs the model on {ctx.device} but parameters are on {sorted(wrong)}; "
                         "call model.to(ctx.device) before wrap_model")
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                   static_graph=static_graph)


def _shard_fsdp2(model: nn.Module, ctx: DistContext, block_attr: str, reshard_after_forward: bool,
                 param_dtype: torch.dtype | None, block_methods: tuple[str, ...]) -> nn.Module:
    """``fully_shard`` every block, with its ``block_methods`` registered as entry points; the root is left
    unsharded, on purpose.

    FSDP2 gathers a unit's parameters only around its ``forward`` and the methods registered with
    ``register_fsdp_forward_method``. The streaming sampler enters the DiT through ``encode_text``, ``denoise`` and
    ``commit``, which use the root's own parameters (text / time / patch embeddings, head) directly, so a sharded
    root fails there ("mixed torch.Tensor and DTensor"), and registering those root methods would nest
    (``forward`` calls ``encode_text``) and reshard in the middle of a call. Blocks are entered through ``forward``
    and ``block_methods`` only. Left unsharded, the root parameters are replicated (about 2% of Wan) and get no
    gradient reduction, so they must be frozen (LoRA trains inside the blocks only); each block is then its own
    FSDP root.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method
    from torch.distributed.device_mesh import init_device_mesh

    blocks = _find_blocks(model, block_attr)
    in_blocks = {id(p) for p in blocks.parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_blocks]
    if trainable:
        raise ValueError(f"strategy='fsdp2' shards {type(model).__name__}.{block_attr} only, and {trainable[:3]} "
                         f"({len(trainable)} trainable parameters outside it) would not be synchronised across "
                         "ranks; freeze them (train LoRA inside the blocks) or use strategy='ddp'")
    fully_shard, mixed_precision_policy = _import_fsdp2()
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(ctx.device.type, (ctx.world_size,)),
                              "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = mixed_precision_policy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:  # one all-gather per block: peak memory is one block, not all
        fully_shard(block, **kwargs)
        for method in block_methods:
            if hasattr(block, method):
                register_fsdp_forward_method(block, method)
    return model


def _find_blocks(model: nn.Module, block_attr: str) -> nn.ModuleList:
    try:
        blocks = operator.attrgetter(block_attr)(model)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"FSDP2 shards per transformer block but {type(model).__name__}.{block_attr} is not a "
                         "non-empty nn.ModuleList; pass block_attr='<dotted path to the blocks>'")
    return blocks


def _import_fsdp2() -> tuple[Callable[..., Any], Any]:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:  # torch 2.4-2.5 kept FSDP2 under _composable
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError as err:
            raise RuntimeError(f"strategy='fsdp2' needs torch.distributed.fsdp.fully_shard (torch >= 2.4); this is "
                               f"torch {torch.__version__}. Upgrade torch or use strategy='ddp'") from err
    return fully_shard, MixedPrecisionPolicy


def is_sharded(model: nn.Module) -> bool:
    """Whether ``wrap_model(..., "fsdp2")`` sharded ``model``'s blocks (its backward then reduces the gradients)."""
    return bool(_fsdp2_modules(model))


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The ``fully_shard``-ed modules inside ``model`` (its blocks after ``wrap_model(..., "fsdp2")``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (FSDP2 shards in place: returned as is)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def average_gradients_(ctx: DistContext, params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over the ranks in place, one flat all-reduce: for passes that call the DiT's cached modes
    (streaming windows) rather than a DDP-wrapped forward, whose hooks would do it. No-op in one process."""
    grads = [p.grad for p in params if p.grad is not None]
    if not _group_ready(ctx) or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Skip the gradient all-reduce inside the block (gradient accumulation: all micro-batches but the last).

    DDP: ``model.no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` on every sharded block for the block.
    Otherwise a no-op. The first backward *outside* the block reduces everything accumulated so far.
    """
    sharded = _fsdp2_modules(model) if enabled else []
    if enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif sharded:
        for m in sharded:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in sharded:
                m.set_requires_gradient_sync(True, recurse=False)
    else:
        yield


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor (an FSDP2-sharded parameter, its gradient or optimiser state) is all-gathered,
    so every rank must call this for it, in the same order; a plain tensor is returned as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: Tensor, ref: Tensor) -> Tensor:
    """``full`` laid out like ``ref``: this rank's shard of it when ``ref`` is a DTensor (no communication: every
    rank holds ``full``), ``full`` itself otherwise. Loads a checkpoint or an EMA into a sharded parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return full
    return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def full_state(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples of tensors, e.g. ``optimizer.state_dict()``) with every DTensor
    all-gathered into a plain tensor: what a checkpoint stores, whatever the world size. Collective: every rank
    calls it on the same structure."""
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return full_tensor(obj) if isinstance(obj, Tensor) else obj


def shard_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a `full_state` checkpoint: lay every per-parameter state tensor of a
    sharded parameter (Adam's moments) out like the parameter; a no-op for plain parameters."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if isinstance(v, Tensor) and v.shape == p.shape:
                state[k] = shard_like(v, p)


# ----------------------------------------------------------------------------------------------------------------
# Rank-0 I/O
# ----------------------------------------------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def on_main(ctx: DistContext) -> Callable[[Callable[_P, _R]], Callable[_P, _R | None]]:
    """Decorator: run the function on rank 0 only; other ranks get ``None``.

    Never call a collective (or ``barrier``) inside: the other ranks would wait for it forever.

        @on_main(ctx)
        def write_table(rows): ...
    """

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R | None]:
        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
            return fn(*args, **kwargs) if ctx.is_main else None

        return wrapper

    return decorate


# ----------------------------------------------------------------------------------------------------------------
# The prompt-group sampler
# ----------------------------------------------------------------------------------------------------------------


class Sample(NamedTuple):
    """One rollout of an epoch: candidate ``candidate`` of prompt ``prompt_id`` (its group id).

    ``global_index`` is the position in the epoch's global batch, ``slot·K + candidate``;
    ``seed_for_noise`` seeds the rollout's noise generator (``rollout(..., seeds=...)``).
    """

    global_index: int
    prompt_id: int
    candidate: int
    seed_for_noise: int


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from integers/labels (identical across processes, platforms and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GroupSampler:
    """Deals each epoch's P prompts × K candidates to the ranks; the global batch does not depend on world size.

    The rule (a pure function of ``(seed, epoch)``; ``N`` prompts, ``P`` per epoch, ``K`` candidates, ``W`` ranks):

    1. **Passes.** The dataset is walked in passes. Pass ``j`` is the permutation
       ``torch.randperm(N, generator=manual_seed(mix(seed, "order", j)))``. A pass serves ``E = N // P`` epochs;
       epoch ``e`` lies in pass ``j = e // E`` and takes the prompts at positions
       ``[(e % E)·P, (e % E)·P + P)`` of that permutation. So prompts are drawn without replacement within a pass;
       when a pass cannot fill another epoch its last ``N % P`` prompts are skipped and a new shuffle starts
       (each epoch then holds P distinct prompts, so prompt id = group id is unambiguous).
    2. **Groups.** The prompt at slot ``s`` of the epoch yields K samples with global indices ``s·K .. s·K + K-1``
       (candidate ``k`` at ``s·K + k``): candidates of a group are adjacent.
    3. **Ranks.** Rank ``r`` takes the contiguous chunk ``[r·n, (r+1)·n)`` with ``n = P·K / W``; concatenating
       the ranks' chunks in rank order (``all_gather_cat``) restores the global order.
    4. **Noise.** ``seed_for_noise = mix(seed, "noise", e, global_index)``: a video depends on (seed, epoch,
       global index) only, so a 1-process and a W-process run generate the same videos.

    ``mix`` is a 63-bit BLAKE2b hash of the colon-joined arguments.
    """

    def __init__(self, num_prompts: int, prompts_per_epoch: int, candidates: int, world_size: int, rank: int,
                 seed: int) -> None:
        _check_sizes(num_prompts, prompts_per_epoch, candidates, world_size, rank)
        self.num_prompts = num_prompts
        self.prompts_per_epoch = prompts_per_epoch
        self.candidates = candidates
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0  # the recipe's position, saved by state_dict(); the plan itself never reads it

    @property
    def samples_per_rank(self) -> int:
        """``n = P·K / W`` samples this rank generates per epoch."""
        return self.prompts_per_epoch * self.candidates // self.world_size

    def __len__(self) -> int:
        return self.samples_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch the recipe is at (what ``state_dict`` saves)."""
        self.epoch = epoch

    def epoch_prompts(self, epoch: int) -> list[int]:
        """The P distinct prompt ids of ``epoch``, in slot order (rule step 1)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        epochs_per_pass = self.num_prompts // self.prompts_per_epoch
        pass_index, start = divmod(epoch, epochs_per_pass)
        start *= self.prompts_per_epoch
        order = torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(
            mix_seed(self.seed, "order", pass_index)))
        return order[start: start + self.prompts_per_epoch].tolist()

    def global_plan(self, epoch: int) -> list[Sample]:
        """All P·K samples of ``epoch`` in global order (every rank computes the same list)."""
        k = self.candidates
        return [Sample(slot * k + c, prompt, c, mix_seed(self.seed, "noise", epoch, slot * k + c))
                for slot, prompt in enumerate(self.epoch_prompts(epoch)) for c in range(k)]

    def epoch_plan(self, epoch: int) -> list[Sample]:
        """This rank's contiguous chunk of ``global_plan(epoch)`` (rule step 3)."""
        n = self.samples_per_rank
        return self.global_plan(epoch)[self.rank * n: (self.rank + 1) * n]

    def state_dict(self) -> dict[str, int]:
        """What resume needs. World size and rank are left out: a run may resume on a different number of ranks
        and still see the same global batches."""
        return {"seed": self.seed, "num_prompts": self.num_prompts, "prompts_per_epoch": self.prompts_per_epoch,
                "candidates": self.candidates, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the epoch; refuses a state whose plan would differ from this sampler's."""
        for key in ("seed", "num_prompts", "prompts_per_epoch", "candidates"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]} but this run has "
                                 f"{key}={getattr(self, key)}; resume with the same value or start a new run")
        self.epoch = int(state["epoch"])


def _check_sizes(num_prompts: int, prompts_per_epoch: int, candidates: int, world_size: int, rank: int) -> None:
    if num_prompts < 1 or candidates < 1 or world_size < 1:
        raise ValueError(f"need num_prompts, candidates, world_size >= 1; got {num_prompts}, {candidates}, "
                         f"{world_size}")
    if not 1 <= prompts_per_epoch <= num_prompts:
        raise ValueError(f"prompts_per_epoch={prompts_per_epoch} must be in [1, num_prompts={num_prompts}]: an "
                         "epoch draws distinct prompts; lower prompts_per_epoch or add prompts")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    total = prompts_per_epoch * candidates
    if total % world_size:
        step = world_size // math.gcd(candidates, world_size)  # P must be a multiple of this
        suggestion = -(-prompts_per_epoch // step) * step
        raise ValueError(f"prompts_per_epoch·candidates = {prompts_per_epoch}·{candidates} = {total} samples cannot "
                         f"be split evenly over world_size={world_size} ranks; use a prompts_per_epoch that is a "
                         f"multiple of {step} (e.g. {suggestion}) or change candidates or the number of ranks")
