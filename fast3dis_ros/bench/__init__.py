"""Benchmarks (``fast3dis-bench``): kept out of the product's import graph; nothing below imports them."""
