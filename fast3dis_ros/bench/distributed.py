"""Training throughput (samples/s) against the number of torch.distributed processes (issue 21).

    python -m fast3dis_ros.bench.distributed --procs 1,2 --steps 6 --batch 2     # CPU, gloo, loopback
    python -m fast3dis_ros.bench.distributed --procs 1,2,4,8 --device cuda --size small --height 280 ...

For each process count N it spawns N ranks (gloo on CPU, NCCL on CUDA: rank r on cuda:r), builds the
``Trainer`` of ``fast3dis-train`` (DDP over LoRA + head, or everything with ``--full-finetune``) on
synthetic scenes, runs ``--warmup`` optimizer steps, then times ``--steps`` steps between two barriers.
``--scaling weak`` (default) keeps the per-rank batch (global batch = N x batch); ``strong`` keeps the
global batch (per-rank batch = batch / N). Prints one table row per N: seconds per step, samples/s, speed-up
over N=1 and parallel efficiency. On CPU the ranks share the host's cores (``--threads`` per rank,
default cores / N), so the CPU figure measures the overhead of DDP + gloo, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

__all__ = ["main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, a: argparse.Namespace, batch: int, scenes, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // world))
    from fast3dis_ros.core import distributed as D
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.train.data import SceneWindowDataset, TrainSampleDataset
    from fast3dis_ros.train.loop import TrainConfig, Trainer

    _, device = D.init_distributed(a.device, timeout_s=600)
    cfg = Fast3disConfig.for_size(a.size, process_res=((max(a.height, a.width) + 13) // 14) * 14)
    ds = TrainSampleDataset(SceneWindowDataset(scenes, frames_per_sample=a.frames), (a.height, a.width))
    tc = TrainConfig(steps=a.warmup + a.steps, batch_size=batch, accum_steps=1, warmup_steps=1, device=device,
                     amp=a.amp, full_finetune=a.full_finetune, progress=False, plot=False, out=out,
                     num_workers=0)
    tr = Trainer(cfg, tc, ds, None)
    it = iter(tr._loader(0, a.warmup + a.steps))
    for _ in range(a.warmup):
        tr.train_step([next(it)])
    batches = [next(it) for _ in range(a.steps)]  # data loading is not what is measured
    D.barrier()
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        tr.train_step([b])
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    D.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        Path(out, "result.txt").write_text(f"{dt} {tr.global_batch}")
    D.shutdown_distributed()


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--scaling", choices=["weak", "strong"], default="weak")
    p.add_argument("--batch", type=int, default=2, help="per-rank batch (weak) or global batch (strong)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", default="tiny")
    p.add_argument("--full-finetune", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores / N)")
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--height", type=int, default=42)
    p.add_argument("--width", type=int, default=56)
    p.add_argument("--scenes", type=int, default=4)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    a = _parse(argv)
    from fast3dis_ros.train.train import make_synthetic_scenes

    scenes = make_synthetic_scenes(range(100, 100 + a.scenes), cameras=a.cameras, frames=a.frames + 1,
                                   height=a.height, width=a.width, n_objects=5)
    rows: list[dict] = []
    import tempfile

    for n in [int(x) for x in a.procs.split(",") if x.strip()]:
        if a.scaling == "strong" and a.batch % n:
            print(f"skip N={n}: global batch {a.batch} not divisible", file=sys.stderr)
            continue
        batch = a.batch if a.scaling == "weak" else a.batch // n
        with tempfile.TemporaryDirectory() as out:
            ctx = mp.get_context("spawn")
            port = _free_port()
            procs = [ctx.Process(target=_worker, args=(r, n, port, a, batch, scenes, out)) for r in range(n)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise SystemExit(f"N={n}: a rank failed (exit codes {[p.exitcode for p in procs]})")
            dt, gb = Path(out, "result.txt").read_text().split()
        dt, gb = float(dt), int(gb)
        rows.append({"procs": n, "per_rank_batch": batch, "global_batch": gb, "s_per_step": dt / a.steps,
                     "samples_per_s": gb * a.steps / dt})
    base = rows[0]["samples_per_s"] if rows else float("nan")
    print(f"\n{a.size}, {a.cameras} cams x {a.frames} frame(s) at {a.width}x{a.height}, "
          f"{'full fine-tune' if a.full_finetune else 'LoRA + head'}, device {a.device}, {a.scaling} scaling, "
          f"{a.steps} timed steps, {os.cpu_count()} CPUs")
    print(f"{'procs':>5} {'batch/rank':>10} {'global':>6} {'s/step':>8} {'samples/s':>10} {'speed-up':>8} {'eff.':>6}")
    for r in rows:
        sp = r["samples_per_s"] / base
        print(f"{r['procs']:>5} {r['per_rank_batch']:>10} {r['global_batch']:>6} {r['s_per_step']:>8.3f} "
              f"{r['samples_per_s']:>10.2f} {sp:>8.2f} {sp / r['procs']:>6.2f}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
