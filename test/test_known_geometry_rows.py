"""Known-geometry rows of the oracle table (issue 16: "how much each source of known geometry improves the map").

No network here: ``DriftingGeometryPredictor`` plays a network whose geometry is right only up to a per-window
Sim(3) (each window its own scale and world, as DA3's windows are) with every view's rotation a few degrees
off, and no masks of its own. GT masks (the oracle's ``masks`` part) on that geometry then isolate what the
known source does: the rows replay the bag through ``eval.replay`` with ``known_geometry`` set, reading rig
extrinsics and poses from the bag's ``/tf_static`` / ``/tf`` exactly as ``fast3dis-eval --known-geometry``.
"""

import numpy as np
import pytest

from fast3dis_ros.core.frames import WindowPrediction
from fast3dis_ros.data.bags import read_ground_truth, write_scene_bag
from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
from fast3dis_ros.eval.oracle import (CachedPredictor, config_name, known_geometry_configs, parse_known_sources,
                                      table_config)
from fast3dis_ros.eval.oracle_table import OracleTable
from fast3dis_ros.eval.replay import ReplayConfig
from fast3dis_ros.eval.report import table_lines

SOURCES = ["none", "rig", "poses", "rig+poses"]
VIEW_ROT_NOISE_DEG = 6.0


def _rot(axis: np.ndarray, deg: float) -> np.ndarray:
    import cv2

    return cv2.Rodrigues(np.asarray(axis, np.float64) / np.linalg.norm(axis) * np.radians(deg))[0]


class DriftingGeometryPredictor:
    """GT depth and cameras of each window in that window's own world: scale ``0.4 + 0.3 * index`` (window
    units per metre), rotated and shifted per window; each view's rotation off by ``VIEW_ROT_NOISE_DEG`` about
    a random axis (its centre kept). No instances (labels 0): the rows put GT masks on top."""

    def __init__(self, gt) -> None:
        self.gt = gt

    def predict(self, window) -> WindowPrediction:
        rng = np.random.default_rng(int(window.index))
        a = 0.4 + 0.3 * window.index
        R_w, t_w = _rot(rng.normal(size=3), 25.0), rng.normal(size=3)
        depth, K, T = [], [], []
        for f in window.views:
            st = int(f.stamp_ns)
            T_cg = np.linalg.inv(self.gt.T_world_cam[f.camera][st])  # T_cam_gtworld
            R = T_cg[:3, :3] @ R_w.T
            t = a * (T_cg[:3, 3] - R @ t_w)
            N = _rot(rng.normal(size=3), VIEW_ROT_NOISE_DEG)
            Tv = np.eye(4)
            Tv[:3, :3], Tv[:3, 3] = N @ R, N @ t
            T.append(Tv)
            depth.append(a * np.nan_to_num(self.gt.depth[f.camera][st]).astype(np.float32))
            K.append(self.gt.K[f.camera])
        V, (h, w) = len(T), depth[0].shape
        return WindowPrediction(
            window_index=window.index, stamp_ns=window.stamp_ns, cameras=[f.camera for f in window.views],
            frame_ids=[f.frame_id for f in window.views], view_stamps_ns=[int(f.stamp_ns) for f in window.views],
            images=np.stack([f.image for f in window.views]), depth=np.stack(depth),
            depth_conf=np.ones((V, h, w), np.float32), K=np.stack(K).astype(np.float64), T_cam_world=np.stack(T),
            labels=np.zeros((V, h, w), np.int32), scores=np.zeros(0, np.float32))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    bag = tmp_path_factory.mktemp("kg") / "scene"
    write_scene_bag(generate_scene(SceneConfig(n_cameras=3, n_frames=6, width=112, height=84, seed=7020)), bag)
    gt = read_ground_truth(bag)
    t = OracleTable([table_config(("masks",), k) for k in SOURCES])
    # one cache for every row, as the CLI does: the first row (none) fills it without known geometry
    t.add("7020", bag, gt, CachedPredictor(DriftingGeometryPredictor(gt)), ReplayConfig())
    return t


@pytest.fixture(scope="module")
def rows(table):
    return {r["known_geometry"]: r for r in table.pooled()}


def test_known_poses_put_the_map_on_the_gt_world(rows):
    """GT masks on drifting geometry: known poses (alone or with the rig) place every window in the GT world
    (the map-cloud Sim(3) is the identity) and the map scores like all-GT; without them it does not."""
    print("\n".join(table_lines(list(rows.values()))))
    none = rows["none"]
    assert none["map_AP50"] < 0.5
    for k in ("poses", "rig+poses"):
        r = rows[k]
        assert r["map_AP50"] > 0.9 > none["map_AP50"] + 0.4, k
        assert r["sim3_scale_mean"] == pytest.approx(1.0, abs=1e-4), k
        assert r["sim3_rotation_deg_mean"] < 0.01 and r["sim3_translation_m_mean"] < 1e-3, k
        assert r["geometry"]["pct_points_within_5cm"] > 0.97, k
        assert r["geometry"]["pct_points_within_5cm"] > none["geometry"]["pct_points_within_5cm"] + 0.3, k


def test_rig_extrinsics_make_the_map_metric(rows):
    """The first window is 0.4 units per metre: without known geometry the map is in those units (Sim(3)
    scale 2.5); the rig's known baselines make it metric, and putting each frame set's cameras back on the
    rig removes most of the views' rotation error (measured: map-cloud AP50 0.19 -> 0.89)."""
    assert rows["none"]["sim3_scale_mean"] == pytest.approx(2.5, rel=0.05)
    assert rows["rig"]["sim3_scale_mean"] == pytest.approx(1.0, abs=0.02)
    assert rows["rig"]["map_AP50"] > rows["none"]["map_AP50"] + 0.4


def test_each_row_reads_its_own_source_from_the_bag(table, rows):
    """Per scene, the replay's TF reader attached to the 18 frames (3 cameras x 6 frame sets) what the row's
    source asks for, and nothing else."""
    per_scene = {r["known_geometry"]: r["known_geometry_counts"] for r in table.scenes[0]["rows"]}
    assert per_scene == {"none": {}, "rig": {"with_rig_extrinsics": 18}, "poses": {"with_pose": 18},
                         "rig+poses": {"with_rig_extrinsics": 18, "with_pose": 18}}
    assert [rows[k]["config"] for k in SOURCES] == ["masks", "masks|known=rig", "masks|known=poses",
                                                    "masks|known=rig+poses"]


def test_known_geometry_configs_and_sources():
    assert parse_known_sources("none,rig,poses,rig+poses") == SOURCES
    assert parse_known_sources("all") == SOURCES and parse_known_sources("rig,rig") == ["rig"]
    with pytest.raises(ValueError, match="odometry"):
        parse_known_sources("rig,odometry")
    cfgs = known_geometry_configs([("masks", "depth", "poses"), ()], ["none", "rig"])
    assert [config_name(c) for c in cfgs] == ["masks+depth+poses", "none", "masks|known=rig", "none|known=rig"]
    assert [config_name(c) for c in known_geometry_configs([()], ["poses"])] == ["masks|known=poses",
                                                                                  "none|known=poses"]


def test_oracle_table_cli_rejects_an_unknown_source(capsys):
    from fast3dis_ros.eval.oracle_table import run

    with pytest.raises(SystemExit) as e:
        run(["--seeds", "none", "--known-geometry", "rig,odometry", "--out", "unused"])
    assert e.value.code == 2 and "unknown known-geometry source(s) ['odometry']" in capsys.readouterr().err
