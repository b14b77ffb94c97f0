"""Helpers for tests that use real DDS on loopback: isolated domains, child processes, spinning.

Every test gets its own ROS_DOMAIN_ID (``unique_domain_id``) and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST,
so tests that run at the same time on one machine (several engineers, CI) do not see each other.
``RosProcess`` starts a Python child (a node or a publisher script) in its own process group, keeps
its output in a log file, and on exit stops it with SIGINT, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

_used_domains: set[int] = set()


def unique_domain_id() -> int:
    """A domain id in [1, 100] not used by this process yet, randomised across processes
    (fast-dds on Linux supports ids up to ~230; 1..100 stays clear of the port range limits)."""
    rnd = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(1000):
        d = rnd.randint(1, 100)
        if d not in _used_domains:
            _used_domains.add(d)
            return d
    raise RuntimeError("no free ROS domain id")


def ros_env(domain_id: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


class RosProcess:
    """A child Python process on a given ROS domain; use as a context manager."""

    def __init__(self, args: list[str], domain_id: int, name: str = "child", env: dict | None = None):
        self.args = [PYTHON, *args]
        self.domain_id = domain_id
        self.name = name
        self.env = ros_env(domain_id, env)
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self) -> RosProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(ROOT), start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal_and_wait(self, signals, timeout: float, gap: float = 0.3) -> tuple[int | None, float]:
        """Send ``signals`` to the child's process group (``gap`` seconds apart), wait up to ``timeout`` for
        it to exit; returns (exit code or None if it still runs, seconds from the first signal)."""
        t0 = time.monotonic()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap)
            os.killpg(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                try:
                    os.killpg(self.proc.pid, sig)  # our own child's process group only
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        rc = self.proc.poll()
        self._log.close()
        return rc

    def __enter__(self) -> RosProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if exc[0] is not None:
            sys.stderr.write(f"\n----- {self.name} output ({self.log_path}) -----\n{self.output()[-6000:]}\n")


class FramePump:
    """Base of the tests' frame publishers (``publish_set()`` sends one frame set): ``pump(period)`` is a
    ``RosContext.spin_until`` step that publishes a set at most every ``period`` s of wall time. The
    steps of successive ``pump`` calls share one schedule, so a new step does not publish early."""

    pump_period = 0.25  # s; the default of ``pump``
    _next_pub = 0.0

    def publish_set(self) -> None:
        raise NotImplementedError

    def pump(self, period: float | None = None):
        period = self.pump_period if period is None else period

        def step():
            now = time.monotonic()
            if now >= self._next_pub:
                self.publish_set()
                self._next_pub = now + period
        return step


class RosContext:
    """An rclpy context + node + single-threaded executor on ``domain_id``, for the test process."""

    def __init__(self, domain_id: int, node_name: str = "test_probe"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(node_name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def spin_until(self, pred, timeout: float, step=None) -> bool:
        """Spin until ``pred()`` is true (returns True) or ``timeout`` s pass (False).
        ``step()`` runs between spins (e.g. publishing)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            if step is not None:
                step()
            self.executor.spin_once(timeout_sec=0.05)
        return bool(pred())

    def close(self) -> None:
        try:
            self.executor.shutdown(timeout_sec=1.0)
            self.node.destroy_node()
        finally:
            if self.context.ok():
                self.rclpy.shutdown(context=self.context)

    def __enter__(self) -> RosContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for_subscribers(ctx: RosContext, publisher, n: int = 1, timeout: float = 20.0) -> bool:
    return ctx.spin_until(lambda: publisher.get_subscription_count() >= n, timeout)


def wait_for_publishers(ctx: RosContext, subscription, n: int = 1, timeout: float = 20.0) -> bool:
    return ctx.spin_until(lambda: subscription.get_publisher_count() >= n, timeout)


class StubPredictor:
    """A predictor for in-process node tests that publish no images: it must never be called."""

    score_threshold = 0.5

    def predict(self, window):
        raise AssertionError("predict called in a test that publishes no images")


@contextlib.contextmanager
def node_in_own_context(node_cls=None, predictor=None, parameter_overrides=()):
    """A node object in this process with its own rclpy context and domain id (default: a ``Fast3disNode``
    with a ``StubPredictor``), shut down cleanly afterwards, also when the test fails."""
    import rclpy

    if node_cls is None:
        from fast3dis_ros.ros.node import Fast3disNode as node_cls
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=unique_domain_id())
    n = node_cls(predictor=predictor if predictor is not None else StubPredictor(), context=ctx,
                 parameter_overrides=list(parameter_overrides))
    try:
        yield n
    finally:
        n.shutdown()
        n.destroy_node()
        rclpy.shutdown(context=ctx)


def in_process_node():
    """Generator for a pytest fixture: ``node_in_own_context()``'s default node."""
    with node_in_own_context() as n:
        yield n


# What scripts/setup.sh builds from ../shared/ros2_sources (module -> package to name in a skip).
ROS_TOOLS = {"tf2_ros": "tf2_ros_py", "message_filters": "message_filters", "sensor_msgs_py": "sensor_msgs_py",
             "launch": "launch", "launch_ros": "launch_ros", "launch_testing": "launch_testing",
             "launch_testing_ros": "launch_testing_ros", "ros2cli": "ros2cli", "rosidl_runtime_py": "rosidl_runtime_py"}


def require_ros_tools(*modules: str) -> None:
    """Skip a test (naming the missing package and how to get it) where the ROS 2 packages that PyPI
    lacks are not installed; in CI (``CI`` set) a missing one is a failure, never a skip."""
    import importlib.util

    import pytest

    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            why = (f"'{mod}' (ROS 2 package {ROS_TOOLS.get(mod, mod)}) is not installed: run scripts/setup.sh, which "
                   "builds it from ../shared/ros2_sources (or a ROS 2 install: apt install ros-kilted-desktop)")
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)


def read_cloud(msg):
    """The package's PointCloud2 reader (``pointcloud2_to_structured``), checked field by field against
    the reference reader ``sensor_msgs_py.point_cloud2.read_points`` on the same message."""
    import numpy as np

    from fast3dis_ros.ros.conversions import pointcloud2_to_structured

    require_ros_tools("sensor_msgs_py")
    from sensor_msgs_py import point_cloud2

    ours = pointcloud2_to_structured(msg)
    names = [f.name for f in msg.fields]
    ref = point_cloud2.read_points(msg, field_names=names, skip_nans=False)
    assert len(ref) == len(ours) == msg.width * msg.height, (len(ref), len(ours), msg.width, msg.height)
    for name in names:
        np.testing.assert_array_equal(np.asarray(ref[name]), np.asarray(ours[name]), err_msg=f"field {name}")
    return ours
