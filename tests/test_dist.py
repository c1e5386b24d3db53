"""train/dist.py: single-process no-ops, the group sampler's rule, and a real 2-process gloo run on CPU.

The 2-process test launches this file twice as a script (``--worker``) with the environment torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on 127.0.0.1), so it exercises ``init_distributed``'s real
detection path. The parent kills the survivors as soon as one rank fails, so a failure never hangs the suite.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from astrolabe_rl.train import dist as D
from astrolabe_rl.train.dist import DistContext, GroupSampler, Sample

CPU = torch.device("cpu")
SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=CPU, backend=None)


@pytest.fixture
def no_launch_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    D.shutdown()
    yield
    D.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------------------------


def test_init_single_process_is_idempotent(no_launch_env):
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.backend) == (0, 1, 0, CPU, None)
    assert ctx.is_main and not ctx.distributed
    assert D.init_distributed() is ctx
    assert not torch.distributed.is_initialized()
    D.shutdown()
    assert D.init_distributed("cpu") is not ctx


def test_partial_launch_env_is_an_error(no_launch_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_an_error(no_launch_env):
    with pytest.raises(RuntimeError, match="device='cpu'"):
        D.init_distributed("cuda")


def test_collectives_are_identity_in_single_process():
    x = torch.randn(3, 2, requires_grad=True)
    for fn in (D.all_gather_cat, D.all_reduce_sum, D.all_reduce_mean):
        y = fn(SINGLE, x)
        assert torch.equal(y, x) and not y.requires_grad
        assert y.data_ptr() != x.data_ptr()  # a new tensor, as in the distributed case
    assert D.all_reduce_mean(SINGLE, torch.tensor([3, 4])).dtype == torch.get_default_dtype()
    obj = {"a": [1, 2]}
    assert D.broadcast_object(SINGLE, obj) is obj
    assert D.all_gather_object(SINGLE, obj) == [obj]
    D.barrier(SINGLE)
    with pytest.raises(ValueError, match="leading dim"):
        D.all_gather_cat(SINGLE, torch.tensor(1.0))
    with pytest.raises(ValueError, match="src=1"):
        D.broadcast_object(SINGLE, obj, src=1)


def test_collective_without_process_group_says_what_to_do():
    ghost = DistContext(rank=0, world_size=2, local_rank=0, device=CPU, backend="gloo")
    with pytest.raises(RuntimeError, match="init_distributed"):
        D.all_reduce_sum(ghost, torch.ones(1))


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def test_wrap_model_single_process_and_errors():
    model = Blocks()
    for strategy in ("none", "ddp", "fsdp2"):
        assert D.wrap_model(model, SINGLE, strategy) is model
    with pytest.raises(ValueError, match="choose one of"):
        D.wrap_model(model, SINGLE, "fsdp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_attr"):
        D.wrap_model(model, SINGLE, "fsdp2", block_attr="layers")
    with pytest.raises(ValueError, match="block_attr"):
        D.wrap_model(model, SINGLE, "fsdp2", block_attr="head")


def test_unwrap_and_no_sync_on_plain_model():
    model = nn.Linear(2, 1)
    assert D.unwrap(model) is model
    compiled = nn.Module()
    compiled._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert D.unwrap(compiled) is model
    x = torch.ones(1, 2)
    with D.no_sync(model, enabled=True):
        model(x).sum().backward()
    model(x).sum().backward()
    assert torch.equal(model.weight.grad, 2 * x)  # plain accumulation


def test_on_main_runs_only_on_rank_zero():
    calls = []

    def write(v: int) -> int:
        calls.append(v)
        return v + 1

    assert D.on_main(SINGLE)(write)(1) == 2
    other = DistContext(rank=1, world_size=2, local_rank=1, device=CPU, backend="gloo")
    assert D.on_main(other)(write)(5) is None
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------------------
# GroupSampler
# ----------------------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_seeded():
    a, b = GroupSampler(20, 4, 3, 1, 0, seed=5), GroupSampler(20, 4, 3, 1, 0, seed=5)
    c = GroupSampler(20, 4, 3, 1, 0, seed=6)
    assert a.epoch_plan(3) == b.epoch_plan(3)
    assert a.epoch_plan(0) != a.epoch_plan(1)
    assert [s.seed_for_noise for s in a.epoch_plan(0)] != [s.seed_for_noise for s in c.epoch_plan(0)]


def test_sampler_group_structure():
    n, p, k = 20, 5, 4
    plan = GroupSampler(n, p, k, 1, 0, seed=0).epoch_plan(2)
    assert len(plan) == p * k and all(isinstance(s, Sample) for s in plan)
    assert [s.global_index for s in plan] == list(range(p * k))
    assert [s.candidate for s in plan] == list(range(k)) * p
    groups = [plan[i * k: (i + 1) * k] for i in range(p)]
    assert all(len({s.prompt_id for s in g}) == 1 for g in groups)  # candidates of a group are adjacent
    assert len({g[0].prompt_id for g in groups}) == p  # P distinct prompts: prompt id = group id
    assert all(0 <= s.prompt_id < n for s in plan)
    assert len({s.seed_for_noise for s in plan}) == p * k


def test_sampler_walks_passes_without_replacement_then_reshuffles():
    n, p = 10, 4  # two epochs per pass; prompts at pass positions 8, 9 are skipped
    s = GroupSampler(n, p, 2, 1, 0, seed=3)
    e0, e1, e2, e3 = (s.epoch_prompts(e) for e in range(4))
    assert len(set(e0 + e1)) == 2 * p  # no replacement within a pass
    assert len(set(e2 + e3)) == 2 * p
    assert e0 + e1 != e2 + e3  # a new shuffle
    seen = set().union(*(s.epoch_prompts(e) for e in range(40)))
    assert seen == set(range(n))
    full = GroupSampler(n, n, 1, 1, 0, seed=3)  # P = N: every epoch is a full, freshly shuffled pass
    assert sorted(full.epoch_prompts(0)) == list(range(n)) and full.epoch_prompts(0) != full.epoch_prompts(1)


def test_sampler_follows_its_documented_rule():
    n, p, k, seed, epoch = 11, 3, 2, 9, 7
    s = GroupSampler(n, p, k, 1, 0, seed=seed)
    pass_index, pos = divmod(epoch, n // p)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(D.mix_seed(seed, "order", pass_index)))
    assert s.epoch_prompts(epoch) == order[pos * p: pos * p + p].tolist()
    assert [x.seed_for_noise for x in s.epoch_plan(epoch)] == [D.mix_seed(seed, "noise", epoch, g) for g in range(p * k)]


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_global_batch_does_not_depend_on_world_size(world):
    n, p, k, seed = 30, 6, 4, 11
    one = GroupSampler(n, p, k, 1, 0, seed)
    for epoch in (0, 1, 9):
        chunks = [GroupSampler(n, p, k, world, r, seed).epoch_plan(epoch) for r in range(world)]
        assert all(len(c) == p * k // world for c in chunks)
        assert [x for c in chunks for x in c] == one.epoch_plan(epoch)  # same samples, same seeds, same order


def test_sampler_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"multiple of 4 \(e.g. 4\)"):
        GroupSampler(30, 3, 2, 8, 0, seed=0)  # 6 samples over 8 ranks
    with pytest.raises(ValueError, match="lower prompts_per_epoch"):
        GroupSampler(3, 4, 2, 1, 0, seed=0)
    with pytest.raises(ValueError, match="rank=2"):
        GroupSampler(10, 2, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        GroupSampler(10, 2, 2, 1, 0, seed=0).epoch_plan(-1)


def test_sampler_state_round_trip_and_resume_on_other_world_size():
    a = GroupSampler(12, 4, 2, 2, 1, seed=4)
    a.set_epoch(5)
    b = GroupSampler(12, 4, 2, 4, 3, seed=4)  # resumed on 4 ranks
    b.load_state_dict(a.state_dict())
    assert b.epoch == 5 and b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="seed=4 but this run has seed=5"):
        GroupSampler(12, 4, 2, 2, 1, seed=5).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# Two real processes (gloo, CPU)
# ----------------------------------------------------------------------------------------------------------------

WORLD = 2


def _full_batch_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    ref = copy.deepcopy(model)
    nn.functional.mse_loss(ref(x), y).backward()
    return [p.grad.clone() for p in ref.parameters()]


def _check_collectives(ctx: DistContext, out_dir: Path) -> dict:
    r = ctx.rank
    rows = [3, 1][r]
    x = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * r
    gathered = D.all_gather_cat(ctx, x)
    assert torch.equal(gathered, torch.cat([torch.arange(6.0).reshape(3, 2), torch.tensor([[100.0, 101.0]])]))
    empty = D.all_gather_cat(ctx, torch.ones(2 - 2 * r, 3, dtype=torch.bool))  # rank 1 contributes 0 rows
    assert empty.shape == (2, 3) and empty.dtype == torch.bool and bool(empty.all())
    mean = D.all_reduce_mean(ctx, torch.tensor([r + 1.0, 10.0 * (r + 1)]))
    assert torch.allclose(mean, torch.tensor([1.5, 15.0]))
    assert torch.equal(D.all_reduce_sum(ctx, torch.tensor([r + 1])), torch.tensor([3]))
    assert D.broadcast_object(ctx, {"from": r}, src=0) == {"from": 0}
    assert D.broadcast_object(ctx, {"from": r}, src=1) == {"from": 1}
    assert D.all_gather_object(ctx, ("rank", r)) == [("rank", 0), ("rank", 1)]
    # The barrier holds rank 0 until rank 1 arrives: checked by what rank 1 did before arriving, not by how long
    # rank 0 waited (a wait time depends on the machine's load: issue 26).
    marker = out_dir / "rank1-reached-the-barrier"
    if r == 1:
        time.sleep(0.5)  # make the race likely to show if the barrier did not wait
        marker.write_text("1")
    D.barrier(ctx)
    if r == 0:
        assert marker.exists(), "barrier returned although rank 1 had not reached it"
    assert D.on_main(ctx)(lambda: "written")() == ("written" if r == 0 else None)
    return {"gathered": gathered.tolist(), "mean": mean.tolist()}


def _check_ddp(ctx: DistContext) -> dict:
    torch.manual_seed(0)  # same model and data on both ranks
    model, x, y = nn.Linear(4, 3), torch.randn(8, 4), torch.randn(8, 3)
    expected = _full_batch_grads(model, x, y)
    ddp = D.wrap_model(model, ctx, "ddp")
    assert isinstance(ddp, nn.parallel.DistributedDataParallel) and D.unwrap(ddp) is model
    lo, hi = 4 * ctx.rank, 4 * ctx.rank + 4
    nn.functional.mse_loss(ddp(x[lo:hi]), y[lo:hi]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-6), "DDP gradient != full-batch gradient"
    other = D.all_gather_object(ctx, grads)
    assert all(torch.equal(a, b) for a, b in zip(other[0], other[1])), "ranks disagree on the gradient"

    # Gradient accumulation: two micro-batches per rank, the first inside no_sync.
    model.zero_grad(set_to_none=True)
    with D.no_sync(ddp, enabled=True):
        nn.functional.mse_loss(ddp(x[lo:lo + 2]), y[lo:lo + 2]).div(2).backward()
    local = D.all_gather_object(ctx, model.weight.grad.clone())
    assert not torch.equal(local[0], local[1]), "no_sync still all-reduced the gradient"
    nn.functional.mse_loss(ddp(x[lo + 2:hi]), y[lo + 2:hi]).div(2).backward()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6), "accumulated gradient != full-batch gradient"
    return {"weight_grad": model.weight.grad.tolist()}


def _check_fsdp2(ctx: DistContext) -> None:
    torch.manual_seed(1)
    model, x, y = Blocks(), torch.randn(8, 4), torch.randn(8, 3)
    with pytest.raises(ValueError, match="head.weight"):  # the unsharded root may not train: no gradient sync
        D.wrap_model(model, ctx, "fsdp2")
    expected = _full_batch_grads(model, x, y)[:4]  # the blocks' weights and biases
    model.head.requires_grad_(False)
    sharded = D.wrap_model(model, ctx, "fsdp2")
    lo = 4 * ctx.rank
    nn.functional.mse_loss(sharded(x[lo:lo + 4]), y[lo:lo + 4]).backward()
    for p, e in zip(sharded.blocks.parameters(), expected, strict=True):
        assert p.grad.to_local().shape[0] < e.shape[0]  # really sharded
        assert torch.allclose(p.grad.full_tensor(), e, atol=1e-6), "FSDP2 gradient != full-batch gradient"

    # Gradient accumulation: two micro-batches per rank, the first inside no_sync.
    model.zero_grad(set_to_none=True)
    with D.no_sync(sharded, enabled=True):
        nn.functional.mse_loss(sharded(x[lo:lo + 2]), y[lo:lo + 2]).div(2).backward()
    # FSDP2 keeps an unsynced gradient unsharded inside and only sets .grad when it reduce-scatters
    assert all(p.grad is None for p in model.blocks.parameters()), "no_sync still reduced the FSDP2 gradient"
    nn.functional.mse_loss(sharded(x[lo + 2:lo + 4]), y[lo + 2:lo + 4]).div(2).backward()
    for p, e in zip(sharded.blocks.parameters(), expected, strict=True):
        assert torch.allclose(p.grad.full_tensor(), e, atol=1e-6), "accumulated FSDP2 gradient != full-batch"


def _check_fsdp2_causal_wan(ctx: DistContext) -> dict:
    """The tiny CausalWan with LoRA, sharded per block: rollouts (``encode_text`` / ``denoise`` / ``commit``, which
    enter the blocks outside their forward) and a gradient-checkpointed θ pass agree with the unsharded model."""
    from astrolabe_rl.models import CausalWan, WanConfig, get_family
    from astrolabe_rl.policy import Policy
    from astrolabe_rl.rollout import rollout

    torch.manual_seed(2)  # same weights, LoRA and data on both ranks
    model = CausalWan(WanConfig.tiny()).eval()
    policy = Policy(model, rank=4, alpha=4.0, seed=0)
    with torch.no_grad():  # non-zero B so that both adapters change the output
        for p in policy.trainable_parameters():
            p.normal_(std=0.05)
    policy.copy_("old", "default")
    sampler, text = get_family("tiny").sampler, torch.randn(2, 8, 16)
    x, t = torch.randn(2, 3, 16, 4, 4), torch.tensor([700.0, 300.0])

    def sample(m: nn.Module, prompts: slice, seeds: list[int]) -> torch.Tensor:
        with policy.use("old"):
            return rollout(m, text[prompts], num_frames=6, latent_hw=(4, 4), sampler=sampler, seeds=seeds).latents

    def loss(m: nn.Module, rows: slice) -> torch.Tensor:
        v = m(x[rows], t[rows], text[rows], frames_per_block=3)
        return v.square().mean()

    ref_video = sample(model, slice(0, 2), [10, 11])
    loss(model, slice(0, 2)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    sharded = D.wrap_model(model, ctx, "fsdp2")
    model.gradient_checkpointing = True
    r = ctx.rank
    video = sample(sharded, slice(r, r + 1), [10 + r])  # this rank's prompt and seed
    torch.testing.assert_close(video, ref_video[r:r + 1], atol=1e-5, rtol=0)
    with torch.no_grad():  # θ_old merged into a plain copy: built from the gathered shards
        merged = rollout(policy.sampling_model(), text[r:r + 1], num_frames=6, latent_hw=(4, 4), sampler=sampler,
                         seeds=[10 + r]).latents
    torch.testing.assert_close(merged, ref_video[r:r + 1], atol=1e-4, rtol=0)
    loss(sharded, slice(r, r + 1)).backward()  # FSDP2 averages the two ranks' gradients: the full-batch mean
    worst = 0.0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.to_local().numel() < p.numel(), f"{n} is not sharded"
            full = p.grad.full_tensor()
            torch.testing.assert_close(full, expected[n], atol=1e-5, rtol=1e-4)
            worst = max(worst, (full - expected[n]).abs().max().item())

    # resume: whole-tensor state and optimiser moments go back into the shards
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    opt.step()
    state, opt_state = policy.state_dict(), D.full_state(opt.state_dict())
    assert not any(isinstance(v, DTensor) for a in state.values() for v in a.values())
    shards = {k: p.to_local().clone() for k, p in policy.adapter_params("default").items()}
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.zero_()
    policy.load_state_dict(state)
    assert all(torch.equal(p.to_local(), shards[k]) for k, p in policy.adapter_params("default").items())
    resumed = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    resumed.load_state_dict(opt_state)
    D.shard_optimizer_state_(resumed)
    for p in policy.trainable_parameters():
        assert torch.equal(resumed.state[p]["exp_avg"].to_local(), opt.state[p]["exp_avg"].to_local())
    resumed.step()  # the moments are shards like their parameters: no 'mixed Tensor and DTensor'
    return {"fsdp2_video": video.flatten()[:8].tolist(), "fsdp2_grad_max_diff": worst}


def _check_sampler(ctx: DistContext) -> None:
    mine = GroupSampler(10, 4, 3, ctx.world_size, ctx.rank, seed=7).epoch_plan(2)
    everyone = D.all_gather_object(ctx, mine)
    assert [s for plan in everyone for s in plan] == GroupSampler(10, 4, 3, 1, 0, seed=7).epoch_plan(2)


# tests/test_train.py's DDP run of the tiny family with LoRA, here under dist.strategy=fsdp2 and for one epoch
# (rollout, sharded update, θ_old / EMA sync, checkpoint) to keep the default suite short.
RECIPE = ["lora.rank=4", "lora.alpha=4", "data.prompts=[a red ball, a blue cube, a green cone]",
          "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=3", "rollout.micro_batch=1",
          "rewards.components=[{name: sharpness, weight: 1.0}]", "rewards.monitors=[]", "log.tensorboard=false",
          "log.plots=false", "log.progress=false", "eval.every=0", "checkpoint.every=1", "train.epochs=1",
          "train.lr=1e-3", "model.device=cpu", "dist.strategy=fsdp2"]


def _train(run_dir: Path) -> None:
    from astrolabe_rl.config import load_config
    from astrolabe_rl.train.recipe import train

    train(load_config(None, [*RECIPE, f"run_dir={run_dir}"]))


def _worker(out_dir: Path) -> None:
    ctx = D.init_distributed("cpu", timeout=datetime.timedelta(seconds=60))
    assert D.init_distributed() is ctx
    assert (ctx.world_size, ctx.backend, ctx.rank == int(os.environ["RANK"])) == (WORLD, "gloo", True)
    result = {"rank": ctx.rank, **_check_collectives(ctx, out_dir), **_check_ddp(ctx)}
    _check_fsdp2(ctx)
    result.update(_check_fsdp2_causal_wan(ctx))
    _check_sampler(ctx)
    D.barrier(ctx)
    _train(out_dir / "fsdp2")  # the whole recipe, sharded; its teardown may close the process group
    D.shutdown()
    assert not torch.distributed.is_initialized()
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, timeout_s: float = 150.0) -> list[tuple[int, str]]:
    """Run the worker on WORLD ranks; kill every rank once one fails or the deadline passes."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; no dependence on the host's network
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(out_dir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    return [(p.wait(), p.stdout.read()) for p in procs]


def test_two_process_gloo(tmp_path):
    for attempt in range(3):  # the free port may be taken between probing it and binding it
        results = _launch(tmp_path)
        if not any("address already in use" in log.lower() for _, log in results):
            break
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{log[-4000:]}"
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [o["rank"] for o in outs] == [0, 1]
    assert outs[0]["gathered"] == outs[1]["gathered"] == [[0, 1], [2, 3], [4, 5], [100, 101]]
    assert outs[0]["mean"] == outs[1]["mean"] == [1.5, 15.0]
    assert outs[0]["weight_grad"] == outs[1]["weight_grad"]
    assert outs[0]["fsdp2_video"] != outs[1]["fsdp2_video"]  # each rank sampled its own prompt and seed

    # dist.strategy=fsdp2 on two ranks trains what one process trains (same samples, same global batch)
    D.shutdown()
    _train(tmp_path / "one")
    from astrolabe_rl.train.checkpoint import latest_checkpoint, load_checkpoint

    one, two = (load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("one", "fsdp2"))
    for adapter in ("default", "old", "ema"):
        assert one["policy"][adapter].keys() == two["policy"][adapter].keys()
        for k, v in one["policy"][adapter].items():
            torch.testing.assert_close(two["policy"][adapter][k], v, atol=1e-6, rtol=1e-4)
    assert one["policy"]["default"]["blocks.0.self_attn.q.lora_B.weight"].abs().max() > 1e-4  # it did train
    for i, state in one["optimizer"]["state"].items():  # Adam's moments saved whole, not as rank 0's shard
        torch.testing.assert_close(two["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], atol=1e-8, rtol=1e-4)
    rewards = [[json.loads(line)["reward/total"] for line in (tmp_path / run / "metrics.jsonl").read_text().split("\n")
                if line] for run in ("one", "fsdp2")]
    assert rewards[0] == pytest.approx(rewards[1], rel=1e-5, abs=1e-7)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
