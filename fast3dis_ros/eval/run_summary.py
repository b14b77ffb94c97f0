"""The "what happened" block that ends every ``fast3dis-eval`` and ``fast3dis-demo`` run, and its verdict.

A newcomer should not have to read ``accounting.json`` to learn that a run did nothing useful (issue 19).
:func:`build_summary` condenses the replay's accounting, the ground truth and the scored views into:
cameras found (and the stream each one reads), calibration used (known / estimated / mixed, with the
reason per camera), frames and frame sets processed / dropped with reasons, views scored and the ones that
could not be, warnings, and the **verdict**: an exit code with the likely cause and the fix when the run
processed no frame set (3), scored no view although ground truth was expected (3), or its accounting does
not add up (1). :func:`format_summary` prints it; :func:`append_to_report` puts the same text in report.md.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

__all__ = ["EXIT_OK", "EXIT_UNBALANCED", "EXIT_NOTHING", "calibration_mode", "build_summary", "format_summary",
           "append_to_report"]

EXIT_OK = 0
EXIT_UNBALANCED = 1  # accounting identities do not hold
EXIT_NOTHING = 3  # no frame set processed, or no view scored although ground truth was expected

_GT_FIX = {
    "pose": "GT poses are TF transforms {world} -> <camera frame>; map the TF child frame to its camera with "
            "--camera-map <frame>=<camera>",
    "depth": "GT depth is read from <stream>/depth_gt; map the stream with --camera-map <stream>=<camera>",
    "instance": "GT instances are read from <stream>/instance_gt; map the stream with --camera-map "
                "<stream>=<camera>",
    "K": "GT K comes from the camera's CameraInfo or the GT JSON's \"K\" entry; add one of them",
}


def calibration_mode(per_camera: dict[str, dict]) -> str:
    """``known`` (every frame had its K), ``estimated`` (none had), ``mixed``, or ``none`` (no frames)."""
    known = sum(c.get("known", 0) for c in per_camera.values())
    total = sum(sum(c.values()) for c in per_camera.values())
    if total == 0:
        return "none"
    return "known" if known == total else ("estimated" if known == 0 else "mixed")


def _calibration(acc: dict) -> dict:
    cal = acc.get("calibration") or {}
    per = {}
    for cam in acc.get("cameras", []):
        c = cal.get(cam) or {}
        est = {k: v for k, v in c.items() if k != "known"}
        if not c:
            per[cam] = "no frames"
        elif not est:
            per[cam] = "known (CameraInfo)"
        else:
            why = ", ".join(f"{k} ({v})" for k, v in sorted(est.items()))
            per[cam] = f"estimated: {why}" if not c.get("known") else f"known {c['known']}, estimated: {why}"
    return {"mode": calibration_mode(cal), "per_camera": per}


def _nothing_processed(acc: dict, slop_ms: float | None, window_size: int | None) -> str:
    fr, fs = acc["frames"], acc["frame_sets"]
    cams = acc.get("cameras", [])
    per = fr.get("read_per_camera", {})
    if fr["read"] == 0:
        return (f"no image message was read for cameras {cams}: the streams {acc.get('streams')} are empty. "
                "Fix: check the topics with --cameras / --image-topics / --camera-map")
    silent = [c for c in cams if per.get(c, 0) == 0]
    if silent:
        return (f"camera(s) {silent} sent no image (others: {per}); a frame set needs every camera. Fix: leave "
                f"them out of --cameras, or map their streams with --camera-map")
    rej = fr.get("rejected", {})
    if rej and sum(rej.values()) >= fr["read"]:
        return f"every frame was rejected ({rej}); see the log for the first reasons"
    drops = fr.get("dropped_by_sync", {})
    if fs["received"] == 0:
        slop = f"--slop-ms {slop_ms:g}" if slop_ms is not None else "the sync slop"
        return (f"the cameras' frames never fell within {slop} of each other, so no frame set formed (frames "
                f"dropped by sync: {drops}). Fix: raise --slop-ms, or check that all cameras stamp with the "
                f"same clock")
    errs = acc.get("errors") or []
    if errs:
        return f"inference failed on every window: {errs[0]}"
    return (f"{fs['received']} frame sets formed but none was processed (dropped: {fs.get('dropped')}); "
            f"window size {window_size}")


def _gt_parts(gt) -> bool:
    """Does the GT bag carry any ground truth at all (so that scoring was expected)?"""
    return bool(gt is not None and (gt.depth or gt.instance or gt.instances or
                                    any(u.endswith(("/depth_gt", "/instance_gt")) for u in gt.unmatched)))


def _unscored(sv) -> dict[str, dict[str, int]]:
    """camera -> {"no GT <parts>": views} for the views ``select_views`` could not score."""
    out: dict[str, Counter] = {}
    for (cam, _st), missing in (getattr(sv, "skipped", None) or {}).items():
        out.setdefault(cam, Counter())[("no GT " + " + ".join(missing))] += 1
    return {c: dict(v) for c, v in out.items()}


def _nothing_scored(unscored: dict, gt, world_frame: str = "map") -> str:
    missing = Counter()
    for per in unscored.values():
        for why, n in per.items():
            for part in why[len("no GT "):].split(" + "):
                missing[part] += n
    parts = [p for p, _ in missing.most_common()]
    cams = sorted(unscored)
    lines = [f"no view could be scored: views of {cams} lack GT {', '.join(parts) or 'data'}"]
    if gt is not None:
        have = {"depth": sorted(gt.depth), "instance": sorted(gt.instance), "pose": sorted(gt.T_world_cam),
                "K": sorted(gt.K)}
        lines.append("GT found for cameras: " + "; ".join(f"{k}: {v}" for k, v in have.items()))
        if gt.unmatched:
            lines.append(f"GT that matches no camera: {gt.unmatched}")
    for p in parts:
        lines.append("Fix: " + _GT_FIX.get(p, p).format(world=world_frame))
    return ". ".join(lines)


def build_summary(acc: dict, *, gt=None, scored=None, gt_expected: bool | None = None, weights_info=None,
                  slop_ms: float | None = None, window_size: int | None = None) -> dict:
    """Everything the "what happened" block says, as a dict (also written to accounting.json/metrics.json).

    ``gt``: the ``GroundTruth`` read (None: not read); ``scored``: the ``ScoredViews`` (None: not scored);
    ``gt_expected``: whether scoring was expected (default: the GT bag carries some ground truth)."""
    fr, fs = acc["frames"], acc["frame_sets"]
    cams = list(acc.get("cameras", []))
    streams = acc.get("streams") or {}
    warnings = list(acc.get("stream_notes") or [])
    for t in acc.get("streams_unmatched") or []:
        warnings.append(f"{t} matches no camera of {cams}: not read (map it with --camera-map <stream>=<camera>)")
    cal = _calibration(acc)
    for cam, c in (acc.get("calibration") or {}).items():
        est = {k: v for k, v in c.items() if k != "known"}
        if est:
            warnings.append(f"camera {cam}: {sum(est.values())} frame(s) without a usable K ("
                            + ", ".join(sorted(est)) + "): the network estimates K for those views")
    per = fr.get("read_per_camera") or {}
    if len(per) > 1 and max(per.values()) > 0 and min(per.values()) < 0.75 * max(per.values()):
        slow = min(per, key=per.get)
        stale = (fr.get("dropped_by_sync") or {}).get("stale", 0)
        warnings.append(f"camera {slow} sent {per[slow]} images, others up to {max(per.values())}: frame sets "
                        f"follow the slowest camera ({stale} frames of the others dropped by sync as 'stale')")
    if weights_info and weights_info.get("random_weights"):
        warnings.append("WEIGHTS ARE RANDOM (no checkpoint found): outputs are not meaningful")
    if acc.get("errors"):
        warnings.append(f"{len(acc['errors'])} window(s) failed: {acc['errors'][0]}")
    expected = _gt_parts(gt) if gt_expected is None else bool(gt_expected)
    views = None
    if scored is not None or expected:
        unscored = _unscored(scored) if scored is not None else {}
        n_scored = len(scored) if scored is not None else 0
        n_unscored = sum(sum(v.values()) for v in unscored.values())
        views = {"scored": n_scored, "unscored": n_unscored, "unscored_by_camera": unscored}
        if gt is not None:
            views["gt_K_source"] = dict(getattr(gt, "K_source", {}))
        for cam, why in unscored.items():
            if n_scored:
                warnings.append(f"camera {cam}: {sum(why.values())} view(s) not scored ({', '.join(why)})")
        if gt is not None and gt.unmatched:
            warnings.append(f"ground truth that matches no camera: {gt.unmatched}")
    code, reason = EXIT_OK, ""
    if fs.get("processed", 0) == 0:
        code, reason = EXIT_NOTHING, "no frame set was processed: " + _nothing_processed(acc, slop_ms, window_size)
    elif expected and (views is None or views["scored"] == 0):
        code, reason = EXIT_NOTHING, _nothing_scored((views or {}).get("unscored_by_camera", {}), gt)
    elif not acc.get("balanced", True):
        code, reason = EXIT_UNBALANCED, ("the accounting does not add up (see accounting.json 'identities'); "
                                         "please report this with the bag")
    return {
        "cameras": {c: (f"{streams[c]['image_topic']} ({streams[c]['transport']}), CameraInfo "
                        f"{streams[c]['camera_info_topic'] or 'none'}" if c in streams else "") for c in cams},
        "calibration": cal,
        "frames": {"read": fr["read"], "per_camera": per, "rejected": fr.get("rejected", {}),
                   "dropped_by_sync": fr.get("dropped_by_sync", {})},
        "frame_sets": {"received": fs.get("received", 0), "processed": fs.get("processed", 0),
                       "dropped": fs.get("dropped", {})},
        "windows_fused": acc.get("windows", {}).get("fused", 0),
        "views": views,
        "warnings": warnings,
        "exit": {"code": code, "reason": reason},
    }


def _counts(d: dict) -> str:
    d = {k: v for k, v in (d or {}).items() if v}
    return "none" if not d else ", ".join(f"{k} {v}" for k, v in sorted(d.items()))


def format_summary(s: dict, markdown: bool = False) -> str:
    """The block as plain text (console) or markdown (report.md)."""
    b = "- " if markdown else "  "
    cal = s["calibration"]
    lines = ["## What happened" if markdown else "=== what happened ===",
             f"{b}cameras ({len(s['cameras'])}): " + "; ".join(f"{c} <- {v}" for c, v in s["cameras"].items()),
             f"{b}calibration: {cal['mode']} (" + "; ".join(f"{c}: {v}" for c, v in cal["per_camera"].items()) + ")",
             f"{b}frames: read {s['frames']['read']} (" + _counts(s["frames"]["per_camera"]) + "), rejected "
             f"{_counts(s['frames']['rejected'])}, dropped by sync {_counts(s['frames']['dropped_by_sync'])}",
             f"{b}frame sets: processed {s['frame_sets']['processed']} of {s['frame_sets']['received']}, dropped "
             f"{_counts(s['frame_sets']['dropped'])}; windows fused {s['windows_fused']}"]
    v = s.get("views")
    if v is not None:
        lines.append(f"{b}views scored: {v['scored']}, not scored: {v['unscored']}" + (
            " (" + "; ".join(f"{c}: {_counts(r)}" for c, r in v["unscored_by_camera"].items()) + ")"
            if v["unscored"] else ""))
    else:
        lines.append(f"{b}views scored: no ground truth in the bag (nothing to score)")
    lines.append(f"{b}warnings: " + ("none" if not s["warnings"] else ""))
    lines += [f"{b}  - {w}" for w in s["warnings"]]
    e = s["exit"]
    lines.append(f"{b}result: " + ("OK" if e["code"] == 0 else f"FAILED (exit {e['code']}): {e['reason']}"))
    return "\n".join(lines)


def append_to_report(report_md: str | Path, summary: dict, title: str = "FAST3DIS evaluation") -> Path:
    """Append the block to ``report_md`` (created with ``title`` when the run wrote no report)."""
    p = Path(report_md)
    head = p.read_text() if p.is_file() else f"# {title}\n"
    p.write_text(head.rstrip("\n") + "\n\n" + format_summary(summary, markdown=True) + "\n")
    return p
