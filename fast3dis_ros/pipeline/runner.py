"""PipelineRunner: sync -> sliding window -> inference engine -> map fusion, with full accounting.

Used by the ROS node (asynchronous: ``sync_mode=False``, the engine drops the oldest queued window when
inference is slower than the input) and by offline replay (``sync_mode=True``: every window is
processed in the caller's thread, nothing is dropped for lack of time).

Accounting is per frame set (output of the synchroniser): a set is *processed* once every window that
contains it has finished and at least one of them was fused; it is *dropped* (reason of its last
window's drop: queue_full, oom, engine_error, fusion_error, shutdown; or ``not_windowed`` when it was
never part of a window, e.g. stride > window_size, or ``reset`` after a time jump before windowing) when
none was. ``accounting()['frame_sets']`` satisfies received == processed + sum(dropped) + in_flight, and
in_flight == 0 after ``flush()``. Per-frame drops of the synchroniser are reported under ``frames``.

Before fusion every prediction goes through ``sanitize_prediction``: views whose camera pose or
intrinsics are not finite are removed (counted in ``fusion.events`` as ``view_nonfinite_pose`` /
``view_nonfinite_K``); a window left without any usable view is dropped with reason
``nonfinite_prediction``. A NaN pose would otherwise poison the fusion's view memory and alignment (and
the voxel keys) for later windows. Non-finite depth pixels (lifting skips them) are counted as
``nonfinite_depth_px`` once the window is done, off its latency path.

Fusion runs in two steps (``MapFusion.begin`` / ``commit``) with ``on_window(WindowResult, prediction)``
in between: the window's cloud in ``map`` with global ids and its camera poses are ready before the map
update, so a publisher can send them first; ``on_fusion(FusionResult, prediction)`` follows the update.
An ``on_window`` that raises is reported through ``on_error`` and does not stop the map update.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable

from fast3dis_ros.pipeline.engine import InferenceEngine
from fast3dis_ros.core.frames import CameraFrame, FrameSet, Window, WindowPrediction
from fast3dis_ros.pipeline.fusion import FusionResult, MapFusion, WindowResult
from fast3dis_ros.core.stats import DropCounter, LatencyStats
from fast3dis_ros.pipeline.sync import ApproximateTimeSync
from fast3dis_ros.pipeline.window import SlidingWindow, SyncWatchdog

__all__ = ["PipelineRunner", "sanitize_prediction", "count_nonfinite"]

log = logging.getLogger(__name__)


def count_nonfinite(a) -> int:
    """Number of non-finite values of a float array (one reduction when all are finite, the common case)."""
    import numpy as np

    a = np.asarray(a)
    if a.size == 0 or not np.issubdtype(a.dtype, np.floating):
        return 0
    with np.errstate(all="ignore"):
        total = np.add.reduce(a, axis=None, dtype=np.float64)
    if np.isfinite(total):  # any inf / nan would make the float64 sum non-finite (no overflow below 1e308)
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def sanitize_prediction(pred: WindowPrediction, count_nonfinite_depth: bool = True
                        ) -> tuple[WindowPrediction | None, dict[str, int]]:
    """(prediction restricted to views with finite pose and K, or None if none is left; event counts).

    ``count_nonfinite_depth=False``: leave out the ``nonfinite_depth_px`` count (a pass over every depth
    pixel; the runner counts it after the window's outputs are out)."""
    import numpy as np

    ev: dict[str, int] = {}
    V = int(np.asarray(pred.depth).shape[0]) if getattr(pred, "depth", None) is not None else 0
    if V == 0:
        return None, {"empty_prediction": 1}
    T = np.asarray(pred.T_cam_world, np.float64).reshape(V, -1)
    K = np.asarray(pred.K, np.float64).reshape(V, -1)
    pose_ok = np.isfinite(T).all(axis=1)
    k_ok = np.isfinite(K).all(axis=1) & (np.abs(K).sum(axis=1) > 0)
    if (~pose_ok).any():
        ev["view_nonfinite_pose"] = int((~pose_ok).sum())
    if (pose_ok & ~k_ok).any():
        ev["view_nonfinite_K"] = int((pose_ok & ~k_ok).sum())
    keep = pose_ok & k_ok
    bad_px = count_nonfinite(pred.depth) if count_nonfinite_depth else 0
    if bad_px:
        ev["nonfinite_depth_px"] = bad_px
    if keep.all():
        return pred, ev
    if not keep.any():
        return None, ev
    idx = np.flatnonzero(keep)
    sub = lambda a: None if a is None else np.asarray(a)[idx]  # noqa: E731
    out = copy.copy(pred)
    out.cameras = [pred.cameras[i] for i in idx]
    out.frame_ids = [pred.frame_ids[i] for i in idx]
    out.view_stamps_ns = [pred.view_stamps_ns[i] for i in idx]
    out.images, out.depth, out.depth_conf = sub(pred.images), sub(pred.depth), sub(pred.depth_conf)
    out.K, out.T_cam_world, out.labels = sub(pred.K), sub(pred.T_cam_world), sub(pred.labels)
    out.T_world_cam_known = sub(pred.T_world_cam_known)
    out.T_rig_cam_known = sub(pred.T_rig_cam_known)
    return out, ev


class _SetState:
    __slots__ = ("outstanding", "processed", "reason", "in_buffer")

    def __init__(self) -> None:
        self.outstanding = 0
        self.processed = False
        self.reason: str | None = None
        self.in_buffer = True


class PipelineRunner:
    def __init__(
        self,
        cameras: list[str],
        predict_fn: Callable[[Window], WindowPrediction],
        slop_ns: int = 20_000_000,
        sync_queue_size: int = 10,
        jump_back_ns: int = 1_000_000_000,
        window_size: int = 4,
        stride: int = 2,
        max_views: int | None = None,
        fusion: MapFusion | dict | None = None,
        sync_mode: bool = False,
        queue_depth: int = 2,
        oom_retries: int = 1,
        oom_subsample: float = 0.5,
        on_oom: Callable[[], None] | None = None,
        on_fusion: Callable[[FusionResult, WindowPrediction], None] | None = None,
        on_window: Callable[[WindowResult, WindowPrediction], None] | None = None,
        on_prediction: Callable[[Window, WindowPrediction], None] | None = None,
        on_error: Callable[[Window, BaseException], None] | None = None,
        watchdog_timeout_ns: int = 2_000_000_000,
        reset_map_on_time_jump: bool = True,
        clock: Callable[[], int] = time.monotonic_ns,
        sync=None,
        jump_confirm: int = 1,
        sync_max_bytes: int = 0,
        on_time_jump: Callable[[dict | None, bool], None] | None = None,
    ) -> None:
        """``sync``: an alternative synchroniser with the ``ApproximateTimeSync`` interface (``push``,
        ``flush``, ``pushed``, ``emitted_sets``, ``pending_count``, ``drops``, ``resets``), e.g. the ROS
        layer's message_filters adapter; default: the project's ``ApproximateTimeSync`` with
        ``jump_confirm`` / ``sync_max_bytes`` (see ``pipeline/sync.py``). ``on_time_jump(jump, map_reset)``
        is told of every adopted backward jump (after the window, and with ``reset_map_on_time_jump`` the
        map, were reset)."""
        self.cameras = list(cameras)
        self.sync_mode = bool(sync_mode)
        self.clock = clock
        self.on_fusion = on_fusion
        self.on_window = on_window
        self.on_prediction = on_prediction
        self.on_error_cb = on_error
        self.reset_map_on_time_jump = reset_map_on_time_jump
        self.on_time_jump = on_time_jump
        # windows in a row whose prediction had no finite depth at all (e.g. a checkpoint of NaN weights)
        self.nonfinite_windows_in_a_row = 0
        self.fusion = fusion if isinstance(fusion, MapFusion) else MapFusion(**(fusion or {}))
        self._lock = threading.RLock()  # accounting
        self._fusion_lock = threading.Lock()  # map state (fusion runs on the engine thread when async)
        self._sets: dict[int, _SetState] = {}
        self.received = 0
        self.processed = 0
        self.dropped = DropCounter()
        self.fusion_ms = LatencyStats()
        self.e2e_ms = LatencyStats()  # window creation -> fusion result
        self.window_e2e_ms = LatencyStats()  # window creation -> on_window called (window cloud ready)
        self.sync = sync if sync is not None else ApproximateTimeSync(
            self.cameras, slop_ns, sync_queue_size, jump_back_ns, on_reset=self._on_time_jump,
            jump_confirm=jump_confirm, max_bytes=sync_max_bytes, clock=clock)
        self.window = SlidingWindow(window_size, stride, max_views, on_evict=self._on_evict, clock=clock)
        self.watchdog = SyncWatchdog(self.cameras, watchdog_timeout_ns, clock=clock)
        self.engine = InferenceEngine(predict_fn, queue_depth, on_result=self._on_result, on_drop=self._on_drop,
                                      on_error=self._on_engine_error, on_oom=on_oom, oom_retries=oom_retries,
                                      oom_subsample=oom_subsample, clock=clock, start=not self.sync_mode)
        self.windows_emitted = 0
        self.last_result: FusionResult | None = None

    # ------------------------------------------------------------------ input
    def feed(self, frame: CameraFrame) -> None:
        self.watchdog.observe(frame.camera)
        for fs in self.sync.push(frame):
            self._on_frame_set(fs)

    def _on_frame_set(self, fs: FrameSet) -> None:
        with self._lock:
            self.received += 1
            self._sets[fs.index] = _SetState()
        w = self.window.push(fs)
        if w is not None:
            self._dispatch(w)

    def _dispatch(self, w: Window) -> None:
        with self._lock:
            self.windows_emitted += 1
            for fs in w.frame_sets:
                self._sets[fs.index].outstanding += 1
        if self.sync_mode:
            self.engine.process_now(w)
        else:
            self.engine.submit(w)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """End of input: window any not-yet-windowed sets, wait for the engine, drop pending sync frames,
        and settle the accounting. Returns False if the engine did not finish within ``timeout``."""
        w = self.window.flush()
        if w is not None:
            self._dispatch(w)
        ok = True
        if not self.sync_mode:
            ok = self.engine.wait_idle(timeout)
        self.window.reset()
        self.sync.flush()
        return ok

    def stop(self, timeout: float = 1.0) -> bool:
        ok = self.engine.stop(timeout)
        self.window.reset()
        return ok

    # ------------------------------------------------------------------ callbacks
    def _on_time_jump(self) -> None:
        log.warning("time jumped back: resetting window%s", " and map" if self.reset_map_on_time_jump else "")
        self.window.reset()
        if self.reset_map_on_time_jump:
            with self._fusion_lock:
                self.fusion.reset()
        if self.on_time_jump is not None:
            self.on_time_jump(getattr(self.sync, "last_jump", None), self.reset_map_on_time_jump)

    def _on_evict(self, fs: FrameSet, windowed: bool) -> None:
        with self._lock:
            st = self._sets.get(fs.index)
            if st is None:
                return
            st.in_buffer = False
            if not windowed:
                st.reason = "not_windowed"
            self._settle(fs.index, st)

    def _settle(self, idx: int, st: _SetState) -> None:
        if st.in_buffer or st.outstanding > 0:
            return
        del self._sets[idx]
        if st.processed:
            self.processed += 1
        else:
            self.dropped.add(st.reason or "unknown")

    def _finish(self, w: Window, ok: bool, reason: str | None) -> None:
        with self._lock:
            for fs in w.frame_sets:
                st = self._sets.get(fs.index)
                if st is None:
                    continue
                st.outstanding -= 1
                if ok:
                    st.processed = True
                else:
                    st.reason = reason
                self._settle(fs.index, st)

    def _on_result(self, w: Window, pred: WindowPrediction) -> None:
        if self.on_prediction is not None:
            self.on_prediction(w, pred)
        t0 = self.clock()
        cb_ns = 0  # time spent in on_window (not fusion time)
        reason = None
        try:
            res, clean, cb_ns, reason = self._fuse(w, pred)
        finally:
            # diagnostics only (lifting skips non-finite depth): counted once the window's outputs are out
            depth = getattr(pred, "depth", None)
            bad_px = count_nonfinite(depth) if depth is not None else 0
            if bad_px:
                self.fusion.events.add("nonfinite_depth_px", bad_px)
            no_finite_output = reason == "nonfinite_prediction" or (depth is not None and bad_px == depth.size)
            self.nonfinite_windows_in_a_row = self.nonfinite_windows_in_a_row + 1 if no_finite_output else 0
        if res is None:
            self._finish(w, False, reason)
            return
        t1 = self.clock()
        self.fusion_ms.add((t1 - t0 - cb_ns) / 1e6)
        if w.created_ns:
            self.e2e_ms.add((t1 - w.created_ns) / 1e6)
        self.last_result = res
        self._finish(w, True, None)
        if self.on_fusion is not None:
            try:
                self.on_fusion(res, clean)  # views as fused (T_map_cam rows match)
            except Exception as exc:
                log.exception("on_fusion callback failed")
                if self.on_error_cb is not None:
                    self.on_error_cb(w, exc)

    def _fuse(self, w: Window, pred: WindowPrediction
              ) -> tuple[FusionResult | None, WindowPrediction | None, int, str | None]:
        """sanitize -> fusion.begin -> on_window -> fusion.commit; (result or None when the window is dropped,
        the prediction as fused, ns spent in on_window, drop reason)."""
        cb_ns = 0
        try:
            clean, ev = sanitize_prediction(pred, count_nonfinite_depth=False)
            for k, n in ev.items():
                self.fusion.events.add(k, n)
            if clean is None:
                log.warning("window %d: no view with a finite pose / intrinsics (%s): dropped", w.index, ev)
                return None, None, 0, "nonfinite_prediction"
            if clean is not pred:
                log.warning("window %d: %d view(s) with non-finite pose / intrinsics left out of fusion", w.index,
                            len(pred.cameras) - len(clean.cameras))
            with self._fusion_lock:
                pending = self.fusion.begin(clean)
                if self.on_window is not None:
                    # the window's own outputs (its cloud in map, poses) go out before the map update
                    c0 = self.clock()
                    if w.created_ns:
                        self.window_e2e_ms.add((c0 - w.created_ns) / 1e6)
                    try:
                        self.on_window(pending.window, clean)
                    except Exception as exc:
                        log.exception("on_window callback failed")
                        if self.on_error_cb is not None:
                            self.on_error_cb(w, exc)
                    cb_ns = self.clock() - c0
                res = self.fusion.commit(pending)
        except Exception as exc:
            log.exception("fusion failed for window %d", w.index)
            if self.on_error_cb is not None:
                self.on_error_cb(w, exc)
            return None, None, 0, "fusion_error"
        return res, clean, cb_ns, None

    def _on_drop(self, w: Window, reason: str) -> None:
        self._finish(w, False, reason)

    def _on_engine_error(self, w: Window, exc: BaseException) -> None:
        if self.on_error_cb is not None:
            self.on_error_cb(w, exc)

    # ------------------------------------------------------------------ reporting
    def accounting(self) -> dict:
        with self._lock:
            return {
                "frame_sets": {
                    "received": self.received,
                    "processed": self.processed,
                    "dropped": self.dropped.as_dict(),
                    "in_flight": len(self._sets),
                },
                "frames": {
                    "pushed": self.sync.pushed,
                    "in_sets": self.sync.emitted_sets * len(self.cameras),
                    "pending": self.sync.pending_count(),
                    "pending_bytes": self.sync.pending_bytes() if hasattr(self.sync, "pending_bytes") else 0,
                    "dropped": self.sync.drops.as_dict(),
                },
                "windows": {"emitted": self.windows_emitted, "engine": self.engine.stats()},
                "fusion": {"events": self.fusion.events.as_dict(), "linking": self.fusion.link_stats(),
                           "ms": self.fusion_ms.as_dict(),
                           "e2e_ms": self.e2e_ms.as_dict(), "window_e2e_ms": self.window_e2e_ms.as_dict()},
                "sync_resets": self.sync.resets,
                "nonfinite_windows_in_a_row": self.nonfinite_windows_in_a_row,
            }

    def silent_cameras(self) -> dict[str, int]:
        return self.watchdog.silent()
