"""Console entry points. Each imports its implementation lazily so `--help` stays fast and a missing
optional part (e.g. ROS for the node) never breaks the others."""

from __future__ import annotations

import sys


def demo_main() -> None:
    from fast3dis_ros.demo import main

    main()


def train_main() -> None:
    from fast3dis_ros.train.train import main

    main()


def eval_main() -> None:
    """``fast3dis-eval``: one bag (``eval/evaluate.py``), or with ``--bags`` a folder / list of bags sharded
    over torchrun ranks into one pooled report (``eval/sharded.py``)."""
    if "--bags" in sys.argv[1:]:
        from fast3dis_ros.eval.sharded import run_many

        raise SystemExit(run_many(sys.argv[1:]))
    from fast3dis_ros.eval.evaluate import main

    main()


def bench_main() -> None:
    from fast3dis_ros.bench.suite import main

    main()


def synth_main() -> None:
    from fast3dis_ros.data.synthetic import main

    main()


def play_main() -> None:
    """fast3dis-play: replay a rosbag2 over DDS without rosbag2 (ros/player.py)."""
    from fast3dis_ros.ros.player import main

    sys.exit(main())


def export_main() -> None:
    """fast3dis-export: the FAST3DIS forward as ONNX for a fixed window shape (deploy/export.py)."""
    from fast3dis_ros.deploy.export import main

    raise SystemExit(main())
