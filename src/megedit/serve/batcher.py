"""Request batching: concurrent requests share one model call, so throughput grows with load.

Requests wait in an asyncio queue. One worker task takes the first, then whatever else is queued, up
to ``max_batch`` prompts; when the queue cannot fill the batch yet it waits ``window_s`` once for
more. The batch runs in one dedicated thread (the model is never touched from two threads, and the
event loop keeps accepting requests meanwhile). While a batch runs, the next one queues up: under
load batches are full and the window is never waited. An exception fails only the requests of its
batch; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """More requests are waiting than the batcher keeps; the caller should refuse the new one."""


class BatchFailed(Exception):
    """The batch a request was in raised; ``__cause__`` is the model's exception."""


@dataclass
class _Request(Generic[Item, Result]):
    items: list[Item]
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    batches: int = 0
    prompts: int = 0
    failed_batches: int = 0

    def as_dict(self) -> dict:
        mean = self.prompts / self.batches if self.batches else 0.0
        return {"batches": self.batches, "prompts": self.prompts, "failed_batches": self.failed_batches,
                "mean_batch_size": round(mean, 2)}


class Batcher(Generic[Item, Result]):
    """``await submit(items)`` -> that request's results, from a ``run_batch(all items of a batch)`` call."""

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int, window_s: float,
                 max_queued: int = 4096):
        self.run_batch, self.max_batch, self.window_s, self.max_queued = run_batch, max_batch, window_s, max_queued
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Request] | None = None
        self._held: _Request | None = None  # a request that did not fit the last batch: first in the next
        self._worker: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megedit-model")
        self._worker = asyncio.get_running_loop().create_task(self._serve(), name="megedit-batcher")

    async def stop(self) -> None:
        """Stop taking batches; requests still queued fail (the batch in the model thread finishes first)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for request in self._drain():
            if not request.future.done():
                request.future.set_exception(BatchFailed("the server is shutting down"))
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._queue = self._worker = self._thread = None

    @property
    def queued(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + (self._held is not None)

    # ------------------------------------------------------------------ requests
    async def submit(self, items: Sequence[Item]) -> list[Result]:
        if self._queue is None:
            raise RuntimeError("Batcher.submit before start()")
        if not 1 <= len(items) <= self.max_batch:
            raise ValueError(f"a request carries 1..{self.max_batch} items, got {len(items)}")
        if self.queued >= self.max_queued:
            raise QueueFull(f"{self.queued} requests are already waiting")
        request = _Request(list(items), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(request)
        return await request.future

    # ------------------------------------------------------------------ the worker
    async def _serve(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _next(self) -> _Request:
        if self._held is not None:
            request, self._held = self._held, None
            return request
        return await self._queue.get()

    async def _collect(self) -> list[_Request]:
        """The next batch: the first live request and what fits after it, waiting the window at most once."""
        first = await self._next()
        if first.future.done():  # its client went away (cancelled) while it waited
            return []
        batch, size = [first], len(first.items)
        if self.window_s > 0 and self._queue.qsize() < self.max_batch - size:
            await asyncio.sleep(self.window_s)  # too few queued to fill the batch: give others the window
        while size < self.max_batch and not self._queue.empty():
            request = self._queue.get_nowait()
            if request.future.done():
                continue
            if size + len(request.items) > self.max_batch:
                self._held = request
                break
            batch.append(request)
            size += len(request.items)
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        items = [item for request in batch for item in request.items]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._thread, self._call, items)
        except Exception as exc:  # noqa: BLE001 - any model failure fails this batch, never the worker
            log.exception("batch of %d prompts failed", len(items))
            self.stats.failed_batches += 1
            for request in batch:
                if not request.future.done():
                    failure = BatchFailed(f"{type(exc).__name__}: {exc}")
                    failure.__cause__ = exc
                    request.future.set_exception(failure)
            return
        self.stats.batches += 1
        self.stats.prompts += len(items)
        start = 0
        for request in batch:
            end = start + len(request.items)
            if not request.future.done():
                request.future.set_result(results[start:end])
            start = end

    def _call(self, items: list) -> list:
        results = list(self.run_batch(items))
        if len(results) != len(items):
            raise RuntimeError(f"the model returned {len(results)} answers for {len(items)} prompts")
        return results

    def _drain(self) -> list[_Request]:
        pending = [self._held] if self._held is not None else []
        self._held = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        return pending
