"""Admission, queueing, dynamic batching and the worker threads of one served model.

A request holds one of `max_queue + workers * max_batch` slots from before its body is read until it is answered,
so a full server answers 503 at once and memory stays bounded. Admitted jobs wait in a FIFO; each worker thread
takes the oldest plus whatever else is queued while the model accepts batches, and waits up to `max_delay_s` for
more only while admitted requests are still on their way (body being read or parsed): a lone request is never held
back. It runs them on its own interpreter (the TFLite interpreter is not thread-safe). A job whose deadline passed is
answered 503, not run.
Idle workers are woken last-in first-out, so a lightly loaded server keeps using the interpreter whose weights are
still in the CPU caches (round-robin over two MobileNetV2 interpreters measured slower at concurrency 1).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from edgetl.edge.serve.metrics import ServeMetrics
from edgetl.edge.serve.protocol import RequestError

log = logging.getLogger("edgetl.serve")
RETRY_AFTER_S = 1


class Overloaded(RequestError):
    """Every slot of the model is taken: 503 with Retry-After."""

    def __init__(self, message: str):
        super().__init__(message, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass(frozen=True)
class BatchOptions:
    """Worker threads, the largest batch and how long to wait to fill it, and the queue beyond the workers."""

    workers: int = 1
    max_batch: int = 1
    max_delay_s: float = 0.0
    max_queue: int = 16

    @property
    def slots(self) -> int:
        return self.max_queue + self.workers * self.max_batch


@dataclass(eq=False)
class Job:
    """One request's work: `payload` for `execute`, `count` images, `finish` turning its output into the answer."""

    payload: Any
    count: int
    finish: Callable[[Any], Any]
    deadline: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False


Execute = Callable[[int, Sequence[Any]], List[Any]]
"""(worker index, payloads) -> one output or Exception per payload, computed on that worker's interpreter."""


class Batcher:
    """The queue and worker threads of one model; `run` is awaited on the event loop, the work happens off it."""

    def __init__(self, name: str, execute: Execute, options: BatchOptions, batch_limit: Callable[[], int],
                 metrics: ServeMetrics):
        self.name, self.options = name, options
        self._execute, self._batch_limit, self._metrics = execute, batch_limit, metrics
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wakeups = [threading.Condition(self._lock) for _ in range(options.workers)]
        self._idle: List[int] = []  # sleeping workers, the most recent last
        self._admitted = 0
        self._busy = 0  # jobs the workers have taken and not yet answered
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"edgetl-{name}-{i}", daemon=True)
                         for i in range(options.workers)]
        metrics.add_model(name, queue_depth=lambda: len(self._queue), admitted=lambda: self._admitted)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Let the workers finish every queued job, then end them."""
        with self._lock:
            self._stopping = True
            for wakeup in self._wakeups:
                wakeup.notify()
        for thread in self._threads:
            thread.join()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a slot for the duration of a request (event loop thread only); Overloaded when none is free."""
        if self._admitted >= self.options.slots:
            raise Overloaded(f"model {self.name!r} is at capacity ({self.options.slots} requests in progress); retry later")
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def run(self, payload: Any, count: int, finish: Callable[[Any], Any], deadline: float) -> Any:
        """Queue a job and wait for its answer; 503 when `deadline` (time.monotonic) passes first.

        A timer fails the job's future at the deadline (asyncio.wait_for would add a task and a future per request)."""
        loop = asyncio.get_running_loop()
        job = Job(payload, count, finish, deadline, loop.create_future(), loop)
        with self._lock:
            self._queue.append(job)
            if self._idle:
                self._wakeups[self._idle.pop()].notify()
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, job)
        try:
            return await job.future
        except asyncio.CancelledError:  # the server gave up on the request: nobody waits for its answer
            job.abandoned = True
            raise
        finally:
            timer.cancel()

    def _work(self, index: int) -> None:
        while True:
            batch = self._take(index)
            if batch is None:
                return
            now = time.monotonic()
            waiting = [job for job in batch if not job.abandoned]
            _settle([(job, None, _deadline_exceeded()) for job in waiting if now > job.deadline])
            live = [job for job in waiting if now <= job.deadline]
            if live:
                self._run_batch(index, live, now)
            with self._lock:
                self._busy -= len(batch)

    def _run_batch(self, index: int, jobs: List[Job], taken: float) -> None:
        start = time.perf_counter()
        try:
            outputs = self._execute(index, [job.payload for job in jobs])
        except Exception as exc:  # a bug, not a bad request: every job of the batch gets a 500
            log.exception("model %s: batch of %d failed", self.name, len(jobs))
            outputs = [exc] * len(jobs)
        answers = []
        for job, output in zip(jobs, outputs):
            if isinstance(output, Exception):
                answers.append((job, None, output))
                continue
            try:
                answers.append((job, job.finish(output), None))
            except RequestError as exc:  # e.g. an output the reloaded model no longer has
                answers.append((job, None, exc))
            except Exception as exc:
                log.exception("model %s: encoding a response failed", self.name)
                answers.append((job, None, exc))
        _settle(answers)
        self._metrics.observe_batch(self.name, sum(job.count for job in jobs), [taken - job.enqueued for job in jobs],
                                    time.perf_counter() - start)

    def _take(self, index: int) -> Optional[List[Job]]:
        """The oldest job plus, while the model batches, more that are queued or arrive within max_delay_s from
        requests already admitted (None: stop)."""
        with self._lock:
            while not self._queue:
                if self._stopping:
                    return None
                self._sleep(index, None)
            batch = [self._queue.popleft()]
            total, limit = batch[0].count, self._batch_limit()
            end = time.monotonic() + self.options.max_delay_s
            while total < limit:
                if self._queue:
                    if total + self._queue[0].count > limit:
                        break
                    batch.append(self._queue.popleft())
                    total += batch[-1].count
                    continue
                remaining = end - time.monotonic()
                on_the_way = self._admitted - self._busy - len(batch)  # admitted, not yet queued
                if remaining <= 0 or self._stopping or on_the_way <= 0:
                    break
                self._sleep(index, remaining)
            self._busy += len(batch)
            return batch

    def _sleep(self, index: int, timeout: Optional[float]) -> None:
        """Wait (holding the lock) until a job arrives for this worker, the timeout passes or the batcher stops."""
        self._idle.append(index)
        self._wakeups[index].wait(timeout)
        if index in self._idle:  # woken by the timeout or by stop(), not by a job
            self._idle.remove(index)


def _deadline_exceeded() -> Overloaded:
    return Overloaded("the request's deadline passed before it was answered (--timeout-ms or parameters.timeout)")


def _expire(job: Job) -> None:
    """The deadline passed before the job was answered: 503 now, and a worker that has not started it skips it."""
    if not job.future.done():
        job.abandoned = True
        job.future.set_exception(_deadline_exceeded())


def _settle(answers: List[Tuple[Job, Any, Optional[BaseException]]]) -> None:
    """Hand (job, value, error) results to their event loop in one thread-safe call per loop (one wake-up for a whole
    batch); a job given up meanwhile is left alone."""
    def resolve(mine):
        for job, value, error in mine:
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)

    for loop in {job.loop for job, _, _ in answers}:
        loop.call_soon_threadsafe(resolve, [answer for answer in answers if answer[0].loop is loop])
