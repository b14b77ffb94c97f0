"""ApproximateTimeSync, SlidingWindow and SyncWatchdog, with hypothesis property tests."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fast3dis_ros.core.frames import CameraFrame, FrameSet
from fast3dis_ros.pipeline.sync import ApproximateTimeSync
from fast3dis_ros.pipeline.window import SlidingWindow, SyncWatchdog

IMG = np.zeros((2, 2, 3), np.uint8)
MS = 1_000_000


def fr(cam, t_ms):
    return CameraFrame(cam, int(t_ms * MS), IMG)


def feed(sync, frames):
    out = []
    for f in frames:
        out += sync.push(f)
    return out


def test_groups_within_slop_and_counts_drops():
    s = ApproximateTimeSync(["a", "b"], slop_ns=10 * MS, queue_size=5)
    out = feed(s, [fr("a", 0), fr("b", 3), fr("a", 33), fr("b", 34), fr("x", 40)])
    assert [[f.stamp_ns // MS for f in fs.frames] for fs in out] == [[0, 3], [33, 34]]
    assert [fs.stamp_ns // MS for fs in out] == [3, 34] and [fs.index for fs in out] == [0, 1]
    assert [fs.cameras for fs in out] == [["a", "b"]] * 2
    assert s.drops.as_dict() == {"unknown_camera": 1}
    # b at 80 makes a@66 unmatchable (66 + 10 < 80): stale
    out = feed(s, [fr("a", 66), fr("b", 80)])
    assert out == [] and s.drops["stale"] == 1
    out = feed(s, [fr("a", 85)])
    assert [f.stamp_ns // MS for f in out[0].frames] == [85, 80]
    # duplicate and out of order
    feed(s, [fr("a", 85), fr("a", 70), fr("b", 79)])
    assert s.drops["duplicate_stamp"] == 1 and s.drops["out_of_order"] == 2
    assert s.pending_count() == 0


def test_queue_overflow_when_camera_silent():
    s = ApproximateTimeSync(["a", "b"], slop_ns=10 * MS, queue_size=3)
    feed(s, [fr("a", 33 * i) for i in range(10)])
    assert s.drops.as_dict() == {"queue_overflow": 7} and s.pending_count() == 3


def test_time_jump_back_resets():
    resets = []
    s = ApproximateTimeSync(["a", "b"], slop_ns=10 * MS, queue_size=5, jump_back_ns=500 * MS,
                            on_reset=lambda: resets.append(1))
    feed(s, [fr("a", 5000), fr("b", 5001), fr("a", 5033)])
    out = feed(s, [fr("b", 10), fr("a", 12)])  # bag loop
    assert resets == [1] and s.resets == 1
    assert s.drops.as_dict() == {"time_jump_back": 1}
    assert [f.stamp_ns // MS for f in out[0].frames] == [12, 10]


def test_single_camera_passthrough():
    s = ApproximateTimeSync(["a"], slop_ns=0)
    out = feed(s, [fr("a", 1), fr("a", 2)])
    assert [fs.stamp_ns // MS for fs in out] == [1, 2]


# ---------------------------------------------------------------- property tests
@st.composite
def streams(draw):
    n_cams = draw(st.integers(1, 4))
    cams = [f"c{i}" for i in range(n_cams)]
    period = draw(st.integers(5, 50))
    n = draw(st.integers(0, 30))
    frames = []
    for c in cams:
        offset = draw(st.integers(0, period))
        for k in range(n):
            if draw(st.floats(0, 1)) < 0.1:
                continue  # missing frame
            t = offset + k * period + draw(st.integers(-3, 3))
            frames.append(fr(c, t))
            if draw(st.floats(0, 1)) < 0.05:
                frames.append(fr(c, t))  # duplicate
    # arrival order: mostly sorted by stamp with local shuffles (out of order)
    keys = [f.stamp_ns / MS + draw(st.integers(0, 20)) for f in frames]
    order = sorted(range(len(frames)), key=lambda i: keys[i])
    if draw(st.booleans()):
        frames.append(fr("unknown", 1))
    slop = draw(st.integers(0, 20)) * MS
    qsize = draw(st.integers(1, 8))
    return cams, [frames[i] for i in order] + frames[len(order):], slop, qsize


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_sync_properties(data):
    cams, frames, slop, qsize = data
    s = ApproximateTimeSync(cams, slop_ns=slop, queue_size=qsize)
    out = feed(s, frames)
    emitted_ids = []
    last = None
    last_per_cam = {}
    for fs in out:
        assert fs.cameras == cams  # one frame per camera, in order
        stamps = [f.stamp_ns for f in fs.frames]
        assert max(stamps) - min(stamps) <= slop
        assert fs.stamp_ns == max(stamps)
        if last is not None:
            assert fs.stamp_ns > last
        last = fs.stamp_ns
        for f in fs.frames:
            assert f.stamp_ns > last_per_cam.get(f.camera, -(1 << 62))
            last_per_cam[f.camera] = f.stamp_ns
        emitted_ids += [id(f) for f in fs.frames]
    assert len(set(emitted_ids)) == len(emitted_ids)  # each frame emitted at most once
    assert len(frames) == len(emitted_ids) + s.drops.total() + s.pending_count()  # exactly once
    assert s.pending_count() <= qsize * len(cams)
    n_flushed = s.flush()
    assert s.drops["flushed"] == n_flushed and s.pending_count() == 0
    assert len(frames) == len(emitted_ids) + s.drops.total()


def test_sync_emits_every_set_of_clean_streams():
    s = ApproximateTimeSync(["a", "b", "c"], slop_ns=5 * MS, queue_size=4)
    frames = [fr(c, 33 * k + j) for k in range(50) for j, c in enumerate(["c", "a", "b"])]
    out = feed(s, frames)
    assert len(out) == 50 and s.drops.total() == 0


# ---------------------------------------------------------------- sliding window
def fsets(n):
    return [FrameSet(i, i * 100, [fr("a", i * 100)]) for i in range(n)]


def test_window_indices_and_overlap():
    evicted = []
    w = SlidingWindow(4, 2, on_evict=lambda fs, windowed: evicted.append((fs.index, windowed)))
    wins = [(i, w.push(fs)) for i, fs in enumerate(fsets(10))]
    got = [(i, [fs.index for fs in win.frame_sets]) for i, win in wins if win is not None]
    assert got == [(3, [0, 1, 2, 3]), (5, [2, 3, 4, 5]), (7, [4, 5, 6, 7]), (9, [6, 7, 8, 9])]
    assert [win.index for _, win in wins if win is not None] == [0, 1, 2, 3]
    assert evicted == [(i, True) for i in range(6)]
    assert w.flush() is None  # everything was windowed
    w.reset()
    assert len(w) == 0 and len(evicted) == 10


def test_window_stride_larger_than_size_and_flush_and_max_views():
    evicted = []
    w = SlidingWindow(2, 3, on_evict=lambda fs, windowed: evicted.append((fs.index, windowed)))
    got = [[fs.index for fs in win.frame_sets] for win in map(w.push, fsets(9)) if win is not None]
    assert got == [[0, 1], [3, 4], [6, 7]]
    assert (2, False) in evicted and (5, False) in evicted
    fl = w.flush()
    assert [fs.index for fs in fl.frame_sets] == [7, 8]
    two = [FrameSet(i, i, [fr("a", i), fr("b", i)]) for i in range(4)]
    w2 = SlidingWindow(4, 1, max_views=5)
    win = [w2.push(fs) for fs in two][-1]
    assert [fs.index for fs in win.frame_sets] == [2, 3] and win.n_views == 4


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 40))
def test_window_properties(size, stride, n):
    w = SlidingWindow(size, stride)
    wins = [(i, w.push(fs)) for i, fs in enumerate(fsets(n))]
    emitted = [(i, win) for i, win in wins if win is not None]
    expected_at = [i for i in range(n) if i >= size - 1 and (i - (size - 1)) % stride == 0]
    assert [i for i, _ in emitted] == expected_at
    for k, (i, win) in enumerate(emitted):
        idx = [fs.index for fs in win.frame_sets]
        assert idx == list(range(i - size + 1, i + 1))  # newest `size` consecutive sets
        assert win.index == k
        if k:
            prev = [fs.index for fs in emitted[k - 1][1].frame_sets]
            assert len(set(prev) & set(idx)) == max(0, size - stride)


def test_watchdog_reports_silent_camera():
    now = [0]
    wd = SyncWatchdog(["a", "b"], timeout_ns=100, clock=lambda: now[0])
    now[0] = 50
    wd.observe("a")
    wd.observe("zzz")
    assert wd.silent() == {}
    now[0] = 120
    assert wd.silent() == {"b": 120}
    now[0] = 200
    assert wd.silent() == {"a": 150, "b": 200}
    wd.observe("b")
    assert set(wd.silent()) == {"a"} and wd.status()["b"]["seen"] is True
