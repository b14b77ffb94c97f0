"""Abort a forward pass that is running on another thread (the node's shutdown).

Why: a window of hundreds of views takes many seconds on the network; a process that leaves while the
inference thread is still inside torch aborts at interpreter exit (``terminate called without an active
exception``), and waiting for the window wastes those seconds. ``abort_forwards()`` installs a global
``nn.Module`` forward pre-hook that raises ``ForwardAborted``: the running forward stops at its next
module call (one block, milliseconds), every later one at its first. It is installed only at shutdown,
so it costs nothing while the node runs; a CUDA graph replay or a compiled graph finishes as one call.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["ForwardAborted", "abort_forwards", "forwards_aborted"]

_lock = threading.Lock()
_handle = None


class ForwardAborted(RuntimeError):
    """Raised inside a forward pass after ``abort_forwards()``."""


def _raise(module, args):
    raise ForwardAborted(f"forward aborted at {type(module).__name__}: shutting down")


def abort_forwards() -> None:
    """From now on every ``nn.Module`` call in this process raises ``ForwardAborted`` (idempotent)."""
    global _handle
    torch = sys.modules.get("torch")
    if torch is None:  # never imported: no forward can be running (and importing it would cost seconds)
        return
    with _lock:
        if _handle is None:
            _handle = torch.nn.modules.module.register_module_forward_pre_hook(_raise)


def forwards_aborted() -> bool:
    return _handle is not None
