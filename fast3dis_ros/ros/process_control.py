"""Process-level control of the node: signals, shutdown order, start-up failures and exit codes.

Exit codes (README, docs/RELIABILITY.md):

- ``0``: stopped by SIGINT / SIGTERM (at any point after start-up), also when a second signal or a window
  that does not abort within ``shutdown_timeout`` makes it leave at once. The process always leaves with
  ``os._exit`` after flushing the logs (``leave_now``): interpreter finalisation with a thread inside torch
  aborts the process (``terminate called without an active exception``), and even after a clean stop it
  spent ~4 s in C++ teardown (torch, DDS) on the CPU test machine.
- ``2``: could not start: bad parameter, unreadable checkpoint, no CUDA device for ``device:=cuda``, or a
  signal during start-up (model loading). One line ``cannot start: <reason>``, no traceback.

Why own signal handlers (rclpy's are disabled with ``SignalHandlerOptions.NO``): rclpy's handler shuts
the context down the moment the signal arrives, while the inference thread may still publish a window
(``publisher's context is invalid``), and a second SIGINT raises ``KeyboardInterrupt`` wherever the main
thread is (inside ``engine.stop``). Here the first signal only asks the spin loop to stop; the node then
stops publishing, aborts the forward in flight, joins the inference thread and only then shuts rclpy
down. A signal during start-up raises ``StartupInterrupted`` (a ``BaseException``, so that no
``except Exception`` in the loading code swallows it).
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["EXIT_OK", "EXIT_STARTUP", "StartupInterrupted", "SignalGate", "startup_failure", "leave_now", "serve"]

EXIT_OK = 0
EXIT_STARTUP = 2


class StartupInterrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} during start-up (model loading)")
        self.signum = signum


def leave_now(code: int, line: str = "") -> None:
    """Leave the process at once (no interpreter finalisation), after flushing what was written."""
    if line:
        try:
            sys.stderr.write(line.rstrip("\n") + "\n")
        except Exception:  # noqa: BLE001
            pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


class SignalGate:
    """SIGINT / SIGTERM: during start-up raise ``StartupInterrupted``; afterwards mark the stop request
    (``requested``) for the spin loop; a second signal leaves at once with ``EXIT_OK``."""

    def __init__(self) -> None:
        self.starting = True
        self.signum: int | None = None
        self.count = 0

    def install(self) -> SignalGate:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def ignore_further(self) -> None:
        """Once the node is down: ignore SIGINT / SIGTERM for the rest of the exit. (Interpreter finalisation
        puts Python-handled signals back to their default, so a late second Ctrl-C would otherwise kill the
        process with -2 during its last milliseconds; ignored signals are left ignored.)"""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            leave_now(EXIT_STARTUP if self.starting else EXIT_OK,
                      f"[fast3dis] second signal ({signal.Signals(signum).name}) while stopping: leaving now")
        self.signum = signum
        if self.starting:
            raise StartupInterrupted(signum)


def startup_failure(exc: BaseException) -> str | None:
    """One line saying why the node could not start, for the exceptions that mean bad start-up input
    (None: a real bug, let it raise)."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if isinstance(exc, StartupInterrupted):
        return text
    if isinstance(exc, (ValueError, FileNotFoundError, ImportError, NotADirectoryError, PermissionError)):
        return text
    if "Parameter" in name or name in ("CheckpointMismatchError", "SafetensorError", "InvalidTopicNameException",
                                       "InvalidNodeNameException", "InvalidNamespaceException"):
        return f"{name}: {text}" if name.startswith("Invalid") else text
    if name == "RCLError" and "initialize rcl" in text:  # e.g. a -p value rcl's YAML parser cannot read
        return f"bad command line: {text}"
    if "CUDA" in text or "cuda" in text:
        return f"CUDA is not usable: {text}"
    return None


def serve(build_node, make_executor, args=None, exit_process: bool = True, node_name: str = "fast3dis") -> int:
    """Run a node process with the signal, shutdown and exit-code rules above; shared by the plain node
    (``ros/node.py``) and the lifecycle node (``ros/lifecycle.py``).

    ``build_node(argv)`` creates the node and does everything that counts as start-up (the plain node loads
    its model in the constructor; the lifecycle node with ``autostart`` configures and activates there): a
    signal or a start-up failure inside it exits ``EXIT_STARTUP`` with one line. ``make_executor()`` spins it
    until the first signal. ``exit_process``: once the node is down, leave with ``os._exit`` (logs flushed)
    instead of returning."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    argv = list(sys.argv if args is None else args)
    gate = SignalGate().install()
    node = None
    rc = EXIT_OK
    stopped = True
    try:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
        node = build_node(argv)
        executor = make_executor()
        executor.add_node(node)
        gate.starting = False
        while not gate.requested and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
        if gate.requested:
            node.get_logger().info(f"{signal.Signals(gate.signum).name}: stopping")
    except BaseException as e:  # noqa: BLE001 - sorted below: start-up failures exit 2, the rest raises
        if not (isinstance(e, StartupInterrupted) and node is not None):  # (else: a signal just after start-up)
            why = startup_failure(e) if node is None else None
            if why is None:
                raise
            rclpy.logging.get_logger(node_name).fatal(f"cannot start: {why}")
            rc = EXIT_STARTUP
    finally:
        gate.starting = False
        if node is not None:
            stopped = node.shutdown()
            if not stopped:
                runner = getattr(node, "runner", None)
                where = runner.engine.busy_in() if runner is not None else "?"
                node.get_logger().warning(
                    f"inference still busy {node.p['shutdown_timeout']:.1f} s after the stop request: leaving "
                    f"without it (exit 0); it is in {where}")
            node.destroy_node()
        rclpy.try_shutdown()
        gate.ignore_further()
    if exit_process or not stopped:
        leave_now(rc)
    return rc
