"""Micro-batching: images from concurrent requests share model batches (bounded queue, bounded wait)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image


class QueueFull(Exception):
    """More work is waiting than the queue allows; the client should retry later (HTTP 503)."""


class Batcher:
    """One worker thread runs `read_batch` on queued images, up to `max_batch` windows of model work per call
    (a long crop is read in several windows), waiting at most `max_wait_ms` for a batch to fill. The queue holds
    at most `max_queue` windows. Requests await their own images' results."""

    def __init__(self, read_batch: Callable[[list[Image.Image]], list[Any]], max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 512) -> None:
        self.read_batch, self.max_batch, self.max_wait = read_batch, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # windows queued or being read
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="clip4str-batcher", daemon=True)
        self._stop = threading.Event()
        self.batches = 0
        self._thread.start()

    async def submit(self, images: Sequence[Image.Image], costs: Sequence[int] | None = None) -> list[Any]:
        """Results for `images`, in order; `costs` = windows of model work per image (1 each by default)."""
        costs = list(costs) if costs is not None else [1] * len(images)
        total = sum(costs)
        with self._lock:
            if self._pending + total > self.max_queue:
                raise QueueFull(f"{self._pending} windows of work are waiting, the queue holds {self.max_queue}")
            self._pending += total
        loop = asyncio.get_running_loop()
        futures = []
        for image, cost in zip(images, costs, strict=True):
            future = loop.create_future()
            self._queue.put_nowait((image, cost, future, loop))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    def _run(self) -> None:
        carry = None  # an item that did not fit the last batch starts the next one
        while not self._stop.is_set():
            try:
                first = carry or self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            carry, items = None, [first]
            work = first[1]
            deadline = time.monotonic() + self.max_wait
            while work < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if work + item[1] > self.max_batch:
                    carry = item
                    break
                items.append(item)
                work += item[1]
            live = [it for it in items if not it[2].cancelled()]
            try:
                results = self.read_batch([image for image, _, _, _ in live]) if live else []
                outcome = [(f, r, None) for (_, _, f, _), r in zip(live, results, strict=True)]
            except Exception as e:  # a failing batch fails its requests, never the worker
                outcome = [(f, None, e) for _, _, f, _ in live]
            with self._lock:
                self._pending -= work
            if not live:
                continue
            self.batches += 1
            for (_, _, _, loop), (future, result, error) in zip(live, outcome, strict=True):
                loop.call_soon_threadsafe(_settle, future, result, error)

    def close(self) -> None:
        """Stop the worker thread."""
        self._stop.set()
        self._thread.join(timeout=2)


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
