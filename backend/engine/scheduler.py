"""The scheduler: the inference thread's loop, one queue in, one running batch.

Each turn of the loop: take waiting requests into the batch as far as MAX_BATCH_SIZE and MAX_BATCH_TOKENS
allow (each is prefilled alone and joins the running sequences), then run one decode step for the whole
batch. Sequences that end (stop, length, abort, timeout, error) leave at once and their clients are answered.
Nothing here touches the event loop: results travel through each job's `emit`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from backend.engine.batch import DecodeBatch
from backend.engine.devices import free_accelerator_cache, release_free_memory
from backend.engine.generation import Failed, Finished, GenerationJob, SequenceState, prefill, timeout_error
from backend.engine.loader import LoadedModel
from backend.errors import ModelNotReadyError, OutOfMemoryError, QueueFullError

logger = logging.getLogger(__name__)


def out_of_memory_error() -> OutOfMemoryError:
    """The 503 for a request that ran the GPU out of memory."""
    return OutOfMemoryError(
        "The GPU ran out of memory on this request; try fewer or smaller images, a shorter conversation or a "
        "lower max_tokens. The server freed its cache and is still running.",
        code="out_of_memory",
    )


class Scheduler:
    """Admits queued jobs into the running batch and steps it; `run` is the inference thread's body."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_batch_tokens: int, max_queue: int) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.batch = DecodeBatch(loaded)
        self._waiting: deque[GenerationJob] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self.peak_running = 0  # the largest batch so far, for /health
        # Where the inference thread's time goes (for /health and scripts/bench.py).
        self.prefill_passes = 0
        self.prefill_seconds = 0.0
        self.decode_steps = 0
        self.decode_seconds = 0.0

    # --- called from the event loop ---

    def submit(self, job: GenerationJob) -> None:
        """Queue a job; 429 when MAX_QUEUE jobs already wait, 503 once shutdown has begun."""
        with self._condition:
            if self._stopping:
                raise ModelNotReadyError("The server is shutting down.", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(self.max_queue, retry_after_seconds=max(1, len(self.batch) // 4))
            self._waiting.append(job)
            self._condition.notify()

    def stop(self) -> None:
        """Cancel every waiting and running job (each ends with `abort`) and let `run` return."""
        with self._condition:
            self._stopping = True
            for job in [*self._waiting, *(row.job for row in self.batch.rows)]:
                job.cancelled.set()
            self._condition.notify()

    @property
    def waiting(self) -> int:
        """Jobs in the queue."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return len(self.batch)

    # --- the inference thread ---

    def run(self) -> None:
        """Serve until `stop` and until every job has been answered."""
        while True:
            with self._condition:
                if not self._waiting and not self.batch.rows and not self._stopping:
                    release_free_memory()  # idle: give what the last requests freed back to the system
                while not self._waiting and not self.batch.rows and not self._stopping:
                    self._condition.wait()
                if self._stopping and not self._waiting and not self.batch.rows:
                    return
            self.step()

    def step(self) -> bool:
        """One turn: admit what fits, then one decode step. Returns whether any work is left."""
        with self._condition:
            dropped = self._drop_cancelled_and_expired()
            admitted = self._admit()
        for job in dropped:
            self._answer_without_running(job)
        if admitted:
            self._start(admitted)
        self.peak_running = max(self.peak_running, len(self.batch))
        if self.batch.rows:
            self._decode_step()
        return bool(self._waiting or self.batch.rows)

    def run_until_idle(self) -> None:
        """Step on the calling thread until every queued job is answered (tests and tools)."""
        while self.step():
            pass

    def _drop_cancelled_and_expired(self) -> list[GenerationJob]:
        """Take out of the queue the jobs whose client left or whose time ran out (lock held)."""
        now = time.perf_counter()
        dropped = [job for job in self._waiting if job.cancelled.is_set() or job.expired(now)]
        for job in dropped:
            self._waiting.remove(job)
        return dropped

    def _admit(self) -> list[GenerationJob]:
        """Jobs to start now, in arrival order, within the batch's size and token budget (lock held).

        The budget counts each sequence's prompt (image tokens included) plus its max_new_tokens, so the KV
        cache the batch can grow to is known when a job is admitted. A job is always admitted into an empty
        batch, however large, so nothing waits forever.
        """
        reserved = sum(row.job.inputs.prompt_tokens + row.params.max_new_tokens for row in self.batch.rows)
        admitted: list[GenerationJob] = []
        while self._waiting and len(self.batch) + len(admitted) < self.max_batch_size:
            job = self._waiting[0]
            cost = job.inputs.prompt_tokens + job.params.max_new_tokens
            if (self.batch.rows or admitted) and reserved + cost > self.max_batch_tokens:
                break
            admitted.append(self._waiting.popleft())
            reserved += cost
        return admitted

    def _answer_without_running(self, job: GenerationJob) -> None:
        """A job that never ran: aborted (client gone) or timed out in the queue."""
        if job.cancelled.is_set():
            queued = time.perf_counter() - job.submitted_at
            job.emit(Finished("abort", job.inputs.prompt_tokens, 0, queued, None, 0.0))
        else:
            job.emit(Failed(timeout_error(job)))

    def _start(self, jobs: list[GenerationJob]) -> None:
        """Prefill admitted jobs (text prompts together, image prompts one by one) and let them join."""
        now = time.perf_counter()
        live = []
        for job in jobs:
            if self._stopping:  # admitted just as shutdown began: stop() may not have seen it
                job.cancelled.set()
            if job.cancelled.is_set() or job.expired(now):
                self._answer_without_running(job)
            else:
                live.append(job)
        text_jobs = [job for job in live if job.inputs.pixel_values is None]
        groups = [[job] for job in live if job.inputs.pixel_values is not None]
        if text_jobs:
            groups.insert(0, text_jobs)
        for group in groups:
            self._prefill_group(group)

    def _prefill_group(self, jobs: list[GenerationJob]) -> None:
        """One prefill forward pass for `jobs`; each chooses its first token and joins unless already done."""
        started = time.perf_counter()
        rows = [SequenceState(self.loaded, job, started) for job in jobs]
        self.prefill_passes += 1
        try:
            with torch.inference_mode():
                prefilled = prefill(self.loaded, [job.inputs for job in jobs])
            self.prefill_seconds += time.perf_counter() - started
        except Exception as exc:  # these requests only; the thread and the running batch carry on
            if isinstance(exc, torch.OutOfMemoryError):
                free_accelerator_cache()
                exc = out_of_memory_error()
            else:
                logger.debug("prefill failed", exc_info=True)
            for row in rows:
                row.fail(exc)
            return
        joining, tokens, keep = [], [], []
        for index, row in enumerate(rows):
            row.next_position = prefilled.next_positions[index]
            try:
                token = row.choose(prefilled.logits[index])
                reason = row.accept(token)
            except Exception as exc:
                row.fail(exc)
                continue
            if reason is None and row.job.cancelled.is_set():
                reason = "abort"
            if reason is not None:
                row.finish(reason)
                continue
            joining.append(row)
            tokens.append(token)
            keep.append(index)
        if not joining:
            return
        if len(keep) < len(rows):  # some ended at their first token: keep only the others' cache rows
            selector = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
            for layer in prefilled.cache.layers:
                layer.keys = layer.keys.index_select(0, selector)
                layer.values = layer.values.index_select(0, selector)
            prefilled.mask = prefilled.mask.index_select(0, selector)
        self.batch.add(joining, prefilled.cache, prefilled.mask, tokens)

    def _decode_step(self) -> None:
        """One forward pass for the batch; each row chooses, emits, and leaves if it has ended."""
        started = time.perf_counter()
        self.decode_steps += 1
        try:
            with torch.inference_mode():
                logits = self.batch.step()
        except Exception as exc:  # the step is shared: every running request gets the error
            if isinstance(exc, torch.OutOfMemoryError):
                free_accelerator_cache()
                exc = out_of_memory_error()
            else:
                logger.exception("decode step failed for %d sequences", len(self.batch))
            for row in self.batch.rows:
                row.fail(exc)
            self.batch.remove(list(range(len(self.batch))))
            return
        now = time.perf_counter()
        ended: list[int] = []
        for index, row in enumerate(self.batch.rows):
            try:
                token = row.choose(logits[index])
                reason = row.accept(token)
            except Exception as exc:
                row.fail(exc)
                ended.append(index)
                continue
            if reason is None and (row.job.cancelled.is_set() or self._stopping):
                reason = "abort"
            if reason is None and row.job.expired(now):
                row.fail(timeout_error(row.job))
                ended.append(index)
                continue
            if reason is not None:
                row.finish(reason)
                ended.append(index)
            else:
                self.batch.next_tokens[index] = token
        self.batch.remove(ended)
        self.decode_seconds += time.perf_counter() - started


def generate_alone(loaded: LoadedModel, job: GenerationJob) -> None:
    """Run one job to its end on the calling thread, through the same code as the batch (for tests)."""
    scheduler = Scheduler(loaded, max_batch_size=1, max_batch_tokens=1 << 30, max_queue=1)
    scheduler.submit(job)
    scheduler.run_until_idle()
