"""``fast3dis-eval --bags`` sharded over 2 gloo ranks equals the single-process run on the same bags.

Three small synthetic bags with ground truth plus one unreadable bag: the pooled AP (whole replay and
per window), per-bag rows and exit status must be identical for 1 and 2 processes; rank 1's bags are
written by rank 1 (per-bag reports), the pooled report by rank 0 only.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ARGS = ["--window-size", "2", "--stride", "1", "--score-threshold", "0.0", "--no-progress", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _w_eval(rank: int, world: int, port: int, bags: list[str], out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from fast3dis_ros.eval.sharded import run_many

    rc = run_many(["--bags", *bags, "--out", out, *ARGS])
    Path(out, f"rc_rank{rank}").write_text(str(rc))


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    from fast3dis_ros.data.bags import write_scene_bag
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    root = tmp_path_factory.mktemp("fleet")
    for seed in (3, 4, 5):
        sc = generate_scene(SceneConfig(n_cameras=2, n_frames=2, width=84, height=56, n_objects=4, seed=seed))
        write_scene_bag(sc, root / f"scene_{seed}")
    bad = root / "scene_9_broken"
    bad.mkdir()
    (bad / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 9, storage_identifier: mcap\n")
    return root


def test_sharded_eval_equals_single_process(bags, tmp_path):
    from fast3dis_ros.eval.sharded import find_bags, run_many

    assert [b.name for b in find_bags([str(bags)])] == ["scene_3", "scene_4", "scene_5", "scene_9_broken"]
    one = tmp_path / "one"
    rc1 = run_many(["--bags", str(bags), "--out", str(one), *ARGS])
    two = tmp_path / "two"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_w_eval, args=(r, 2, port, [str(bags)], str(two))) for r in range(2)]
    for p in procs:
        p.start()
    t_end = time.monotonic() + 300
    for p in procs:
        p.join(max(t_end - time.monotonic(), 1.0))
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    rc2 = [int((two / f"rc_rank{r}").read_text()) for r in range(2)]
    assert rc1 == 1 and rc2 == [1, 0]  # one unreadable bag -> 1 (rank 0 reports; rank 1 writes no report)
    r1 = json.loads((one / "pooled.json").read_text())
    r2 = json.loads((two / "pooled.json").read_text())
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert r1["n_bags"] == 4 and r1["n_scored"] == 3 and r1["n_failed"] == 1
    # exactly equal, every threshold (compared as JSON text: NaN of an empty threshold equals itself there)
    assert json.dumps(r2["pooled"], sort_keys=True) == json.dumps(r1["pooled"], sort_keys=True)
    w = r1["pooled"]["fast3dis"]["whole"]
    assert w["n_scenes"] == 3 and w["n_gt"] > 0 and w["n_pred"] > 0
    def rows(r):
        return json.dumps([{k: v for k, v in b.items() if k != "wall_s"} for b in r["bags"]], sort_keys=True)

    assert rows(r2) == rows(r1)
    assert "FAILED" in (one / "pooled.md").read_text()
    # bag 1 (scene_4) was evaluated by rank 1 in the sharded run; its per-bag report exists
    assert (two / "bags" / "0001_scene_4" / "metrics.json").is_file()
    # pooled == the same evaluator fed the bags' own scenes one after another (no sharding at all)
    per_bag = [json.loads((one / "bags" / f"{i:04d}_scene_{s}" / "metrics.json").read_text())
               for i, s in enumerate((3, 4, 5))]
    assert sum(m["methods"]["fast3dis"]["n_gt"] for m in per_bag) == w["n_gt"]
