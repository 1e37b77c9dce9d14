"""Benchmarks: ``python -m quicmesh.bench <name>`` or ``quicmesh bench <name>``.

Each benchmark prints ratios against a baseline measured in the same run, since
these machines are noisy; none of them asserts a speed.
"""
