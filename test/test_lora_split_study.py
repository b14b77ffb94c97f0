"""LoRA split study: --first-lora-block, --init-da3, the pooled AP with bootstrap, the study driver end to end.

CPU, tiny configuration (the bundled checkpoint's DA3 part), 56x42 images; the end-to-end study trains two
splits for 2 steps each in parallel subprocesses, so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT

H, W = 42, 56
D = 96  # tiny embed dim
# LoRA parameters of one tiny block at rank 4: r * (in + out) for qkv, proj, fc1, fc2
LORA_PER_BLOCK = 4 * ((D + 3 * D) + (D + D) + (D + 4 * D) + (4 * D + D))


def _lora_blocks(model) -> dict[int, int]:
    """block index -> LoRA parameter count."""
    out: dict[int, int] = {}
    for n, p in model.backbone.net.named_parameters():
        if "lora_" in n:
            b = int(re.search(r"blocks\.(\d+)\.", n).group(1))
            out[b] = out.get(b, 0) + p.numel()
    return out


# ---------------------------------------------------------------------------------- --first-lora-block
def test_first_lora_block_puts_adapters_only_in_later_blocks():
    from fast3dis_ros.model.fast3dis import Fast3DIS
    from fast3dis_ros.train.train import build_model_config, build_parser

    counts = {}
    for n in (0, 4, 5):
        args = build_parser().parse_args(["--size", "tiny", "--height", str(H), "--width", str(W),
                                          "--first-lora-block", str(n)])
        cfg = build_model_config(args)
        assert cfg.backbone.first_lora_block == n and cfg.backbone.lora_start == n
        model = Fast3DIS(cfg)
        blocks = _lora_blocks(model)
        assert sorted(blocks) == list(range(n, 6))
        assert all(v == LORA_PER_BLOCK for v in blocks.values()), blocks
        assert model.backbone.lora_start == n
        counts[n] = sum(blocks.values())
    assert counts == {0: 6 * LORA_PER_BLOCK, 4: 2 * LORA_PER_BLOCK, 5: LORA_PER_BLOCK}


def test_first_lora_block_range_and_split_mismatch_are_errors(tmp_path):
    from fast3dis_ros.train.train import main

    base = ["--synthetic", "1", "--steps", "0", "--device", "cpu", "--height", str(H), "--width", str(W),
            "--val-seeds", "", "--no-progress", "--no-plot", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match=r"--first-lora-block 6 is out of range.*0\.\.5"):
        main(base + ["--first-lora-block", "6"])
    with pytest.raises(SystemExit, match=r"out of range"):
        main(base + ["--first-lora-block", "-1"])
    # the bundled checkpoint has LoRA from block 3: --init with another split would drop weights silently
    with pytest.raises(SystemExit, match=r"LoRA from block 3"):
        main(base + ["--init", str(BUNDLED_CHECKPOINT), "--first-lora-block", "5"])
    with pytest.raises(SystemExit, match=r"cannot be combined with --full-finetune"):
        main(base + ["--init-da3", str(BUNDLED_CHECKPOINT), "--full-finetune"])



def test_study_rejects_out_of_range_splits(tmp_path):
    from experiments.lora_split_study import run_study

    for bad in ("0,6", "-1,3"):
        with pytest.raises(SystemExit, match=r"^--splits \[(6|-1)\] out of range: DA3-tiny has 6 blocks \(0\.\.5\)$"):
            run_study(["--out", str(tmp_path / "out"), f"--splits={bad}"])


# ---------------------------------------------------------------------------------- --init-da3
def test_init_da3_loads_only_the_da3_weights(tmp_path):
    from safetensors.torch import load_file

    from fast3dis_ros.model.checkpoint import load_checkpoint, read_checkpoint_config
    from fast3dis_ros.train.loop import build_model_split_invariant
    from fast3dis_ros.train.train import main

    out = tmp_path / "ckpt"
    main(["--synthetic", "1", "--steps", "0", "--device", "cpu", "--height", str(H), "--width", str(W),
          "--val-seeds", "", "--no-progress", "--no-plot", "--out", str(out),
          "--init-da3", str(BUNDLED_CHECKPOINT), "--first-lora-block", "5", "--seed", "3"])
    cfg, contents, _ = read_checkpoint_config(out)
    # a LoRA + head checkpoint whose DA3 weights are the bundled checkpoint's
    assert contents == "trainable" and not cfg.train_backbone
    assert cfg.backbone.pretrained == str(BUNDLED_CHECKPOINT.resolve()) and cfg.backbone.first_lora_block == 5
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(k.startswith("head.") or "lora_" in k for k in saved)
    model, _ = load_checkpoint(out)

    ref = load_file(str(BUNDLED_CHECKPOINT / "model.safetensors"))
    ref_da3 = {k[len("backbone.net."):].replace(".base_layer.", "."): v for k, v in ref.items()
               if k.startswith("backbone.net.") and "lora_" not in k}
    da3 = model.backbone.da3_state_dict()
    assert set(da3) == set(ref_da3) and len(da3) > 100
    for k, v in ref_da3.items():
        assert torch.equal(da3[k], v.float()), k
    # LoRA only in block 5, fresh: B = 0 (feature pass starts as the geometry pass), A not the bundled one
    assert sorted(_lora_blocks(model)) == [5]
    lora = {n: p for n, p in model.backbone.net.named_parameters() if "lora_" in n}
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in lora.items() if "lora_B" in n)
    a_name = "backbone.pretrained.blocks.5.attn.qkv.lora_A.default.weight"
    assert not torch.allclose(lora[a_name], ref["backbone.net." + a_name].float())
    # head fresh from the seed: equal to a newly built one, far from the bundled head
    fresh = build_model_split_invariant(cfg, 3)
    for n, p in model.head.state_dict().items():
        assert torch.equal(p, fresh.head.state_dict()[n]), n
    w = "head." + next(n for n, p in model.head.named_parameters() if p.dim() == 2)
    assert not torch.allclose(model.state_dict()[w], ref[w].float(), atol=1e-3)


def test_head_init_does_not_depend_on_the_split():
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.train.loop import build_model_split_invariant

    heads = [build_model_split_invariant(Fast3disConfig.tiny(process_res=W, first_lora_block=n), 0).head
             for n in (0, 5)]
    a, b = heads[0].state_dict(), heads[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- pooled AP
def _toy_window(rng, n=400, k=5):
    gt = rng.integers(0, k + 1, size=n)
    pred = gt.copy()
    flip = rng.random(n) < 0.25
    pred[flip] = rng.integers(0, k + 2, size=int(flip.sum()))
    scores = rng.random(k + 1)
    return pred, scores, gt


def test_pooled_ap_matches_evaluator_and_bootstrap_is_a_repooling():
    from fast3dis_ros.eval.metrics import InstanceAPEvaluator
    from experiments.split_metrics import PooledAP

    rng = np.random.default_rng(0)
    windows = [_toy_window(rng) for _ in range(12)]
    ev, pooled = InstanceAPEvaluator(), PooledAP()
    for w in windows:
        ev.add_scene(*w)
        pooled.add(*w)
    ref, got = ev.compute(), pooled.compute()
    assert 0.0 < ref["AP"] < ref["AP50"] <= ref["AP25"] <= 1.0
    for k in ("AP", "AP50", "AP25"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12)
    # a resample = the evaluator over the resampled windows (repeats included)
    idx = rng.integers(0, 12, size=12)
    ev2 = InstanceAPEvaluator()
    for i in idx:
        ev2.add_scene(*windows[i])
    boot = pooled.bootstrap(np.stack([np.arange(12), idx]))
    assert boot["AP50"][0] == pytest.approx(ref["AP50"], abs=1e-12)
    assert boot["AP"][1] == pytest.approx(ev2.compute()["AP"], abs=1e-12)


# ---------------------------------------------------------------------------------- scene rendering
def test_render_device_auto_is_the_gpu_only_when_training_on_cuda(monkeypatch):
    from experiments.lora_split_study import build_parser, resolve_render_device

    assert build_parser().parse_args(["--out", "x"]).render_device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_render_device("auto", "auto") == "cuda"
    assert resolve_render_device("auto", "cuda:1") == "cuda:1"
    assert resolve_render_device("auto", "cpu") == "cpu"
    assert resolve_render_device("cpu", "cuda") == "cpu"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_render_device("auto", "auto") == "cpu"


def test_prepare_cache_renders_on_the_gpu_and_falls_back_to_cpu_processes(monkeypatch, tmp_path):
    from experiments import lora_split_study as S
    from fast3dis_ros.train import train as T

    calls = []

    def fake_make(seeds, *, device, workers, write_threads, cache, keep, **kw):  # make_synthetic_scenes
        calls.append((device, workers, write_threads, len(seeds)))
        assert not keep and cache == str(tmp_path)
        if fail and device != "cpu":
            raise RuntimeError("CUDA error: out of memory\nmore")
        return [None] * len(seeds)

    monkeypatch.setattr(T, "make_synthetic_scenes", fake_make)
    argv = ["--out", "x", "--scenes", "3", "--val-seeds", "900000-900001", "--test-seeds", "930000",
            "--gen-workers", "5", "--render-device", "cuda"]
    (tmp_path / "scene_0001001").mkdir()
    (tmp_path / "scene_0001001" / "scene.json").write_text("{}")
    fail = False
    args = S.build_parser().parse_args(argv)
    info = S.prepare_cache(args, tmp_path, 0.0)
    # on the GPU: rendered in this process (no worker processes) with 5 write threads; training scenes first
    assert calls == [("cuda", 0, 5, 3), ("cuda", 0, 5, 3)] and args.render_device == "cuda"
    assert info["device"] == "cuda" and "fallback" not in info
    assert (info["scenes"], info["found_in_cache"]) == (6, 1)
    calls.clear()
    fail = True
    args = S.build_parser().parse_args(argv)
    info = S.prepare_cache(args, tmp_path, 0.0)
    # the GPU fails on the first batch: everything again with the CPU processes, and the runs use the CPU
    assert calls == [("cuda", 0, 5, 3), ("cpu", 5, 5, 3), ("cpu", 5, 5, 3)]
    assert args.render_device == "cpu" and info["device"] == "cpu" and info["requested"] == "cuda"
    assert info["fallback"] == "RuntimeError: CUDA error: out of memory"


def test_prepare_cache_writes_what_the_trainings_render(tmp_path, capsys):
    """``prepare_cache`` (here rendering in this process on the CPU, as on a GPU, with one write thread)
    caches the very scenes the trainings render, and a second call renders nothing again."""
    from fast3dis_ros.data.synthetic import load_dataset
    from experiments import lora_split_study as S
    from fast3dis_ros.train.train import make_synthetic_scenes

    argv = ["--out", "x", "--scenes", "2", "--scene-seed", "7", "--scene-frames", "2", "--val-seeds", "900000",
            "--test-seeds", "930000", "--cameras", "2", "--frames", "1", "--height", str(H), "--width", str(W),
            "--objects", "3", "--gen-workers", "0", "--render-device", "cpu"]
    info = S.prepare_cache(S.build_parser().parse_args(argv), tmp_path, 0.0)
    assert (info["device"], info["scenes"], info["found_in_cache"]) == ("cpu", 4, 0)
    assert sorted(p.parent.name for p in tmp_path.glob("*/scene.json")) == [
        "scene_0000007", "scene_0000008", "scene_0900000", "scene_0930000"]
    kw = dict(cameras=2, height=H, width=W, n_objects=3)
    for seed, frames in ((8, 2), (930000, 1)):
        ref = make_synthetic_scenes([seed], frames=frames, **kw)[0]
        got = load_dataset(tmp_path / f"scene_{seed:07d}")
        assert got.config.to_dict() == ref.config.to_dict() and got.n_frames == frames
        for fa, fb in zip(got.frames, ref.frames, strict=True):
            for a, b in zip(fa, fb, strict=True):
                assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.depth, b.depth)
                assert np.array_equal(a.instance, b.instance)
    # a second study in the same cache finds every scene: nothing is rendered or written again
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    info = S.prepare_cache(S.build_parser().parse_args(argv), tmp_path, 0.0)
    assert info["found_in_cache"] == 4 and "0 rendered" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_rerun_in_the_same_folder_starts_without_the_previous_outputs(tmp_path):
    """Run B reused run A's --work: its progress lines showed run A's last step until the loop started."""
    import sys

    from experiments.lora_split_study import RUN_OUTPUTS, Run, _launch, _progress

    run = Run(split=0, seed=0, dir=tmp_path, argv=[sys.executable, "-c", "pass"])
    (tmp_path / "train_log.jsonl").write_text('{"step": 646, "loss": 7.7, "time_s": 0.15}\n')
    for name in RUN_OUTPUTS[1:]:
        (tmp_path / name).write_text("stale")
    (tmp_path / "cache").mkdir()  # anything else stays
    _launch(run, {})
    assert run.proc.wait(timeout=60) == 0
    run.log.close()
    assert not any((tmp_path / n).exists() for n in RUN_OUTPUTS) and (tmp_path / "cache").is_dir()
    assert _progress([run], 600) == "split0_seed0: starting"


# ---------------------------------------------------------------------------------- the study
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from experiments.lora_split_study import run_study

    out = tmp_path_factory.mktemp("study")
    res = run_study(["--out", str(out / "out"), "--work", str(out / "work"), "--device", "cpu", "--amp", "none",
                     "--splits", "0,5", "--steps", "2", "--scenes", "1", "--scene-frames", "2",
                     "--height", str(H), "--width", str(W), "--batch-size", "1", "--warmup-steps", "1",
                     "--val-seeds", "900000", "--test-seeds", "930000-930002", "--eval-every", "0",
                     "--parallel", "--gen-workers", "0", "--bootstrap", "20", "--no-timing",
                     "--progress-every", "5"])
    return res, out / "out"


def test_study_runs_both_splits_and_compares_costs(study):
    res, out = study
    runs = {r["split"]: r for r in res["runs"]}
    assert sorted(runs) == [0, 5] and all(r["status"] == "ok" and r["steps_run"] == 2 for r in runs.values())
    c0, c5 = runs[0]["cost"], runs[5]["cost"]
    assert c0["lora_blocks"] == [0, 1, 2, 3, 4, 5] and c5["lora_blocks"] == [5]
    assert (c0["shared_blocks"], c5["shared_blocks"]) == (0, 5)
    assert c0["lora_params"] == 6 * LORA_PER_BLOCK and c5["lora_params"] == LORA_PER_BLOCK
    assert c0["head_params"] == c5["head_params"] > 0
    assert c0["trainable_params"] - c5["trainable_params"] == 5 * LORA_PER_BLOCK
    # split 0 runs every block twice; split 5 only the last one
    assert c0["flops_rel_split0"] == 1.0 and c0["flops_rel_da3"] == pytest.approx(2.0)
    # 7 of 12 block passes; the global-attention block 5 costs a little more than a local one
    assert 7 / 12 < c5["flops_rel_split0"] < 0.65 and 1.0 < c5["flops_rel_da3"] < 1.3
    for r in runs.values():
        t = r["test"]
        assert t["n_windows"] == 3
        assert all(0.0 <= t[k] <= 1.0 for k in ("AP", "AP50", "AP25"))
        assert np.isfinite(r["train"]["loss_tail_mean"]) and r["train"]["loss_tail_mean"] > 0
        assert np.isfinite(r["val"]["val_loss"]) and "val_mv_AP25" in r["val"]
        assert r["ms_per_step"] > 0 and r["wall_s"] > 0
    assert "delta_vs_ref" in runs[5]["test"] and "delta_vs_ref" not in runs[0]["test"]
    assert not res["warnings"]
    # --device cpu: the scenes were rendered on the CPU, and the trainings were told so
    assert res["render"]["device"] == "cpu" and res["render"]["scenes"] == 1 + 1 + 3
    assert res["config"]["render_device"] == "cpu"
    assert all("--render-device cpu" in r["train_command"] for r in runs.values())


def test_study_writes_json_markdown_png_and_logs(study):
    import tarfile

    res, out = study
    data = json.loads((out / "lora_split.json").read_text())
    assert [r["split"] for r in data["runs"]] == [0, 5]
    assert data["runs"][1]["cost"]["trainable_params"] == res["runs"][1]["cost"]["trainable_params"]
    md = (out / "lora_split.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| 0 ") or l.startswith("| 5 ")]
    ratio = res["runs"][1]["cost"]["flops_rel_split0"]
    assert len(rows) == 2 and "| 5 | 5 | 5/6 |" in md and f"({ratio:.2f}x split 0, " in md
    assert "- scenes: 5, 0 of them found in the cache, the rest rendered on cpu in " in md
    for png in ("lora_split_ap.png", "lora_split_loss.png"):
        b = (out / png).read_bytes()
        assert b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 5000, png
    with tarfile.open(out / "lora_split_runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"split0_seed0/train_log.jsonl", "split5_seed0/model.safetensors", "split5_seed0/train_stdout.log"} <= names
