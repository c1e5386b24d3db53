"""Score rewards in the background, overlapped with the next rollout micro-batch.

Forward-process RL needs only the clean samples of a batch, so while the rewards of micro-batch k are computed
the sampler can already generate micro-batch k+1 (`reference/rewards.md` §10.3)::

    scorer = AsyncScorer(rewards)                  # {name: Reward}, e.g. from build_reward
    pending = []
    for prompts in micro_batches:
        videos = generate(prompts)                 # [B, T, 3, H, W] in [0, 1]
        pending.append(scorer.submit(videos, prompts))
    scores = [f.result() for f in pending]         # each {name: [B]} plus "{name}/{extra}" diagnostics

A reward that raises, or returns NaN or ±inf, yields NaN for the samples it could not score (`score_all`), never
a lost run; its message goes to ``on_error``, and every batch's failures add up in a `FailureReport` that
``drain_failures()`` hands over (once per epoch) and resets::

    report = scorer.drain_failures()               # per reward: failed share, first error
    logger.log(report.metrics())                   # reward/<name>/failed_frac
    check_failures(report, cfg.rewards.max_failed_frac)

With ``enabled=False`` ``submit`` scores on the spot and returns a finished future, so a
training loop has one code path either way.

On a GPU the work runs on its own CUDA stream, ordered after the stream that produced ``videos`` (an event is
recorded at ``submit``), and ``videos`` is marked as used by that stream so its memory is not recycled early.
Do not modify ``videos`` in place until its future is done.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from astrolabe_rl.rewards.base import FailureReport, Reward, check_videos, score_all

log = logging.getLogger(__name__)


def _log_error(name: str, message: str) -> None:
    log.warning("reward %s failed on part of a batch (NaN where it failed): %s", name, message)


class AsyncScorer:
    """A background scorer for a fixed set of rewards.

    Args:
        rewards: ``{name: Reward}``; identical reward configs are already one instance (`build_reward`).
        enabled: False scores synchronously inside ``submit`` (same results, no overlap).
        workers: batches scored concurrently (1 keeps memory bounded and results in submission order).
        max_pending: ``submit`` blocks while this many batches are unfinished (back-pressure on the sampler).
        on_error: called with ``(reward name, message)`` when a reward fails on part of a batch; None: only count
            the failure in the report ``drain_failures`` returns.
    """

    def __init__(self, rewards: dict[str, Reward], *, enabled: bool = True, workers: int = 1, max_pending: int = 2,
                 on_error: Callable[[str, str], None] | None = _log_error) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError(f"workers and max_pending must be >= 1; got {workers}, {max_pending}")
        self.rewards = dict(rewards)
        self.enabled = enabled
        self.on_error = on_error
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="reward") if enabled else None
        self._slots = threading.BoundedSemaphore(max_pending)
        self._failures = FailureReport()
        self._failures_lock = threading.Lock()  # workers add, the training loop drains

    def submit(self, videos: Tensor, prompts: list[str]) -> "Future[dict[str, Tensor]]":
        """Start scoring ``videos [B, T, 3, H, W]`` in [0, 1]; the future gives ``{name: [B]}`` float32 CPU scores
        and ``{name}/{key}`` for every per-video diagnostic a reward leaves in its ``extras``."""
        check_videos(videos, prompts)
        prompts = list(prompts)
        if self._pool is None:
            done: Future[dict[str, Tensor]] = Future()
            done.set_result(self.score(videos, prompts))
            return done
        ready = _mark_ready(videos)
        self._slots.acquire()
        future = self._pool.submit(self._run, videos, prompts, ready)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def score(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Score synchronously (what the worker runs)."""
        out: dict[str, Tensor] = {}
        b = videos.shape[0]
        for name, reward in self.rewards.items():
            scores, errors = score_all({name: reward}, videos, prompts)
            out[name] = scores[name]
            for key, value in (getattr(reward, "extras", None) or {}).items():
                if isinstance(value, Tensor) and value.shape == (b,):
                    out[f"{name}/{key}"] = value.detach().float().cpu()
            report = FailureReport.from_scores(scores, errors)
            with self._failures_lock:
                self._failures = self._failures.merge(report)
            if name in errors and self.on_error is not None:
                self.on_error(name, errors[name])
        return out

    def drain_failures(self) -> FailureReport:
        """The failures of every batch scored since the last call (counts and first errors), then reset.

        Call it after the futures of the batches it should cover are done (their results collected)."""
        with self._failures_lock:
            report, self._failures = self._failures, FailureReport()
        return report

    def _run(self, videos: Tensor, prompts: list[str], ready: "torch.cuda.Event | None") -> dict[str, Tensor]:
        if ready is None:
            return self.score(videos, prompts)
        stream = torch.cuda.Stream(device=videos.device)
        stream.wait_event(ready)
        videos.record_stream(stream)
        with torch.cuda.stream(stream):
            out = self.score(videos, prompts)
        stream.synchronize()
        return out

    def close(self, wait: bool = True) -> None:
        """Stop the worker threads (after the queued batches when ``wait``)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait)

    def __enter__(self) -> "AsyncScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mark_ready(videos: Tensor) -> "torch.cuda.Event | None":
    """On CUDA, an event after the work that produced ``videos`` (the worker's stream waits on it)."""
    if not videos.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(videos.device))
    return event
