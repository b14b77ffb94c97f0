"""``fast3dis-train``: train FAST3DIS on synthetic scenes (generated on the fly) or dataset folders.

Examples::

    # CPU smoke run
    fast3dis-train --synthetic 2 --steps 3 --size tiny --device cpu --out /tmp/ckpt
    # the bundled tiny checkpoint (GPU): see scripts/train_bundled.sh
    fast3dis-train --synthetic 256 --size tiny --full-finetune --cameras 3 --frames 2 \
        --height 140 --width 196 --batch-size 8 --steps 3000 --amp bf16 --device cuda --out ckpt/
    # resume (same command + --resume, or --resume DIR)
    fast3dis-train ... --out ckpt/ --resume
    # continue from a checkpoint's weights on varied rigs (60 %) with the geometry losses x4 (run 3)
    fast3dis-train ... --init fast3dis_ros/assets/fast3dis_tiny --rig-variety 0.6 --geometry-loss-weight 4
    # the same on 8 GPUs of one host (global batch = 8 x --batch-size x --accum-steps; README "Issue 21")
    torchrun --standalone --nproc-per-node 8 -m fast3dis_ros.train.train ... --device cuda

Outputs in ``--out``: ``config.json`` + ``model.safetensors`` (model/checkpoint.py), ``train_state.pt``
(exact resume), ``train_log.jsonl``, ``val_log.jsonl``, ``loss_curve.png``, ``train_args.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from fast3dis_ros.core import distributed as D
from fast3dis_ros.train.data import SceneWindowDataset, TrainSampleDataset, eval_windows
from fast3dis_ros.core.distributed import DEFAULT_TIMEOUT_S
from fast3dis_ros.inference.factory import resolve_device
from fast3dis_ros.train.loop import TrainConfig, Trainer

__all__ = ["main", "build_parser", "make_synthetic_scenes", "build_datasets", "build_model_config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fast3dis-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=str, default=None, help="comma-separated dataset folders (synthetic scene folders "
                     "written by fast3dis-synth, or folders of them)")
    src.add_argument("--synthetic", type=int, default=None, metavar="N_SCENES",
                     help="generate N synthetic training scenes (seeds --scene-seed .. +N-1)")
    p.add_argument("--data-layout", type=str, default="auto", choices=["auto", "synthetic", "ase", "scannetpp"])
    p.add_argument("--cache", type=str, default=None, help="cache folder for generated scenes (reused when present)")
    p.add_argument("--scene-seed", type=int, default=1000, help="first seed of the generated training scenes")
    p.add_argument("--val-seeds", type=str, default="900000,900001",
                   help="held-out synthetic seeds for validation: 'a,b,c' or 'a-b' (empty = no validation)")
    p.add_argument("--scene-frames", type=int, default=0, help="frames rendered per synthetic scene (0 = 2x --frames)")
    p.add_argument("--objects", type=int, default=10, help="instances per synthetic scene")
    p.add_argument("--render-device", type=str, default="auto", help="device for the synthetic renderer")
    p.add_argument("--gen-workers", type=int, default=0, help="CPU processes generating scenes (0 = in-process)")
    p.add_argument("--rig-variety", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                   help="fraction of synthetic train/val scenes with a randomised rig (wide yaws, per-camera K, "
                        "drive/turn motion; data/rig_variety.py); bare flag = 1.0, default 0 = fixed rig")
    p.add_argument("--size", type=str, default="tiny", choices=["tiny", "small", "base", "large", "giant"])
    p.add_argument("--da3-weights", type=str, default=None, help="DA3 weights (folder or hub id) for non-tiny sizes")
    p.add_argument("--init", type=str, default=None, help="initialise the model from a FAST3DIS checkpoint folder")
    p.add_argument("--init-da3", type=str, default=None, metavar="CKPT_DIR",
                   help="take ONLY the DA3 weights (frozen) and their architecture from a full FAST3DIS checkpoint "
                        "folder; LoRA adapters and instance head start fresh from --seed (not with --init, "
                        "--da3-weights or --full-finetune)")
    p.add_argument("--first-lora-block", type=int, default=None, metavar="N",
                   help="LoRA only in ViT blocks >= N; blocks < N run once, shared by both passes "
                        "(default: the config's, one past the first tapped block)")
    p.add_argument("--cameras", type=int, default=3, help="cameras per sample")
    p.add_argument("--frames", type=int, default=2, help="frames per sample (views = cameras x frames)")
    p.add_argument("--views", type=int, default=None, help="views per sample; overrides --frames (= views // cameras)")
    p.add_argument("--height", type=int, default=140)
    p.add_argument("--width", type=int, default=196)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-backbone-mult", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps (max 200)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--amp", type=str, default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--out", type=str, default="outputs/train")
    p.add_argument("--resume", nargs="?", const="__out__", default=None, metavar="CKPT_DIR",
                   help="resume exactly from CKPT_DIR (default: --out)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-dtype", type=str, default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--export", type=str, default=None,
                   help="also write a lean inference checkpoint (config.json + model.safetensors) here")
    p.add_argument("--export-dtype", type=str, default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--full-finetune", action="store_true", help="train the whole network (tiny config) incl. geometry")
    p.add_argument("--geometry-loss-weight", type=float, default=-1.0,
                   help="weight of depth/pose/intrinsics losses (<0: 1 with --full-finetune, else 0)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--jitter", type=float, default=0.2, help="colour jitter strength (0 = off)")
    p.add_argument("--no-shuffle-views", action="store_true")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: a collective that waits longer (a rank died or hangs) fails the job")
    p.add_argument("--dist-backend", type=str, default=None, choices=["nccl", "gloo"],
                   help="under torchrun: process-group backend (default: nccl on CUDA, gloo on CPU)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="wall-time budget of the training loop: after 20 steps --steps is reduced to fit "
                        "(LR/overlap schedules refitted); 0 = off")
    return p


def _parse_seeds(s: str | None) -> list[int]:
    if not s:
        return []
    out: list[int] = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


# ---------------------------------------------------------------------------------- model config
#: DA3 architecture fields copied from the --init-da3 checkpoint besides its size ``name`` (which replaces
#: --size); the LoRA layout and head come from the CLI
_DA3_ARCH_FIELDS = ("tiny_embed_dim", "tiny_depth", "tiny_num_heads", "tiny_head_features",
                    "ref_view_strategy", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def build_model_config(args: argparse.Namespace) -> Any:
    from fast3dis_ros.model.config import Fast3disConfig

    res = max(args.height, args.width)
    res = ((res + 13) // 14) * 14
    overrides: dict[str, Any] = {"process_res": res}
    size = args.size
    if args.da3_weights:
        overrides["pretrained"] = args.da3_weights
    if getattr(args, "init_da3", None):
        from fast3dis_ros.train.loop import read_model_config

        src = read_model_config(Path(args.init_da3)).backbone
        overrides.update({k: getattr(src, k) for k in _DA3_ARCH_FIELDS})
        # absolute: the checkpoint written here names its DA3 weights by this path (model/checkpoint.py)
        overrides["pretrained"] = str(Path(args.init_da3).resolve())
        size = src.name
    if getattr(args, "first_lora_block", None) is not None:
        overrides["first_lora_block"] = int(args.first_lora_block)
    cfg = Fast3disConfig.for_size(size, **overrides)
    cfg.train_backbone = bool(args.full_finetune)
    return cfg


def check_first_lora_block(n: int | Sequence[int], backbone: Any, flag: str = "--first-lora-block") -> None:
    """SystemExit unless ``n`` (one first LoRA block, or a list of them: the study's ``--splits``) lies in
    0..depth-1 of ``backbone`` (a ``BackboneConfig``), the range ``BackboneConfig.lora_start`` enforces."""
    depth = backbone.depth
    if isinstance(n, int):
        if not 0 <= n < depth:
            raise SystemExit(f"{flag} {n} is out of range: DA3-{backbone.name} has {depth} ViT blocks, "
                             f"so N must be in 0..{depth - 1} (taps at blocks {backbone.out_layers}; blocks < N "
                             "are shared by both passes)")
        return
    bad = [s for s in n if not 0 <= s < depth]
    if bad:
        raise SystemExit(f"{flag} {bad} out of range: DA3-{backbone.name} has {depth} blocks (0..{depth - 1})")


def check_lora_split_args(args: argparse.Namespace, cfg: Any, cfg_from: str | None) -> None:
    """Reject --first-lora-block / --init-da3 combinations that would silently train something else.

    Why: a checkpoint's LoRA tensors (and the ``base_layer`` names of its adapted linears) exist only for
    its own split, so loading it into a network with another split would drop weights without error.
    """
    n = getattr(args, "first_lora_block", None)
    if getattr(args, "init_da3", None):
        clash = [f for f, v in (("--init", args.init), ("--da3-weights", args.da3_weights),
                                ("--full-finetune", args.full_finetune)) if v]
        if clash:
            raise SystemExit(f"--init-da3 keeps the DA3 weights frozen and starts LoRA + head fresh; it cannot be "
                             f"combined with {', '.join(clash)} (use --init to load a whole checkpoint)")
    if n is not None:
        check_first_lora_block(n, cfg.backbone)
    if n is not None and cfg_from is not None and cfg.backbone.lora_start != n:
        raise SystemExit(f"--first-lora-block {n}: {cfg_from} was trained with LoRA from block "
                         f"{cfg.backbone.lora_start}; its LoRA weights do not fit another split "
                         "(start adapters fresh with --init-da3 instead)")


# ---------------------------------------------------------------------------------- data
def scene_cache_folder(cache: str | Path, seed: int) -> Path:
    """Folder of scene ``seed`` in a training scene cache (``--cache``)."""
    return Path(cache) / f"scene_{int(seed):07d}"


def _cache_matches(sc: Any, cfg_d: dict) -> bool:
    c = sc.config
    return (c.width, c.height, c.n_cameras, c.n_frames, c.n_objects, c.rig_variety) == (
        cfg_d["width"], cfg_d["height"], cfg_d["n_cameras"], cfg_d["n_frames"], cfg_d["n_objects"],
        bool(cfg_d.get("rig_variety", False)))


def _load_cached(payload: tuple[dict, int, str | None, bool]) -> tuple[bool, Any]:
    """``(hit, scene)`` for one ``(scene config dict, seed, cache, keep)`` payload: ``hit`` when ``cache``
    holds scene ``seed`` at this size/config (``scene`` is None with ``keep=False``). An unreadable folder is
    a miss, reported by name (it is rendered and written again). Only called with a cache folder."""
    from fast3dis_ros.data.synthetic import load_dataset

    cfg_d, seed, cache, keep = payload
    folder = scene_cache_folder(cache, seed)
    if not (folder / "scene.json").is_file():
        return False, None
    try:
        sc = load_dataset(folder, load_views=keep)
    except Exception as e:
        print(f"[fast3dis-train] cache: cannot load {folder} ({type(e).__name__}: {e}); rendering it again",
              flush=True)
        return False, None
    if not _cache_matches(sc, cfg_d):
        return False, None
    return True, (sc if keep else None)


def _render_one(payload: tuple[dict, int, str | None, bool]) -> Any:
    """Render scene ``seed`` of one payload (no cache access): shared by :func:`_gen_one` and the
    overlapped writes of :func:`_gen_here_overlapped`, so both give the same pixels."""
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    cfg_d, seed, _, _ = payload
    return generate_scene(SceneConfig.from_dict(cfg_d), seed=seed)


def _write_cached(scene: Any, cache: str | Path, seed: int) -> None:
    """Write one rendered scene to its cache folder (``write_dataset`` writes ``scene.json`` last, so an
    interrupted write leaves a folder that :func:`_load_cached` treats as a miss)."""
    from fast3dis_ros.data.synthetic import write_dataset

    write_dataset(scene, scene_cache_folder(cache, seed))


def _gen_one(payload: tuple[dict, int, str | None, bool]) -> Any:
    """Render scene ``seed`` (a cache miss) and write it to ``cache`` when given; ``keep=False`` returns None
    (filling a cache for other processes without shipping the pixels back to the caller)."""
    _, seed, cache, keep = payload
    sc = _render_one(payload)
    if cache:
        _write_cached(sc, cache, seed)
    return sc if keep else None


#: scenes rendered but not yet written, per write thread, in :func:`_gen_here_overlapped`: enough to keep
#: the threads busy, few enough that a fast (GPU) render does not pile the whole data set up in memory
WRITES_IN_FLIGHT_PER_THREAD = 4


def _gen_here_overlapped(payloads: Sequence[tuple], write_threads: int) -> list[Any]:
    """:func:`_gen_one` of every payload (all with a cache), in order, rendered one after another in this
    process while ``write_threads`` threads write the finished ones: ``np.savez_compressed``'s zlib releases
    the GIL, and writing a scene costs ~0.1 s of CPU, more than its GPU render. At most
    ``WRITES_IN_FLIGHT_PER_THREAD * write_threads`` scenes wait for their write. When a render raises, the
    scenes already rendered are written before the error propagates (the thread pool's exit waits), so a
    fallback renderer finds them in the cache."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    n_threads = max(1, int(write_threads))
    out: list[Any] = []
    with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="scene_write") as ex:
        pending: deque[Future] = deque()
        for p in payloads:
            _, seed, cache, keep = p
            sc = _render_one(p)
            pending.append(ex.submit(_write_cached, sc, cache, seed))
            out.append(sc if keep else None)
            while len(pending) > WRITES_IN_FLIGHT_PER_THREAD * n_threads:
                pending.popleft().result()
        for f in pending:
            f.result()  # a failed write raises here
    return out


def _gen_worker_init() -> None:
    """Render processes: one torch thread. With the default (one per CPU) every process keeps an OpenMP
    team whose idle threads spin after each parallel op and steal the cores the other processes render
    on: 2 processes on 2 cores rendered a 196x140 3x6 scene in 0.45 s instead of 0.16 s (the renderer
    itself runs with ``cpu_threads=1``); 14 processes x 16 threads on the 16-core H100 host took 163 s
    for 512 scenes."""
    torch.set_num_threads(1)


def _load_cached_many(payloads: Sequence[tuple], threads: int) -> list[tuple[bool, Any]]:
    """:func:`_load_cached` of every payload, in order, on ``threads`` threads (inflating the views'
    zlib streams releases the GIL)."""
    if threads <= 1 or len(payloads) <= 1:
        return [_load_cached(p) for p in payloads]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(payloads)), thread_name_prefix="scene_cache") as ex:
        return list(ex.map(_load_cached, payloads))


def varied_rig_mask(n: int, fraction: float) -> list[bool]:
    """Which of ``n`` scenes (in seed order) get a randomised rig: ``round(n * fraction)`` of them, spread
    evenly (scene i is varied when ``floor((i + 1) f) > floor(i f)``), so any prefix holds its share."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rig variety fraction must be in [0, 1], got {fraction}")
    return [math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9) for i in range(n)]


def make_synthetic_scenes(seeds: Sequence[int], *, cameras: int, frames: int, height: int, width: int,
                          n_objects: int = 10, device: str = "cpu", cache: str | None = None,
                          workers: int = 0, desc: str = "scenes", keep: bool = True,
                          load_threads: int | None = None, write_threads: int = 2,
                          rig_variety: float = 0.0) -> list[Any]:
    """Generate (or load from ``cache``) synthetic scenes rendered at the training resolution.

    ``rig_variety``: fraction of the scenes (spread by :func:`varied_rig_mask`) rendered with
    ``SceneConfig(rig_variety=True)`` (wide-yaw rigs, per-camera K, drive/turn motion); the rest use the
    fixed rig.

    Cached scenes are loaded first, on ``load_threads`` threads (None: the usable CPUs, at most 16;
    ``data.synthetic.default_load_threads``), in seed order; the rest are rendered (``workers`` CPU
    processes when rendering on the CPU, else in this process) and written to ``cache``. Rendering in this
    process, ``write_threads`` threads write the finished scenes while the next one renders
    (:func:`_gen_here_overlapped`); 0 writes each scene in this thread before the next render.
    ``keep=False``: only fill ``cache`` (the returned list holds None), e.g. once before several trainings.
    """
    from fast3dis_ros.data.synthetic import SceneConfig, default_load_threads

    if not keep and not cache:
        raise ValueError("keep=False without a cache folder would render scenes for nothing")
    cfg = SceneConfig(n_cameras=cameras, n_frames=frames, width=width, height=height, n_objects=n_objects,
                      device=device)
    seeds = list(seeds)
    varied = varied_rig_mask(len(seeds), rig_variety)
    payloads = [({**cfg.to_dict(), "rig_variety": v}, int(s), cache, keep) for s, v in zip(seeds, varied)]
    t0 = time.perf_counter()
    scenes: list[Any] = [None] * len(payloads)
    todo = list(range(len(payloads)))
    if cache:
        threads = default_load_threads(len(payloads)) if load_threads is None else max(1, int(load_threads))
        loaded = _load_cached_many(payloads, threads)
        todo = [i for i, (hit, _) in enumerate(loaded) if not hit]
        scenes = [sc for _, sc in loaded]
    t_load = time.perf_counter() - t0
    render = [payloads[i] for i in todo]
    if workers > 0 and device == "cpu" and len(render) > 1:
        import multiprocessing as mp

        n_proc = min(workers, len(render))
        with ProcessPoolExecutor(max_workers=n_proc, mp_context=mp.get_context("spawn"),
                                 initializer=_gen_worker_init) as ex:
            # one scene per task: a scene takes ~0.1-0.3 s, far more than a task's round trip
            rendered = list(ex.map(_gen_one, render, chunksize=1))
    elif cache and write_threads > 0 and render:
        rendered = _gen_here_overlapped(render, write_threads)
    else:
        rendered = [_gen_one(p) for p in render]
    for i, sc in zip(todo, rendered):
        scenes[i] = sc
    extra = f" ({len(payloads) - len(todo)} from the cache in {t_load:.1f}s, {len(todo)} rendered)" if cache else ""
    print(f"[fast3dis-train] {desc}: {len(scenes)} scenes ({cameras} cams x {frames} frames, {width}x{height}, "
          f"{sum(varied)} with a varied rig) "
          f"on {device} in {time.perf_counter() - t0:.1f}s{extra}", flush=True)
    return scenes


def _folder_datasets(spec: str, n_views: int, layout: str = "auto") -> Any:
    """Lazy torch datasets (data/datasets.py) over comma-separated folders; layout auto-detected per folder:
    ``scene.json`` -> synthetic, ``trajectory.csv`` -> Aria Synthetic Environments, ``dslr/nerfstudio``
    -> ScanNet++."""
    from torch.utils.data import ConcatDataset

    from fast3dis_ros.data import datasets as D

    parts = []
    for d in [s.strip() for s in spec.split(",") if s.strip()]:
        root = Path(d)
        kind = layout
        if kind == "auto":
            if next(iter(root.glob("scene.json")), None) or next(iter(root.glob("*/scene.json")), None):
                kind = "synthetic"
            elif next(iter(root.glob("**/trajectory.csv")), None):
                kind = "ase"
            elif next(iter(root.glob("**/dslr/nerfstudio")), None):
                kind = "scannetpp"
            else:
                raise FileNotFoundError(f"{root}: no synthetic (scene.json), ASE (trajectory.csv) or ScanNet++ "
                                        "(dslr/nerfstudio) scenes found")
        cls = {"synthetic": D.SyntheticWindowDataset, "ase": D.AriaSyntheticDataset,
               "scannetpp": D.ScanNetPPDataset}[kind]
        parts.append(cls(root, n_views=n_views))
        print(f"[fast3dis-train] {root}: {kind}, {len(parts[-1])} windows of {n_views} views", flush=True)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def build_datasets(args: argparse.Namespace) -> tuple[TrainSampleDataset, TrainSampleDataset | None]:
    hw = (args.height, args.width)
    frames = args.frames if args.views is None else max(1, args.views // max(args.cameras, 1))
    scene_frames = args.scene_frames or max(2 * frames, frames)
    rdev = args.render_device
    if rdev == "auto":
        rdev = "cuda" if resolve_device(args.device).type == "cuda" else "cpu"
    if args.data:
        train_base = _folder_datasets(args.data, frames * args.cameras, args.data_layout)
    else:
        n = args.synthetic if args.synthetic is not None else 8
        scenes = make_synthetic_scenes(range(args.scene_seed, args.scene_seed + n), cameras=args.cameras,
                                       frames=scene_frames, height=args.height, width=args.width,
                                       n_objects=args.objects, device=rdev, cache=args.cache,
                                       workers=args.gen_workers, desc="train", rig_variety=args.rig_variety)
        train_base = SceneWindowDataset(scenes, frames_per_sample=frames)
    if len(train_base) == 0:
        raise ValueError(f"no training windows: scenes have fewer than {frames} frames")
    train = TrainSampleDataset(train_base, hw, augment=True, jitter=args.jitter,
                               shuffle_views=not args.no_shuffle_views)
    val = None
    seeds = _parse_seeds(args.val_seeds)
    if seeds:
        vs = make_synthetic_scenes(seeds, cameras=args.cameras, frames=frames, height=args.height,
                                   width=args.width, n_objects=args.objects, device=rdev,
                                   cache=args.cache, desc="val", rig_variety=args.rig_variety)
        val = eval_windows(vs, frames, hw)
    return train, val


# ---------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Train; under ``torchrun`` every rank runs this (rank 0 alone prints and writes files)."""
    args = build_parser().parse_args(argv)
    denv, args.device = D.init_distributed(args.device, args.dist_backend, args.dist_timeout)
    stdout = sys.stdout
    if not denv.is_main:  # logs from rank 0 only; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    try:
        return _main(args)
    except (D.dist.DistError, RuntimeError) as e:
        if not denv.enabled or not _is_collective_error(e):
            raise
        print(D.collective_failure_message(e, args.dist_timeout), file=sys.stderr, flush=True)
        raise SystemExit(1) from e
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        D.shutdown_distributed()


def _is_collective_error(e: BaseException) -> bool:
    """A failure of the process group (peer gone, timeout), not a bug of this rank."""
    if isinstance(e, D.dist.DistError):
        return True
    msg = str(e).lower()
    return any(w in msg for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout"))


def _main(args: argparse.Namespace) -> dict:
    denv = D.env()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.height % 14 or args.width % 14:
        raise SystemExit(f"--height/--width must be multiples of 14 (DA3 patch size), got {args.height}x{args.width}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_dir = None
    if args.resume is not None:
        resume_dir = out if args.resume == "__out__" else Path(args.resume)
    # model config: from the checkpoint being resumed/initialised, else from the CLI
    cfg_src = resume_dir if resume_dir is not None and (resume_dir / "config.json").is_file() else (
        Path(args.init) if args.init else None)
    if cfg_src is not None:
        from fast3dis_ros.train.loop import read_model_config

        cfg = read_model_config(cfg_src)
        cfg.train_backbone = bool(args.full_finetune)
        if args.first_lora_block is not None and cfg.backbone.first_lora_block is None \
                and cfg.backbone.lora_start == args.first_lora_block:
            cfg.backbone.first_lora_block = int(args.first_lora_block)
    else:
        cfg = build_model_config(args)
    check_lora_split_args(args, cfg, str(cfg_src) if cfg_src is not None else None)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(200, max(1, args.steps // 20))
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
        lr_backbone_mult=args.lr_backbone_mult, weight_decay=args.weight_decay, warmup_steps=warmup,
        grad_clip=args.grad_clip, amp=args.amp, device=args.device, seed=args.seed, log_every=args.log_every,
        save_every=args.save_every, eval_every=args.eval_every, full_finetune=args.full_finetune,
        geometry_loss_weight=args.geometry_loss_weight, num_workers=args.num_workers, save_dtype=args.save_dtype,
        deterministic=args.deterministic, progress=not args.no_progress, plot=not args.no_plot, out=str(out),
        time_budget_s=args.time_budget,
    )
    if denv.is_main:
        (out / "train_args.json").write_text(json.dumps(
            {**vars(args), "world_size": denv.world,
             "global_batch": D.global_batch(args.batch_size, args.accum_steps, denv.world)},
            indent=2, sort_keys=True) + "\n")
    if args.cache and denv.enabled:  # rank 0 fills the scene cache, the others then read it (no write races)
        if denv.is_main:
            train_set, val_set = build_datasets(args)
        D.barrier()
        if not denv.is_main:
            train_set, val_set = build_datasets(args)
    else:
        train_set, val_set = build_datasets(args)
    model = None
    if args.init_da3 and resume_dir is None:
        from fast3dis_ros.train.loop import build_model_split_invariant

        model = build_model_split_invariant(cfg, args.seed)
        print(f"[fast3dis-train] DA3 weights (frozen) from {args.init_da3}; LoRA in blocks >= "
              f"{cfg.backbone.lora_start}, LoRA + instance head fresh (seed {args.seed})", flush=True)
    trainer = Trainer(cfg, tcfg, train_set, val_set, model=model)
    n_train = sum(p.numel() for _, p in trainer.named_trainable)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    print(f"[fast3dis-train] {args.size}: {n_all / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable; "
          f"{len(train_set)} train windows, {len(val_set) if val_set else 0} val windows; device "
          f"{trainer.device}, amp {trainer.amp_dtype}", flush=True)
    if args.init and resume_dir is None:
        from fast3dis_ros.train.loop import load_model_weights

        load_model_weights(trainer.model, Path(args.init))
    if resume_dir is not None:
        if (resume_dir / "train_state.pt").is_file() or (resume_dir / "model.safetensors").is_file():
            trainer.load(resume_dir)
            print(f"[fast3dis-train] resumed from {resume_dir} at step {trainer.step}", flush=True)
        else:
            print(f"[fast3dis-train] nothing to resume in {resume_dir}; starting fresh", flush=True)
    summary = trainer.fit()
    if not denv.is_main:
        return summary
    if args.export:
        from fast3dis_ros.train.loop import _DTYPES, save_model_checkpoint

        save_model_checkpoint(trainer.model, cfg, Path(args.export), _DTYPES[args.export_dtype])
        size = sum(f.stat().st_size for f in Path(args.export).iterdir() if f.is_file())
        summary["export"] = {"path": str(args.export), "bytes": size}
    final = {k: v for k, v in summary["train"].items() if k.startswith("loss")}
    print("[fast3dis-train] final train losses: " + json.dumps(final), flush=True)
    if summary.get("val"):
        print("[fast3dis-train] final val: " + json.dumps(summary["val"]), flush=True)
    print(f"[fast3dis-train] done: {summary['step']} steps in {summary['wall_s']:.1f}s -> {out}", flush=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
