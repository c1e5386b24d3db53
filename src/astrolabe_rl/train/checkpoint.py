"""Full-state checkpoints that resume bit-exactly, written atomically, with a completion marker.

On-disk layout (one folder per saved step; ``state`` is the dict given to `save_checkpoint`):

    run_dir/checkpoints/
      step-000300/
        adapters.safetensors   one file per ``state`` entry that is a flat dict of tensors
        old.safetensors          (trained adapters, old policy, EMA, ...): safetensors, dtype-exact
        ema.safetensors
        optimizer.pt           every other entry (optimizer/scheduler state, trainer counters, ...): torch.save,
        trainer.pt               loaded back with weights_only=True, so keep them to tensors, numbers, strings,
                                 lists, tuples and dicts
        rng-rank0.pt           each rank's RNG streams (python, numpy, torch CPU, every CUDA device)
        rng-rank1.pt ...
        config.yaml            the resolved run config
        adapter_model.safetensors, adapter_config.json
                               files written by ``export`` (the recipe's EMA adapter in peft format, so the folder
                                 is itself an adapter for ``--adapter``): listed, never loaded back
        COMPLETE               JSON: format, step, time, config_hash, world_size, {file: size in bytes},
                                 {file: sha256 of its content}, exports
      .tmp-step-000330/        a save in progress (or one that crashed): never loaded, removed by the next save

A save writes everything into ``.tmp-step-XXXXXX``, fsyncs it, renames it to ``step-XXXXXX`` and only then writes
``COMPLETE`` (itself atomically). A folder is a checkpoint if and only if its marker parses and every file it
lists has the recorded size, so a crash at any point leaves the previous checkpoint as the newest complete one.
A save that fails (a full disk) removes its temporary folder and raises `CheckpointWriteError`, one message that
says which checkpoint was lost and which complete one a resume would take.

Loading checks every file against the SHA-256 its marker records, so a file changed after its save (a bad disk, a
bad copy, the same size or not) is refused as `CorruptCheckpointError`, naming the file; `load_resume` with
``resume="auto"`` then falls back to the newest older checkpoint that is intact (markers of format 1, before
checksums, are checked by size and by whether the files load).

A run folder belongs to one run (`claim_run_dir`): an advisory lock (``run_dir/.lock``, holding the owner's pid and
host) makes a second run into it fail at once, and a fresh run into a folder that already holds a run fails unless it
resumes it or moves the old contents aside (``overwrite``).

Distributed use: every rank calls `save_checkpoint` with its own rank and a barrier (rank 0 writes the shared
files; each rank writes its own RNG file). If one rank raises mid-save the others wait at the next barrier until
the process group times out, as with any collective.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
FORMAT_VERSION = 2  # 2 added the content checksums (``sha256``); format 1 markers still load, checked by size

_STEP_DIR = re.compile(r"step-(\d{6,})")
_STATE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RNG_FILE = "rng-rank{rank}.pt"
_MISSING = "<missing>"


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG streams: python ``random``, numpy's global generator, torch CPU, every CUDA device."""
    np_state = np.random.get_state(legacy=False)
    # numpy arrays would need unsafe unpickling on load; the key is 624 uint32s, a plain list is as exact
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back the streams `capture_rng` returned; the next draws equal the draws that followed the capture."""
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    saved_cuda = state.get("cuda")
    if saved_cuda is None:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible != len(saved_cuda):
        warnings.warn(
            f"CUDA RNG not restored: the checkpoint holds {len(saved_cuda)} device states, this process sees "
            f"{visible} CUDA devices; the resumed run will not be bit-exact",
            stacklevel=2,
        )
        return
    torch.cuda.set_rng_state_all([s.cpu() for s in saved_cuda])


# ------------------------------------------------------------------------------------------------ config


def config_hash(config: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """16 hex digits identifying ``config``, or only the dotted ``keys`` of it (the run-altering ones).

    Stable across processes and Python versions: the values are normalised to JSON (tuples become lists) and
    serialised with sorted keys. A key absent from ``config`` hashes as ``"<missing>"``.
    """
    plain = _plain(config)
    picked = plain if keys is None else {k: _lookup(plain, k) for k in _keys(keys)}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def check_resume_compatible(
    saved_config: Mapping[str, Any], config: Mapping[str, Any], critical: Iterable[str], force: bool
) -> None:
    """Refuse to resume when a run-altering value changed (ValueError), or warn when ``force`` is set.

    Args:
        saved_config: the config stored in the checkpoint (``load_checkpoint(...)["config"]``).
        config: the config of the run that wants to resume.
        critical: dotted keys whose change alters what the run computes, e.g. ``"train.sigmas"``.
        force: the user passed ``--force-resume``: warn with the same list instead of raising.
    """
    old, new = _plain(saved_config), _plain(config)
    changes = [
        f"  {key}: {_show(_lookup(old, key))} -> {_show(_lookup(new, key))}"
        for key in _keys(critical)
        if _lookup(old, key) != _lookup(new, key)
    ]
    if not changes:
        return
    message = "these run-altering config values differ from the checkpoint's:\n" + "\n".join(changes)
    if force:
        warnings.warn(message + "\nresuming anyway (--force-resume)", stacklevel=2)
        return
    raise ValueError(
        message + "\nrestore them, start a fresh run_dir, or pass --force-resume to resume with the new values"
    )


def _plain(config: Any) -> Any:
    """JSON-normalised copy: dataclasses -> dicts, tuples -> lists, Paths and other objects -> str."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))


def _lookup(config: Any, dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; ``"<missing>"`` where a level is absent."""
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _keys(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, str):  # a lone "train.sigmas" would otherwise be iterated letter by letter
        raise TypeError(f"pass a list of dotted keys, not the string {keys!r}")
    return list(keys)


def _show(value: Any) -> str:
    return value if value is _MISSING else json.dumps(value)


# ------------------------------------------------------------------------------------------------ save


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    rank: int = 0,
    is_main: bool | None = None,
    keep_last: int | None = 3,
    barrier: Callable[[], None] | None = None,
    export: Callable[[Path], Any] | None = None,
) -> Path | None:
    """Write ``run_dir/checkpoints/step-{step:06d}/`` atomically; every rank calls this.

    Args:
        run_dir: the run's output folder.
        step: optimiser step (names the folder).
        state: ``{"adapters": {name: Tensor}, "old": ..., "ema": ..., "optimizer": opt.state_dict(),
            "trainer": {"step": ..., "epoch": ..., "sampler": ...}, "rng": capture_rng()}``. Entry names become
            file names (letters, digits, ``_ . -``; ``config`` is reserved). Off rank 0 only ``"rng"`` is read.
            A missing ``"rng"`` is captured here.
        config: the resolved run config (nested dict); saved as ``config.yaml`` and hashed into the marker.
        rank: this process's global rank; names its RNG file.
        is_main: whether this process writes the shared files; defaults to ``rank == 0``.
        keep_last: complete checkpoints kept after this one is written (the new one always survives);
            None keeps all.
        barrier: waits for every rank (e.g. ``lambda: dist.barrier(ctx)``); required off rank 0.
        export: called on the main rank with the unpublished folder to add files a user reads directly (the
            recipe's peft adapter); they are listed in the marker (the checkpoint is complete only with them) under
            ``exports`` and not loaded back by `load_checkpoint`.
    Returns:
        The checkpoint folder on the main rank, None elsewhere.
    """
    is_main = rank == 0 if is_main is None else is_main
    _check_save_args(step, rank, keep_last, barrier)
    if is_main:
        _check_state_keys(state)
    wait = barrier or (lambda: None)
    rng = state["rng"] if "rng" in state else capture_rng()
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"

    exports: list[str] = []
    if is_main:
        _writing(root, final, lambda: _fresh_dir(tmp), tmp)
    wait()  # the temp folder exists before any rank writes into it

    def write() -> None:
        nonlocal exports
        _save_pt(tmp / _RNG_FILE.format(rank=rank), rng)
        if is_main:
            _save_shared(tmp, state, config)
            exports = _export(tmp, export)

    _writing(root, final, write, tmp if is_main else None)
    wait()  # every rank's files are on disk before the folder is published
    if is_main:
        _writing(root, final, lambda: _publish(tmp, final, step, config, exports), tmp, unmarked=final)
        _prune(root, keep_last, final)
    wait()  # no rank moves on (or loads) before the checkpoint is complete
    return final if is_main else None


def _writing(root: Path, final: Path, write: Callable[[], None], tmp: Path | None,
             unmarked: Path | None = None) -> None:
    """Run one writing stage of a save; if it fails, remove what it left (the temp folder; ``unmarked``, a published
    folder whose marker was never written) and raise `CheckpointWriteError` for an I/O failure (torch.save reports
    a full disk as a RuntimeError, safetensors as a SafetensorError)."""
    try:
        write()
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise  # an interrupt leaves an unmarked folder as a kill would: never loaded, pruned by the next save
        if unmarked is not None and not (unmarked / MARKER).is_file():
            shutil.rmtree(unmarked, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(root, final.name, e)) from e


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); its temporary files are gone and the
    earlier checkpoints are untouched. The message says which checkpoint was lost and what a resume would take."""


def _write_failure(root: Path, name: str, error: BaseException) -> str:
    from astrolabe_rl.errors import no_space, os_error_message

    if no_space(error):
        free = shutil.disk_usage(root if root.is_dir() else root.parent).free
        cause = f"no space left on the device ({free / 2**20:.1f} MiB free)"
    elif isinstance(error, OSError):
        cause = os_error_message(error)
    else:
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    latest = latest_checkpoint(root.parent)
    kept = (f"the newest complete checkpoint is {latest.name}, which --resume auto continues from" if latest
            else "no earlier checkpoint exists")
    return f"could not write checkpoint {name} into {root}: {cause}; nothing of it was kept and {kept}"


def _check_save_args(step: int, rank: int, keep_last: int | None, barrier: Callable[[], None] | None) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint); got {keep_last}")
    if rank != 0 and barrier is None:
        raise ValueError(f"rank {rank} needs barrier=... so no rank reads or publishes a half-written checkpoint")


def _check_state_keys(state: Mapping[str, Any]) -> None:
    for key in state:
        if not isinstance(key, str) or not _STATE_KEY.fullmatch(key) or key == "config" or key.startswith("rng-"):
            raise ValueError(
                f"state key {key!r} cannot name a checkpoint file: use letters, digits and _ . - "
                "('config' and 'rng-*' are reserved)"
            )


def _fresh_dir(path: Path) -> None:
    """An empty ``path``; a leftover from a crashed save of the same step is discarded."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _save_shared(folder: Path, state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    import yaml

    for key, value in state.items():
        if key == "rng":
            continue
        if _is_flat_tensor_dict(value):
            _save_safetensors(folder / f"{key}.safetensors", value)
        else:
            _save_pt(folder / f"{key}.pt", value)
    _write_bytes(folder / CONFIG_FILE, yaml.safe_dump(_plain(config), sort_keys=False).encode())


def _export(folder: Path, export: Callable[[Path], Any] | None) -> list[str]:
    """Run ``export`` into ``folder``; the names of the files it added (top level only: the marker lists files)."""
    if export is None:
        return []
    before = {p.name for p in folder.iterdir()}
    export(folder)
    added = sorted(p.name for p in folder.iterdir() if p.name not in before)
    nested = [name for name in added if not (folder / name).is_file()]
    if nested:
        raise ValueError(f"a checkpoint export may add files only, not folders: {nested}")
    return added


def _is_flat_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _save_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    cpu: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights, views of one buffer): store a copy
        cpu[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    save_file(cpu, str(path))
    _fsync(path)


def _save_pt(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path, step: int, config: Mapping[str, Any], exports: list[str]) -> None:
    """Rename the finished temp folder into place, then write the marker that makes it a checkpoint."""
    _fsync(tmp)
    if final.exists():  # an earlier save of this step (a rerun after resume) or a crashed, marker-less one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    names = sorted(p.name for p in final.iterdir())
    files = {name: (final / name).stat().st_size for name in names}
    marker = {
        "format": FORMAT_VERSION,
        "step": step,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash(config),
        "world_size": sum(name.startswith("rng-rank") for name in files),
        "files": files,
        "sha256": {name: file_sha256(final / name) for name in names},
        "exports": exports,
    }
    part = final / f"{MARKER}.part"
    _write_bytes(part, json.dumps(marker, indent=1).encode())
    os.replace(part, final / MARKER)
    _fsync(final)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, in hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _prune(root: Path, keep_last: int | None, keep: Path) -> None:
    """Drop crashed saves, and complete checkpoints beyond the ``keep_last`` newest (``keep`` always stays)."""
    for stale in root.glob(".tmp-step-*"):  # saves are sequential and run on rank 0: any left is a crash
        shutil.rmtree(stale, ignore_errors=True)
    complete = []
    for _, folder in sorted(_step_dirs(root)):
        if folder == keep:
            continue
        if not (folder / MARKER).exists():  # renamed but never marked: a crash between the two
            shutil.rmtree(folder, ignore_errors=True)
        elif read_marker(folder) is not None:
            complete.append(folder)
    if keep_last is not None:
        for folder in complete[: max(0, len(complete) - (keep_last - 1))]:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ find and load


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The ``COMPLETE`` record of a checkpoint folder, or None unless it parses and every listed file has its size."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        sizes_ok = all((Path(path) / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker if sizes_ok else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir/checkpoints``; temp/incomplete ones are skipped."""
    complete = [(step, folder) for step, folder in _step_dirs(Path(run_dir) / CHECKPOINTS) if read_marker(folder)]
    return max(complete)[1] if complete else None


def resolve_resume(run_dir: str | Path, resume: str | Path | None) -> Path | None:
    """Which checkpoint a run resumes from.

    Args:
        run_dir: the run's output folder.
        resume: None (start fresh), ``"auto"`` (the latest complete checkpoint, or None when there is none), or a
            checkpoint folder: a path, or a folder name under ``run_dir/checkpoints`` such as ``"step-000300"``.
    Raises:
        FileNotFoundError: the named checkpoint does not exist.
        ValueError: it exists but is incomplete (its save was interrupted).
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.exists() and (Path(run_dir) / CHECKPOINTS / path).exists():
        path = Path(run_dir) / CHECKPOINTS / path
    if path.is_file():
        raise ValueError(f"checkpoint.resume={resume} is a file; a checkpoint is a folder (step-XXXXXX, or "
                         "resume=auto for the newest complete one)")
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {resume}; pass resume=auto or a step-XXXXXX folder")
    if read_marker(path) is None:
        latest = latest_checkpoint(run_dir)
        raise ValueError(
            f"{path} is not a complete checkpoint (no valid {MARKER} marker: its save was interrupted); "
            f"resume from the latest complete one ({latest}) with resume=auto"
        )
    return path


class CorruptCheckpointError(ValueError):
    """A checkpoint whose marker is complete but a file of which changed after the save or does not load."""


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of a complete checkpoint against the SHA-256 its marker records (every rank's files, so
    every rank reaches the same verdict); raises `CorruptCheckpointError` naming the first file that differs.
    Markers of format 1 (no checksums) pass: their files are checked as they load."""
    path = Path(path)
    marker = read_marker(path)
    if marker is None:
        raise ValueError(f"{path} is not a complete checkpoint (no valid {MARKER} marker); use resolve_resume()")
    for name, digest in (marker.get("sha256") or {}).items():
        if file_sha256(path / name) != digest:
            raise CorruptCheckpointError(
                f"checkpoint {path} is corrupt: the content of {name} differs from the checksum its {MARKER} marker "
                "recorded (the file changed after it was saved: a disk or copy error)")


def load_checkpoint(path: str | Path, rank: int = 0, map_location: str | torch.device = "cpu",
                    verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder back into the ``state`` dict that was saved.

    Args:
        path: the checkpoint folder.
        rank: whose RNG file to read.
        map_location: where tensors land.
        verify: check the files against their checksums first (`verify_checkpoint`).
    Returns:
        Every saved entry (tensor dicts from safetensors, the rest from torch.load) on ``map_location``, plus
        ``"rng"``: this rank's RNG state for `restore_rng` (always on CPU; None, with a warning, when the checkpoint
        was written by fewer ranks), and ``"config"``: the saved config as a nested dict.
    Raises:
        CorruptCheckpointError: a file differs from its checksum or does not load.
    """
    import yaml
    from safetensors.torch import load_file

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    marker = read_marker(path)
    if marker is None:
        raise ValueError(f"{path} is not a complete checkpoint (no valid {MARKER} marker); use resolve_resume()")
    state: dict[str, Any] = {}
    exports = set(marker.get("exports", ()))
    for name in marker["files"]:
        if name in exports:
            continue
        file = path / name
        if name.endswith(".safetensors"):
            state[file.stem] = _readable(file, lambda f: load_file(f, device=str(map_location)))
        elif name.endswith(".pt") and not name.startswith("rng-rank"):
            state[file.stem] = _readable(file, lambda f: torch.load(f, map_location=map_location, weights_only=True))
    state["rng"] = _load_rng(path, rank, marker["world_size"])
    state["config"] = _readable(path / CONFIG_FILE, lambda f: yaml.safe_load(f.read_text()))
    return state


def _readable(file: Path, load: Callable[[Path], Any]) -> Any:
    """``load(file)``; a file that does not load (cut, flipped bytes, not ours) raises `CorruptCheckpointError`."""
    from astrolabe_rl.models.loading import load_error_detail

    try:
        return load(file)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and safetensors readers raise assorted errors
        raise CorruptCheckpointError(f"checkpoint file {file} does not load ({type(e).__name__}: "
                                     f"{load_error_detail(e)}); the checkpoint is corrupt") from e


def _load_rng(path: Path, rank: int, world_size: int) -> dict[str, Any] | None:
    file = path / _RNG_FILE.format(rank=rank)
    if not file.is_file():
        warnings.warn(
            f"{path} was written by {world_size} rank(s) and holds no RNG state for rank {rank}: this rank keeps "
            "its fresh seeds, so the resumed run is not bit-exact",
            stacklevel=3,
        )
        return None
    return _readable(file, lambda f: torch.load(f, map_location="cpu", weights_only=True))


def load_resume(run_dir: str | Path, resume: str | Path | None, rank: int = 0,
                warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run resumes from (`resolve_resume`) and its state (`load_checkpoint`); None: start fresh.

    With ``resume="auto"`` a corrupt checkpoint (`CorruptCheckpointError`) is skipped for the newest older one that
    is intact, and ``warn`` (default: print to stderr) says so; a checkpoint named explicitly must be intact.
    """
    path = resolve_resume(run_dir, resume)
    if path is None:
        return None
    if resume != "auto":
        try:
            return path, load_checkpoint(path, rank=rank)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{e}; resume=auto falls back to the newest intact checkpoint") from e
    candidates = sorted(((s, f) for s, f in _step_dirs(Path(run_dir) / CHECKPOINTS) if read_marker(f)), reverse=True)
    skipped: list[str] = []
    for _, folder in candidates:
        try:
            state = load_checkpoint(folder, rank=rank)
        except CorruptCheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            message = f"warning: {skipped[0]}; resuming from the newest intact checkpoint, {folder.name}"
            (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
        return folder, state
    raise CorruptCheckpointError(f"every checkpoint in {Path(run_dir) / CHECKPOINTS} is corrupt (the newest: "
                                 f"{skipped[0]}); start a fresh run_dir, or move the checkpoints aside")


def _step_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    """``(step, folder)`` for every ``step-XXXXXX`` folder under ``root`` (complete or not)."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        match = _STEP_DIR.fullmatch(folder.name)
        if match and folder.is_dir():
            yield int(match.group(1)), folder


# ------------------------------------------------------------------------------------------------ run folder


class RunDirError(ValueError):
    """The run folder cannot be used as asked; the message says what to change."""


class RunDirLock:
    """Exclusive, advisory ownership of a run folder: ``fcntl.flock`` on ``run_dir/.lock``, which holds the owner's
    pid and host.

    The kernel drops a flock when its file is closed, and the process's files are closed however it ends (``kill -9``
    included), so a lock file left behind never blocks a later run: only a live holder does. Advisory: it stops other
    astrolabe runs, not other programs. Use `claim_run_dir` to take a folder for a run.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunDirLock:
        """Take the lock (creating the folder) or raise `RunDirError` naming the holder, without waiting."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # neither truncates the holder's record nor fails if absent
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(500).strip() or "another process"
            f.close()
            raise RunDirError(
                f"run_dir {self.path.parent} is in use by {holder}: wait for that run to end, or pick another run_dir"
            ) from None
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {now}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Give the folder up (the file stays: its record is stale once no process holds the lock); idempotent."""
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def claim_run_dir(run_dir: str | Path, *, resume: str | Path | None, overwrite: bool) -> RunDirLock:
    """Take ``run_dir`` for one run: lock it, then refuse to mix two runs in it.

    Args:
        run_dir: the run's output folder (created if absent).
        resume: ``checkpoint.resume``: any value means this run continues what the folder holds.
        overwrite: a fresh run (``resume`` None) into a folder that holds anything moves the old contents aside, to
            ``<run_dir>.old-<UTC time>`` next to it, instead of failing.
    Returns:
        The held lock: release it (`RunDirLock.release`) when the run ends; the process's exit releases it too.
    Raises:
        RunDirError: another live process holds the folder, or it holds a run and neither ``resume`` nor
            ``overwrite`` says what to do with it, or both are set.
    """
    run_dir = Path(run_dir)
    if overwrite and resume is not None:
        raise RunDirError(
            f"checkpoint.overwrite=true and checkpoint.resume={resume} contradict each other: resume continues the run "
            f"in {run_dir}, overwrite moves it aside; pass one of them"
        )
    lock = RunDirLock(run_dir).acquire()
    try:
        held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if held and resume is None:
            if not overwrite:
                shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
                raise RunDirError(
                    f"run_dir {run_dir} already holds a run ({shown}): continue it with --resume auto "
                    "(checkpoint.resume=auto), move it aside with --overwrite (checkpoint.overwrite=true), or pick "
                    "another run_dir"
                )
            aside = _move_aside(run_dir, held)
            print(f"moved the previous contents of {run_dir} to {aside}", file=sys.stderr, flush=True)
    except BaseException:
        lock.release()
        raise
    return lock


def _move_aside(run_dir: Path, names: list[str]) -> Path:
    """Move ``names`` (entries of ``run_dir``) into a new sibling ``<run_dir>.old-<UTC time>[-k]``; returns it."""
    run_dir = run_dir.resolve()  # run_dir=. (or ..) has no name of its own to put ".old-<time>" after
    if not run_dir.name:
        raise RunDirError(f"run_dir {run_dir} is the root folder; its contents cannot be moved aside: pick a run_dir")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    k = 1
    while aside.exists():  # two overwrites within one second
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{k}")
        k += 1
    aside.mkdir()
    for name in names:
        os.replace(run_dir / name, aside / name)  # a sibling folder: the same filesystem, so a rename
    return aside
