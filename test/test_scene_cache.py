"""Scene cache: threaded loading (``load_datasets``, ``make_synthetic_scenes``) equals a sequential
``np.load``, keeps the seed order, reads caches written by numpy's ``savez_compressed`` (the format before
``write_dataset`` chose its zlib level) and names the folder that fails; ``make_synthetic_scenes``'s
overlapped writes (render in this process, write on threads) cache what an unthreaded render caches."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fast3dis_ros.data.synthetic import (
    SceneConfig,
    SceneLoadError,
    generate_scene,
    load_dataset,
    load_datasets,
    write_dataset,
)

H, W = 21, 28
VIEW = ("rgb", "depth", "instance", "K", "T_world_cam")


def _np_load_scene(folder: Path) -> list[dict[str, np.ndarray]]:
    """Reference: every view's arrays through ``np.load``, in scene.json order."""
    import json

    meta = json.loads((folder / "scene.json").read_text())
    out = []
    for row in meta["views"]:
        for rel in row:
            with np.load(folder / rel) as z:
                out.append({k: z[k] for k in VIEW})
    return out


def _assert_scene_equals(sc, ref: list[dict[str, np.ndarray]]) -> None:
    views = [v for fr in sc.frames for v in fr]
    assert len(views) == len(ref)
    for v, r in zip(views, ref):
        for k in VIEW:
            a, b = getattr(v, k), r[k]
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
            assert a.flags.writeable and a.flags.c_contiguous  # as np.load returns them


def _savez_compressed_scene(sc, folder: Path) -> None:
    """A cache folder as the previous ``write_dataset`` wrote it (``np.savez_compressed``, zlib level 6)."""
    write_dataset(sc, folder)
    for fi, fr in enumerate(sc.frames):
        for v in fr:
            np.savez_compressed(folder / "views" / f"f{fi:04d}_{v.camera}.npz", rgb=v.rgb, depth=v.depth,
                                instance=v.instance, K=v.K, T_world_cam=v.T_world_cam)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Five scenes; seed 3 in the old numpy-written format."""
    root = tmp_path_factory.mktemp("cache")
    cfg = SceneConfig(n_cameras=2, n_frames=3, width=W, height=H, n_objects=4)
    folders = []
    for seed in range(5):
        sc = generate_scene(cfg, seed=seed)
        f = root / f"scene_{seed:07d}"
        (_savez_compressed_scene if seed == 3 else write_dataset)(sc, f)
        folders.append(f)
    return root, folders


def test_threaded_load_equals_sequential_np_load_in_order(cache):
    root, folders = cache
    order = [folders[i] for i in (4, 0, 3, 1, 2, 0)]  # any order, repeats too
    seq = [load_dataset(f) for f in order]
    for threads in (1, 3, 16):
        got = load_datasets(order, threads=threads)
        assert [s.config.seed for s in got] == [4, 0, 3, 1, 2, 0]
        for sc, ref_sc, f in zip(got, seq, order):
            ref = _np_load_scene(f)
            _assert_scene_equals(sc, ref)
            _assert_scene_equals(ref_sc, ref)
            assert sc.config == ref_sc.config and sc.camera_names == ref_sc.camera_names
            assert [i.to_dict() for i in sc.instances] == [i.to_dict() for i in ref_sc.instances]
    assert load_datasets([], threads=4) == []


def test_load_threads_follow_the_usable_cpus(monkeypatch):
    import os

    from fast3dis_ros.data import synthetic

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert synthetic.usable_cpus() == 40
    assert (synthetic.default_load_threads(), synthetic.default_load_threads(5)) == (16, 5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert (synthetic.default_load_threads(), synthetic.default_load_threads(0)) == (3, 1)
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert synthetic.usable_cpus() == 1 and synthetic.default_load_threads() == 1


def test_written_views_are_plain_npz(cache):
    """``write_dataset``'s level-1 files are still what ``np.load`` reads (zip of NAME.npy, deflate)."""
    _, folders = cache
    p = next((folders[0] / "views").glob("*.npz"))
    with zipfile.ZipFile(p) as zf:
        assert [i.filename for i in zf.infolist()] == [f"{k}.npy" for k in VIEW]
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(p) as z:
        assert z["rgb"].dtype == np.uint8 and z["rgb"].shape == (H, W, 3) and z["depth"].dtype == np.float32


@pytest.mark.parametrize("arr", [
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),  # fortran order: numpy's own reader
    np.array(7.5, dtype=np.float32),  # 0-d
    np.zeros((0, 3), dtype=np.int32),  # empty
    np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian
    np.array([(1, 2.5)], dtype=[("a", "<i2"), ("b", "<f8")]),  # structured
])
def test_npy_reader_matches_np_load(arr):
    from fast3dis_ros.data.synthetic import _npy_from_bytes

    buf = io.BytesIO()
    np.save(buf, arr)
    got, ref = _npy_from_bytes(buf.getvalue()), np.load(io.BytesIO(buf.getvalue()))
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.tobytes() == ref.tobytes()
    assert np.array_equal(got, arr) and got.flags.writeable
    with pytest.raises(ValueError):
        _npy_from_bytes(buf.getvalue()[:-1] if arr.size else buf.getvalue()[:8])


def test_errors_name_the_scene_folder(cache, tmp_path):
    _, folders = cache
    import shutil

    bad = [tmp_path / f.name for f in folders]
    for f, b in zip(folders, bad):
        shutil.copytree(f, b)
    (bad[2] / "views" / "f0001_left.npz").write_bytes(b"not a zip")  # corrupt view
    (bad[4] / "scene.json").unlink()  # not a scene folder
    with pytest.raises(SceneLoadError, match=r"scene_0000002: cannot read views/f0001_left\.npz") as e:
        load_datasets(bad, threads=3)
    assert e.value.folder == bad[2]
    with pytest.raises(SceneLoadError, match=r"scene_0000004: FileNotFoundError") as e:
        load_datasets(bad[3:], threads=2)
    assert e.value.folder == bad[4]
    with pytest.raises(SceneLoadError, match=r"scene_0000002"):  # load_dataset alone names it too
        load_dataset(bad[2])
    # the scene.json alone still loads (the check of keep=False)
    assert load_dataset(bad[2], load_views=False).config.seed == 2


def test_make_synthetic_scenes_cache_hits_misses_and_a_broken_folder(tmp_path, capsys):
    """Cache hits load in threads, misses render (in order), an unreadable folder is rendered again and
    reported by name; the results equal rendering without a cache, bit for bit."""
    from fast3dis_ros.train.train import make_synthetic_scenes

    kw = dict(cameras=2, frames=2, height=H, width=W, n_objects=3)
    seeds = [21, 20, 22, 23]
    ref = make_synthetic_scenes(seeds, **kw)  # no cache
    cache = tmp_path / "c"
    make_synthetic_scenes(seeds[:2], cache=str(cache), keep=False, **kw)
    view = cache / "scene_0000020" / "views" / "f0001_front.npz"
    view.write_bytes(view.read_bytes()[:100])  # truncated write
    capsys.readouterr()
    got = make_synthetic_scenes(seeds, cache=str(cache), load_threads=3, **kw)
    out = capsys.readouterr().out
    assert f"cannot load {cache / 'scene_0000020'}" in out and "1 from the cache" in out and "3 rendered" in out
    assert [s.config.seed for s in got] == seeds
    for a, b in zip(got, ref):
        _assert_scene_equals(a, [{k: getattr(v, k) for k in VIEW} for fr in b.frames for v in fr])
    again = make_synthetic_scenes(seeds, cache=str(cache), **kw)  # all hits now, the broken one rewritten
    assert "4 from the cache" in capsys.readouterr().out
    for a, b in zip(again, ref):
        _assert_scene_equals(a, [{k: getattr(v, k) for k in VIEW} for fr in b.frames for v in fr])


def test_render_processes_give_the_in_process_scenes(tmp_path):
    """CPU render processes (spawned, one torch thread each) write and return the in-process pixels."""
    from fast3dis_ros.train.train import make_synthetic_scenes

    kw = dict(cameras=2, frames=2, height=H, width=W, n_objects=3)
    ref = make_synthetic_scenes([5, 6, 7], **kw)
    got = make_synthetic_scenes([5, 6, 7], cache=str(tmp_path), workers=2, **kw)
    for a, b, f in zip(got, ref, sorted(tmp_path.glob("scene_*"))):
        refv = [{k: getattr(v, k) for k in VIEW} for fr in b.frames for v in fr]
        _assert_scene_equals(a, refv)
        _assert_scene_equals(load_dataset(f), refv)


# ---------------------------------------------------------------------------------- overlapped writes
def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder as bytes, ``.npz`` files member by member (a zip stores its write time,
    so two writes of the same arrays differ in their headers only)."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".npz":
            with zipfile.ZipFile(f) as z:
                out.update({f"{f.relative_to(folder)}:{m}": z.read(m) for m in sorted(z.namelist())})
        elif f.is_file():
            out[str(f.relative_to(folder))] = f.read_bytes()
    return out


def test_overlapped_writes_equal_an_unthreaded_render(tmp_path):
    """In-process rendering with write threads caches, bit for bit, what rendering and writing one scene
    after another caches, and what a render without a cache returns."""
    from fast3dis_ros.train.train import make_synthetic_scenes

    kw = dict(cameras=2, frames=2, height=H, width=W, n_objects=3)
    seeds = [31, 30, 32, 33, 34]
    threaded, serial = tmp_path / "threaded", tmp_path / "serial"
    assert make_synthetic_scenes(seeds, cache=str(threaded), keep=False, write_threads=2, **kw) == [None] * 5
    make_synthetic_scenes(seeds, cache=str(serial), keep=False, write_threads=0, **kw)
    ref = make_synthetic_scenes(seeds, **kw)  # no cache
    for seed, sc in zip(seeds, ref):
        name = f"scene_{seed:07d}"
        got = _folder_bytes(threaded / name)
        assert len(got) == 1 + 2 * 2 * len(VIEW) and got == _folder_bytes(serial / name)
        _assert_scene_equals(load_dataset(threaded / name), [{k: getattr(v, k) for k in VIEW}
                                                             for fr in sc.frames for v in fr])
    # keep=True with write threads returns the rendered scenes themselves, in seed order
    kept = make_synthetic_scenes(seeds, cache=str(tmp_path / "kept"), write_threads=3, **kw)
    assert [s.config.seed for s in kept] == seeds
    for a, b in zip(kept, ref):
        _assert_scene_equals(a, [{k: getattr(v, k) for k in VIEW} for fr in b.frames for v in fr])


def test_overlapped_writes_put_scene_json_last_and_skip_cached_seeds(tmp_path, monkeypatch, capsys):
    """No view is written into a folder that already has its scene.json (a folder without it is rendered
    again), and a second call renders only the seeds the cache lacks."""
    import threading

    from fast3dis_ros.data import synthetic
    from fast3dis_ros.train import train as T

    kw = dict(cameras=2, frames=2, height=H, width=W, n_objects=3)
    lock = threading.Lock()
    writes: list[tuple[str, bool]] = []  # (scene folder, scene.json already there) per view written
    write_npz = synthetic._write_npz

    def spy_npz(path, arrays, compresslevel):
        with lock:
            writes.append((path.parent.parent.name, (path.parent.parent / "scene.json").exists()))
        write_npz(path, arrays, compresslevel)

    rendered: list[int] = []
    render_one = T._render_one

    def spy_render(payload):
        rendered.append(payload[1])
        return render_one(payload)

    monkeypatch.setattr(synthetic, "_write_npz", spy_npz)
    monkeypatch.setattr(T, "_render_one", spy_render)
    T.make_synthetic_scenes([40, 41, 42], cache=str(tmp_path), keep=False, write_threads=2, **kw)
    assert rendered == [40, 41, 42]
    assert sorted(writes) == sorted((f"scene_{s:07d}", False) for s in (40, 41, 42) for _ in range(4))
    mtime = (tmp_path / "scene_0000041" / "scene.json").stat().st_mtime_ns
    rendered.clear()
    capsys.readouterr()
    T.make_synthetic_scenes([40, 43, 41, 42, 44], cache=str(tmp_path), keep=False, write_threads=2, **kw)
    assert rendered == [43, 44] and "3 from the cache" in capsys.readouterr().out
    assert (tmp_path / "scene_0000041" / "scene.json").stat().st_mtime_ns == mtime


def test_a_failed_render_or_write_leaves_a_consistent_cache(tmp_path, monkeypatch):
    """A render that raises (the study's GPU fallback) propagates after the scenes rendered before it are
    written; a write that raises propagates too and leaves no scene.json, so the next call renders it."""
    from fast3dis_ros.train import train as T

    kw = dict(cameras=2, frames=2, height=H, width=W, n_objects=3)
    render_one, write_cached = T._render_one, T._write_cached

    def gpu_fails_at_52(payload):
        if payload[1] == 52:
            raise RuntimeError("CUDA error: out of memory")
        return render_one(payload)

    monkeypatch.setattr(T, "_render_one", gpu_fails_at_52)
    with pytest.raises(RuntimeError, match="out of memory"):
        T.make_synthetic_scenes([50, 51, 52, 53], cache=str(tmp_path), keep=False, write_threads=2, **kw)
    assert sorted(p.parent.name for p in tmp_path.glob("*/scene.json")) == ["scene_0000050", "scene_0000051"]
    ref = T.make_synthetic_scenes([51], **kw)[0]
    _assert_scene_equals(load_dataset(tmp_path / "scene_0000051"),
                         [{k: getattr(v, k) for k in VIEW} for fr in ref.frames for v in fr])

    def disk_full_at_53(scene, cache, seed):
        if seed == 53:
            (T.scene_cache_folder(cache, seed) / "views").mkdir(parents=True)  # a half-written folder
            raise OSError("No space left on device")
        write_cached(scene, cache, seed)

    monkeypatch.setattr(T, "_render_one", render_one)
    monkeypatch.setattr(T, "_write_cached", disk_full_at_53)
    with pytest.raises(OSError, match="No space"):
        T.make_synthetic_scenes([50, 51, 52, 53], cache=str(tmp_path), keep=False, write_threads=2, **kw)
    assert (tmp_path / "scene_0000052" / "scene.json").is_file()
    assert not (tmp_path / "scene_0000053" / "scene.json").exists()
    monkeypatch.setattr(T, "_write_cached", write_cached)
    got = T.make_synthetic_scenes([50, 51, 52, 53], cache=str(tmp_path), write_threads=2, **kw)
    assert [s.config.seed for s in got] == [50, 51, 52, 53]
    assert (tmp_path / "scene_0000053" / "scene.json").is_file()


def test_overlapped_writes_bound_the_scenes_waiting_for_their_write(monkeypatch):
    """With the writes stuck, rendering stops once WRITES_IN_FLIGHT_PER_THREAD scenes per thread wait (plus
    the one being written by each thread), so a fast GPU render cannot hold the whole data set."""
    import threading
    import time

    from fast3dis_ros.train import train as T

    release = threading.Event()
    rendered: list[int] = []
    written: list[int] = []

    def fake_render(payload):
        rendered.append(payload[1])
        return f"scene {payload[1]}"

    def stuck_write(scene, cache, seed):
        assert release.wait(30) and scene == f"scene {seed}"
        written.append(seed)

    monkeypatch.setattr(T, "_render_one", fake_render)
    monkeypatch.setattr(T, "_write_cached", stuck_write)
    payloads = [({}, s, "cache", False) for s in range(20)]
    out: list = []
    th = threading.Thread(target=lambda: out.extend(T._gen_here_overlapped(payloads, write_threads=2)))
    th.start()
    bound = T.WRITES_IN_FLIGHT_PER_THREAD * 2 + 1  # the render that waits for the oldest write
    deadline = time.monotonic() + 30
    while len(rendered) < bound and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a bound that does not hold would render more meanwhile
    assert len(rendered) == bound == 9 and written == []
    release.set()
    th.join(30)
    assert rendered == list(range(20)) and sorted(written) == list(range(20)) and out == [None] * 20
