"""Abort a forward pass that is running on another thread (the node's shutdown).

Why: a window of hundreds of views takes many seconds on the network; waiting for it at shutdown wastes
those seconds, and a process that leaves while the inference thread is still inside torch aborts at
interpreter exit (``terminate called without an active exception``). ``abort_forwards(thread)``
installs a global ``nn.Module`` forward pre-hook that raises ``ForwardAborted`` on that thread only: its
running forward stops at the next module call (one block, milliseconds). Other threads (other models in
the same process, e.g. tests) are not affected, and ``release(thread)`` removes the hook again once the
thread has ended (thread ids are reused). Nothing is installed while the node runs; a CUDA graph replay
or a compiled graph finishes as one call first.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["ForwardAborted", "abort_forwards", "release"]

_lock = threading.Lock()
_handle = None
_aborted: set[int] = set()  # idents of the threads whose forwards raise


class ForwardAborted(RuntimeError):
    """Raised inside a forward pass on a thread passed to ``abort_forwards``."""


def _raise(module, args):
    if threading.get_ident() in _aborted:
        raise ForwardAborted(f"forward aborted at {type(module).__name__}: shutting down")


def abort_forwards(thread: threading.Thread | None) -> None:
    """From now on every ``nn.Module`` call on ``thread`` raises ``ForwardAborted``."""
    global _handle
    torch = sys.modules.get("torch")
    if thread is None or thread.ident is None or torch is None:  # torch never imported: nothing to abort
        return
    with _lock:
        _aborted.add(thread.ident)
        if _handle is None:
            _handle = torch.nn.modules.module.register_module_forward_pre_hook(_raise)


def release(thread: threading.Thread | None) -> None:
    """Undo ``abort_forwards(thread)`` (call once the thread has ended); the hook goes with the last one."""
    global _handle
    if thread is None or thread.ident is None:
        return
    with _lock:
        _aborted.discard(thread.ident)
        if not _aborted and _handle is not None:
            _handle.remove()
            _handle = None
