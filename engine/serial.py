"""One job at a time, in arrival order, on one thread: how predictions share the GPU.

Why this exists: coglet (the Cog HTTP server, 0.17 and later) answers a prediction before it
returns that prediction's slot to its pool, so with one slot a client that sends its next
request as soon as it has read an answer is sometimes refused with 409 (docs/architecture.md,
"Back-to-back requests"). With two slots the server admits that request; this runner makes it
wait for the GPU instead of running beside the first. The jobs are plain blocking functions
(the engine's ``predict``); the async side awaits them without blocking the event loop, so the
server can still deliver a cancel.

Cancelling the caller of :meth:`SerialRunner.run` cancels its job: a queued job never starts, a
running one gets ``cancel_exception`` raised in its thread (the way coglet cancels a
synchronous predictor), and the caller returns only once the job has ended, so two jobs never
overlap. Pure Python: no torch, no cog.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import functools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class Cancelled(BaseException):
    """Raised in a running job when its caller is cancelled (unless another type is given)."""


@dataclass(eq=False)
class _Job:
    fn: Callable[[], Any]
    context: contextvars.Context
    future: concurrent.futures.Future


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``thread_id`` at its next bytecode; ``None`` drops a pending one."""
    obj = ctypes.py_object(exc) if exc is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


class SerialRunner:
    """Runs blocking calls one at a time, first come first served, on a thread of its own.

    ``call()`` blocks (for setup), ``run()`` is awaited (for predictions). Everything runs on the
    same thread, so per-thread state of the libraries underneath (CUDA streams, compiled graphs)
    sees one thread, as it did when the server called the predictor directly. The caller's
    context variables travel with each job: coglet routes a prediction's log lines by one.
    """

    def __init__(self, *, cancel_exception: type[BaseException] = Cancelled, name: str = "serial") -> None:
        self._cancel_exception = cancel_exception
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._state = threading.Lock()  # guards _running against a cancel racing the job's end
        self._running: _Job | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)``; the future is its result (or exception)."""
        if not self._thread.is_alive():
            raise RuntimeError("SerialRunner is closed")
        job = _Job(
            functools.partial(fn, *args, **kwargs), contextvars.copy_context(), concurrent.futures.Future()
        )
        self._jobs.put(job)
        return job.future

    def busy(self) -> bool:
        """Whether a job is running or queued now (a hint for logs: it can change at once)."""
        return self._running is not None or not self._jobs.empty()

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the runner's thread and wait for it (after any queued job)."""
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Await ``fn`` in turn; if this task is cancelled, cancel the job and wait for it to end."""
        future = self.submit(fn, *args, **kwargs)
        try:
            # Cancelling this wrapper also cancels a job that has not started.
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._interrupt(future)
            ended = asyncio.wrap_future(future)
            while not future.done():  # never hand the GPU on while this job still runs
                try:
                    await asyncio.wait({ended})
                except asyncio.CancelledError:
                    self._interrupt(future)
            if ended.done() and not ended.cancelled():
                ended.exception()  # the job's own outcome is moot now; mark it as seen
            raise

    def close(self, timeout: float | None = None) -> None:
        """Let queued jobs finish, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _interrupt(self, future: concurrent.futures.Future) -> None:
        if future.cancel():  # not started: it never will
            return
        with self._state:
            job = self._running
            if job is not None and job.future is future and self._thread.ident is not None:
                _set_async_exc(self._thread.ident, self._cancel_exception)

    def _work(self) -> None:
        while True:
            job = None
            try:
                job = self._jobs.get()
                if job is None:
                    return
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                with self._state:
                    self._running = job
                try:
                    result = job.context.run(job.fn)
                finally:
                    with self._state:
                        self._running = None
                        # A cancel that came as the job was ending may still be pending: drop it,
                        # so it cannot land in this loop or in the next job.
                        _set_async_exc(threading.get_ident(), None)
                job.future.set_result(result)
            except BaseException as exc:  # every outcome belongs to the job's future
                with self._state:
                    self._running = None
                if job is not None and not job.future.done():
                    job.future.set_exception(exc)
