"""Diagnostics of the fast3dis node: rate meters and the diagnostic_msgs/DiagnosticArray builder."""

from __future__ import annotations

import threading
import time
from collections import deque

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

__all__ = ["RateMeter", "Counter", "make_status", "gpu_memory", "DiagnosticsBuilder", "interface_status"]

OK, WARN, ERROR, STALE = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR, DiagnosticStatus.STALE


class RateMeter:
    """Events per second over the last ``window_s`` seconds (monotonic clock, thread safe, bounded)."""

    def __init__(self, window_s: float = 5.0, max_events: int = 10_000, clock=time.monotonic):
        self.window_s = float(window_s)
        self._t: deque[float] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self._clock = clock
        self.count = 0
        self.last: float | None = None

    def tick(self) -> None:
        now = self._clock()
        with self._lock:
            self._t.append(now)
            self.count += 1
            self.last = now

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            while self._t and self._t[0] < now - self.window_s:
                self._t.popleft()
            n = len(self._t)
            if n < 2:
                return 0.0
            span = self._t[-1] - self._t[0]
            return (n - 1) / span if span > 0 else 0.0

    def age(self) -> float | None:
        """Seconds since the last event (None if none)."""
        return None if self.last is None else self._clock() - self.last


class Counter:
    """Thread-safe named counters."""

    def __init__(self):
        self._c: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] = self._c.get(key, 0) + n

    def get(self, key: str) -> int:
        return self._c.get(key, 0)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


def make_status(name: str, level: int, message: str, values: dict, hardware_id: str = "") -> DiagnosticStatus:
    if isinstance(level, int):
        level = bytes([level])
    st = DiagnosticStatus(name=name, level=level, message=message, hardware_id=hardware_id)
    st.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    return st


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def gpu_memory() -> dict:
    """torch CUDA memory figures in MiB (empty when torch/CUDA is not in use)."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    mib = 1024.0 * 1024.0
    d = torch.cuda.current_device()
    return {
        "gpu_name": torch.cuda.get_device_name(d),
        "gpu_allocated_mib": torch.cuda.memory_allocated(d) / mib,
        "gpu_reserved_mib": torch.cuda.memory_reserved(d) / mib,
        "gpu_peak_allocated_mib": torch.cuda.max_memory_allocated(d) / mib,
        "gpu_total_mib": torch.cuda.get_device_properties(d).total_memory / mib,
    }


# fusion events that mean a window was aligned by a weaker method than the map was built with
MAP_RISK_EVENTS = {"scale_from_centres": "scaled from camera centres (no shared depth)",
                   "align_failed": "failed to align"}


class DiagnosticsBuilder:
    """Collects the node's figures into one DiagnosticArray (one status per concern)."""

    def __init__(self, node_name: str, cameras: list[str], stale_after_s: float = 3.0):
        self.node_name = node_name
        self.cameras = list(cameras)
        self.stale_after_s = stale_after_s
        self.image_rate = {c: RateMeter() for c in self.cameras}
        self.info_rate = {c: RateMeter() for c in self.cameras}
        self.input_errors = {c: Counter() for c in self.cameras}
        self.k_status: dict[str, str] = {c: "no CameraInfo yet" for c in self.cameras}
        self.output_rate = RateMeter(window_s=30.0)
        self.node_errors = Counter()
        self.last_publish_ms = 0.0  # instances + markers + map (after the map update)
        self.last_window_publish_ms = 0.0  # window cloud + TF (before the map update)
        self.maps_published = 0  # ~/instances_cloud messages (fewer than results with map_publish_period)
        self.time_jump: tuple[float, str] | None = None  # (monotonic time, what happened) of the newest jump
        self.time_jump_warn_s = 60.0  # the sync status stays WARN this long after a jump was adopted
        self.nonfinite_error_after = 3  # windows in a row without any finite output -> engine ERROR

    def calibration(self) -> str:
        """``known`` (every camera's CameraInfo K is used), ``estimated`` (none), or ``mixed (estimated: a, b)``:
        the network estimates K per view only for the cameras without a usable one (issue 19)."""
        est = [c for c in self.cameras if not self.k_status[c].startswith("ok")]
        if not est:
            return "known"
        return "estimated" if len(est) == len(self.cameras) else f"mixed (estimated: {', '.join(est)})"

    def build(self, stamp, sync: dict, engine: dict, outputs: dict) -> DiagnosticArray:
        arr = DiagnosticArray()
        arr.header.stamp = stamp
        hw = self.node_name
        for c in self.cameras:
            ir, age = self.image_rate[c].rate(), self.image_rate[c].age()
            errs = self.input_errors[c].as_dict()
            if age is None:
                level, msg = WARN, "no images received yet"
            elif age > self.stale_after_s:
                level, msg = WARN, f"no image for {age:.1f} s"
            elif errs:
                level, msg = WARN, f"{sum(errs.values())} input message(s) rejected"
            elif self.k_status[c].startswith("invalid"):
                level, msg = WARN, f"CameraInfo refused: {self.k_status[c][len('invalid: '):]}"
            else:
                level, msg = OK, f"{ir:.1f} Hz"
            vals = {"image_rate_hz": ir, "camera_info_rate_hz": self.info_rate[c].rate(),
                    "images_received": self.image_rate[c].count, "last_image_age_s": -1.0 if age is None else age,
                    "intrinsics": self.k_status[c]}
            vals.update({f"rejected_{k}": v for k, v in errs.items()})
            arr.status.append(make_status(f"{hw}: input {c}", level, msg, vals, hw))
        sdrops = sync.get("drops", {})
        slevel = WARN if sum(sdrops.values()) and not sync.get("frame_sets") else OK
        smsg = f"{sync.get('frame_sets', 0)} frame sets, {sum(sdrops.values())} frames dropped"
        jump = self.time_jump
        if jump is not None and time.monotonic() - jump[0] < self.time_jump_warn_s:
            slevel, smsg = WARN, f"{jump[1]} ({time.monotonic() - jump[0]:.0f} s ago); {smsg}"
        arr.status.append(make_status(
            f"{hw}: sync", slevel, smsg,
            {"backend": sync.get("backend", ""), "frame_sets": sync.get("frame_sets", 0),
             "pending_bytes": sync.get("pending_bytes", 0), "last_time_jump": jump[1] if jump else "",
             **{f"drop_{k}": v for k, v in sdrops.items()}}, hw))
        edrops = engine.get("drops", {})
        streak = int(engine.get("nonfinite_windows_in_a_row", 0))
        if streak >= self.nonfinite_error_after and not engine.get("error"):
            engine["error"] = (f"the model produced no finite output for {streak} windows in a row "
                               "(broken checkpoint or weights?)")
        elevel = ERROR if engine.get("error") else (WARN if edrops.get("queue_full") else OK)
        emsg = engine.get("error") or (f"{engine.get('processed', 0)} windows, "
                                       f"p50 {engine.get('engine_ms_p50', 0.0):.0f} ms")
        evals = {k: v for k, v in engine.items() if k not in ("drops", "error")}
        evals.update({f"drop_{k}": v for k, v in edrops.items()})
        arr.status.append(make_status(f"{hw}: engine", elevel, emsg, evals, hw))
        gm = gpu_memory()
        arr.status.append(make_status(f"{hw}: gpu", OK, gm.get("gpu_name", "no CUDA device in use"), gm, hw))
        nerr = self.node_errors.as_dict()
        risk = {k: outputs.get(f"fusion_{k}", 0) for k in MAP_RISK_EVENTS if outputs.get(f"fusion_{k}", 0)}
        omsg = f"{self.output_rate.count} results published" + (f", {sum(nerr.values())} errors" if nerr else "")
        if risk:
            omsg = "map at risk: " + ", ".join(f"{v} window(s) {MAP_RISK_EVENTS[k]}" for k, v in risk.items()) \
                + "; " + omsg
        arr.status.append(make_status(
            f"{hw}: outputs", WARN if nerr or risk else OK, omsg,
            {"results_published": self.output_rate.count, "result_rate_hz": self.output_rate.rate(),
             "last_publish_ms": self.last_publish_ms, "last_window_publish_ms": self.last_window_publish_ms,
             "maps_published": self.maps_published, "calibration": self.calibration(), **outputs,
             **{f"error_{k}": v for k, v in nerr.items()}},
            hw))
        return arr


def interface_status(node_name: str, lifecycle_state: str, calls: list) -> DiagnosticStatus:
    """Lifecycle state and the last map service calls (``map_services.ServiceCall``), newest first.
    WARN when the newest call was refused, so a failing map saver shows up in rqt_robot_monitor."""
    vals: dict = {"lifecycle_state": lifecycle_state, "service_calls_listed": len(calls)}
    for k, c in enumerate(reversed(calls)):
        vals[f"call_{k}"] = (f"{c.service} {'ok' if c.success else 'refused'} "
                             f"{time.strftime('%H:%M:%S', time.localtime(c.wall_time))} "
                             f"({c.duration_ms:.1f} ms): {c.message}")
    level = WARN if calls and not calls[-1].success else OK
    msg = f"{lifecycle_state}" + (f"; last call {calls[-1].service}: "
                                  f"{'ok' if calls[-1].success else 'refused'}" if calls else "")
    return make_status(f"{node_name}: interface", level, msg, vals, node_name)
