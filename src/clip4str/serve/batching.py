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
    """More images are waiting than the queue allows; the client should retry later (HTTP 503)."""


class Batcher:
    """One worker thread runs `read_batch` on up to `max_batch` queued images, waiting at most `max_wait_ms`
    for a batch to fill. Requests await their own images' results."""

    def __init__(self, read_batch: Callable[[list[Image.Image]], list[Any]], max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 512) -> None:
        self.read_batch, self.max_batch, self.max_wait = read_batch, max_batch, max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="clip4str-batcher", daemon=True)
        self._stop = threading.Event()
        self.batches = 0
        self._thread.start()

    async def submit(self, images: Sequence[Image.Image]) -> list[Any]:
        """Results for `images`, in order."""
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            try:
                self._queue.put_nowait((image, future, loop))
            except queue.Full as e:
                for f in futures:
                    f.cancel()
                raise QueueFull(f"{self._queue.maxsize} images are already waiting") from e
            futures.append(future)
        return list(await asyncio.gather(*futures))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            items = [first]
            deadline = time.monotonic() + self.max_wait
            while len(items) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    items.append(self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else
                                 self._queue.get_nowait())
                except queue.Empty:
                    break
            live = [it for it in items if not it[1].cancelled()]
            if not live:
                continue
            try:
                results = self.read_batch([image for image, _, _ in live])
                outcome = [(f, r, None) for (_, f, _), r in zip(live, results, strict=True)]
            except Exception as e:  # a failing batch fails its requests, never the worker
                outcome = [(f, None, e) for _, f, _ in live]
            self.batches += 1
            for (_, _, loop), (future, result, error) in zip(live, outcome, strict=True):
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
