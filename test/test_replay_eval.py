"""fast3dis-eval / replay: accounting with an injected bad frame, baseline side by side, bad bags."""

import json
import shutil

import numpy as np
import pytest

from fast3dis_ros.data.bags import (CAMERA_INFO, IMAGE, TF, BagWriter, camera_info_dict, image_dict,
                                    tf_message_dict, write_scene_bag)


@pytest.fixture(scope="module")
def scene():
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    return generate_scene(SceneConfig(n_cameras=2, n_frames=4, width=112, height=84, seed=3))


def _write_bag_with_bad_frame(scene, path, bad=(2, 1)):
    """Scene bag with GT, where image (frame 2, camera 1) has the wrong size (half resolution)."""
    period = 100_000_000
    t0 = 1_700_000_000_000_000_000
    with BagWriter(path) as w:
        for fi, frame in enumerate(scene.frames):
            st = t0 + fi * period
            for ci, v in enumerate(frame):
                fid = f"{v.camera}_optical_frame"
                h, wd = v.rgb.shape[:2]
                rgb = v.rgb[::2, ::2].copy() if (fi, ci) == bad else v.rgb
                w.write(f"/{v.camera}/image_raw", IMAGE, image_dict(rgb, "rgb8", fid, st), st)
                w.write(f"/{v.camera}/camera_info", CAMERA_INFO, camera_info_dict(v.K, wd, h, fid, st), st)
                w.write(f"/{v.camera}/depth_gt", IMAGE, image_dict(v.depth.astype(np.float32), "32FC1", fid, st), st)
                w.write(f"/{v.camera}/instance_gt", IMAGE, image_dict(v.instance.astype(np.int32), "32SC1", fid, st),
                        st)
            w.write("/tf", TF, tf_message_dict([("map", f"{v.camera}_optical_frame", v.T_world_cam) for v in frame],
                                               st), st)


def test_replay_accounting_with_bad_frame_and_baseline(scene, tmp_path, capsys):
    from fast3dis_ros.eval.evaluate import run

    bag = tmp_path / "bad.mcap"
    _write_bag_with_bad_frame(scene, bag)
    out = tmp_path / "eval"
    rc = run(["--bag", str(bag), "--out", str(out), "--window-size", "2", "--stride", "1", "--score-threshold",
              "0.0", "--baseline", "hdbscan", "--no-progress"])
    assert rc == 0
    acc = json.loads((out / "accounting.json").read_text())
    fr, fs = acc["frames"], acc["frame_sets"]
    assert fr["read"] == 8
    assert fr["rejected"] == {"image_size_mismatch": 1}
    assert fr["read"] == sum(fr["rejected"].values()) + fr["in_sets"] + sum(fr["dropped_by_sync"].values()) + \
        fr["pending"]
    assert fr["pending"] == 0 and sum(fr["dropped_by_sync"].values()) == 1  # the lone partner of the bad frame
    assert fs["received"] == 3 and fs["in_flight"] == 0
    assert fs["received"] == fs["processed"] + sum(fs["dropped"].values())
    assert acc["balanced"] is True
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["methods"]) == {"fast3dis", "hdbscan"}
    # measured (bundled checkpoint, CPU): FAST3DIS AP50 0.056 / AP25 0.31 with 2D mask-overlap linking (issue 16:
    # every instance of the second window linked; 0.13 / 0.32 with voxel-only linking, whose unlinked copies
    # happened to score better here), HDBSCAN on its mask features AP50 0.11 / AP25 0.78; bounds with a margin
    # for CPU numerics
    f, b = m["methods"]["fast3dis"], m["methods"]["hdbscan"]
    assert 0.04 <= f["AP50"] <= 0.10 and 0.24 <= f["AP25"] <= 0.40 and f["AP"] <= f["AP50"]
    assert 0.06 <= b["AP50"] <= 0.16 and 0.66 <= b["AP25"] <= 0.86 and b["AP"] <= b["AP50"]
    for meth in (f, b):
        assert meth["timing"]["ms_per_window_mean"] > 0
    assert "mask_features" in m["methods"]["hdbscan"]["features"]
    assert (out / "report.md").is_file() and (out / "ap_bars.png").is_file()
    assert (out / "output_bag" / "metadata.yaml").is_file()
    printed = capsys.readouterr().out
    assert "hdbscan" in printed and "balanced: True" in printed


def test_replay_without_gt_and_sqlite(scene, tmp_path):
    """A sqlite3 bag without ground truth: replay + accounting only, no metrics."""
    from fast3dis_ros.eval.replay import ReplayConfig, replay_bag
    from fast3dis_ros.inference.predictor import Predictor

    bag = tmp_path / "nogt"
    write_scene_bag(scene, bag, storage="sqlite3", ground_truth=False)
    res = replay_bag(bag, Predictor.random_tiny(0), ReplayConfig(window_size=4, stride=4), out_bag=tmp_path / "o",
                     progress=False)
    assert res.cameras == list(scene.camera_names)
    assert res.accounting["balanced"] and res.accounting["frame_sets"]["processed"] == 4
    assert len(res.records) == 1 and res.output_counts["/tf"] == 1


def test_truncated_bag_gives_clear_error(scene, tmp_path, capsys):
    from fast3dis_ros.eval.evaluate import main

    bag = tmp_path / "good"
    write_scene_bag(scene, bag)
    bad = tmp_path / "truncated"
    shutil.copytree(bag, bad)
    mcap = next(bad.glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit) as e:
        main(["--bag", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "fast3dis-eval: error: cannot read bag" in err and "Traceback" not in err
    # not a bag at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--bag", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert e.value.code == 2
    assert "metadata.yaml" in capsys.readouterr().err
