"""InferenceEngine: drop-oldest queue, prompt stop, error counting, OOM retry, synchronous mode."""

import threading
import time

import numpy as np
import pytest

from fast3dis_ros.pipeline.engine import InferenceEngine, is_oom_error, subsample_window
from fast3dis_ros.core.frames import CameraFrame, FrameSet, Window

IMG = np.zeros((2, 2, 3), np.uint8)


def win(i, n_sets=4, n_cams=2):
    sets = [FrameSet(i * 10 + k, k, [CameraFrame(f"c{c}", k, IMG) for c in range(n_cams)]) for k in range(n_sets)]
    return Window(i, sets, created_ns=time.monotonic_ns())


class Recorder:
    def __init__(self):
        self.results, self.drops, self.errors = [], [], []
        self.lock = threading.Lock()

    def on_result(self, w, p):
        with self.lock:
            self.results.append((w.index, p))

    def on_drop(self, w, reason):
        with self.lock:
            self.drops.append((w.index, reason))

    def on_error(self, w, e):
        with self.lock:
            self.errors.append((w.index, e))


def test_drops_oldest_when_slow():
    gate = threading.Event()
    started = threading.Event()

    def predict(w):
        started.set()
        gate.wait(5)
        return w.index

    r = Recorder()
    eng = InferenceEngine(predict, queue_depth=2, on_result=r.on_result, on_drop=r.on_drop)
    eng.submit(win(0))
    assert started.wait(2)  # window 0 in flight
    for i in range(1, 6):
        eng.submit(win(i))
    assert r.drops == [(1, "queue_full"), (2, "queue_full"), (3, "queue_full")]
    assert eng.queue_len() == 2
    gate.set()
    assert eng.wait_idle(5)
    assert [i for i, _ in r.results] == [0, 4, 5]
    assert eng.drops.as_dict() == {"queue_full": 3}
    st = eng.stats()
    assert st["processed"] == 3 and st["engine_ms"]["count"] == 3 and st["queue_wait_ms"]["count"] == 3
    assert st["e2e_ms"]["max"] >= st["engine_ms"]["max"] > 0
    assert eng.stop(1.0)


def test_stop_returns_promptly_mid_inference():
    started = threading.Event()

    def predict(w):
        started.set()
        time.sleep(3.0)
        return w.index

    r = Recorder()
    eng = InferenceEngine(predict, queue_depth=4, on_result=r.on_result, on_drop=r.on_drop)
    eng.submit(win(0))
    eng.submit(win(1))
    assert started.wait(2)
    t0 = time.monotonic()
    finished = eng.stop(timeout=0.5)
    assert time.monotonic() - t0 < 1.0
    assert finished is False  # still sleeping in predict, left as a daemon
    assert r.drops == [(1, "shutdown")]
    eng.submit(win(2))  # after stop: dropped, not queued
    assert (2, "shutdown") in r.drops and eng.queue_len() == 0


def test_errors_counted_and_worker_survives():
    def predict(w):
        if w.index % 2:
            raise ValueError(f"bad window {w.index}")
        return w.index

    r = Recorder()
    eng = InferenceEngine(predict, queue_depth=10, on_result=r.on_result, on_drop=r.on_drop, on_error=r.on_error)
    for i in range(6):
        eng.submit(win(i))
    assert eng.wait_idle(5)
    assert [i for i, _ in r.results] == [0, 2, 4]
    assert [i for i, _ in r.errors] == [1, 3, 5] and isinstance(r.errors[0][1], ValueError)
    assert eng.drops.as_dict() == {"engine_error": 3} and eng.errors == 3
    assert eng.running
    eng.stop()


def test_oom_retries_with_half_views_then_drops():
    calls = []
    cleared = []

    def predict(w):
        calls.append(w.n_views)
        if w.n_views > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return w.n_views

    r = Recorder()
    eng = InferenceEngine(predict, on_result=r.on_result, on_drop=r.on_drop, on_oom=lambda: cleared.append(1),
                          start=False)
    p = eng.process_now(win(0, n_sets=4))  # 8 views -> 4 views
    assert p == 4 and calls == [8, 4] and cleared == [1] and eng.oom_retried == 1
    assert r.results[0][0] == 0  # callback gets the submitted window
    calls.clear()
    assert eng.process_now(win(1, n_sets=8)) is None  # 16 -> 8 -> still OOM after 1 retry: dropped
    assert calls == [16, 8] and r.drops == [(1, "oom")] and eng.drops.as_dict() == {"oom": 1}


def test_is_oom_error_and_subsample():
    class OutOfMemoryError(RuntimeError):
        pass

    assert is_oom_error(OutOfMemoryError("x")) and is_oom_error(MemoryError())
    assert not is_oom_error(RuntimeError("shape mismatch"))
    w = win(0, n_sets=5)
    s = subsample_window(w)
    assert [fs.index for fs in s.frame_sets] == [2, 4] and s.frame_sets[-1] is w.frame_sets[-1]
    one = subsample_window(win(0, n_sets=1, n_cams=4))
    assert one.n_views == 2


def test_process_now_sync_mode_never_drops():
    r = Recorder()
    eng = InferenceEngine(lambda w: w.index * 2, queue_depth=1, on_result=r.on_result, on_drop=r.on_drop, start=False)
    assert [eng.process_now(win(i)) for i in range(5)] == [0, 2, 4, 6, 8]
    assert r.drops == [] and len(r.results) == 5
    with pytest.raises(ZeroDivisionError):
        InferenceEngine(lambda w: 1 / 0, start=False).process_now(win(0), raise_errors=True)
