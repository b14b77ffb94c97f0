"""Inference engine: runs ``predict_fn(window) -> WindowPrediction`` on a worker thread.

- Bounded queue of ``queue_depth`` windows; when full the OLDEST queued window is dropped
  (reason ``queue_full``), so the newest data is always processed next.
- Exceptions of ``predict_fn`` are caught, reported through ``on_error(window, exc)`` and counted
  (``engine_error``); the worker keeps running.
- Out of memory (``torch.cuda.OutOfMemoryError``, ``MemoryError`` or a RuntimeError whose message
  contains "out of memory"): ``on_oom()`` is called (e.g. ``torch.cuda.empty_cache``), then the window
  is retried with its views subsampled by ``oom_subsample`` up to ``oom_retries`` times; after that it is
  dropped with reason ``oom``.
- ``stop(timeout)`` returns within ``timeout`` even while ``predict_fn`` is running (the worker is a
  daemon thread; a result that completes after stop is discarded as ``shutdown``, and so is a
  prediction that raises after stop, e.g. aborted by ``model.interrupt.abort_forwards``). Queued windows
  are dropped as ``shutdown``.
- A window without views is dropped with reason ``empty_window`` (``predict_fn`` is not called).
- ``process_now(window)``: synchronous mode for offline replay, nothing is dropped for lack of time.

Callbacks ``on_result(window, prediction)`` and ``on_drop(window, reason)`` always receive the window
as submitted (even when the prediction came from a subsampled retry) and run on the worker thread in
asynchronous mode. Each submitted window ends in exactly one of on_result / on_drop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from fast3dis_ros.core.frames import FrameSet, Window, WindowPrediction
from fast3dis_ros.core.stats import DropCounter, LatencyStats

__all__ = ["InferenceEngine", "is_oom_error", "subsample_window"]

log = logging.getLogger(__name__)


def is_oom_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def subsample_window(window: Window, factor: float = 0.5) -> Window:
    """A window with about ``factor`` of the views: every k-th frame set (newest always kept); a
    single-set window keeps a subset of its cameras instead. Never returns zero views."""
    sets = window.frame_sets
    if len(sets) > 1:
        keep = max(1, int(len(sets) * factor))
        step = len(sets) / keep
        idx = sorted({len(sets) - 1 - int(i * step) for i in range(keep)})
        new_sets = [sets[i] for i in idx]
    else:
        fs = sets[0]
        keep = max(1, int(len(fs.frames) * factor))
        new_sets = [FrameSet(fs.index, fs.stamp_ns, fs.frames[:keep])]
    return Window(window.index, new_sets, created_ns=window.created_ns)


class InferenceEngine:
    def __init__(
        self,
        predict_fn: Callable[[Window], WindowPrediction],
        queue_depth: int = 2,
        on_result: Callable[[Window, WindowPrediction], None] | None = None,
        on_drop: Callable[[Window, str], None] | None = None,
        on_error: Callable[[Window, BaseException], None] | None = None,
        on_oom: Callable[[], None] | None = None,
        oom_retries: int = 1,
        oom_subsample: float = 0.5,
        clock: Callable[[], int] = time.monotonic_ns,
        start: bool = True,
        name: str = "fast3dis-engine",
    ) -> None:
        if queue_depth < 1:
            raise ValueError("InferenceEngine: queue_depth must be >= 1")
        if not 0 < oom_subsample < 1:
            raise ValueError("InferenceEngine: oom_subsample must be in (0, 1)")
        self.predict_fn = predict_fn
        self.queue_depth = int(queue_depth)
        self.on_result = on_result
        self.on_drop = on_drop
        self.on_error = on_error
        self.on_oom = on_oom
        self.oom_retries = int(oom_retries)
        self.oom_subsample = float(oom_subsample)
        self.clock = clock
        self.name = name
        self.drops = DropCounter()
        self.engine_ms = LatencyStats()
        self.queue_wait_ms = LatencyStats()
        self.e2e_ms = LatencyStats()
        self.submitted = 0
        self.processed = 0
        self.errors = 0
        self.oom_retried = 0
        self._q: deque[tuple[Window, int]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._busy = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop the worker; returns True if it ended within ``timeout`` s (else it is left to finish as a
        daemon and its result is discarded). Queued windows are dropped as 'shutdown'."""
        with self._cv:
            self._stop = True
            pending = list(self._q)
            self._q.clear()
            self._cv.notify_all()
        for w, _ in pending:
            self._drop(w, "shutdown")
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread (None in synchronous mode before ``start``)."""
        return self._thread

    def busy_in(self, depth: int = 3) -> str:
        """Where the worker thread is now (innermost ``depth`` frames), for a log line when it does not stop."""
        import sys
        import traceback

        t = self._thread
        frame = sys._current_frames().get(t.ident) if t is not None and t.ident is not None else None
        if frame is None:
            return "not running"
        return " <- ".join(f"{fs.name} ({fs.filename.rsplit('/', 1)[-1]}:{fs.lineno})"
                           for fs in reversed(traceback.extract_stack(frame)[-depth:]))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def queue_len(self) -> int:
        with self._cv:
            return len(self._q)

    def idle(self) -> bool:
        with self._cv:
            return not self._q and not self._busy

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and no window is in flight (True) or timeout (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._q or self._busy:
                rem = None if end is None else end - time.monotonic()
                if rem is not None and rem <= 0:
                    return False
                self._cv.wait(rem if rem is not None else 0.1)
            return True

    # ------------------------------------------------------------------ submission
    def submit(self, window: Window) -> None:
        """Queue a window (asynchronous mode). Drops the oldest queued window when full."""
        dropped = []
        with self._cv:
            self.submitted += 1
            if self._stop:
                dropped.append(window)
            else:
                while len(self._q) >= self.queue_depth:
                    dropped.append(self._q.popleft()[0])
                self._q.append((window, self.clock()))
                self._cv.notify_all()
        for w in dropped:
            self._drop(w, "shutdown" if w is window else "queue_full")

    def process_now(self, window: Window, raise_errors: bool = False) -> WindowPrediction | None:
        """Synchronous: predict (with the OOM fallback) in the caller's thread; calls on_result /
        on_drop like the worker. Returns the prediction or None (error / oom)."""
        self.submitted += 1
        return self._process(window, self.clock(), raise_errors=raise_errors, check_stop=False)

    # ------------------------------------------------------------------ internals
    def _drop(self, window: Window, reason: str) -> None:
        self.drops.add(reason)
        if self.on_drop is not None:
            try:
                self.on_drop(window, reason)
            except Exception:  # a callback must not kill the worker
                log.exception("on_drop callback failed")

    def _process(self, window: Window, enq_ns: int, raise_errors: bool, check_stop: bool):
        t_start = self.clock()
        self.queue_wait_ms.add((t_start - enq_ns) / 1e6)
        if window.n_views == 0:  # nothing to predict on: a counted drop, not a predictor exception
            log.warning("window %d has no views: dropped", window.index)
            self._drop(window, "empty_window")
            return None
        attempt = window
        retries = 0
        while True:
            t0 = self.clock()
            try:
                pred = self.predict_fn(attempt)
                break
            except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                if check_stop and self._stop:  # aborted by the shutdown (model.interrupt): not an error
                    self._drop(window, "shutdown")
                    return None
                if is_oom_error(exc):
                    if self.on_oom is not None:
                        try:
                            self.on_oom()
                        except Exception:
                            log.exception("on_oom hook failed")
                    if retries < self.oom_retries and attempt.n_views > 1:
                        retries += 1
                        self.oom_retried += 1
                        attempt = subsample_window(attempt, self.oom_subsample)
                        log.warning("window %d: out of memory, retrying with %d views", window.index,
                                    attempt.n_views)
                        continue
                    self._drop(window, "oom")
                    if raise_errors:
                        raise
                    return None
                self.errors += 1
                log.error("window %d: predict failed: %r", window.index, exc)
                if self.on_error is not None:
                    try:
                        self.on_error(window, exc)
                    except Exception:
                        log.exception("on_error callback failed")
                self._drop(window, "engine_error")
                if raise_errors:
                    raise
                return None
        t1 = self.clock()
        ms = (t1 - t0) / 1e6
        try:
            pred.engine_ms = ms
        except Exception:
            pass
        if check_stop and self._stop:
            self._drop(window, "shutdown")
            return None
        self.engine_ms.add(ms)
        if window.created_ns:
            self.e2e_ms.add((t1 - window.created_ns) / 1e6)
        self.processed += 1
        if self.on_result is not None:
            try:
                self.on_result(window, pred)
            except Exception as exc:
                log.exception("on_result callback failed")
                if self.on_error is not None:
                    try:
                        self.on_error(window, exc)
                    except Exception:
                        log.exception("on_error callback failed")
                if raise_errors:
                    raise
        return pred

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                window, enq = self._q.popleft()
                self._busy = True
            try:
                self._process(window, enq, raise_errors=False, check_stop=True)
            except BaseException:  # pragma: no cover - _process already guards
                log.exception("engine worker: unexpected failure")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def stats(self) -> dict:
        return {
            "submitted": self.submitted,
            "processed": self.processed,
            "errors": self.errors,
            "oom_retried": self.oom_retried,
            "queue_len": self.queue_len(),
            "drops": self.drops.as_dict(),
            "engine_ms": self.engine_ms.as_dict(),
            "queue_wait_ms": self.queue_wait_ms.as_dict(),
            "e2e_ms": self.e2e_ms.as_dict(),
        }
