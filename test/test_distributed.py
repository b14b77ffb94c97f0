"""Distributed training on CPU: gloo, 2 processes on loopback (torch.multiprocessing, spawn).

* 2 ranks x (batch 1, accum 2) give the weights of 1 rank x (batch 2, accum 2) after a few steps
  (DDP averaging, global mask normaliser, sharded sampler), with one gradient all-reduce per step (no_sync);
* a 2-rank run interrupted and resumed equals the uninterrupted one, every rank's RNG state included;
* a rank that dies makes the other fail fast with a clear message (process-group timeout, no hang);
* the sharded scene sampler: disjoint shards, union = the single-process stream, reshuffled per epoch.

Tiny config, 42x56 images, 3 cameras x 1 frame, LoRA + head (the DDP-over-adapters case).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

H, W = 42, 56


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _trainer(scenes, out, *, steps, bs, accum, augment=False):
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.train.data import SceneWindowDataset, TrainSampleDataset
    from fast3dis_ros.train.loop import TrainConfig, Trainer

    cfg = Fast3disConfig.tiny(process_res=W)
    ds = TrainSampleDataset(SceneWindowDataset(scenes, frames_per_sample=1, window_step=1), (H, W),
                            augment=augment)
    tc = TrainConfig(steps=steps, batch_size=bs, accum_steps=accum, lr=3e-3, warmup_steps=1,
                     full_finetune=False, device="cpu", amp="none", seed=0, progress=False, plot=False,
                     log_every=1, out=str(out), deterministic=True)
    return Trainer(cfg, tc, ds, None)


def _weights(tr) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.named_trainable}


def _run(target, world: int, args: tuple, timeout: float = 240.0) -> list[int]:
    """Start ``world`` spawn processes of ``target(rank, world, port, *args)``; their exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    t_end = time.monotonic() + timeout
    for p in procs:
        p.join(max(t_end - time.monotonic(), 1.0))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(-999)
        else:
            codes.append(p.exitcode)
    return codes


# ---------------------------------------------------------------------------------- workers (spawned)
def _w_train(rank, world, port, scenes, out, bs, accum, steps):
    torch.set_num_threads(1)
    from fast3dis_ros.core import distributed as D

    _join_env(rank, world, port)
    D.init_distributed("cpu", timeout_s=60)
    tr = _trainer(scenes, out, steps=steps, bs=bs, accum=accum)
    calls = [0]
    if D.env().enabled:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        tr.forward_model.register_comm_hook(None, counting_hook)
    tr.fit()
    fit_calls = calls[0]
    # buckets per synchronised backward: one more step of one micro-batch (synchronised)
    mb = next(iter(tr._loader(0, 1)))
    tr.accumulate([mb])
    per_sync = calls[0] - fit_calls
    if rank == 0:
        torch.save({"w": _weights(tr), "fit_calls": fit_calls, "per_sync": per_sync,
                    "history": tr.history}, Path(out) / "result.pt")
    D.shutdown_distributed()


def _w_resume(rank, world, port, scenes, out):
    torch.set_num_threads(1)
    from fast3dis_ros.core import distributed as D

    _join_env(rank, world, port)
    D.init_distributed("cpu", timeout_s=60)
    a = _trainer(scenes, Path(out) / "a", steps=4, bs=1, accum=1, augment=True)
    a.fit()
    b = _trainer(scenes, Path(out) / "b", steps=4, bs=1, accum=1, augment=True)
    b.fit(stop_at=2)
    torch.rand(7)  # rank-local draws after the checkpoint: resume must bring back the saved stream
    st = torch.load(Path(out) / "b" / "train_state.pt", weights_only=False)
    c = _trainer(scenes, Path(out) / "b", steps=4, bs=1, accum=1, augment=True)
    c.load(Path(out) / "b")
    rng_loaded = torch.get_rng_state()
    c.fit()
    res = {"a": _weights(a), "c": _weights(c), "rng_loaded": rng_loaded,
           "rng_file": st["rng_ranks"][rank]["cpu"], "world_file": st["world_size"]}
    torch.save(res, Path(out) / f"resume_rank{rank}.pt")
    D.shutdown_distributed()


def _w_dies(rank, world, port, out):
    torch.set_num_threads(1)
    sys.stderr = open(Path(out) / f"stderr_rank{rank}.txt", "w", buffering=1)
    _join_env(rank, world, port)
    from fast3dis_ros.train import loop
    from fast3dis_ros.train.train import main

    if rank == 1:
        orig = loop.Trainer._train_step

        def dying_step(self, mbs):
            if self.step == 2:
                os._exit(3)  # a crash without cleanup, like an OOM kill
            return orig(self, mbs)

        loop.Trainer._train_step = dying_step
    try:
        main(["--synthetic", "1", "--size", "tiny", "--cameras", "3", "--frames", "1", "--height", str(H),
              "--width", str(W), "--steps", "50", "--device", "cpu", "--amp", "none", "--val-seeds", "",
              "--no-progress", "--no-plot", "--out", str(Path(out) / "ckpt"), "--dist-timeout", "30",
              "--objects", "3"])
    except SystemExit as e:
        sys.stderr.flush()
        os._exit(int(e.code or 0))
    os._exit(0)


# ---------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def scenes():
    from fast3dis_ros.train.train import make_synthetic_scenes

    return make_synthetic_scenes([11, 12], cameras=3, frames=2, height=H, width=W, n_objects=5)


def test_two_ranks_half_batch_equal_one_rank_full_batch(scenes, tmp_path):
    steps = 3
    assert _run(_w_train, 1, (scenes, str(tmp_path / "one"), 2, 2, steps)) == [0]
    assert _run(_w_train, 2, (scenes, str(tmp_path / "two"), 1, 2, steps)) == [0, 0]
    one = torch.load(tmp_path / "one" / "result.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    w0 = _trainer(scenes, tmp_path / "init", steps=1, bs=1, accum=1)
    init = _weights(w0)
    # relative to how far training moved the weights: Adam divides by sqrt(v), so float-rounding noise in a
    # near-zero gradient (summation order differs between a batch and its all-reduced halves) becomes a
    # visible per-element difference; a wrong gradient (no averaging, local normaliser) moves everything
    moved = sum(float((one["w"][n] - init[n]).norm() ** 2) for n in init) ** 0.5
    diff = sum(float((one["w"][n] - two["w"][n]).norm() ** 2) for n in init) ** 0.5
    assert moved > 0.1, moved  # training changed the weights, so the equality below is not trivial
    assert diff / moved < 1e-3, (diff, moved)
    # the logged losses are the means over ranks = the single-process losses
    l1 = [r["loss"] for r in one["history"]]
    l2 = [r["loss"] for r in two["history"]]
    assert len(l1) == steps and np.allclose(l1, l2, rtol=1e-4), (l1, l2)
    # no_sync: one all-reduce of each gradient bucket per optimizer step, not one per micro-step
    assert two["per_sync"] >= 1 and two["fit_calls"] == steps * two["per_sync"], two


def test_resume_two_ranks_matches_uninterrupted(scenes, tmp_path):
    assert _run(_w_resume, 2, (scenes, str(tmp_path))) == [0, 0]
    r = [torch.load(tmp_path / f"resume_rank{k}.pt", weights_only=False) for k in range(2)]
    for k in range(2):
        assert r[k]["world_file"] == 2
        for n in r[k]["a"]:
            assert torch.allclose(r[k]["a"][n], r[k]["c"][n], atol=1e-5, rtol=1e-4), (k, n)
        assert torch.equal(r[k]["rng_loaded"], r[k]["rng_file"]), k  # this rank's own stream came back
    assert not torch.equal(r[0]["rng_file"], r[1]["rng_file"])  # ranks keep distinct RNG streams
    for n in r[0]["c"]:  # DDP keeps the replicas identical
        assert torch.equal(r[0]["c"][n], r[1]["c"][n]), n


def test_dead_rank_fails_job_with_clear_message(tmp_path):
    t0 = time.monotonic()
    codes = _run(_w_dies, 2, (str(tmp_path),), timeout=150.0)
    wall = time.monotonic() - t0
    assert codes[1] == 3
    assert codes[0] == 1, (codes, (tmp_path / "stderr_rank0.txt").read_text()[-2000:])
    err = (tmp_path / "stderr_rank0.txt").read_text()
    assert "rank 0/2: a collective failed" in err and "Another rank most likely died" in err, err[-2000:]
    assert wall < 140.0


def test_sharded_sampler_partitions_and_reshuffles():
    from fast3dis_ros.train.data import ResumableSampler
    from fast3dis_ros.core.distributed import global_batch
    from fast3dis_ros.train.sharded_sampler import ShardedSceneSampler

    n, b, world = 12, 2, 2
    single = [k for k, _ in zip(ResumableSampler(n, seed=3), range(3 * n))]
    shards = [list(ShardedSceneSampler(n, rank=r, world=world, block=b, seed=3, length=3 * n // world))
              for r in range(world)]
    # interleave the ranks' blocks: the single-process stream, keys (index, aug_seed) included
    merged = []
    for blk in range(len(shards[0]) // b):
        for r in range(world):
            merged += shards[r][blk * b:(blk + 1) * b]
    assert merged == single
    e0 = [ShardedSceneSampler(n, rank=r, world=world, block=b, seed=3).epoch_positions(0) for r in range(world)]
    assert not set(e0[0]) & set(e0[1]) and sorted([*e0[0], *e0[1]]) == list(range(n))
    s = ShardedSceneSampler(n, rank=0, world=world, block=b, seed=3)
    s.set_epoch(1)
    assert s.start == 12 and s.epoch_positions(1).size == n // world  # epoch 1 = positions 12..23
    s10 = ShardedSceneSampler(10, rank=1, world=world, block=b, seed=3)
    s10.set_epoch(1)
    assert s10.start == 12  # the first block x world boundary at or after position 10
    assert [k for k, _ in single[:n]] != [k for k, _ in single[n:2 * n]]  # a new permutation per epoch
    assert global_batch(2, 4, 8) == 64
    with pytest.raises(ValueError):
        ShardedSceneSampler(n, rank=0, world=2, block=2, start=2)
