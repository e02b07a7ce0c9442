"""AsyncEngine: one background thread owns the Engine and steps it while there is work.

Front doors on an asyncio loop (the HTTP server) `add()` requests and read their outputs
from an asyncio.Queue (one per group of requests); after every step the thread hands the step's outputs
to the loop through a `_Waker` (a pipe the loop watches, written without letting go of the GIL). Requests join and leave between steps
(continuous batching is the Engine's own). `abort()` frees the request's cache slot at
once, from any thread. The thread sleeps on a condition while there is nothing to do.

Other torch work of the server (the inspector's forwards) runs on the same thread, between
two steps (`call`), never on a thread of its own: every thread that runs torch's parallel
ops gets its own OpenMP thread team, and once libgomp manages more threads than there are
cores it stops spinning between parallel regions, which halved the engine's speed for as
long as the other thread lived (measured: 4 streams went from ~170 to ~80 tok/s after a
few inspections, until the idle worker thread exited).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from pellucid.engine.engine import Engine
from pellucid.engine.request import Request, RequestOutput
from pellucid.errors import PellucidError
from pellucid.runtime import ENGINE


class EngineDead(PellucidError):
    """The engine thread failed on a step; the request cannot continue."""


def _gil_holding_write() -> Callable[[int], object]:
    """write(fd, one byte) that keeps the GIL (a ctypes.PyDLL call), else os.write.

    Any Python-level write lets the GIL go for the system call; the event loop it wakes then
    takes the GIL and handles the token (its socket writes included) while the engine thread,
    which woke it, waits to get the GIL back: about 0.3 ms of every SmolLM2 step (measured).
    Keeping the GIL, the engine thread goes on into the forward, which lets the GIL go for its
    C++ work, and the loop's work overlaps the forward instead of delaying it.
    """
    try:
        write = ctypes.PyDLL(None).write
        write.argtypes, write.restype = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t), ctypes.c_ssize_t
        return lambda fd: write(fd, b"\0", 1)
    except (OSError, AttributeError, TypeError):  # no C library symbols in this process (or no dlopen(NULL))
        return lambda fd: os.write(fd, b"\0")


_write_byte = _gil_holding_write()


class _Waker:
    """Hands items from any thread to one event loop: a deque and a pipe the loop reads.

    At most one byte is in the pipe at a time; the loop drains the deque on each wake-up, so
    outputs that pile up while it is busy arrive together. A loop that cannot watch a pipe
    (add_reader: not on Windows' proactor) is woken by call_soon_threadsafe instead. The
    hand-over relies on the GIL for the order of `pending` and the deque.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque[list] = deque()
        self.pending = self.closed = False
        self._fd_lock = threading.Lock()  # no write once close() has let the fds go (they may be reused)
        self.rfd = self.wfd = -1
        try:
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
            loop.add_reader(self.rfd, self._drain)
            self.piped = True
        except (NotImplementedError, OSError):
            self._close_fds()
            self.piped = False

    def post(self, items: list) -> None:
        """(queue, item) pairs to put on their queues on the loop's thread (call from any thread)."""
        if self.closed:
            return  # its loop has gone: nobody would read them
        self.items.append(items)
        if not self.pending:
            self.pending = True
            if self.piped:
                with self._fd_lock:
                    if not self.closed:
                        _write_byte(self.wfd)  # a full pipe refuses it: a wake-up is waiting anyway
            else:
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed
                    pass

    def _drain(self) -> None:
        if self.piped:
            try:
                os.read(self.rfd, 4096)
            except BlockingIOError:
                pass
        self.pending = False  # before emptying the deque: a post from now on writes again
        while self.items:
            for q, item in self.items.popleft():
                q.put_nowait(item)

    def close(self) -> None:
        """Stop watching the pipe and close it. On the loop's thread (or with the loop not
        running): what was posted before is delivered first."""
        if self.closed:
            return
        if not self.loop.is_closed():
            self._drain()
            if self.piped:
                self.loop.remove_reader(self.rfd)
        with self._fd_lock:
            self.closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1


@dataclass
class _Stream:
    waker: _Waker
    queue: asyncio.Queue


class RequestGroup:
    """The outputs of one or more requests (n choices, several prompts) on one queue.

    `get()` returns the next RequestOutput of any of them (`index[request_id]` says which);
    `abort()` stops those still running and frees their cache slots.
    """

    def __init__(self, engine: AsyncEngine, requests: list[Request], queue: asyncio.Queue):
        self.engine, self.requests, self.queue = engine, requests, queue
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self._left = len(requests)

    async def get(self) -> RequestOutput:
        return self._take(await self.queue.get())

    def get_nowait(self) -> RequestOutput | None:
        """The next output if one is already queued (to merge a backlog into one message)."""
        try:
            item = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        return self._take(item)

    def _take(self, item) -> RequestOutput:
        if isinstance(item, RequestOutput) and item.finish_reason == "error":
            item = EngineDead(item.error, status=500, code="engine_error")  # this request alone failed
        if isinstance(item, BaseException):
            self._left = 0
            raise item
        if item.finished:
            self._left -= 1
        return item

    @property
    def done(self) -> bool:
        """Every request's final output has been taken."""
        return self._left <= 0

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.done:
                yield await self.get()
        finally:
            self.abort()

    def abort(self) -> list[str]:
        """Abort the requests that have not finished; returns their ids."""
        ids = [r.request_id for r in self.requests if not r.finished]
        for rid in ids:
            self.engine.abort(rid)
        return ids


class AsyncEngine:
    """Runs `engine.step()` on a background thread; thread-safe add/abort."""

    def __init__(self, engine: Engine, *, max_waiting: int = ENGINE.max_waiting, num_threads: int | None = None,
                 on_step: Callable[[Engine, list[RequestOutput], float], None] | None = None):  # fmt: skip
        self.engine = engine
        self.max_waiting = max_waiting
        self.num_threads = num_threads
        self.on_step = on_step  # called on the engine thread after every step (metrics)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._calls: deque[tuple[concurrent.futures.Future, Callable[[], Any]]] = deque()
        self._wakers: dict[asyncio.AbstractEventLoop, _Waker] = {}  # one per event loop that adds requests
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the last step failure, for /health
        self.busy_seconds = 0.0  # wall time spent in steps
        self.cpu_seconds = 0.0  # CPU time of the engine thread spent in steps

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pellucid-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for rid in list(self._streams):
            self.engine.abort(rid)
        self._streams.clear()
        with self._lock:
            wakers = list(self._wakers.values())
            self._wakers.clear()
        for waker in wakers:
            if waker.loop.is_running() and not waker.loop.is_closed():
                try:
                    waker.loop.call_soon_threadsafe(waker.close)  # on its own thread
                    continue
                except RuntimeError:  # closed meanwhile
                    pass
            waker.close()  # nothing runs the loop: safe from here

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests (call from the event loop) --------------------------------------------
    def num_waiting(self) -> int:
        return sum(1 for r in list(self.engine.waiting) if not r.finished)

    def add(self, req: Request) -> RequestGroup:
        """Queue `req`; its outputs arrive on the returned group. 429 if the queue is full."""
        return self.add_many([req])

    def add_many(self, reqs: list[Request]) -> RequestGroup:
        """Queue several requests at once, all or none; their outputs share one queue."""
        loop = asyncio.get_running_loop()
        if not self.alive:
            raise PellucidError("the engine is not running", status=503, code="engine_not_running")
        with self._wake:
            waiting = self.num_waiting()
            free = self.engine.max_batch - len(self.engine.running)
            if waiting + len(reqs) - max(free, 0) > self.max_waiting:
                raise PellucidError(
                    f"the server is busy: {waiting} requests are waiting (the limit is {self.max_waiting}); retry later",
                    status=429, code="rate_limit_exceeded",
                )  # fmt: skip
            q: asyncio.Queue = asyncio.Queue()
            waker = self._waker(loop)
            for req in reqs:
                self._streams[req.request_id] = _Stream(waker, q)
        try:
            for req in reqs:
                self.engine.add_request(req)
        except BaseException:
            for req in reqs:
                self.abort(req.request_id)
            raise
        with self._wake:
            self._wake.notify()
        return RequestGroup(self, reqs, q)

    def _waker(self, loop: asyncio.AbstractEventLoop) -> _Waker:
        """This loop's waker (made on first use; the wakers of closed loops are closed). Holds _lock."""
        waker = self._wakers.get(loop)
        if waker is None:
            for old in [w for w in self._wakers.values() if w.loop.is_closed()]:
                del self._wakers[old.loop]
                old.close()
            waker = self._wakers[loop] = _Waker(loop)
        return waker

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        with self._lock:
            self._streams.pop(request_id, None)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """fn() on the engine thread before its next step (see the module docstring for why);
        a future of its result. Cancel it to drop a call that has not started."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(PellucidError("the engine is not running", status=503, code="engine_not_running"))
            return fut
        with self._wake:
            self._calls.append((fut, fn))
            self._wake.notify()
        return fut

    # -- the loop (engine thread) -------------------------------------------------------
    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        while True:
            with self._wake:
                while not self._stop and not self._calls and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stop:
                    for fut, _ in self._calls:
                        fut.cancel()
                    return
                calls = self._take_calls() if self._calls else ()
            for fut, fn in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # the caller gets it; the engine goes on
                        fut.set_exception(e)
            if not self.engine.has_unfinished():
                continue
            t, c = time.perf_counter(), time.thread_time()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step must not kill the server: fail its requests
                self.error = e
                self._fail_all(e)
                continue
            self._deliver(outputs)
            dt = time.perf_counter() - t
            self.busy_seconds += dt
            self.cpu_seconds += time.thread_time() - c
            if self.on_step is not None:
                try:
                    self.on_step(self.engine, outputs, dt)
                except Exception as e:  # metrics must never stop generation
                    self.error = e

    def _take_calls(self) -> list:
        calls = list(self._calls)
        self._calls.clear()
        return calls

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[_Waker, list] = {}
        with self._lock:
            for out in outputs:
                s = self._streams.get(out.request_id)
                if s is None:
                    continue  # aborted: nobody is listening
                batches.setdefault(s.waker, []).append((s.queue, out))
                if out.finished:
                    del self._streams[out.request_id]
        for waker, items in batches.items():
            waker.post(items)

    def end_all(self, message: str) -> None:
        """End every request with a 503 saying `message` (shutting down): each stream ends with it, cleanly."""
        self._fail_with(PellucidError(message, status=503, code="server_shutting_down"))

    def _fail_all(self, e: Exception) -> None:
        self._fail_with(EngineDead(f"generation failed inside the engine: {type(e).__name__}: {e}", status=500, code="engine_error"))

    def _fail_with(self, err: PellucidError) -> None:
        with self._lock:
            streams = dict(self._streams)
            self._streams.clear()
        for rid, s in streams.items():
            self.engine.abort(rid)
            s.waker.post([(s.queue, err)])
        # Requests that were added without a stream still need to leave the engine.
        for req in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(req.request_id)
