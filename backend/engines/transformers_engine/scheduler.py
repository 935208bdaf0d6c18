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

from backend.engines.transformers_engine.batch import DecodeBatch
from backend.engines.transformers_engine.devices import free_accelerator_cache
from backend.engines.transformers_engine.generation import (
    Failed,
    Finished,
    GenerationJob,
    SequenceState,
    prefill,
    timeout_error,
)
from backend.engines.transformers_engine.loader import LoadedModel
from backend.errors import ModelNotReadyError, OutOfMemoryError, QueueFullError
from backend.process_memory import release_free_memory

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
        self._starting: list[GenerationJob] = []  # admitted by this step, prefilling, not in the batch yet
        self._condition = threading.Condition()
        self._stopping = False
        self._failure: Exception | None = None  # set when the inference thread has died: every submit gets it
        self.peak_running = 0  # the largest batch so far, for /health
        self.peak_waiting = 0  # the longest queue so far, for /health
        # Where the inference thread's time goes (for /health and scripts/bench.py).
        self.prefill_passes = 0
        self.prefill_seconds = 0.0
        self.decode_steps = 0
        self.decode_seconds = 0.0

    # --- called from the event loop ---

    def submit(self, *jobs: GenerationJob) -> None:
        """Queue jobs (the `n` choices of one request) all or none: 429 when they would take the queue past
        MAX_QUEUE, 503 once shutdown has begun or the inference thread has stopped."""
        with self._condition:
            if self._failure is not None:
                raise self._failure
            if self._stopping:
                raise ModelNotReadyError("The server is shutting down.", code="shutting_down")
            # Jobs that the next step will admit into free batch rows are not "waiting beyond the batch".
            free_rows = max(0, self.max_batch_size - len(self.batch) - len(self._starting))
            if len(self._waiting) + len(jobs) > self.max_queue + free_rows:
                raise QueueFullError(self.max_queue, retry_after_seconds=max(1, len(self.batch) // 4))
            self._waiting.extend(jobs)
            self.peak_waiting = max(self.peak_waiting, len(self._waiting))
            self._condition.notify()

    def stop(self) -> None:
        """Cancel every waiting and running job (each ends with `abort`) and let `run` return."""
        with self._condition:
            self._stopping = True
            for job in [*self._waiting, *(row.job for row in self.batch.rows)]:
                job.cancelled.set()
            self._condition.notify()

    def fail_everything(self, error: Exception) -> None:
        """The inference thread has stopped for good: answer every waiting and running job with `error`, and
        every later `submit` too, so no request waits for a thread that will never step again."""
        with self._condition:
            self._failure = error
            jobs = [*self._waiting, *(row.job for row in self.batch.rows)]
            self._waiting.clear()
        self.batch.clear()
        for job in jobs:
            _emit_failure(job, error)

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
        """Serve until `stop` and until every job has been answered.

        No request's failure may end this loop: whatever escapes a step fails the running batch (the only
        requests whose state it could have touched) and the loop goes on with the queue.
        """
        while True:
            with self._condition:
                if not self._waiting and not self.batch.rows and not self._stopping:
                    release_free_memory()  # idle: give what the last requests freed back to the system
                while not self._waiting and not self.batch.rows and not self._stopping:
                    self._condition.wait()
                if self._stopping and not self._waiting and not self.batch.rows:
                    return
            try:
                self.step()
            except Exception as exc:
                logger.exception("a scheduler step failed; failing its %d running sequences", len(self.batch))
                error = as_api_error(exc)
                with self._condition:
                    # Admitted in this step but not in the batch yet: nobody else would answer them.
                    starting, self._starting = self._starting, []
                joined = {id(row.job) for row in self.batch.rows}
                for job in starting:
                    if id(job) not in joined and not job.answered:
                        _emit_failure(job, error)
                self._fail_batch(error)

    def step(self) -> bool:
        """One turn: admit what fits, then one decode step. Returns whether any work is left."""
        with self._condition:
            dropped = self._drop_cancelled_and_expired()
            admitted = self._starting = self._admit()
        for job in dropped:
            self._answer_without_running(job)
        if admitted:
            self._start(admitted)
        with self._condition:
            self._starting = []
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

    def _fail_batch(self, error: Exception) -> None:
        """Answer every running sequence with `error` and empty the batch."""
        rows = self.batch.rows
        self.batch.clear()
        for row in rows:
            _emit_failure(row.job, error)

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
        """One prefill forward pass for `jobs`; each chooses its first token and joins unless already done.

        Every failure here (a bad request's sampling state, out of memory in the pass or while the batch
        grows) ends only these jobs: the running batch is left as it was.
        """
        started = time.perf_counter()
        rows: list[SequenceState] = []
        for job in jobs:
            try:
                rows.append(SequenceState(self.loaded, job, started))
            except Exception as exc:
                _emit_failure(job, as_api_error(exc))
        if not rows:
            return
        self.prefill_passes += 1
        try:
            with torch.inference_mode():
                prefilled = prefill(self.loaded, [row.job.inputs for row in rows])
            self.prefill_seconds += time.perf_counter() - started
        except Exception as exc:  # these requests only; the thread and the running batch carry on
            logger.debug("prefill failed", exc_info=True)
            error = as_api_error(exc)
            for row in rows:
                row.fail(error)
            return
        joining, tokens, keep = [], [], []
        for index, row in enumerate(rows):
            row.next_position = prefilled.next_positions[index]
            try:
                token = row.choose(prefilled.logits[index])
                reason = row.accept(token)
                if reason is None and row.job.cancelled.is_set():
                    reason = "abort"
                if reason is not None:
                    row.finish(reason)
                    continue
            except Exception as exc:
                row.fail(as_api_error(exc))
                continue
            joining.append(row)
            tokens.append(token)
            keep.append(index)
        if not joining:
            return
        try:
            if len(keep) < len(rows):  # some ended at their first token: keep only the others' cache rows
                selector = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
                for layer in prefilled.cache.layers:
                    layer.keys = layer.keys.index_select(0, selector)
                    layer.values = layer.values.index_select(0, selector)
                prefilled.mask = prefilled.mask.index_select(0, selector)
            self.batch.add(joining, prefilled.cache, prefilled.mask, tokens)
        except Exception as exc:  # growing the batch failed (out of memory in torch.cat): these rows only
            logger.debug("joining the batch failed", exc_info=True)
            error = as_api_error(exc)
            for row in joining:
                row.fail(error)

    def _decode_step(self) -> None:
        """One forward pass for the batch; each row chooses, emits, and leaves if it has ended."""
        started = time.perf_counter()
        self.decode_steps += 1
        try:
            with torch.inference_mode():
                logits = self.batch.step()
        except Exception as exc:  # the step is shared: every running request gets the error
            if not isinstance(exc, torch.OutOfMemoryError):
                logger.exception("decode step failed for %d sequences", len(self.batch))
            self._fail_batch(as_api_error(exc))
            return
        now = time.perf_counter()
        ended: list[int] = []
        for index, row in enumerate(self.batch.rows):
            try:
                token = row.choose(logits[index])
                reason = row.accept(token)
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
            except Exception as exc:
                row.fail(as_api_error(exc))
                ended.append(index)
        try:
            self.batch.remove(ended)
        except Exception as exc:  # shrinking the cache failed: the rows still in it cannot go on
            logger.debug("shrinking the batch failed", exc_info=True)
            ended_rows = {id(self.batch.rows[index]) for index in ended}
            survivors = [row for row in self.batch.rows if id(row) not in ended_rows]
            self.batch.clear()
            error = as_api_error(exc)
            for row in survivors:
                row.fail(error)
        self.decode_seconds += time.perf_counter() - started


def as_api_error(exc: Exception) -> Exception:
    """What a request's client is told about an exception on the inference thread: an accelerator
    out-of-memory becomes the 503 `out_of_memory` (after the cache is freed); anything else is passed on."""
    if isinstance(exc, torch.OutOfMemoryError):
        free_accelerator_cache()
        return out_of_memory_error()
    return exc


def _emit_failure(job: GenerationJob, error: Exception) -> None:
    """Tell one job's client it failed; a broken listener must not take the inference thread with it."""
    try:
        job.emit(Failed(error))
    except Exception:
        logger.exception("could not deliver the failure of %s", job.request_id)


def generate_alone(loaded: LoadedModel, job: GenerationJob) -> None:
    """Run one job to its end on the calling thread, through the same code as the batch (for tests)."""
    scheduler = Scheduler(loaded, max_batch_size=1, max_batch_tokens=1 << 30, max_queue=1)
    scheduler.submit(job)
    scheduler.run_until_idle()
