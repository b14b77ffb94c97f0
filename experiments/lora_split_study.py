"""LoRA split study (issue 7): accuracy vs cost of starting the LoRA adapters at ViT block N.

Blocks before ``first_lora_block`` run once and are shared by the geometry pass (adapters off) and the
feature pass (adapters on); the later N starts, the cheaper the network and the fewer blocks the
adapters can change. For each split N this trains the same thing -- frozen DA3 weights taken from a
FAST3DIS checkpoint (``--init-da3``, default: the bundled tiny model), fresh LoRA adapters in blocks
``>= N`` and a fresh instance head, identical seed, data order, augmentation, steps and
hyper-parameters (``scripts/train_bundled.sh``'s, with a fixed step count instead of a time budget) --
then scores every run on the same held-out synthetic windows and writes the comparison.

Usage (GPU, one H100, ~6-7 min for the defaults; see docs/training/lora_split.md)::

    python -m experiments.lora_split_study --parallel --out OUT [--work /tmp/lora_split]
        [--splits 0,3,5] [--steps 1000] [--scenes 512] [--train-seeds 0] [--deadline-s 540]

Steps:

1. render the training / validation / test scenes once into ``--cache`` (reused when present): on the GPU
   when the study trains on one (``--render-device auto``; the bundled training renders the 512 training
   scenes in 23 s on an H100, docs/training/run2, plus the cache writes here, done in threads), else, or
   if the GPU fails, with ``--gen-workers`` CPU processes (163 s with 14 on the H100 host),
2. one ``fast3dis_ros.train.train`` process per (split, seed), all at once on one GPU with ``--parallel``
   (the tiny model leaves the GPU mostly idle, so three runs take little more than one), progress
   printed every ``--progress-every`` seconds from their ``train_log.jsonl``,
3. score each checkpoint: pooled ScanNet AP / AP50 / AP25 over the test windows, 95% bootstrap CIs and
   paired CIs of the differences to the first split (``split_metrics.PooledAP``); the loop's own
   validation AP on ``--val-seeds`` is reported too; plus FLOPs, parameters and an eager forward time,
4. write into ``--out``: ``lora_split.json``, ``lora_split.md``, ``lora_split_ap.png``,
   ``lora_split_loss.png`` and ``lora_split_runs.tar.gz`` (every run's logs + LoRA/head weights).

``--deadline-s``: wall-time budget of the whole study. Each training gets ``--time-budget`` so it ends in
time (the loop shortens ``--steps`` only if it would not fit; the table's steps column then shows it and
a warning says the splits are no longer like for like), and trainings still running when only the
scoring reserve is left are stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fast3dis_ros.data.synthetic import usable_cpus
from fast3dis_ros.train.train import _parse_seeds, check_first_lora_block

__all__ = ["build_parser", "main", "run_study"]

#: seconds reserved at the end of a --deadline-s for scoring + reports, and at a training's start for
#: the process start (imports, loading the scene cache, model build, DataLoader workers)
SCORE_RESERVE_S = 45.0
START_RESERVE_S = 40.0


def build_parser() -> argparse.ArgumentParser:
    from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m experiments.lora_split_study",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="reports (json, md, 2 png, runs tar.gz)")
    p.add_argument("--work", default=None, help="training folders (default: OUT/runs)")
    p.add_argument("--cache", default=None, help="rendered scenes, shared by all runs (default: WORK/cache)")
    p.add_argument("--splits", default="0,3,5", help="first_lora_block values; the first is the reference")
    p.add_argument("--train-seeds", default="0", help="training seeds; every split runs with each")
    p.add_argument("--init-da3", default=str(BUNDLED_CHECKPOINT), help="FAST3DIS checkpoint with the DA3 weights")
    # data: scripts/train_bundled.sh's
    p.add_argument("--scenes", type=int, default=512, help="training scenes (seeds --scene-seed ..)")
    p.add_argument("--scene-seed", type=int, default=1000)
    p.add_argument("--scene-frames", type=int, default=6)
    p.add_argument("--objects", type=int, default=10)
    p.add_argument("--val-seeds", default="900000-900015", help="the training loop's validation scenes")
    p.add_argument("--test-seeds", default="930000-930095",
                   help="held-out scoring scenes, one window each (never seen by the DA3 stand-in either)")
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--height", type=int, default=140)
    p.add_argument("--width", type=int, default=196)
    # optimisation: scripts/train_bundled.sh's, fixed step count
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--amp", default="bf16", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--eval-every", type=int, default=250, help="validation every N steps (0: at the end only)")
    p.add_argument("--extra-train-args", default="", help="appended to every training command (shell words)")
    # execution
    p.add_argument("--device", default="auto")
    p.add_argument("--parallel", action="store_true", help="run all trainings at once (one GPU)")
    p.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers per run (-1: from CPU count)")
    p.add_argument("--render-device", default="auto",
                   help="scene renderer device for the cache (auto: the GPU if --device resolves to CUDA, else "
                        "the CPU; a GPU that fails falls back to the CPU). GPU and CPU renders of a seed are "
                        "not bit-identical")
    p.add_argument("--gen-workers", type=int, default=-1, help="CPU render processes (-1: CPU count - 2)")
    p.add_argument("--deadline-s", type=float, default=0.0, help="wall-time budget of the whole study (0: none)")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    # scoring
    p.add_argument("--score-threshold", type=float, default=0.05, help="postprocess threshold (AP ranks by score)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the test windows")
    p.add_argument("--no-timing", action="store_true", help="skip the eager forward timing")
    return p


@dataclass
class Run:
    """One training process: split x seed."""

    split: int
    seed: int
    dir: Path
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log: Any = None
    t_start: float = 0.0
    t_end: float = 0.0
    rc: int | None = None
    stopped: bool = False
    seen: tuple[float, int] | None = None  # (time, step) at the previous progress line: rate between lines

    @property
    def name(self) -> str:
        return f"split{self.split}_seed{self.seed}"


# ---------------------------------------------------------------------------------------------- steps
def _log(t0: float, msg: str) -> None:
    print(f"[lora-split {time.perf_counter() - t0:5.0f}s] {msg}", flush=True)


def resolve_render_device(render_device: str, device: str) -> str:
    """``--render-device auto``: the training GPU when ``--device`` resolves to CUDA, else the CPU."""
    if render_device != "auto":
        return render_device
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if device == "auto" else (device if device.startswith("cuda") else "cpu")


def prepare_cache(args: argparse.Namespace, cache: Path, t0: float) -> dict[str, Any]:
    """Render every scene the runs and the scoring need once (runs load them from ``cache``).

    Through the trainings' own ``make_synthetic_scenes`` (same config, so the same pixels and the same cache
    check: a cached scene of another size/config is rendered again). On the CPU: ``--gen-workers``
    processes. On a GPU: in this process, with the scene writes overlapped on up to 8 threads (writing a
    scene costs more CPU than its GPU render). When the GPU raises (a CUDA error, out of memory), the rest
    is rendered by the CPU processes (scenes already rendered are written first and stay) and
    ``args.render_device`` becomes ``cpu`` for the trainings and the scoring.
    Returns the figures of the report's ``render``."""
    from fast3dis_ros.train.train import make_synthetic_scenes, scene_cache_folder

    workers = args.gen_workers if args.gen_workers >= 0 else max(0, usable_cpus() - 2)
    jobs = [(list(range(args.scene_seed, args.scene_seed + args.scenes)), args.scene_frames, "cache train"),
            (_parse_seeds(args.val_seeds) + _parse_seeds(args.test_seeds), args.frames, "cache val+test")]
    n_all = sum(len(seeds) for seeds, _, _ in jobs)
    n_cached = sum((scene_cache_folder(cache, s) / "scene.json").is_file() for seeds, _, _ in jobs for s in seeds)
    common = dict(cameras=args.cameras, height=args.height, width=args.width, n_objects=args.objects)

    def render(device: str) -> None:
        for seeds, frames, desc in jobs:
            make_synthetic_scenes(seeds, frames=frames, device=device, cache=str(cache),
                                  workers=workers if device == "cpu" else 0, write_threads=max(1, min(8, workers)),
                                  desc=desc, keep=False, **common)

    requested = args.render_device
    info: dict[str, Any] = {"requested": requested, "scenes": n_all, "found_in_cache": n_cached}
    ts = time.perf_counter()
    if requested == "cpu":
        render("cpu")
    else:
        import torch

        try:
            render(requested)
        except RuntimeError as e:  # CUDA errors, torch.cuda.OutOfMemoryError
            info["fallback"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _log(t0, f"rendering on {requested} failed ({info['fallback']}); rendering the rest on the CPU "
                     f"({workers} processes)")
            args.render_device = "cpu"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            render("cpu")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the renderer's buffers: the trainings need the memory
    info["device"] = args.render_device
    info["s"] = time.perf_counter() - ts
    _log(t0, f"scene cache ready: {cache} ({n_all} scenes, {n_cached} found in the cache, the rest rendered on "
             f"{info['device']} in {info['s']:.0f}s)")
    return info


def train_argv(args: argparse.Namespace, split: int, seed: int, out: Path, cache: Path, workers: int,
               threads: int, time_budget: float) -> list[str]:
    """The ``fast3dis_ros.train.train`` command of one run: only ``--first-lora-block``/``--seed``/``--out``
    differ between runs."""
    argv = [sys.executable, "-m", "fast3dis_ros.train.train",
            "--synthetic", str(args.scenes), "--scene-seed", str(args.scene_seed),
            "--scene-frames", str(args.scene_frames), "--objects", str(args.objects), "--cache", str(cache),
            "--render-device", args.render_device, "--val-seeds", args.val_seeds,
            "--eval-every", str(args.eval_every),
            "--init-da3", str(Path(args.init_da3).resolve()), "--first-lora-block", str(split),
            "--cameras", str(args.cameras), "--frames", str(args.frames),
            "--height", str(args.height), "--width", str(args.width),
            "--batch-size", str(args.batch_size), "--accum-steps", "1", "--lr", str(args.lr),
            "--warmup-steps", str(args.warmup_steps), "--weight-decay", str(args.weight_decay),
            "--grad-clip", str(args.grad_clip), "--steps", str(args.steps), "--amp", args.amp,
            "--device", args.device, "--num-workers", str(workers), "--threads", str(threads),
            "--seed", str(seed), "--log-every", str(max(1, min(50, args.steps // 10))), "--no-progress",
            "--out", str(out)]
    if time_budget > 0:
        argv += ["--time-budget", f"{time_budget:.0f}"]
    return argv + shlex.split(args.extra_train_args)


def _last_record(path: Path) -> dict | None:
    """Last line of a jsonl log (read from the end: logs grow during the run)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _progress(runs: Sequence[Run], steps: int) -> str:
    """One line: step, loss and ms/step (averaged since the previous line) and ETA of every run."""
    parts = []
    now = time.perf_counter()
    for r in runs:
        if r.proc is None and r.rc is None:
            parts.append(f"{r.name}: waiting")
            continue
        rec = _last_record(r.dir / "train_log.jsonl")
        state = "done" if r.rc == 0 else (f"failed rc={r.rc}" if r.rc is not None else "")
        if rec is None:
            parts.append(f"{r.name}: {state or 'starting'}")
            continue
        ms = 1000.0 * float(rec.get("time_s", float("nan")))  # the last step alone until a rate exists
        if r.seen is not None and rec["step"] > r.seen[1]:
            ms = 1000.0 * (now - r.seen[0]) / (rec["step"] - r.seen[1])
        if r.seen is None or rec["step"] > r.seen[1]:
            r.seen = (now, int(rec["step"]))
        eta = (steps - rec["step"]) * ms / 1000.0
        parts.append(f"{r.name}: {state or 'step'} {rec['step']}/{steps} loss {float(rec['loss']):.3g} "
                     f"{ms:.0f} ms/step" + ("" if state else f" ETA {eta:.0f}s"))
    return " | ".join(parts)


#: outputs of a training in its folder: a rerun in the same --work deletes the previous run's before it
#: starts, so neither the progress lines nor the report can read a stale log or checkpoint
RUN_OUTPUTS = ("train_log.jsonl", "val_log.jsonl", "train_summary.json", "model.safetensors", "train_state.pt",
               "loss_curve.png")


def _launch(run: Run, env: dict[str, str]) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        (run.dir / name).unlink(missing_ok=True)
    run.log = open(run.dir / "train_stdout.log", "w")
    run.log.write("$ " + shlex.join(run.argv) + "\n")
    run.log.flush()
    run.t_start = time.perf_counter()
    run.proc = subprocess.Popen(run.argv, stdout=run.log, stderr=subprocess.STDOUT, env=env)


def _reap(run: Run) -> bool:
    """True once the process has ended (records its exit code and end time)."""
    if run.proc is None or run.rc is not None:
        return run.rc is not None
    rc = run.proc.poll()
    if rc is None:
        return False
    run.rc, run.t_end = rc, time.perf_counter()
    run.log.close()
    return True


def _stop(run: Run) -> None:
    if run.proc is not None and run.rc is None:
        run.stopped = True
        run.proc.terminate()
        try:
            run.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
        _reap(run)


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_trainings(args: argparse.Namespace, runs: list[Run], cache: Path, t0: float) -> None:
    """Start the runs (all at once with --parallel, else one after another) and follow them."""
    n_par = len(runs) if args.parallel else 1
    cpus = usable_cpus()
    workers = args.num_workers if args.num_workers >= 0 else max(0, min(6, cpus // n_par - 1))
    on_cpu = args.device == "cpu"
    threads = max(1, cpus // n_par) if on_cpu else 2
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    pending = list(runs)
    active: list[Run] = []
    last_print = 0.0
    try:
        while pending or active:
            while pending and len(active) < n_par:
                r = pending.pop(0)
                budget = 0.0
                if args.deadline_s > 0:
                    left = args.deadline_s - (time.perf_counter() - t0) - SCORE_RESERVE_S
                    share = left / max(1, -(-(len(pending) + 1) // n_par))  # sequential: split what is left
                    budget = max(30.0, share - START_RESERVE_S)
                r.argv = train_argv(args, r.split, r.seed, r.dir, cache, workers, threads, budget)
                _launch(r, env)
                active.append(r)
                _log(t0, f"started {r.name} (pid {r.proc.pid}, {workers} loader workers"
                         + (f", loop budget {budget:.0f}s" if budget else "") + f"): log {r.dir / 'train_stdout.log'}")
            time.sleep(1.0)
            for r in list(active):
                if _reap(r):
                    active.remove(r)
                    msg = "finished" if r.rc == 0 else \
                        f"FAILED (rc {r.rc}); last lines:\n{_tail(r.dir / 'train_stdout.log')}"
                    _log(t0, f"{r.name} {msg} after {r.t_end - r.t_start:.0f}s")
            now = time.perf_counter()
            if args.deadline_s > 0 and now - t0 > args.deadline_s - SCORE_RESERVE_S and active:
                _log(t0, f"deadline: stopping {[r.name for r in active]} to leave time for scoring")
                for r in active:
                    _stop(r)
                active.clear()
                for r in pending:
                    r.rc = -1
                pending.clear()
            if now - last_print >= args.progress_every and (active or pending):
                last_print = now
                _log(t0, _progress(runs, args.steps))
    except KeyboardInterrupt:
        for r in active:
            _stop(r)
        raise


# ---------------------------------------------------------------------------------------------- scoring
def _train_figures(run: Run) -> dict[str, Any]:
    """Steps run, ms/step, final losses (mean over the last 10% of steps: one step's loss is noisy)."""
    out: dict[str, Any] = {"steps_run": 0}
    log = run.dir / "train_log.jsonl"
    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    if recs:
        tail = recs[-max(1, len(recs) // 10):]
        out["steps_run"] = int(recs[-1]["step"])
        out["ms_per_step"] = 1000.0 * float(np.median([float(r["time_s"]) for r in recs[len(recs) // 10:] or recs]))
        out["train"] = {f"{k}_tail_mean": float(np.mean([float(r[k]) for r in tail if k in r]))
                        for k in ("loss", "loss_instance") if k in recs[-1]}
        out["train"]["last"] = {k: v for k, v in recs[-1].items() if k.startswith("loss")}
    summ = run.dir / "train_summary.json"
    if summ.is_file():
        s = json.loads(summ.read_text())
        out["val"] = s.get("val") or {}
        out["fit_wall_s"] = s.get("wall_s")
    return out


def _bootstrap_stats(draws: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}


def score_runs(args: argparse.Namespace, runs: list[Run], cache: Path, t0: float) -> dict[str, Any]:
    """Pooled test AP (+ bootstrap), forward time of every finished run; paired deltas to the reference."""
    import torch

    from fast3dis_ros.inference.factory import resolve_device
    from fast3dis_ros.train.loop import resolve_amp
    from fast3dis_ros.train.data import eval_windows
    from experiments.split_metrics import score_checkpoint, time_forward
    from fast3dis_ros.train.train import make_synthetic_scenes

    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    scenes = make_synthetic_scenes(_parse_seeds(args.test_seeds), cameras=args.cameras, frames=args.frames,
                                   height=args.height, width=args.width, n_objects=args.objects,
                                   device=args.render_device, cache=str(cache), desc="test")
    windows = eval_windows(scenes, args.frames, (args.height, args.width))
    n = len(windows)
    rng = np.random.default_rng(20240607)
    resamples = rng.integers(0, n, size=(max(0, args.bootstrap), n))
    scored: dict[str, dict[str, Any]] = {}
    draws: dict[str, dict[str, np.ndarray]] = {}
    for r in runs:
        if r.rc != 0 or not (r.dir / "model.safetensors").is_file():
            continue
        ts = time.perf_counter()
        pooled, info = score_checkpoint(r.dir, windows, device, amp, args.score_threshold)
        res = {**pooled.compute(), "n_windows": n, "n_pred": info["n_pred"]}
        if len(resamples):
            draws[r.name] = pooled.bootstrap(resamples)
            res["ci"] = _bootstrap_stats(draws[r.name])
        fwd = float("nan") if args.no_timing else time_forward(info["model"], windows[0], device, amp)
        scored[r.name] = {"test": res, "fwd_ms": fwd}
        del info
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _log(t0, f"scored {r.name}: AP {100 * res['AP']:.1f} AP50 {100 * res['AP50']:.1f} AP25 "
                 f"{100 * res['AP25']:.1f} on {n} windows ({time.perf_counter() - ts:.0f}s)")
    # paired differences to the reference split (first in --splits) of the same training seed
    ref_split = runs[0].split
    for r in runs:
        ref = f"split{ref_split}_seed{r.seed}"
        if r.name not in scored or r.split == ref_split or ref not in draws or r.name not in draws:
            continue
        delta = {}
        for k in ("AP", "AP50", "AP25"):
            d = draws[r.name][k] - draws[ref][k]
            delta[k] = {"mean": scored[r.name]["test"][k] - scored[ref]["test"][k],
                        "lo": float(np.nanpercentile(d, 2.5)), "hi": float(np.nanpercentile(d, 97.5)),
                        "p_below_zero": float(np.mean(d < 0))}
        scored[r.name]["test"]["delta_vs_ref"] = delta
    return scored


# ---------------------------------------------------------------------------------------------- main
def run_study(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    splits = [int(s) for s in args.splits.split(",") if s.strip()]
    seeds = _parse_seeds(args.train_seeds)
    if not splits or not seeds:
        raise SystemExit("--splits and --train-seeds need at least one value each")
    if len(set(splits)) != len(splits):
        raise SystemExit(f"--splits has duplicates: {splits}")
    overlap = set(_parse_seeds(args.test_seeds)) & (set(_parse_seeds(args.val_seeds))
                                                    | set(range(args.scene_seed, args.scene_seed + args.scenes)))
    if overlap:
        raise SystemExit(f"--test-seeds overlap the training/validation scenes: {sorted(overlap)[:10]}")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "runs"
    cache = Path(args.cache) if args.cache else work / "cache"
    for d in (out, work, cache):
        d.mkdir(parents=True, exist_ok=True)

    # cost figures first: they also validate the splits against the DA3 size before anything runs
    from fast3dis_ros.train.loop import read_model_config
    from experiments.split_metrics import split_cost

    base_cfg = read_model_config(Path(args.init_da3))
    check_first_lora_block(splits, base_cfg.backbone, "--splits")
    views = args.cameras * args.frames
    costs = {s: split_cost(base_cfg, s, views, args.height, args.width).to_dict() for s in sorted({0, *splits})}
    for s, c in costs.items():
        c["flops_rel_split0"] = c["trunk_gflops"] / costs[0]["trunk_gflops"]
        c["flops_rel_da3"] = c["trunk_gflops"] / c["da3_gflops"]
    _log(t0, "splits: " + "; ".join(f"{s}: LoRA blocks {costs[s]['lora_blocks']}, {costs[s]['trainable_params']} "
                                    f"trainable, {costs[s]['flops_rel_split0']:.2f}x split-0 trunk FLOPs"
                                    for s in splits))

    args.render_device = resolve_render_device(args.render_device, args.device)
    render = prepare_cache(args, cache, t0)
    runs = [Run(split=s, seed=sd, dir=work / f"split{s}_seed{sd}") for sd in seeds for s in splits]
    t_train = time.perf_counter()
    run_trainings(args, runs, cache, t0)
    train_wall = time.perf_counter() - t_train
    scored = score_runs(args, runs, cache, t0)

    import torch

    from fast3dis_ros.inference.factory import resolve_device

    device = resolve_device(args.device)
    res: dict[str, Any] = {
        "command": "python -m experiments.lora_split_study " + shlex.join(argv),
        "config": {**{k: v for k, v in vars(args).items()}, "splits": splits, "train_seeds": seeds,
                   "size": base_cfg.backbone.name, "init_da3": str(args.init_da3),
                   "test_seeds": args.test_seeds},
        "host": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                 "cpu_count": usable_cpus(), "torch": torch.__version__},
        "costs": {str(k): v for k, v in costs.items()},
        "render": render,
        "runs": [], "warnings": [],
    }
    for r in runs:
        row: dict[str, Any] = {"split": r.split, "seed": r.seed, "dir": str(r.dir), "rc": r.rc,
                               "status": "ok" if r.rc == 0 else ("stopped at deadline" if r.stopped else "failed"),
                               "wall_s": (r.t_end - r.t_start) if r.t_end else None,
                               "cost": costs[r.split], "train_command": shlex.join(r.argv)}
        row.update(_train_figures(r))
        row.update(scored.get(r.name, {}))
        res["runs"].append(row)
    steps_run = {r["steps_run"] for r in res["runs"]}
    if len(steps_run) > 1 or steps_run != {args.steps}:
        res["warnings"].append(f"runs did not all run {args.steps} steps ({sorted(steps_run)}): the time budget cut "
                               "some, so the splits are not compared like for like")
    failed = [r["split"] for r in res["runs"] if r["status"] != "ok"]
    if failed:
        res["warnings"].append(f"runs of splits {failed} did not finish")
    if len(seeds) > 1:
        res["per_split"] = []
        for s in splits:
            t = [r["test"] for r in res["runs"] if r["split"] == s and r.get("test")]
            if t:
                res["per_split"].append({"split": s, "n": len(t), **{k: float(np.mean([x[k] for x in t]))
                                                                     for k in ("AP", "AP50", "AP25")},
                                         "AP50_sd": float(np.std([x["AP50"] for x in t], ddof=1)) if len(t) > 1
                                         else float("nan")})
    res["test"] = {"n_windows": next((r["test"]["n_windows"] for r in res["runs"] if r.get("test")), 0)}
    res["train_wall_s"] = train_wall
    res["wall_s"] = time.perf_counter() - t0
    files = write_reports(res, out)
    from experiments.split_report import console_table

    print("\n" + console_table(res), flush=True)
    for w in res["warnings"]:
        print(f"WARNING: {w}", flush=True)
    _log(t0, f"done in {res['wall_s']:.0f}s (trainings {train_wall:.0f}s); outputs:\n  " + "\n  ".join(map(str, files)))
    res["files"] = [str(f) for f in files]
    return res


def write_reports(res: dict[str, Any], out: Path) -> list[Path]:
    from experiments import split_report as R

    files = [R.write_json(res, out / "lora_split.json")]
    (out / "lora_split.md").write_text(R.markdown(res))
    files.append(out / "lora_split.md")
    if any(r.get("test") for r in res["runs"]):
        files.append(R.plot_ap(res, out / "lora_split_ap.png"))
    files.append(R.plot_losses(res, out / "lora_split_loss.png"))
    files.append(R.archive_runs(res, out / "lora_split_runs.tar.gz"))
    return files


def main(argv: Sequence[str] | None = None) -> None:
    res = run_study(argv)
    if any(r["status"] != "ok" for r in res["runs"]):
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
