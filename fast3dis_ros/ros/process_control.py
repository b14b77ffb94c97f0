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

__all__ = ["EXIT_OK", "EXIT_STARTUP", "StartupInterrupted", "SignalGate", "startup_failure", "leave_now"]

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
