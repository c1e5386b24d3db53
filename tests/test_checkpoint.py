"""Checkpoints: atomic saves, pruning, RNG and optimizer round trips, bit-exact resume, resume policy."""

import json
import random
import threading

import numpy as np
import pytest
import torch
from torch import nn

from astrolabe_rl.train import checkpoint as ckpt
from astrolabe_rl.train.checkpoint import (
    capture_rng,
    check_resume_compatible,
    config_hash,
    latest_checkpoint,
    load_checkpoint,
    read_marker,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)

from conftest import tensor_digest

CONFIG = {"train": {"lr": 1e-5, "sigmas": "release_grid", "betas": (0.9, 0.999)}, "model": {"family": "tiny"}}


def _state(step: int) -> dict:
    return {
        "adapters": {"a.weight": torch.full((2, 3), float(step)), "b.weight": torch.arange(4, dtype=torch.bfloat16)},
        "trainer": {"step": step, "epoch": step // 2, "sampler": {"epoch": 1, "position": 7}},
    }


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


# ------------------------------------------------------------------------------------------------ save / layout


def test_layout_marker_and_round_trip(tmp_path):
    path = save_checkpoint(tmp_path, 12, _state(12), config=CONFIG)
    assert path == tmp_path / "checkpoints" / "step-000012"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["COMPLETE", "adapters.safetensors", "config.yaml", "rng-rank0.pt", "trainer.pt"]
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 12 and marker["world_size"] == 1 and marker["config_hash"] == config_hash(CONFIG)
    assert marker["files"]["adapters.safetensors"] == (path / "adapters.safetensors").stat().st_size

    loaded = load_checkpoint(path)
    assert set(loaded) == {"adapters", "trainer", "rng", "config"}
    for name, tensor in _state(12)["adapters"].items():
        assert loaded["adapters"][name].dtype == tensor.dtype and torch.equal(loaded["adapters"][name], tensor)
    assert loaded["trainer"] == _state(12)["trainer"]
    assert loaded["config"]["train"]["betas"] == [0.9, 0.999] and loaded["config"]["train"]["lr"] == 1e-5


def test_shared_storage_tensors_are_saved(tmp_path):
    weight = torch.randn(4, 4)
    state = {"model": {"embed.weight": weight, "head.weight": weight, "half": weight[:2]}}
    loaded = load_checkpoint(save_checkpoint(tmp_path, 0, state, config={}))
    assert torch.equal(loaded["model"]["head.weight"], weight) and torch.equal(loaded["model"]["half"], weight[:2])


def test_crash_while_writing_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, 1, _state(1), config=CONFIG)
    real_save_pt = ckpt._save_pt

    def crash_on_trainer(path, obj):
        if path.name == "trainer.pt":
            raise OSError("disk full")
        real_save_pt(path, obj)

    monkeypatch.setattr(ckpt, "_save_pt", crash_on_trainer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, _state(2), config=CONFIG)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert latest_checkpoint(tmp_path) == first


def test_crash_between_rename_and_marker_is_ignored_then_cleaned(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, 1, _state(1), config=CONFIG)

    real_write = ckpt._write_bytes

    def crash_on_marker(path, data):  # the marker is the last thing written, after the rename
        if path.name.startswith("COMPLETE"):
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _state(2), config={})
    monkeypatch.undo()
    half = tmp_path / "checkpoints" / "step-000002"
    assert half.is_dir() and not (half / "COMPLETE").exists()
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(ValueError, match="not a complete checkpoint.*resume=auto"):
        resolve_resume(tmp_path, str(half))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(half)
    # a leftover temp folder of a killed process is never a checkpoint either; the next save removes both
    (tmp_path / "checkpoints" / ".tmp-step-000005").mkdir()
    assert latest_checkpoint(tmp_path) == first
    save_checkpoint(tmp_path, 3, _state(3), config=CONFIG)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000003"]


def test_a_truncated_file_makes_a_checkpoint_incomplete(tmp_path):
    first = save_checkpoint(tmp_path, 1, _state(1), config=CONFIG)
    second = save_checkpoint(tmp_path, 2, _state(2), config=CONFIG)
    assert latest_checkpoint(tmp_path) == second
    data = (second / "adapters.safetensors").read_bytes()
    (second / "adapters.safetensors").write_bytes(data[:-8])
    assert read_marker(second) is None and latest_checkpoint(tmp_path) == first


def test_keep_last_prunes_oldest_and_never_the_new_one(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, _state(step), config=CONFIG, keep_last=3)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-000030", "step-000040", "step-000050"]
    # resumed from step 30 and saving step 35: the new one survives even though 40 and 50 are newer
    save_checkpoint(tmp_path, 35, _state(35), config=CONFIG, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000035", "step-000050"]
    save_checkpoint(tmp_path, 60, _state(60), config=CONFIG, keep_last=None)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3
    # saving a step again replaces it
    save_checkpoint(tmp_path, 60, _state(61), config=CONFIG, keep_last=None)
    assert load_checkpoint(latest_checkpoint(tmp_path))["trainer"]["step"] == 61


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, _state(1), config=CONFIG, keep_last=0)
    with pytest.raises(ValueError, match="barrier"):
        save_checkpoint(tmp_path, 1, {"rng": capture_rng()}, config=CONFIG, rank=1)
    with pytest.raises(ValueError, match="cannot name a checkpoint file"):
        save_checkpoint(tmp_path, 1, {"config": {"a": 1}}, config=CONFIG)
    with pytest.raises(ValueError, match="cannot name a checkpoint file"):
        save_checkpoint(tmp_path, 1, {"../escape": {}}, config=CONFIG)
    assert latest_checkpoint(tmp_path) is None


def test_every_rank_writes_its_rng_and_only_rank0_the_rest(tmp_path):
    """Two ranks as threads with a real barrier: one folder, both RNG files, each rank loads its own."""
    world = 2
    barrier = threading.Barrier(world, timeout=20)
    rngs = [{"rank": r, **capture_rng()} for r in range(world)]
    results: list = [None] * world
    errors: list = []

    def worker(rank: int) -> None:
        try:
            state = _state(7) if rank == 0 else {"adapters": {"junk": torch.zeros(1)}}
            results[rank] = save_checkpoint(
                tmp_path, 7, {**state, "rng": rngs[rank]}, config=CONFIG, rank=rank, barrier=barrier.wait
            )
        except BaseException as e:  # surfaced below; a hang would break the barrier instead
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    path = tmp_path / "checkpoints" / "step-000007"
    assert results == [path, None]
    assert json.loads((path / "COMPLETE").read_text())["world_size"] == 2
    assert load_checkpoint(path, rank=1)["rng"]["rank"] == 1
    assert torch.equal(load_checkpoint(path, rank=0)["adapters"]["a.weight"], _state(7)["adapters"]["a.weight"])
    with pytest.warns(UserWarning, match="no RNG state for rank 2"):
        assert load_checkpoint(path, rank=2)["rng"] is None


# ------------------------------------------------------------------------------------------------ RNG and resume


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    path = save_checkpoint(tmp_path, 0, {}, config={})  # captures the RNG itself
    expected = _draws()
    _draws()  # move every stream on
    restore_rng(load_checkpoint(path)["rng"])
    assert _draws() == expected
    restore_rng(capture_rng())  # capturing does not consume draws
    assert _draws() != expected


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """Data and dropout masks come from the global RNG, so a resume that loses it diverges."""
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)


def test_resume_continues_training_bit_identically(tmp_path):
    model, opt = _fresh()
    _train(model, opt, 2)
    path = save_checkpoint(
        tmp_path, 2, {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": 2}}, config={}
    )
    _train(model, opt, 2)
    uninterrupted = tensor_digest(list(model.parameters()))

    state = load_checkpoint(path)
    resumed, resumed_opt = _fresh()
    torch.manual_seed(999)  # a new process starts from other seeds
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    assert state["trainer"] == {"step": 2}
    _train(resumed, resumed_opt, 2)
    assert tensor_digest(list(resumed.parameters())) == uninterrupted

    # the test can fail: the same resume without the optimizer state (or the RNG) ends elsewhere
    no_opt, no_opt_opt = _fresh()
    no_opt.load_state_dict(state["model"])
    restore_rng(state["rng"])
    _train(no_opt, no_opt_opt, 2)
    assert tensor_digest(list(no_opt.parameters())) != uninterrupted
    no_rng, no_rng_opt = _fresh()
    no_rng.load_state_dict(state["model"])
    no_rng_opt.load_state_dict(state["optimizer"])
    _train(no_rng, no_rng_opt, 2)
    assert tensor_digest(list(no_rng.parameters())) != uninterrupted


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "auto") is None  # nothing saved yet: start fresh
    save_checkpoint(tmp_path, 5, _state(5), config=CONFIG)
    second = save_checkpoint(tmp_path, 9, _state(9), config=CONFIG)
    assert resolve_resume(tmp_path, "auto") == second
    first = tmp_path / "checkpoints" / "step-000005"
    assert resolve_resume(tmp_path, str(first)) == first
    assert resolve_resume(tmp_path, "step-000005") == first  # a folder name under run_dir/checkpoints
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-000100"))


def _flip_bytes_in_place(path, at: int, n: int = 4) -> None:
    """Corrupt a file without changing its size (a bad disk or a bad copy): the marker's sizes still match."""
    data = bytearray(path.read_bytes())
    for k in range(at, at + n):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_file_changed_at_the_same_size_is_refused_and_resume_auto_falls_back(tmp_path):
    first = save_checkpoint(tmp_path, 1, {**_state(1), "policy": {"step": 1, "weights": [1.0, 2.0]}}, config=CONFIG)
    second = save_checkpoint(tmp_path, 2, {**_state(2), "policy": {"step": 2, "weights": [3.0, 4.0]}}, config=CONFIG)
    assert set(read_marker(second)["sha256"]) == set(read_marker(second)["files"])
    _flip_bytes_in_place(second / "policy.pt", at=60)
    assert read_marker(second) is not None and latest_checkpoint(tmp_path) == second  # sizes cannot tell
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"step-000002 is corrupt: the content of policy.pt differs"):
        load_checkpoint(second)
    with pytest.raises(ckpt.CorruptCheckpointError, match="policy.pt"):
        ckpt.load_resume(tmp_path, str(second))  # named explicitly: refused, not replaced
    said = []
    path, state = ckpt.load_resume(tmp_path, "auto", warn=said.append)
    assert path == first and state["policy"] == {"step": 1, "weights": [1.0, 2.0]}
    assert len(said) == 1 and "policy.pt differs" in said[0] and "resuming from the newest intact checkpoint, " \
        "step-000001" in said[0]
    _flip_bytes_in_place(first / "adapters.safetensors", at=100)
    with pytest.raises(ckpt.CorruptCheckpointError, match="every checkpoint in .* is corrupt"):
        ckpt.load_resume(tmp_path, "auto")


def test_a_format_1_checkpoint_without_checksums_still_loads_and_a_broken_file_is_one_message(tmp_path):
    folder = save_checkpoint(tmp_path, 1, {**_state(1), "policy": {"step": 1}}, config=CONFIG)
    marker = json.loads((folder / "COMPLETE").read_text())
    del marker["sha256"]
    marker["format"] = 1
    (folder / "COMPLETE").write_text(json.dumps(marker))
    assert load_checkpoint(folder)["policy"] == {"step": 1}
    size = (folder / "policy.pt").stat().st_size
    noise = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (folder / "policy.pt").write_bytes(noise.numpy().tobytes())  # same size: only loading can tell
    with pytest.raises(ckpt.CorruptCheckpointError, match="policy.pt does not load") as info:
        load_checkpoint(folder)
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle anyway is not repeated


def test_a_full_disk_mid_save_leaves_no_temp_folder_and_says_which_checkpoint_remains(tmp_path, monkeypatch):
    import errno

    first = save_checkpoint(tmp_path, 1, _state(1), config=CONFIG)
    real_save_pt = ckpt._save_pt

    def full(path, obj):
        if path.name == "trainer.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
                errno.ENOSPC, "No space left on device")
        real_save_pt(path, obj)

    monkeypatch.setattr(ckpt, "_save_pt", full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not write checkpoint step-000002 into .*: no space "
                                                        r"left on the device \(.* MiB free\); nothing of it was kept "
                                                        r"and the newest complete checkpoint is step-000001"):
        save_checkpoint(tmp_path, 2, _state(2), config=CONFIG)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert latest_checkpoint(tmp_path) == first


# ------------------------------------------------------------------------------------------------ config checks


def test_config_hash_is_stable_and_selective():
    reordered = {"model": {"family": "tiny"}, "train": {"betas": [0.9, 0.999], "sigmas": "release_grid", "lr": 1e-5}}
    assert config_hash(CONFIG) == config_hash(reordered)  # key order and tuple/list do not matter
    assert len(config_hash(CONFIG)) == 16
    changed_lr = {**CONFIG, "train": {**CONFIG["train"], "lr": 2e-5}}
    assert config_hash(changed_lr) != config_hash(CONFIG)
    assert config_hash(changed_lr, ["train.sigmas"]) == config_hash(CONFIG, ["train.sigmas"])
    assert config_hash(CONFIG, ["train.nope"]) != config_hash(CONFIG, ["train.sigmas"])


def test_check_resume_compatible_lists_every_changed_critical_key():
    new = {"train": {"lr": 3e-5, "sigmas": "uniform", "betas": [0.9, 0.999]}, "model": {"family": "tiny"}, "x": 1}
    critical = ["train.sigmas", "train.betas", "model.family", "model.checkpoint", "train.lr"]
    with pytest.raises(ValueError) as err:
        check_resume_compatible(CONFIG, new, critical, force=False)
    message = str(err.value)
    assert 'train.sigmas: "release_grid" -> "uniform"' in message
    assert "train.lr: 1e-05 -> 3e-05" in message
    assert "betas" not in message and "model.family" not in message and "model.checkpoint" not in message
    assert "--force-resume" in message
    with pytest.warns(UserWarning, match="train.sigmas"):
        check_resume_compatible(CONFIG, new, critical, force=True)
    check_resume_compatible(CONFIG, new, ["model.family", "x.y"], force=False)  # absent in both: unchanged
    with pytest.raises(ValueError, match=r"x: <missing> -> 1"):
        check_resume_compatible(CONFIG, new, ["x"], force=False)
    with pytest.raises(TypeError, match="list of dotted keys"):
        check_resume_compatible(CONFIG, new, "train.sigmas", force=False)


def test_saved_config_round_trips_into_the_compatibility_check(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1), config=CONFIG)
    saved = load_checkpoint(path)["config"]
    check_resume_compatible(saved, CONFIG, ["train.lr", "train.betas", "train.sigmas"], force=False)
    assert config_hash(saved) == json.loads((path / "COMPLETE").read_text())["config_hash"]


# ------------------------------------------------------------------------------------------------ export, run folder


def test_export_files_are_listed_in_the_marker_and_not_loaded(tmp_path):
    def export(folder):
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "adapter_config.json").write_text("{}")

    path = save_checkpoint(tmp_path, 3, _state(3), config=CONFIG, export=export)
    marker = read_marker(path)
    assert marker["exports"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert marker["files"]["adapter_model.safetensors"] == 7
    assert set(load_checkpoint(path)) == {"adapters", "trainer", "rng", "config"}  # the export is not state
    (path / "adapter_model.safetensors").write_bytes(b"torn")  # a damaged export makes the checkpoint incomplete
    assert read_marker(path) is None and latest_checkpoint(tmp_path) is None


def test_a_live_holder_locks_the_run_folder_until_it_dies(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom astrolabe_rl.train.checkpoint import RunDirLock\n"
         f"lock = RunDirLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ckpt.RunDirError, match=rf"in use by pid {child.pid} on \S+ since"):
            ckpt.claim_run_dir(tmp_path, resume="auto", overwrite=False)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock with the process
        child.wait(timeout=30)
    lock = ckpt.claim_run_dir(tmp_path, resume="auto", overwrite=False)
    assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    with pytest.raises(ckpt.RunDirError, match="in use"):  # a second run in this process is refused as well
        ckpt.RunDirLock(tmp_path).acquire()
    lock.release()
    ckpt.RunDirLock(tmp_path).acquire().release()


def test_a_fresh_run_into_a_used_folder_fails_unless_it_resumes_or_overwrites(tmp_path):
    run = tmp_path / "run"
    ckpt.claim_run_dir(run, resume=None, overwrite=False).release()  # absent or empty (a stale .lock): fine
    ckpt.claim_run_dir(run, resume=None, overwrite=False).release()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    save_checkpoint(run, 1, _state(1), config=CONFIG)
    with pytest.raises(ckpt.RunDirError, match=r"already holds a run \(checkpoints, metrics.jsonl\).*--resume auto"
                                               r".*--overwrite"):
        ckpt.claim_run_dir(run, resume=None, overwrite=False)
    ckpt.claim_run_dir(run, resume="auto", overwrite=False).release()
    with pytest.raises(ckpt.RunDirError, match="contradict"):
        ckpt.claim_run_dir(run, resume="auto", overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "metrics.jsonl"]  # nothing moved

    lock = ckpt.claim_run_dir(run, resume=None, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n' and latest_checkpoint(aside) is not None
    lock.release()
    (run / "x").write_text("")
    ckpt.claim_run_dir(run, resume=None, overwrite=True).release()  # a second overwrite in the same second
    assert len(list(tmp_path.glob("run.old-*"))) == 2
