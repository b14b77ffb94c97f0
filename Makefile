# The two commands of the README. Both set everything up first (idempotent, see scripts/setup.sh).
.PHONY: setup demo test bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/fast3dis-demo --out outputs/demo

test: setup
	ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST .venv/bin/python -m pytest -q test

bench: setup
	.venv/bin/fast3dis-bench --size tiny --device cpu --views 2 4 8
