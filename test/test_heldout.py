"""Held-out evaluation (fast3dis_ros.eval.heldout): tiny CPU smoke run + seed parsing + CLI parameters."""

import json

import pytest

from fast3dis_ros.eval.heldout import parse_seeds


def test_parse_seeds():
    assert parse_seeds("7000-7003") == [7000, 7001, 7002, 7003]
    assert parse_seeds("7000,7002, 7001") == [7000, 7001, 7002]
    assert parse_seeds("7000-7001,7010") == [7000, 7001, 7010]
    with pytest.raises(ValueError):
        parse_seeds("7003-7000")
    with pytest.raises(ValueError):
        parse_seeds(",")


def test_heldout_smoke(tmp_path, capsys):
    from fast3dis_ros.eval.heldout import run_heldout

    out = tmp_path / "heldout"
    argv = ["--seeds", "7000-7001", "--tune-seeds", "7100", "--sweep-min-cluster-frac", "0.004",
            "--sweep-w-feat", "0,1", "--out", str(out), "--cameras", "2", "--frames", "4", "--width", "112",
            "--height", "84", "--no-progress"]
    res = run_heldout(argv)
    d = json.loads((out / "heldout.json").read_text())
    assert d["command"] == "python -m fast3dis_ros.eval.heldout " + " ".join(argv)
    assert d["argv"] == argv and d["test_seeds"] == [7000, 7001] and d["tune_seeds"] == [7100]
    assert set(d["pooled"]) == {"fast3dis", "hdbscan"}
    rows = d["per_scene"]
    assert [r["seed"] for r in rows] == [7000, 7001] and all(r["balanced"] for r in rows)
    for m in ("fast3dis", "hdbscan"):
        for proto in ("per_window", "whole"):
            p = d["pooled"][m][proto]
            for k in ("AP", "AP50", "AP25"):
                assert 0.0 <= p[k] <= 1.0, (m, proto, k)
            # ScanNet pooling: the pooled GT count is the sum of the per-scene GT counts
            assert p["n_gt"] == sum(r[m][proto]["n_gt"] for r in rows) > 0
            assert p["n_pred"] == sum(r[m][proto]["n_pred"] for r in rows)
        assert 0.0 <= d["pooled"][m]["depth_delta1_mean"] <= 1.0
    # each window is its own scene in the per-window protocol, each replay in the whole one
    assert d["pooled"]["fast3dis"]["whole"]["n_scenes"] == 2
    assert d["pooled"]["fast3dis"]["per_window"]["n_scenes"] == sum(r["windows"] for r in rows)
    # the sweep: 1 x 2 settings on the tuning seed, the chosen one is what the test scenes used
    sw = d["sweep"]
    assert len(sw["rows"]) == 2 and sw["seeds"] == [7100]
    assert d["pooled"]["hdbscan"]["params"] == sw["rows"][sw["best_index"]]["params"]
    assert {r["params"]["w_feat"] for r in sw["rows"]} == {0.0, 1.0}
    assert all(r["params"]["min_samples"] == 10 for r in sw["rows"])
    md = (out / "heldout.md").read_text()
    assert d["command"] in md and "per window" in md
    assert (out / "ap_bars.png").stat().st_size > 0 and (out / "metrics.json").is_file()
    assert res["pooled"]["fast3dis"]["per_window"]["n_gt"] == d["pooled"]["fast3dis"]["per_window"]["n_gt"]
    printed = capsys.readouterr().out
    assert "hdbscan" in printed and "per_window" in printed and "scene 2/2" in printed


def test_heldout_fixed_params_skip_sweep(tmp_path):
    from fast3dis_ros.eval.heldout import run_heldout

    out = tmp_path / "h"
    d = run_heldout(["--seeds", "7000", "--out", str(out), "--cameras", "2", "--frames", "2", "--width", "112",
                     "--height", "84", "--window-size", "2", "--hdbscan-min-cluster-frac", "0.01",
                     "--hdbscan-w-feat", "0", "--no-progress"])
    assert d["sweep"] is None and d["tune_seeds"] == []
    assert d["pooled"]["hdbscan"]["params"] == {"min_cluster_frac": 0.01, "w_feat": 0.0}


def test_overlapping_tuning_seeds_refused(tmp_path):
    from fast3dis_ros.eval.heldout import run_heldout

    with pytest.raises(SystemExit):
        run_heldout(["--seeds", "7000-7001", "--tune-seeds", "7001", "--out", str(tmp_path / "x")])


def test_eval_cli_baseline_params():
    from fast3dis_ros.eval.evaluate import _parse, baseline_params_from_args

    a = _parse(["--bag", "b", "--out", "o", "--baseline", "hdbscan", "--hdbscan-min-cluster-frac", "0.002",
                "--hdbscan-min-samples", "5", "--hdbscan-w-xyz", "2", "--hdbscan-w-feat", "0"])
    assert baseline_params_from_args(a) == {"min_cluster_frac": 0.002, "min_samples": 5, "w_xyz": 2.0, "w_feat": 0.0}
    assert baseline_params_from_args(_parse(["--bag", "b", "--out", "o"])) == {}
