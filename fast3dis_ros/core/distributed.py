"""torch.distributed plumbing shared by ``fast3dis-train`` and ``fast3dis-eval --bags``: process group,
rank helpers, gathering of per-rank state. (The training sampler is train/sharded_sampler.py.)

One code path from 1 to N processes: without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1)
:func:`init_distributed` creates no process group and every helper here degrades to the single-process
answer (rank 0 of 1), so a plain ``fast3dis-train`` run is unchanged.

Why a timeout on the process group: a rank that dies (OOM, killed node, exception) leaves the others
blocked in a collective. gloo usually notices the closed socket at once; NCCL and half-open TCP
connections may not, so the group's ``timeout`` (``--dist-timeout``) turns a hang into an error that
:func:`collective_failure_message` explains, and the launcher (torchrun) then stops the job non-zero.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "env", "is_main", "barrier",
           "all_gather_objects", "broadcast_object", "all_reduce_mean_", "all_reduce_sum_",
           "global_batch", "collective_failure_message", "DEFAULT_TIMEOUT_S"]

#: default process-group timeout: long enough for a rank-0-only validation / checkpoint write while the
#: other ranks wait at a barrier, short enough that a dead rank does not hold a GPU node for hours
DEFAULT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV = DistEnv()


def env() -> DistEnv:
    """The current :class:`DistEnv` (set by :func:`init_distributed`; rank 0 of 1 before)."""
    return _ENV


def is_main() -> bool:
    return _ENV.is_main


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError as e:
        raise SystemExit(f"{name}={v!r} is not an integer (set by torchrun)") from e


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistEnv, str]:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).

    Returns ``(env, device)``: ``device`` is the one this rank trains on -- ``cuda:LOCAL_RANK`` when CUDA
    is used (``device`` ``auto`` or ``cuda``), else ``device`` unchanged. ``backend`` None: NCCL for CUDA,
    gloo otherwise. Without ``WORLD_SIZE`` > 1 nothing is initialised (single process)."""
    global _ENV
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if world <= 1:
        _ENV = DistEnv()
        return _ENV, device
    if use_cuda:
        if device not in ("auto", "cuda") and ":" in device:
            raise SystemExit(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)),
                                rank=rank, world_size=world)
    _ENV = DistEnv(rank=rank, world=world, local_rank=local, backend=backend)
    return _ENV, device


def shutdown_distributed() -> None:
    """Destroy the process group (if any) and go back to the single-process environment."""
    global _ENV
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _ENV = DistEnv()


def barrier() -> None:
    if _ENV.enabled:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small state only)."""
    if not _ENV.enabled:
        return [obj]
    out: list[Any] = [None] * _ENV.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. a decision only rank 0 may take)."""
    if not _ENV.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op for one process)."""
    if _ENV.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (SUM / world: gloo has no AVG)."""
    if _ENV.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(_ENV.world)
    return t


def global_batch(per_rank_batch: int, accum_steps: int, world: int | None = None) -> int:
    """Samples per optimizer step: per-rank batch x world size x accumulation steps."""
    return int(per_rank_batch) * int(world if world is not None else _ENV.world) * int(accum_steps)


def collective_failure_message(err: BaseException, timeout_s: float) -> str:
    """The one-line explanation a rank prints when a collective fails (peer died or timed out)."""
    e = _ENV
    return (f"[fast3dis-train] rank {e.rank}/{e.world}: a collective failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Another rank most likely died or stalled for "
            f"more than --dist-timeout {timeout_s:.0f}s; see its log. Stopping this rank.")
