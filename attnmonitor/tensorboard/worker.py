"""Drawing figures off the training thread: one background worker, a bounded queue, errors warned."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class FigureWorker:
    """Runs figure jobs (render, then write to TensorBoard) one at a time on a background thread.

    The training step only hands over a job whose data is already on the CPU. When ``max_pending``
    jobs are waiting, a new one is skipped and counted (memory never grows); an exception in a job is
    warned about, never raised into training.

    Args:
        max_pending: jobs queued or running at most.
    """

    def __init__(self, max_pending: int = 8) -> None:
        self.max_pending = max_pending
        self.skipped = 0
        """Jobs skipped because the queue was full."""
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, int]:
        """Pickling (Hydra multirun, checkpoints of the callback) keeps the settings, not the thread."""
        return {"max_pending": self.max_pending, "skipped": self.skipped}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_pending"])  # type: ignore[misc]
        self.skipped = state["skipped"]

    def submit(self, job: Callable[[], None], name: str) -> bool:
        """Queue ``job`` (``name`` for messages); returns False when it was skipped."""
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.skipped += 1
                message = f"attnmonitor: figures of {name} skipped: {self.max_pending} figure jobs still pending."
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                return False
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnmonitor-figures")
            future = self._executor.submit(job)
            self._pending.add(future)
        future.add_done_callback(lambda done: self._finished(done, name))
        return True

    def _finished(self, future: Future[None], name: str) -> None:
        with self._lock:
            self._pending.discard(future)
        error = future.exception()
        if error is not None:
            warnings.warn(f"attnmonitor: drawing the figures of {name} failed: {error!r}", RuntimeWarning, stacklevel=2)

    def flush(self) -> None:
        """Wait for every queued job (end of training: nothing pending is lost)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.exception()  # waits; the error, if any, was warned about

    def close(self) -> None:
        """Finish every job, then stop the thread (idempotent)."""
        self.flush()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
