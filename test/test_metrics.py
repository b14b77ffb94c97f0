"""Tests of fast3dis_ros.eval.metrics: ScanNet 3D AP, common point set, COCO 2D mask AP, depth, pose."""

import contextlib
import io

import numpy as np
import pytest

from fast3dis_ros.eval.metrics import (
    InstanceAPEvaluator,
    align_camera_centers,
    apply_sim3,
    build_common_point_set,
    coco_mask_ap,
    depth_metrics,
    instance_ap,
    mask_ap_2d,
    pose_metrics,
    relative_pose_errors,
    transfer_labels_nn,
    umeyama,
)

# ------------------------------------------------------------------------------------------ 3D AP


def _toy_scene():
    """30 points: GT A = 0..9, GT B = 10..19, void = 20..29 (gt 0)."""
    gt = np.zeros(30, dtype=np.int64)
    gt[0:10] = 1
    gt[10:20] = 2
    return gt


def _mask(idx, n=30):
    m = np.zeros(n, dtype=bool)
    m[list(idx)] = True
    return m


def test_one_prediction_matches_one_gt_and_iou_must_exceed_the_threshold():
    """p = A u B (20 points, score 0.9): IoU 10/20 = 0.5 with each of A and B, exactly.
    IoU 0.5: strict ``>`` (ScanNet) -> no match: AP50 = 0.
    IoU 0.25: p matches A (TP); B cannot take the same prediction -> 1 hard FN: precision 1 up to
      recall 1/2 -> AP25 = 1/2 (a prediction matching both would give AP25 = 1)."""
    gt = _toy_scene()
    res = instance_ap([([_mask(range(0, 20))], np.array([0.9]), gt)])
    assert res["AP50"] == 0.0
    assert res["AP25"] == pytest.approx(0.5, abs=1e-12)


def test_perfect_prediction_ap_is_one():
    gt = _toy_scene()
    res = instance_ap([(gt.copy(), np.array([0.9, 0.3]), gt)])
    assert res["AP"] == pytest.approx(1.0)
    assert res["AP50"] == pytest.approx(1.0)
    assert res["AP25"] == pytest.approx(1.0)
    assert len(res["ap_per_threshold"]) == 9  # ScanNet: 0.50..0.90
    res_coco = instance_ap([(gt.copy(), np.array([0.9, 0.3]), gt)], iou_thresholds="coco")
    assert len(res_coco["ap_per_threshold"]) == 10 and res_coco["AP"] == pytest.approx(1.0)


def test_hand_computed_two_gt_three_preds():
    """p1 (0.90) = pts 0..7  -> IoU(A) = 8/10 = 0.8
    p3 (0.85) = pts 0..5  -> IoU(A) = 6/10 = 0.6 (a duplicate of A)
    p2 (0.80) = pts 10..13 -> IoU(B) = 4/10 = 0.4

    IoU 0.5: A -> TP 0.90, p3 is a second match of A -> FP 0.85; B unmatched -> 1 hard FN;
      p2 matches nothing and is not on void -> FP 0.80.
      ascending scores .80(0) .85(0) .90(1), n_true = 1, hard FN = 1:
        at .80: tp 1 fp 2 fn 1 -> P 1/3 R 1/2;  at .85: P 1/2 R 1/2;  at .90: P 1 R 1/2;  end P 1 R 0
      ScanNet steps (r[k-1] - r[k+1]) / 2 with r[-1] = r[0], r[n] = 0: 0, 0, 1/4, 1/4
      AP50 = 1 * 1/4 + 1 * 1/4 = 1/2.
    IoU 0.25: A -> TP 0.90, FP 0.85; B -> TP 0.80 (0.4 > 0.25); no hard FN.
      ascending .80(1) .85(0) .90(1), n_true = 2:
        at .80: tp 2 fp 1 fn 0 -> P 2/3 R 1;  at .85: tp 1 fp 1 fn 1 -> P 1/2 R 1/2;
        at .90: tp 1 fp 0 -> P 1 R 1/2;  end P 1 R 0
      steps: (1 - 1/2)/2, (1 - 1/2)/2, (1/2 - 0)/2, (1/2 - 0)/2 = 1/4 each
      AP25 = (2/3 + 1/2 + 1 + 1) / 4 = 19/24.
    IoU 0.55..0.75: p1 (IoU 0.8) still matches A; p3 either is a second match of A (FP 0.85) or, from
      0.60 on (strict >), matches nothing and is a plain FP 0.85 -> same (y_true, y_score) -> 1/2 each.
    IoU 0.80, 0.85, 0.90: nothing matches (strict >) -> AP 0.
    AP = (6 * 1/2 + 3 * 0) / 9 = 1/3.
    """
    gt = _toy_scene()
    masks = [_mask(range(0, 8)), _mask(range(10, 14)), _mask(range(0, 6))]
    scores = np.array([0.90, 0.80, 0.85])
    res = instance_ap([(masks, scores, gt)])
    assert res["AP50"] == pytest.approx(0.5, abs=1e-12)
    assert res["AP25"] == pytest.approx(19 / 24, abs=1e-12)
    assert res["AP"] == pytest.approx(1 / 3, abs=1e-12)
    assert res["ap_per_threshold"]["0.80"] == 0.0
    # dict input gives the same
    res2 = instance_ap([{"pred_masks": masks, "scores": scores, "gt_labels": gt}])
    assert res2["AP25"] == res["AP25"]
    # PR curve at 0.5 as computed by hand (precision, recall per distinct score + end point)
    np.testing.assert_allclose(res["curves"]["0.50"]["precision"], [1 / 3, 1 / 2, 1, 1])
    np.testing.assert_allclose(res["curves"]["0.50"]["recall"], [1 / 2, 1 / 2, 1 / 2, 0])


def test_labels_and_masks_inputs_agree_and_void_preds_are_ignored():
    gt = _toy_scene()
    labels = np.zeros(30, dtype=np.int64)
    labels[0:8] = 1
    labels[10:14] = 2
    labels[20:30] = 3  # entirely on void -> ignored (ScanNet), does not lower AP
    scores = np.array([0.9, 0.8, 0.99])
    r_lab = instance_ap([(labels, scores, gt)])
    masks = [labels == k for k in (1, 2, 3)]
    r_mask = instance_ap([(masks, scores, gt)])
    for k in ("AP", "AP50", "AP25"):
        assert r_lab[k] == pytest.approx(r_mask[k])
    r_novoid = instance_ap([(np.where(labels == 3, 0, labels), scores, gt)])
    assert r_lab["AP50"] == pytest.approx(r_novoid["AP50"])
    assert r_lab["AP25"] == pytest.approx(1.0)


def test_high_score_false_positive_lowers_ap():
    gt = _toy_scene()
    masks = [_mask(range(0, 9)), _mask(range(10, 19))]
    scores = [0.6, 0.5]
    base = instance_ap([(masks, scores, gt)])
    assert base["AP50"] == pytest.approx(1.0)
    fp = _mask([10, 11, 0, 1])  # IoU 2/18 with each GT: a false positive at every threshold
    worse = instance_ap([(masks + [fp], scores + [0.95], gt)])
    assert worse["AP50"] < base["AP50"] - 0.1
    assert worse["AP25"] < base["AP25"] - 0.1
    assert worse["AP"] < base["AP"]


def test_scenes_are_pooled_and_missing_predictions_give_zero():
    gt = _toy_scene()
    ev = InstanceAPEvaluator()
    ev.add_scene(gt.copy(), [0.9, 0.8], gt)
    ev.add_scene(np.zeros(30, dtype=np.int64), np.zeros(0), gt)  # GT but nothing predicted: 2 FN
    res = ev.compute()
    assert res["n_scenes"] == 2 and res["n_gt"] == 4 and res["n_pred"] == 2
    # y = two TPs, 2 hard FN -> P 1 at R 1/2 -> AP50 = 1/2
    assert res["AP50"] == pytest.approx(0.5)
    only_fn = InstanceAPEvaluator()
    only_fn.add_scene(np.zeros(30, dtype=np.int64), np.zeros(0), gt)
    assert only_fn.compute()["AP50"] == 0.0
    no_gt = InstanceAPEvaluator()
    no_gt.add_scene(np.zeros(30, dtype=np.int64), np.zeros(0), np.zeros(30, dtype=np.int64))
    assert np.isnan(no_gt.compute()["AP"])


# ---------------------------------------------------------------------------- common point set


def _plane_views(shift_px: int):
    """Two fronto-parallel views of the plane z = 2; pixel footprint 0.01 m, view 1 shifted by
    ``shift_px`` pixels in x. A square object (id 7) at plane x in [0.10, 0.30), y in [0.10, 0.30)."""
    H, W = 40, 40
    f, z = 200.0, 2.0  # footprint z / f = 0.01
    K = np.array([[f, 0, 0], [0, f, 0], [0, 0, 1.0]])
    depth = np.full((2, H, W), z, dtype=np.float32)
    T_world_cam = np.stack([np.eye(4), np.eye(4)])
    T_world_cam[1, 0, 3] = shift_px * 0.01
    inst = np.zeros((2, H, W), dtype=np.int32)
    for v in range(2):
        xs = (np.arange(W) + 0.5) * 0.01 + T_world_cam[v, 0, 3]
        ys = (np.arange(H) + 0.5) * 0.01
        inside = ((ys >= 0.10) & (ys < 0.30))[:, None] & ((xs >= 0.10) & (xs < 0.30))[None, :]
        inst[v][inside] = 7
    return depth, inst, np.stack([K, K]), T_world_cam


def test_common_point_set_counts_shared_surface_once():
    depth, inst, K, Twc = _plane_views(shift_px=20)
    pred = np.where(inst > 0, 3, 0)[:, ::2, ::2]  # predicted at half resolution, global id 3
    single = build_common_point_set(depth[:1], inst[:1], K[:1], pred[:1], T_world_cam=Twc[:1], voxel_size=0.02)
    both = build_common_point_set(depth, inst, K, pred, T_world_cam=Twc, voxel_size=0.02)
    assert len(single) == 20 * 20  # 40x40 pixels of 0.01 m into 0.02 m voxels
    assert len(both) == 20 * 30  # union spans 60 pixels in x: the 20 shared columns count once
    assert (both.n_pixels[both.n_pixels > 4] == 8).sum() == 20 * 10  # shared voxels hold both views' pixels
    # the object is 0.2 x 0.2 m = 10 x 10 voxels, seen by both views but counted once
    assert (both.gt_labels == 7).sum() == 100
    assert np.array_equal(both.pred_labels > 0, both.gt_labels > 0)
    res = instance_ap([(both.pred_labels, np.array([0.1, 0.2, 0.9]), both.gt_labels)])
    assert res["AP"] == pytest.approx(1.0)
    # T_cam_world input gives the same set; pixel_voxel maps every valid pixel
    again = build_common_point_set(depth, inst, K, pred, T_cam_world=np.linalg.inv(Twc), voxel_size=0.02)
    assert len(again) == len(both) and (again.pixel_voxel >= 0).all()


def test_transfer_labels_nn_after_sim3():
    rng = np.random.default_rng(0)
    gt_xyz = rng.uniform(-1, 1, (500, 3))
    gt_lab = (gt_xyz[:, 0] > 0).astype(np.int64) + 1
    s, R, t = 0.5, _rot([0.3, -0.2, 0.5]), np.array([1.0, 2.0, -1.0])
    pred_xyz = (gt_xyz - t) @ R / s  # so gt = s R pred + t
    lab, d = transfer_labels_nn(pred_xyz, gt_lab, gt_xyz, max_dist=1e-6, sim3_gt_pred=(s, R, t))
    assert np.array_equal(lab, gt_lab) and d.max() < 1e-9
    far = np.array([[10.0, 10.0, 10.0]])
    lab2, _ = transfer_labels_nn(pred_xyz, gt_lab, far, max_dist=0.1, sim3_gt_pred=(s, R, t))
    assert lab2[0] == 0


# ------------------------------------------------------------------------------------------ 2D AP


def _rand_images(seed, n_img=6, H=24, W=32):
    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(n_img):
        gts = []
        for _ in range(rng.integers(0, 5)):
            y0, x0 = rng.integers(0, H - 4), rng.integers(0, W - 4)
            h, w = rng.integers(3, H - y0 + 1), rng.integers(3, W - x0 + 1)
            m = np.zeros((H, W), bool)
            m[y0 : y0 + h, x0 : x0 + w] = True
            gts.append(m)
        dts = []
        for g in gts:  # most GT get a detection of random quality (some duplicates)
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                m = g & (rng.random((H, W)) > rng.uniform(0, 0.6))
                dts.append(np.roll(m, rng.integers(-1, 2, size=2), (0, 1)) if rng.random() < 0.3 else m)
        for _ in range(rng.integers(0, 3)):  # false positives
            dts.append(rng.random((H, W)) < 0.1)
        sc = np.round(rng.random(len(dts)), 1)  # ties on purpose
        imgs.append((np.array(dts, bool).reshape(-1, H, W), sc, np.array(gts, bool).reshape(-1, H, W)))
    return imgs


def _pycocotools_ap(imgs):
    from pycocotools import mask as mu
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    H, W = imgs[0][0].shape[1:]
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "obj"}]}
    dts, aid = [], 1
    for i, (dm, ds, gm) in enumerate(imgs):
        gt["images"].append({"id": i + 1, "height": H, "width": W})
        for m in gm:
            rle = mu.encode(np.asfortranarray(m.astype(np.uint8)))
            gt["annotations"].append(
                {"id": aid, "image_id": i + 1, "category_id": 1, "segmentation": rle, "area": float(m.sum()), "iscrowd": 0, "bbox": list(mu.toBbox(rle))}
            )
            aid += 1
        for m, s in zip(dm, ds):
            dts.append({"image_id": i + 1, "category_id": 1, "segmentation": mu.encode(np.asfortranarray(m.astype(np.uint8))), "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = gt
        c.createIndex()
        E = COCOeval(c, c.loadRes(dts), "segm")
        E.params.useCats = 0
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats, E.eval["precision"][:, :, 0, 0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_mask_ap_2d_matches_pycocotools(seed):
    imgs = _rand_images(seed)
    ours = coco_mask_ap(imgs)
    stats, prec = _pycocotools_ap(imgs)
    assert 0.05 < stats[0] < 0.95  # a non-trivial case
    assert ours["AP"] == pytest.approx(stats[0], abs=1e-12)
    assert ours["AP50"] == pytest.approx(stats[1], abs=1e-12)
    assert ours["AP75"] == pytest.approx(stats[2], abs=1e-12)
    np.testing.assert_allclose(ours["precision"], prec, atol=1e-12)


def test_mask_ap_2d_label_maps():
    gt = np.zeros((2, 8, 8), dtype=np.int32)
    gt[0, :4, :4] = 1
    gt[1, 4:, 4:] = 5
    gt[1, :2, :2] = 6
    assert mask_ap_2d(gt.copy(), np.ones(6), gt)["AP"] == pytest.approx(1.0)
    pred = gt[:, ::2, ::2]  # half resolution, nearest-upsampled back: still exact for these blocks
    assert mask_ap_2d(pred, np.ones(6), gt)["AP"] == pytest.approx(1.0)
    missing = np.where(gt == 6, 0, gt)
    r = mask_ap_2d(missing, np.ones(6), gt)
    assert r["AP"] == pytest.approx(2 / 3 * 101 / 101, abs=0.01)  # recall 2/3 at precision 1


# ---------------------------------------------------------------------------------------- depth


def test_depth_metrics_exact():
    gt = np.array([[[1.0, 2.0], [4.0, 0.0]]])  # 0 = invalid
    pred = np.array([[[1.0, 2.5], [3.0, 7.0]]])
    r = depth_metrics(pred, gt, scale="none")
    # rel errors 0, 0.25, 0.25 -> 1/6; ratios 1, 1.25 (not < 1.25), 4/3 -> delta1 = 1/3
    assert r["abs_rel"] == pytest.approx(1 / 6)
    assert r["delta1"] == pytest.approx(1 / 3)
    assert r["n_valid"] == 3
    # a scaled prediction is exact after median scaling (per view and global) or the right scale
    gt2 = np.random.default_rng(0).uniform(1, 5, (3, 4, 5))
    for scale in ("median", "global_median", 0.5):
        r2 = depth_metrics(gt2 * 2.0, gt2, scale=scale, return_errors=True)
        assert r2["abs_rel"] == pytest.approx(0.0, abs=1e-12) and r2["delta1"] == 1.0
        assert r2["abs_rel_errors"].shape == (60,)
    per_view = gt2 * np.array([1.0, 2.0, 3.0])[:, None, None]
    assert depth_metrics(per_view, gt2, scale="median")["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert depth_metrics(per_view, gt2, scale="global_median")["abs_rel"] > 0.1


# ----------------------------------------------------------------------------------------- pose


def _rot(w):
    w = np.asarray(w, dtype=np.float64)
    th = np.linalg.norm(w)
    if th == 0:
        return np.eye(3)
    k = w / th
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * Kx + (1 - np.cos(th)) * Kx @ Kx


def _gt_cameras(V=8, seed=0):
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (V, 1, 1))
    for v in range(V):
        T[v, :3, :3] = _rot(rng.normal(0, 0.4, 3))
        T[v, :3, 3] = rng.normal(0, 1.0, 3)
    return T  # T_cam_world


def _sim3_world(T_cam_world, s, R, t):
    """The same cameras expressed in a world x' = s R x + t (distances scale by s):
    x_c' = s x_c = R_c R^T x' + (s t_c - R_c R^T t)."""
    out = np.tile(np.eye(4), (len(T_cam_world), 1, 1))
    out[:, :3, :3] = T_cam_world[:, :3, :3] @ R.T
    out[:, :3, 3] = s * T_cam_world[:, :3, 3] - out[:, :3, :3] @ t
    return out


def test_umeyama_recovers_sim3():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(20, 3))
    s, R, t = 2.5, _rot([0.1, 0.7, -0.3]), np.array([0.5, -1, 2])
    s2, R2, t2 = umeyama(src, s * src @ R.T + t)
    assert s2 == pytest.approx(s) and np.allclose(R2, R) and np.allclose(t2, t)


def test_align_camera_centers_rotation_fallback_is_the_chordal_mean_sum():
    """The < 3 view / collinear fallback gives bit for bit the projection of sum_v R_gt_v^T R_pred_v."""
    from fast3dis_ros.geometry.rotations import nearest_rotation

    rng = np.random.default_rng(7)
    gt = _gt_cameras()
    for V in (1, 2, 3, 5):
        for _ in range(20):
            pred = gt[:V].copy()
            for v in range(V):
                pred[v, :3, :3] = _rot(rng.normal(0, 0.3, 3)) @ pred[v, :3, :3]
            if V >= 3:  # collinear camera centres: the fallback path
                c = np.outer(rng.normal(size=V), rng.normal(size=3))
                pred[:, :3, 3] = -np.einsum("vij,vj->vi", pred[:, :3, :3], c)
            R_ref = nearest_rotation(sum(gt[v, :3, :3].T @ pred[v, :3, :3] for v in range(V)))
            _, R, _ = align_camera_centers(pred, gt[:V])
            assert np.array_equal(R, R_ref)


def test_pose_auc_one_for_sim3_copy_and_drops_with_noise():
    gt = _gt_cameras()
    s, R, t = 0.37, _rot([0.5, -0.4, 0.2]), np.array([3.0, -2.0, 0.5])
    pred = _sim3_world(gt, s, R, t)
    for v in range(len(gt)):  # still rigid transforms
        assert np.allclose(pred[v, :3, :3] @ pred[v, :3, :3].T, np.eye(3))
    r = pose_metrics(pred, gt)
    assert r["auc3"] == pytest.approx(1.0) and r["auc30"] == pytest.approx(1.0)
    assert r["ate_rmse"] < 1e-9 and r["sim3_scale"] == pytest.approx(1 / s)
    assert r["n_pairs"] == 28
    # sim3 from alignment maps predicted centres onto GT ones
    sa, Ra, ta = align_camera_centers(pred, gt)
    cp = -np.einsum("vji,vj->vi", pred[:, :3, :3], pred[:, :3, 3])
    cg = -np.einsum("vji,vj->vi", gt[:, :3, :3], gt[:, :3, 3])
    assert np.allclose(apply_sim3((sa, Ra, ta), cp), cg)
    # two views: rotation-based fallback still aligns
    s2, R2, t2 = align_camera_centers(pred[:2], gt[:2])
    assert np.allclose(apply_sim3((s2, R2, t2), cp[:2]), cg[:2])
    rng = np.random.default_rng(3)
    prev = 1.0
    for sigma in (0.02, 0.1):  # radians of rotation noise per camera
        noisy = pred.copy()
        for v in range(len(gt)):
            noisy[v, :3, :3] = _rot(rng.normal(0, sigma, 3)) @ noisy[v, :3, :3]
        rn = pose_metrics(noisy, gt)
        assert rn["auc30"] < prev and rn["auc3"] <= rn["auc30"]
        prev = rn["auc30"]
    assert prev < 0.9
    rerr, terr = relative_pose_errors(pred, gt)
    assert rerr.max() < 1e-5 and terr.max() < 1e-5
