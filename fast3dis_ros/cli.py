"""Console entry points. Each imports its implementation lazily so `--help` stays fast and a missing
optional part (e.g. ROS for the node) never breaks the others."""

from __future__ import annotations


def demo_main() -> None:
    from fast3dis_ros.demo import main

    main()


def train_main() -> None:
    from fast3dis_ros.train.train import main

    main()


def eval_main() -> None:
    from fast3dis_ros.eval.evaluate import main

    main()


def bench_main() -> None:
    from fast3dis_ros.bench import main

    main()


def synth_main() -> None:
    from fast3dis_ros.data.synthetic import main

    main()


def export_main() -> None:
    from fast3dis_ros.deploy.export import main

    raise SystemExit(main())
