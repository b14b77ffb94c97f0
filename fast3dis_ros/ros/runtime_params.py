"""Which parameters may change while the node runs, and why the others may not.

``params.PARAMS`` marks run-time parameters with ``read_only=False``; the node's set-parameters callback
applies those at once. A start-up-only parameter is refused while the node is configured, with the
reason below (what it builds at configure) and the way to change it. A lifecycle node takes every
parameter while unconfigured (they are read at configure).
"""

from __future__ import annotations

from . import params as P

__all__ = ["RUNTIME", "START_UP_REASON", "refusal"]

RUNTIME = frozenset(p.name for p in P.PARAMS if not p.read_only)

# what a start-up-only parameter is built into at configure (why a running node cannot take a new value)
START_UP_REASON: dict[str, str] = {
    "cameras": "the subscriptions, the frame-set synchroniser and the view order of every window",
    "image_topic": "the image subscriptions",
    "camera_info_topic": "the CameraInfo subscriptions",
    "use_compressed": "the CompressedImage subscriptions",
    "compressed_topic": "the CompressedImage subscriptions",
    "sync_slop": "the frame-set synchroniser (frames already matched would mix two rules)",
    "sync_queue_size": "the frame-set synchroniser's buffers",
    "sync_backend": "the frame-set synchroniser",
    "sync_queue_max_mb": "the frame-set synchroniser's byte budget",
    "time_jump_threshold": "the frame-set synchroniser's timeline (a new rule would judge frames already held)",
    "time_jump_confirm": "the frame-set synchroniser's timeline (frames held for a jump are counted under it)",
    "time_jump_policy": "the pipeline's reaction to a time jump",
    "camera_map": "the image and CameraInfo subscriptions (topics from the camera streams)",
    "min_image_side": "the image geometry guard",
    "max_image_aspect": "the image geometry guard",
    "max_distortion_px": "the cached CameraInfo intrinsics (K already accepted or refused per camera)",
    "window_size": "the sliding window and the CUDA graph shape",
    "stride": "the sliding window (windows in flight share frame sets)",
    "process_long_edge": "the model input size (CUDA graphs, compiled kernels)",
    "model_size": "the loaded model",
    "weights": "the loaded model",
    "checkpoint": "the loaded model",
    "seed": "the loaded (random) model",
    "backend": "the loaded network engine (torch, onnxruntime or tensorrt)",
    "engine": "the loaded exported network",
    "device": "the loaded model and its memory",
    "cuda_graphs": "the captured CUDA graphs",
    "compile": "the compiled model",
    "queue_depth": "the inference engine's queue",
    "voxel_size": "the map's voxel grid (existing voxels would not fit the new size)",
    "max_map_points": "the map's preallocated storage",
    "fusion_threads": "the fusion worker pool",
    "camera_frame": "the TF frame names already published (a rename would leave stale frames)",
    "map_frame": "the frame of the map and of every output",
    "use_known_poses": "the TF listener and the map alignment mode",
    "known_pose_frame": "the map alignment to the input TF tree",
    "condition_on_known_poses": "the loaded model's pose conditioning and the map alignment mode",
    "use_rig_extrinsics": "the TF listener and the map's metric scale from the rig",
    "rig_frame": "the rig extrinsics looked up once per camera (static transforms)",
    "link_2d": "the map's instance linking (ids already given would follow two rules)",
    "instance_vote_weight": "the map's voxel votes (votes already cast would follow two rules)",
    "support_windows": "the map's instance scores already published",
    "output_qos_depth": "the output publishers",
    "autostart": "the start-up sequence",
    "warmup_width": "the warm-up at configure",
    "warmup_height": "the warm-up at configure",
}


def refusal(name: str, lifecycle: bool) -> str:
    """The reason a running node refuses a new value of the start-up-only parameter ``name``."""
    what = START_UP_REASON.get(name, "the node's set-up")
    how = ("deactivate and clean up the node (ros2 lifecycle set <node> deactivate / cleanup), set it, then "
           "configure and activate" if lifecycle else "restart the node with the new value")
    return f"{name} is start-up only: it sets up {what}; to change it, {how}"
