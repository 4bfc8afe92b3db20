"""Slow work kept off what every request needs (docs/operating.md, Isolation).

Two kinds of request can last as long as someone else decides:

- a synchronous test delivery waits for the receiver. It is sent on threads of its own
  (``SendingThreads``), never on the worker threads every other route's unit of work runs on; when
  all of them are busy the caller gets 429 at once rather than a place in a queue;
- an operation's event stream stays open for as long as its client wants. Each API key may
  hold a few at once in a process (``StreamSlots``); a slot is given back whenever the
  response ends: the operation ended, the stream hit its lifetime, or the client went away.
"""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from models.errors import RateLimited

T = TypeVar("T")

# What a caller refused a stream is told to wait: streams end with their operation, at any time.
STREAM_RETRY_AFTER_S = 5


class Reservation:
    """A thread of a ``SendingThreads`` pool, held until the work handed to it ends."""

    def __init__(self, pool: SendingThreads):
        self._pool = pool
        self.handed_off = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the reserved thread. The thread is given back when ``fn`` returns,
        even if the awaiting request has gone away meanwhile."""
        future = self._pool.executor.submit(fn, *args)
        self.handed_off = True
        future.add_done_callback(self._pool.give_back)  # once: done, failed or canceled
        return await asyncio.wrap_future(future)


class SendingThreads:
    """At most ``threads`` test deliveries sending at once in this process, on their own
    threads."""

    def __init__(self, threads: int):
        self.threads = threads
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="test-send")
        self._free = threading.BoundedSemaphore(threads)

    @contextmanager
    def reserve(self, retry_after: float) -> Iterator[Reservation]:
        """A thread for one test, or ``RateLimited`` (telling to retry after ``retry_after``
        seconds) when all are busy. Given back on leaving the block unless work was handed to
        it (then when that work ends)."""
        if not self._free.acquire(blocking=False):
            raise RateLimited(retry_after=math.ceil(retry_after))
        reservation = Reservation(self)
        try:
            yield reservation
        finally:
            if not reservation.handed_off:
                self._free.release()

    def give_back(self, _done: Future[Any] | None = None) -> None:
        self._free.release()


@cache
def sending_threads(threads: int) -> SendingThreads:
    """The process's test-delivery threads (``ROTATOR_SYNC_TEST_THREADS``)."""
    return SendingThreads(threads)


class StreamSlots:
    """Open event streams per API key, in this process."""

    def __init__(self) -> None:
        self._open: dict[uuid.UUID, int] = {}
        self._lock = threading.Lock()

    def open(self, key_id: uuid.UUID) -> int:
        with self._lock:
            return self._open.get(key_id, 0)

    def take(self, key_id: uuid.UUID, limit: int) -> Callable[[], None]:
        """A slot for one more stream of ``key_id`` (else ``RateLimited``); the function that
        gives it back (once, however often it is called)."""
        with self._lock:
            if self._open.get(key_id, 0) >= limit:
                raise RateLimited(retry_after=STREAM_RETRY_AFTER_S)
            self._open[key_id] = self._open.get(key_id, 0) + 1
        held = True

        def give_back() -> None:
            nonlocal held
            with self._lock:
                if not held:
                    return
                held = False
                left = self._open[key_id] - 1
                if left:
                    self._open[key_id] = left
                else:
                    del self._open[key_id]

        return give_back


streams = StreamSlots()


class HeldStreamingResponse(StreamingResponse):
    """A streaming response that gives back its slot when it ends, however it ends: its
    iterator finished, the server cancelled it on the client's disconnect, or sending failed."""

    def __init__(self, content: Any, *, release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
