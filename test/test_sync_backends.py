"""The node's two frame-set back ends (``sync_backend``) without DDS: the real
``message_filters.ApproximateTimeSynchronizer`` behind ``ros/sync_adapter.py`` and the package's own
``ApproximateTimeSync`` group the same well-formed stream into the same frame sets; only the package's
one names why a frame was dropped and resets on a jump back in time. (Over DDS: test_node_sync_dds.py.)"""

import numpy as np
import pytest
from ros_helpers import require_ros_tools

require_ros_tools("message_filters")

from fast3dis_ros.core.frames import CameraFrame  # noqa: E402
from fast3dis_ros.pipeline.runner import PipelineRunner  # noqa: E402
from fast3dis_ros.ros import sync_adapter as sa  # noqa: E402

IMG = np.zeros((2, 2, 3), np.uint8)
S = 1_000_000_000


def _stream(n=6, cams=("a", "b", "c"), jitter=3_000_000):
    """n frame sets at 10 Hz, camera i late by i*jitter; arrival order interleaved."""
    return [CameraFrame(c, S + k * S // 10 + i * jitter, IMG) for k in range(n) for i, c in enumerate(cams)]


def _sets(sync, frames):
    out = []
    for f in frames:
        out += sync.push(f)
    return [(fs.stamp_ns, tuple(f.stamp_ns for f in fs.frames)) for fs in out]


def _project(cams, slop, q=10):
    from fast3dis_ros.pipeline.sync import ApproximateTimeSync

    return ApproximateTimeSync(list(cams), slop, q)


def test_message_filters_backend_matches_the_package_synchroniser():
    mf = sa.make_synchronizer(["a", "b", "c"], 10_000_000, 10, backend="message_filters")
    assert isinstance(mf, sa.MessageFiltersSync) and mf.backend == "message_filters"
    frames = _stream()
    got_mf = _sets(mf, frames)
    got_own = _sets(_project(["a", "b", "c"], 10_000_000), frames)
    # message_filters emits a set once a later message proves it complete: the last set may wait
    assert len(got_mf) >= 5 and got_mf == got_own[:len(got_mf)]
    assert got_mf[0] == (S + 6_000_000, (S, S + 3_000_000, S + 6_000_000))
    assert mf.pushed == 18 and mf.emitted_sets == len(got_mf) and mf.resets == 0
    assert mf.drops.as_dict() == {"unmatched": 18 - 3 * len(got_mf)}


def test_unknown_backend_and_default():
    assert sa.make_synchronizer(["a"], 1) is None  # 'fast3dis': the runner builds its own (with resets)
    with pytest.raises(ValueError, match="one of \\['fast3dis', 'message_filters'\\]"):
        sa.make_synchronizer(["a"], 1, backend="project")


def test_only_the_package_synchroniser_names_drops_and_reports_a_jump_back():
    """Same frame sets from both; what differs is what the node can report. A camera that misses a set and
    an out-of-order frame: the package's back end names why each frame went ('stale', 'out_of_order'),
    message_filters gives one 'unmatched' total. A looping bag (stamps jump back 1.4 s, past the 1 s
    threshold): only the package's back end reports the reset the runner uses to restart the map."""
    bad = [f for f in _stream(6, ("a", "b")) if not (f.camera == "b" and f.stamp_ns == S + 2 * S // 10 + 3_000_000)]
    bad.insert(5, CameraFrame("a", S, IMG))  # older than a frame already matched
    own, mf = _project(["a", "b"], 10_000_000), sa.MessageFiltersSync(["a", "b"], 10_000_000, 10)
    assert _sets(own, bad) == _sets(mf, bad) and own.emitted_sets == 5
    assert own.drops.as_dict() == {"out_of_order": 1, "stale": 1}
    assert mf.drops.as_dict() == {"unmatched": 2}

    frames = _stream(15, ("a", "b"))
    looped = frames + [CameraFrame(f.camera, f.stamp_ns, IMG) for f in frames]  # the same 15 sets again
    own, mf = _project(["a", "b"], 10_000_000), sa.MessageFiltersSync(["a", "b"], 10_000_000, 10)
    got_own = _sets(own, looped)
    assert len(got_own) == 30 and got_own[15:] == got_own[:15] and _sets(mf, looped) == got_own
    assert own.resets == 1 and mf.resets == 0


def test_runner_with_message_filters_backend_accounts_every_frame():
    seen = []

    def predict(window):
        seen.append(window.n_views)
        raise RuntimeError("no model needed: counted as engine_error")

    sync = sa.make_synchronizer(["a", "b"], 10_000_000, 5, backend="message_filters")
    runner = PipelineRunner(["a", "b"], predict, window_size=2, stride=1, sync_mode=True, sync=sync)
    for k in range(5):
        t = S * (k + 1)
        runner.feed(CameraFrame("a", t, IMG))
        runner.feed(CameraFrame("b", t + 2_000_000, IMG))
    runner.feed(CameraFrame("a", 9 * S, IMG))  # never matched
    runner.flush()
    acc = runner.accounting()
    fs = acc["frame_sets"]
    n = fs["received"]
    assert n >= 4 and seen == [4] * (n - 1)  # windows of 2 sets x 2 cameras, stride 1
    assert n == fs["processed"] + sum(fs["dropped"].values()) + fs.get("in_flight", 0)
    frames = acc["frames"]
    assert frames["pushed"] == 11 and frames["in_sets"] == 2 * n and frames["dropped"] == {"unmatched": 11 - 2 * n}
    runner.stop()
