"""The fast3dis node as a managed (lifecycle) node: the ``fast3dis_node`` executable.

Transitions (driven by a lifecycle manager, ``ros2 lifecycle set``, or any client of the standard
``~/change_state`` service; ``autostart`` true = configure + activate at start, like a plain node):

* ``configure``: read and validate the parameters, load the weights, build the pipeline, publishers
  and map services, and warm the model with one window of the configured shape (kernels, first CUDA
  graph capture, ``compile``). Bad parameters or a model that cannot load: FAILURE, the node stays
  unconfigured and the log line says why.
* ``activate``: the model back on its device (after a deactivate), subscriptions created: frames flow.
* ``deactivate``: subscriptions destroyed, queued windows finish, the model leaves the GPU
  (``Predictor.release_device``); the map, its latched topics and the map services stay. The log line
  gives host RSS and GPU memory before and after.
* ``cleanup``: the model, the map, publishers and services are dropped (back to unconfigured).
* ``shutdown`` (from any state) releases everything; an exception inside a transition goes to
  ``on_error``, which releases what was built and returns to unconfigured, with an error log line.

Parameters are declared at construction; start-up-only ones may be set while unconfigured and are
refused with the reason while configured (``ros/runtime_params.py``).
"""

from __future__ import annotations

import gc
import sys
import time
import traceback

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.clock import Clock, ClockType
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from fast3dis_ros.core.frames import CameraFrame, FrameSet, Window
from . import params as P
from .diagnostics import gpu_memory
from .cli_params import with_command_line
from .node import Fast3disNode

__all__ = ["Fast3disLifecycleNode", "memory_mib", "release_host_memory", "warmup_window", "main"]

SUCCESS, FAILURE, ERROR = (TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE,
                           TransitionCallbackReturn.ERROR)


def memory_mib() -> dict[str, float]:
    """Host RSS and (when CUDA is in use) GPU allocated / reserved memory, in MiB."""
    import psutil

    out = {"rss_mib": psutil.Process().memory_info().rss / 2**20}
    gm = gpu_memory()
    for k in ("gpu_allocated_mib", "gpu_reserved_mib"):
        if k in gm:
            out[k] = float(gm[k])
    return out


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``): without it the
    RSS of a cleaned-up node stays at its peak, since glibc keeps large freed blocks for reuse."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its own policy
        pass


def _fmt_mem(before: dict, after: dict) -> str:
    return ", ".join(f"{k[:-4]} {before[k]:.0f} -> {after.get(k, 0.0):.0f} MiB" for k in before)


def warmup_window(cameras: list[str], window_size: int, width: int, height: int) -> Window:
    """A grey window of the configured shape (window_size frame sets x cameras) for the warm-up."""
    img = np.full((height, width, 3), 128, np.uint8)
    sets = [FrameSet(i, (i + 1) * 1_000_000, [CameraFrame(c, (i + 1) * 1_000_000, img) for c in cameras])
            for i in range(window_size)]
    return Window(-1, sets)


class Fast3disLifecycleNode(Fast3disNode, LifecycleNode):
    """``Fast3disNode``'s stages behind lifecycle transitions (see the module docstring)."""

    _is_lifecycle = True

    def __init__(self, predictor=None, command_line: list[str] | None = None, **node_kwargs):
        """``command_line``: the process arguments; their ``-p`` values override ``--params-file``
        (``ros/cli_params.py``)."""
        LifecycleNode.__init__(self, P.NODE_NAME, **with_command_line(command_line, node_kwargs, P.NODE_NAME))
        self.configure_error: BaseException | None = None  # why the last configure failed
        P.declare_parameters(self)
        self._predictor_arg = predictor  # tests inject one; None: loaded from the parameters at configure
        self._configured = False
        self.runner = self.predictor = self.map_services = None
        self.last_memory: dict[str, dict] = {}  # transition -> {"before": ..., "after": ...}
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(float(self.get_parameter("diagnostics_period").value),
                                             self._publish_diagnostics,
                                             clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info("lifecycle node up: unconfigured (configure loads the model)")

    # ------------------------------------------------------------------ transitions
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        t0 = time.perf_counter()
        try:
            self._configure(self._predictor_arg)
        except Exception as e:
            self.configure_error = e
            self._teardown()
            self.get_logger().error(f"configure failed, staying unconfigured: {e}")
            return FAILURE
        try:
            warm_ms = self._warm_up()
        except Exception as e:
            self.configure_error = e
            self._teardown()
            self.get_logger().error(f"configure failed at the model warm-up, staying unconfigured: {e!r}\n"
                                    f"{traceback.format_exc(limit=4)}")
            return FAILURE
        self.get_logger().info(
            f"configured in {(time.perf_counter() - t0):.1f} s ({len(self.cameras)} cameras, window "
            f"{self.p['window_size']} / stride {self.p['stride']}"
            + (f", warm-up {warm_ms:.0f} ms" if warm_ms is not None else ", no warm-up") + f"); memory "
            + ", ".join(f"{k[:-4]} {v:.0f} MiB" for k, v in memory_mib().items()))
        return SUCCESS

    def _warm_up(self) -> float | None:
        """One forward on a window of the configured shape: loads kernels, captures the first CUDA graph and
        compiles (``compile``) before the first real window. Not fused: the map stays empty."""
        w, h = int(self.p["warmup_width"]), int(self.p["warmup_height"])
        if w == 0 or h == 0 or not hasattr(self.predictor, "predict"):
            return None
        t0 = time.perf_counter()
        self.predictor.predict(warmup_window(self.cameras, int(self.p["window_size"]), w, h))
        return (time.perf_counter() - t0) * 1000.0

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        restore = getattr(self.predictor, "restore_device", None)
        if restore is not None:
            restore()
        self._closing = False
        self._create_inputs()
        self.get_logger().info(f"active: subscribed to {len(self._subs)} input topics")
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        before = memory_mib()
        self._destroy_inputs()
        drained = self.runner.engine.wait_idle(10.0)
        self.runner.window.reset()  # frames of before the pause never join frames of after it
        release = getattr(self.predictor, "release_device", None)
        if release is not None:
            release()
        release_host_memory()
        after = memory_mib()
        self.last_memory["deactivate"] = {"before": before, "after": after}
        self.get_logger().info(
            f"inactive: input stopped{'' if drained else ' (engine still busy after 10 s)'}, map kept "
            f"({len(self.runner.fusion.map)} points, latched topics and map services stay); memory "
            + _fmt_mem(before, after))
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        before = memory_mib()
        self._teardown()
        release_host_memory()
        after = memory_mib()
        self.last_memory["cleanup"] = {"before": before, "after": after}
        self.get_logger().info("unconfigured: model, map, publishers and services dropped; memory "
                               + _fmt_mem(before, after))
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info(f"shut down from '{state.label}': everything released (finalized)")
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error during a transition from '{state.label}': releasing everything, back to "
                                "unconfigured (configure again to recover)")
        try:
            self._teardown()
        except Exception as e:  # pragma: no cover
            self.get_logger().fatal(f"could not release after the error: {e!r}: finalizing")
            return FAILURE
        return SUCCESS

    # ------------------------------------------------------------------ state for diagnostics
    def _lifecycle_state_label(self) -> str:
        return str(self._state_machine.current_state[1])

    def _publish_diagnostics(self) -> None:
        if self._configured:
            return super()._publish_diagnostics()
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status.append(self._interface_status())
        self.pub_diag.publish(arr)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Process exit: stop like the plain node (stop publishing, abort the forward in flight, join the
        engine: ``Fast3disNode.shutdown``), then release like the shutdown transition (the state machine is
        not consulted). False when the engine did not stop within the timeout."""
        if not self._configured:
            return True
        stopped = Fast3disNode.shutdown(self, timeout)
        if stopped:
            self._teardown(0.5)
        return stopped


def start(node: Fast3disLifecycleNode) -> None:
    """``autostart``: configure + activate; a failed configure raises its cause (so the process exits 2 with
    it, ``process_control.startup_failure``), a failed activate a RuntimeError; once active it logs the
    plain node's ``ready: ...`` line."""
    if node.trigger_configure() != SUCCESS:
        raise node.configure_error or RuntimeError("configure failed (the error above says why)")
    if node.trigger_activate() != SUCCESS:
        raise RuntimeError("activate failed (the error above says why)")
    node._log_ready()  # the same start-up line as the plain node


def main(args=None, exit_process: bool = True) -> int:
    """``fast3dis_node``: the lifecycle node; with ``autostart`` (default) configured and activated at start.
    Exit codes, signals and the shutdown order as the plain node (``ros/process_control.py``): 2 with one
    line when it cannot start. Spun by a multi-threaded executor so the map services answer while images are
    handled."""
    from .process_control import serve

    def build(argv):
        node = Fast3disLifecycleNode(command_line=argv)
        if node.get_parameter("autostart").value:
            start(node)
        return node

    return serve(build, lambda: MultiThreadedExecutor(num_threads=4), args, exit_process, P.NODE_NAME)


if __name__ == "__main__":
    sys.exit(main())
