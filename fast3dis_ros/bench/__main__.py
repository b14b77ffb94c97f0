"""``python -m fast3dis_ros.bench``: the benchmark suite (same as ``fast3dis-bench``)."""

import sys

from fast3dis_ros.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
