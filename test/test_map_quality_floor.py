"""Quality floor of the bundled checkpoint on two small held-out scenes (issue 16).

What the robot receives is the fused map, so the floor is on the map: the published map cloud scored
against the GT surface (``eval/map_metrics.py``) and the window linking rate, for the network alone and with
everything replaced by ground truth (``eval/oracle.py``: the fusion / linking / scoring chain on perfect
inputs). Figures measured on 2026-12-05 (bundled checkpoint, CPU, seeds 7010-7011, 3 cameras x 6 frame
sets at 160x120, window 4 stride 2) are in FLOORS' comments; each floor sits a margin below. A regression of the
network, the fusion, the tracker or the scoring fails here. Raise the floors when the figures go up.
"""

import shutil

import numpy as np
import pytest

from fast3dis_ros.data.bags import read_ground_truth, write_scene_bag
from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
from fast3dis_ros.eval.oracle import CachedPredictor
from fast3dis_ros.eval.oracle_table import OracleTable
from fast3dis_ros.eval.replay import ReplayConfig
from fast3dis_ros.inference.factory import PredictorSpec, build_predictor
from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT

SEEDS = (7010, 7011)  # not among the bundled checkpoint's training / validation seeds (eval/heldout.py)
NET, ALL_GT, GT_GEOMETRY = (), ("masks", "depth", "poses"), ("depth", "poses")

# pooled over the two scenes; measured value -> floor. Re-measured 2026-12-05 after the fusion rules for network
# masks (instance_vote_weight 5, support_windows 3; docs/BENCHMARKS.md "Issue 16: fusion of network masks"):
# only the all-GT map AP50 moved (0.983 -> 0.999); the other figures are the merged 2D linking's.
FLOORS = {
    ("masks+depth+poses", "map_AP50"): 0.95,  # measured 0.999: fusion + scoring on perfect inputs
    ("masks+depth+poses", "link_rate"): 0.85,  # measured 0.963 (26/27 window instances)
    ("depth+poses", "link_rate"): 0.75,  # measured 0.889: network masks, GT geometry
    ("depth+poses", "map_AP50"): 0.05,  # measured 0.071
    ("none", "per_window_AP50"): 0.10,  # measured 0.154: the network alone, each window on all its views
    ("none", "lifted_AP50"): 0.07,  # measured 0.091
}
# The product's own map-cloud AP50 (network masks + network geometry) measures 0.0 today (its geometry puts
# the map ~1-3 m off the GT surface after the Sim(3)): no floor above 0 is possible for it yet; the rows
# above pin the network (lifted / per-window) and the map chain (GT geometry) separately.


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    assert (BUNDLED_CHECKPOINT / "model.safetensors").is_file(), "the bundled checkpoint is part of the package"
    predictor, info = build_predictor(PredictorSpec(device="cpu"))
    assert info["weights"] == "bundled"
    table = OracleTable([NET, GT_GEOMETRY, ALL_GT])
    root = tmp_path_factory.mktemp("floor")
    for seed in SEEDS:
        bag = root / f"scene_{seed}"
        write_scene_bag(generate_scene(SceneConfig(n_cameras=3, n_frames=6, width=160, height=120, seed=seed)), bag)
        table.add(str(seed), bag, read_ground_truth(bag), CachedPredictor(predictor), ReplayConfig())
        shutil.rmtree(bag)
    return {r["oracle"]: r for r in table.pooled()}


def _value(rows, name, key):
    r = rows[name]
    return r["linking"]["rate"] if key == "link_rate" else r[key]


@pytest.mark.parametrize("name,key", sorted(FLOORS))
def test_quality_floor(pooled, name, key):
    v = _value(pooled, name, key)
    print(f"{name} {key} = {v:.4f} (floor {FLOORS[(name, key)]})")
    assert np.isfinite(v) and v >= FLOORS[(name, key)], f"{name} {key} = {v:.4f} fell below its floor"


def test_all_gt_map_is_metric_and_complete(pooled):
    """With GT depth and poses the map frame is the GT world: the Sim(3) is the identity and the published
    points lie on the GT surface."""
    r = pooled["masks+depth+poses"]
    assert abs(r["sim3_scale_mean"] - 1.0) < 1e-3 and r["sim3_residual_m_mean"] < 1e-3
    assert r["geometry"]["pct_points_within_5cm"] > 0.98
    assert r["geometry"]["pct_gt_surface_covered"] > 0.98
    assert r["instances"]["merges"] == 0
